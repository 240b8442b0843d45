"""The per-sequence zarr v3 capture store, ``capture.zarr``.

Layout: one chunk per (camera, frame), so a camera's frames are written by exactly one writer
(parallel per-camera writers never share a chunk) and a random-pixel training batch from one
(camera, t) decodes exactly one chunk. Stage bookkeeping lives in ``attrs["stages"]``.

Nothing silently wrong: zarr answers a read of a chunk that is not on disk with the fill value, so a
deleted chunk would read as a black frame or an empty matte. Every array is therefore handed out as a
:class:`CheckedArray`, whose reads verify that each chunk they touched exists, and every chunk is written
even when it equals the fill value (an empty matte is data, not absence). A missing chunk raises
:class:`MissingChunkError` naming the array, camera and frame.

Crash-safe rebuilds: :meth:`CaptureStore.rebuild` first writes a marker file beside the store
(``capture.zarr.incomplete``), then deletes and re-creates the store; :meth:`CaptureStore.seal` removes
the marker once the writer has recorded its stage. A writer killed in between (even mid-delete, with
``zarr.json`` files gone and orphan chunks left) leaves the marker, so :meth:`CaptureStore.open` refuses
the store with a message that says to run ingest again, and ingest rebuilds it from nothing. Marking
and rebuilding in place (rather than building beside and swapping) needs no rename of a folder, which
object stores cannot do atomically, and no second copy of the frames on disk.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import zarr
import zarr.storage
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.sync import sync

from storage import uri as uris
from storage.chunk_writer import ChunkWriter
from storage.errors import ArraysDroppedError, CaptureStoreError, MissingChunkError, UnknownCameraError
from storage.records import StageRecord

ARRAY_NAMES = ("frames", "alpha", "depth", "backgrounds")
REWRITE_MARKER_SUFFIX = ".incomplete"  # capture.zarr.incomplete: a rebuild has started and not finished
# The stage that writes each array: a missing chunk is repaired by running it again.
ARRAY_WRITERS = {"frames": "ingest", "backgrounds": "ingest", "alpha": "matte", "depth": "depth"}
# The arrays a stage's record vouches for; a record over missing chunks is not complete.
STAGE_ARRAYS = {"ingest": ("frames",), "matte": ("alpha",), "depth": ("depth",)}
FORMAT_NAME = "nersemble-pipeline/capture"
FORMAT_VERSION = 1

CameraKey = int | np.integer | str


def _frame_codec() -> ZstdCodec:
    # Ingest must keep pace with video decoding: zstd level 1 wrote camera frames about twice as fast
    # as bit-shuffled blosc-zstd 3 and compressed them as well or better (benchmarks/ingest.py).
    return ZstdCodec(level=1)


def _mask_codec() -> BloscCodec:
    # Masks are long runs of 0 and 255: bit-shuffled zstd compresses them better than plain zstd.
    return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


def _depth_codec() -> ZstdCodec:
    # Depth is mostly 0 plus smooth or quantised values: plain zstd is smaller and faster here.
    return ZstdCodec(level=3)


CODECS = ("zstd", "lz4", "none")  # all lossless: the codec changes the bytes on disk and the speed, never a value


def _codecs(codec: str) -> dict[str, Any]:
    """Compressor per array for a codec name; "zstd" is the tuned default set above."""
    if codec == "zstd":
        return {"frames": _frame_codec(), "alpha": _mask_codec(), "depth": _depth_codec(),
                "backgrounds": _frame_codec()}
    if codec == "lz4":  # faster than zstd at both ends, larger files: for fast local disks
        frames = BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle")
        return {"frames": frames, "alpha": BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
                "depth": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), "backgrounds": frames}
    if codec == "none":
        return dict.fromkeys(ARRAY_NAMES)
    raise ValueError(f"codec must be one of {', '.join(CODECS)}, got {codec!r}")


def _open_zarr_store(uri: str, *, read_only: bool) -> zarr.abc.store.Store:
    if uris.is_local(uri):
        return zarr.storage.LocalStore(uri, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(uri, read_only=read_only)


def _matrices(name: str, value: Any, cameras: list[str], shape: tuple[int, int]) -> dict[str, list[list[float]]] | None:
    """Validate per-camera matrices; one bare matrix is shared by every camera."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        shared = np.asarray(value, dtype=np.float64)
        if shared.shape != shape:
            raise ValueError(f"{name} must be a dict serial -> {shape[0]}x{shape[1]} or one shared {shape[0]}x{shape[1]}, got shape {shared.shape}")
        value = {cam: shared for cam in cameras}
    by_serial = {str(k): v for k, v in value.items()}
    missing = [c for c in cameras if c not in by_serial]
    extra = [k for k in by_serial if k not in cameras]
    if missing or extra:
        raise ValueError(f"{name} must have exactly the store's cameras; missing {missing}, unknown {extra}")
    out: dict[str, list[list[float]]] = {}
    for cam in cameras:
        m = np.asarray(by_serial[cam], dtype=np.float64)
        if m.shape != shape:
            raise ValueError(f"{name}[{cam!r}] must be {shape[0]}x{shape[1]}, got shape {m.shape}")
        if not np.all(np.isfinite(m)):
            raise ValueError(f"{name}[{cam!r}] has non-finite values")
        out[cam] = m.tolist()
    return out


def _touched_chunks(selection: Any, shape: tuple[int, ...], chunks: tuple[int, ...]) -> list[list[int]]:
    """Per dimension, the chunk indices a (basic or integer-array) selection reads."""
    sel = selection if isinstance(selection, tuple) else (selection,)
    if any(s is Ellipsis for s in sel):
        at = next(i for i, s in enumerate(sel) if s is Ellipsis)
        sel = sel[:at] + (slice(None),) * (len(shape) - len(sel) + 1) + sel[at + 1:]
    out = []
    for dim, (size, chunk) in enumerate(zip(shape, chunks)):
        s = sel[dim] if dim < len(sel) else slice(None)
        if isinstance(s, (int, np.integer)):
            out.append([(int(s) % size) // chunk] if size else [])
        elif isinstance(s, slice):
            r = range(*s.indices(size))
            if not len(r):
                out.append([])
            elif r.step == 1:
                out.append(list(range(r.start // chunk, (r[-1]) // chunk + 1)))
            else:
                out.append(sorted({i // chunk for i in r}))
        else:
            idx = np.asarray(s)
            idx = np.flatnonzero(idx) if idx.dtype == np.bool_ else idx.ravel().astype(np.int64) % max(size, 1)
            out.append(sorted({int(i) // chunk for i in idx}))
    return out


class CheckedArray:
    """A capture-store array whose reads fail on missing chunks instead of returning the fill value.

    Everything else (shape, dtype, chunks, resize, writes) is the zarr array's own.
    """

    def __init__(self, array: zarr.Array, uri: str, camera_name: Callable[[int], str], local_root: str | None):
        self._zarr, self._uri, self._camera_name, self._local_root = array, uri, camera_name, local_root

    def __getattr__(self, name: str) -> Any:
        return getattr(self._zarr, name)

    def __repr__(self) -> str:
        return f"CheckedArray({self._zarr!r})"

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self[...]
        return data if dtype is None else data.astype(dtype)

    def __getitem__(self, selection: Any) -> Any:
        data = self._zarr[selection]
        self.require_chunks(selection)
        return data

    def __setitem__(self, selection: Any, value: Any) -> None:
        with _naming_os_errors(f"{self._uri}/{self._zarr.path}"):
            self._zarr[selection] = value

    def chunk_key(self, coords: tuple[int, ...]) -> str:
        """The chunk's key relative to the store root (``frames/c/1/2/0/0/0``)."""
        return f"{self._zarr.path}/{self._zarr.metadata.encode_chunk_key(coords)}"

    def _exists(self, key: str) -> bool:
        if self._local_root is not None:
            return os.path.isfile(os.path.join(self._local_root, key))
        return bool(sync(self._zarr.store.exists(key)))

    def require_chunks(self, selection: Any) -> None:
        """Raise :class:`MissingChunkError` for the first chunk the selection touches that is not stored."""
        for coords in itertools.product(*_touched_chunks(selection, self._zarr.shape, self._zarr.chunks)):
            key = self.chunk_key(coords)
            if not self._exists(key):
                name = self._zarr.path.rsplit("/", 1)[-1]
                frame = int(coords[1]) if name != "backgrounds" else None
                raise MissingChunkError(self._uri, name, self._camera_name(int(coords[0])), frame, key,
                                        ARRAY_WRITERS.get(name, "ingest"))

    def stored_chunks(self) -> set[tuple[int, int]]:
        """(camera, frame) of every stored chunk (camera, 0 for backgrounds), from one listing."""
        prefix = f"{self._zarr.path}/c/"

        async def collect() -> list[str]:
            return [key async for key in self._zarr.store.list_prefix(prefix)]

        per_frame = not self._zarr.path.endswith("backgrounds")
        found = set()
        for key in sync(collect()):
            parts = key[len(prefix):].split("/")
            if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
                found.add((int(parts[0]), int(parts[1]) if per_frame else 0))
        return found


@contextlib.contextmanager
def _naming_os_errors(path: str) -> Iterator[None]:
    """OS errors raised mid-write (disk full) carry no file name; give them the array's, for the message."""
    try:
        yield
    except OSError as error:
        if error.filename is None and error.errno is not None:
            raise type(error)(error.errno, error.strerror or str(error), path) from error
        raise


def rewrite_marker(uri: str) -> str:
    """URI of the marker that says a rebuild of the store at ``uri`` started and has not finished."""
    return uris.normalize(uri) + REWRITE_MARKER_SUFFIX


def rewrite_interrupted(uri: str) -> bool:
    """True while a rebuild of the store at ``uri`` is unfinished (or was killed)."""
    marker = rewrite_marker(uri)
    if uris.is_local(marker):
        return os.path.exists(marker)
    fs, path = uris.filesystem(marker)
    return bool(fs.exists(path))


def _root_format(uri: str) -> str | None:
    """The ``format`` attr of the group's own zarr.json, read without zarr (works on a half-deleted store)."""
    try:
        if uris.is_local(uri):
            with open(os.path.join(uri, "zarr.json"), encoding="utf-8") as f:
                meta = json.load(f)
        else:
            fs, path = uris.filesystem(uri)
            meta = json.loads(fs.cat_file(f"{path.rstrip('/')}/zarr.json"))
    except (OSError, ValueError):
        return None
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    return attrs.get("format") if isinstance(attrs, dict) else None


class CaptureStore:
    """The per-sequence zarr v3 group capture.zarr."""

    def __init__(self, uri: str, group: zarr.Group, store: zarr.abc.store.Store):
        """Use :meth:`create` or :meth:`open`; this only wraps an already-validated group."""
        self.uri = uri
        self.group = group
        self._store = store
        self._arrays: dict[str, zarr.Array] = {}

    def __repr__(self) -> str:
        return (
            f"CaptureStore({self.uri!r}, cameras={self.n_cameras}, frames={self.n_frames}, "
            f"size={self.height}x{self.width})"
        )

    # ------------------------------------------------------------------ create / open

    @classmethod
    def create(
        cls,
        uri: str,
        *,
        cameras: list[str],
        n_frames: int,
        height: int,
        width: int,
        fps: float,
        frame_indices: list[int],
        intrinsics: Mapping[str, Any] | None,
        world_2_cam: Mapping[str, Any] | None,
        overwrite: bool = False,
        codec: str = "zstd",
    ) -> CaptureStore:
        """Allocate the group and all arrays before any writer fans out.

        ``intrinsics`` is K for the *stored* frame size. Refuses to replace an existing store
        unless ``overwrite=True``, because a store holds hours of matting/depth work.
        ``codec`` (one of :data:`CODECS`) compresses every array; it is recorded in ``attrs["codec"]``.
        """
        compressors = _codecs(codec)
        uri = uris.normalize(uri)
        cams = [str(c) for c in cameras]
        if not cams:
            raise ValueError("a capture store needs at least one camera")
        if len(set(cams)) != len(cams):
            raise ValueError(f"camera serials must be unique, got {cams}")
        if int(n_frames) < 1 or int(height) < 1 or int(width) < 1:
            raise ValueError(f"n_frames, height and width must be positive, got {n_frames}, {height}, {width}")
        n_frames, height, width = int(n_frames), int(height), int(width)
        indices = [int(i) for i in frame_indices]
        if len(indices) != n_frames:
            raise ValueError(f"frame_indices has {len(indices)} entries, expected n_frames={n_frames}")
        if not float(fps) > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        attrs = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "cameras": cams,
            "fps": float(fps),
            "frame_indices": indices,
            "intrinsics": _matrices("intrinsics", intrinsics, cams, (3, 3)),
            "world_2_cam": _matrices("world_2_cam", world_2_cam, cams, (4, 4)),
            "stages": {},
            "codec": codec,
        }
        if cls.exists(uri):
            if not overwrite:
                raise FileExistsError(
                    f"a capture store already exists at {uri}; pass overwrite=True to replace it"
                )
        store = _open_zarr_store(uri, read_only=False)
        group = zarr.create_group(store, overwrite=overwrite, attributes=attrs)
        c, t, h, w = len(cams), n_frames, height, width
        specs = {
            "frames": ((c, t, h, w, 3), (1, 1, h, w, 3), "uint8", compressors["frames"]),
            "alpha": ((c, t, h, w), (1, 1, h, w), "uint8", compressors["alpha"]),
            "depth": ((c, t, h, w), (1, 1, h, w), "float32", compressors["depth"]),
            "backgrounds": ((c, h, w, 3), (1, h, w, 3), "uint8", compressors["backgrounds"]),
        }
        for name, (shape, chunks, dtype, codec) in specs.items():
            group.create_array(
                name, shape=shape, chunks=chunks, dtype=dtype, compressors=codec,
                fill_value=0, overwrite=overwrite,
            )
        return cls(uri, zarr.open_group(store, mode="r+"), store)

    @classmethod
    def open(cls, uri: str, mode: str = "r") -> CaptureStore:
        """Open an existing store, ``"r"`` to read or ``"r+"`` to write chunks and attrs."""
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r} (use CaptureStore.create to make one)")
        uri = uris.normalize(uri)
        if rewrite_interrupted(uri):
            raise CaptureStoreError(
                f"{uri}: an ingest that was rebuilding this store did not finish (marker {rewrite_marker(uri)}); "
                f"run the ingest stage again to rebuild it"
            )
        if not cls.exists(uri):
            raise FileNotFoundError(f"no capture store at {uri} (no zarr.json there); run the ingest stage first")
        store = _open_zarr_store(uri, read_only=(mode == "r"))
        try:
            group = zarr.open_group(store, mode=mode)
        except Exception as exc:  # an array or a v2 node where a v3 group should be
            raise CaptureStoreError(f"{uri} is not a zarr v3 group, so not a capture store: {exc}") from exc
        attrs = dict(group.attrs)
        missing_attrs = [k for k in ("cameras", "fps", "frame_indices") if k not in attrs]
        members = set(group.array_keys())
        missing_arrays = [n for n in ARRAY_NAMES if n not in members]
        if missing_attrs or missing_arrays:
            raise CaptureStoreError(
                f"{uri} is a zarr group but not a capture store: missing attrs {missing_attrs}, "
                f"missing arrays {missing_arrays}"
                + ("; it is damaged: run the ingest stage again to rebuild it" if cls.is_ours(uri) else "")
            )
        return cls(uri, group, store)

    @staticmethod
    def exists(uri: str) -> bool:
        """True if a zarr node (normally a capture store) is at ``uri``."""
        uri = uris.normalize(uri)
        if uris.is_local(uri):
            return os.path.isfile(os.path.join(uri, "zarr.json"))
        fs, path = uris.filesystem(uri)
        return bool(fs.exists(f"{path.rstrip('/')}/zarr.json"))

    @staticmethod
    def is_ours(uri: str) -> bool:
        """True if the group at ``uri`` says it is a capture store (even when its arrays are damaged)."""
        return _root_format(uris.normalize(uri)) == FORMAT_NAME

    @staticmethod
    def remove(uri: str) -> None:
        """Delete everything at ``uri`` (a whole store, or what a killed writer left of one)."""
        uri = uris.normalize(uri)
        if uris.is_local(uri):
            if os.path.isdir(uri):
                shutil.rmtree(uri)
            elif os.path.exists(uri):
                os.unlink(uri)
            return
        fs, path = uris.filesystem(uri)
        if fs.exists(path):
            fs.rm(path, recursive=True)

    @classmethod
    def rebuild(cls, uri: str, **create_args: Any) -> CaptureStore:
        """Mark the store as being rebuilt, delete whatever is at ``uri`` and create it anew (see the module doc).

        The marker stays until :meth:`seal`: until then every :meth:`open` refuses the store, so a rebuild
        killed at any point is never mistaken for a store, and the next rebuild starts from nothing.
        """
        uri = uris.normalize(uri)
        marker = rewrite_marker(uri)
        if uris.is_local(marker):
            os.makedirs(os.path.dirname(marker), exist_ok=True)
            with open(marker, "w", encoding="utf-8") as f:
                f.write(json.dumps({"pid": os.getpid()}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        else:
            fs, path = uris.filesystem(marker)
            fs.pipe_file(path, b"{}\n")
        cls.remove(uri)
        return cls.create(uri, **create_args)

    def seal(self) -> None:
        """Remove the rebuild marker: call it after the writer's stage record (the store is whole again)."""
        marker = rewrite_marker(self.uri)
        if uris.is_local(marker):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(marker)
            return
        fs, path = uris.filesystem(marker)
        if fs.exists(path):
            fs.rm_file(path)

    def refresh(self) -> None:
        """Re-read the group's attrs (another process may have written calibration or records)."""
        self.group = zarr.open_group(self._store, mode="r" if self._store.read_only else "r+")

    # ------------------------------------------------------------------ arrays and attrs

    def _array(self, name: str, *, data: bool = True) -> CheckedArray:
        if name not in ARRAY_NAMES:
            raise KeyError(f"unknown array {name!r}; a capture store has {list(ARRAY_NAMES)}")
        if data:
            self._check_not_dropped(name)
        if name not in self._arrays:
            arr = self.group[name]
            assert isinstance(arr, zarr.Array)
            # Every chunk is written, even one equal to the fill value (an empty matte, a depth map with no
            # valid pixel): then "no chunk" always means "never written or lost", which reads refuse. It also
            # spares zarr comparing each chunk with the fill value, which costs as much as compressing it.
            arr = arr.with_config({"write_empty_chunks": True})
            self._arrays[name] = CheckedArray(arr, self.uri, self._camera_name,
                                              self.uri if uris.is_local(self.uri) else None)
        return self._arrays[name]

    def _camera_name(self, index: int) -> str:
        cams = self.cameras
        return f"{cams[index]} (index {index})" if 0 <= index < len(cams) else f"index {index}"

    def _check_not_dropped(self, name: str) -> None:
        """A dropped array (storage.lifecycle) must not read as zeros: say what happened and how to undo it."""
        dropped = self.group.attrs.get("dropped_arrays") or {}
        if name in (dropped.get("arrays") or ()):
            raise ArraysDroppedError(
                f"capture store {self.uri}: its {', '.join(dropped['arrays'])} arrays were dropped on "
                f"{dropped.get('at', '?')} ({dropped.get('reason', 'to save space')}); ingest the sequence again "
                "to get them back (`nersemble-pipeline ingest` or `run` re-ingests a store whose arrays were "
                "dropped, and the stages after it follow)")

    @property
    def frames(self) -> CheckedArray:
        return self._array("frames")

    @property
    def alpha(self) -> CheckedArray:
        return self._array("alpha")

    @property
    def depth(self) -> CheckedArray:
        return self._array("depth")

    @property
    def backgrounds(self) -> CheckedArray:
        return self._array("backgrounds")

    def missing_chunks(self, name: str, *, skip_unwritten_cameras: bool = False) -> list[tuple[int, int]]:
        """(camera, frame) of every chunk of ``name`` that is not stored (frame 0 for backgrounds).

        ``skip_unwritten_cameras``: a camera with no chunk at all counts as one the writer chose to leave out.
        For ``backgrounds`` only the cameras listed in ``attrs["background_cameras"]`` are expected.
        """
        arr = self._array(name)
        stored = arr.stored_chunks()
        if name == "backgrounds":
            listed = self.group.attrs.get("background_cameras") or []
            expected = [(self.camera_index(s), 0) for s in listed if s in self.cameras]
        else:
            cameras = range(arr.shape[0])
            if skip_unwritten_cameras:
                cameras = sorted({c for c, _ in stored})
            expected = [(c, t) for c in cameras for t in range(arr.shape[1])]
        return [key for key in expected if key not in stored]

    @property
    def attrs(self) -> dict[str, Any]:
        """A snapshot of the group attrs as loaded (see :meth:`refresh`)."""
        return dict(self.group.attrs)

    @property
    def cameras(self) -> list[str]:
        return [str(c) for c in self.group.attrs["cameras"]]

    @property
    def fps(self) -> float:
        return float(self.group.attrs["fps"])

    @property
    def frame_indices(self) -> list[int]:
        return [int(i) for i in self.group.attrs["frame_indices"]]

    @property
    def n_cameras(self) -> int:
        return int(self._array("frames", data=False).shape[0])

    @property
    def n_frames(self) -> int:
        return int(self._array("frames", data=False).shape[1])

    @property
    def height(self) -> int:
        return int(self._array("frames", data=False).shape[2])

    @property
    def width(self) -> int:
        return int(self._array("frames", data=False).shape[3])

    @property
    def intrinsics(self) -> dict[str, np.ndarray] | None:
        """serial -> 3x3 K (float64) for the stored frame size, or None before calibration."""
        return self._matrix_attr("intrinsics")

    @property
    def world_2_cam(self) -> dict[str, np.ndarray] | None:
        """serial -> 4x4 world-to-camera (OpenCV axes, metres), or None before calibration."""
        return self._matrix_attr("world_2_cam")

    def _matrix_attr(self, key: str) -> dict[str, np.ndarray] | None:
        value = self.group.attrs.get(key)
        if value is None:
            return None
        return {str(k): np.asarray(v, dtype=np.float64) for k, v in value.items()}

    def camera_index(self, serial: str) -> int:
        """Position of a camera serial along the camera axis."""
        cams = self.cameras
        try:
            return cams.index(str(serial))
        except ValueError:
            raise UnknownCameraError(
                f"camera {serial!r} is not in the capture store {self.uri}; known cameras: {cams}"
            ) from None

    def _cam(self, camera: CameraKey) -> int:
        if isinstance(camera, str):
            return self.camera_index(camera)
        if isinstance(camera, (bool, np.bool_)) or not isinstance(camera, (int, np.integer)):
            raise TypeError(f"camera must be an index or a serial string, got {type(camera).__name__}")
        idx = int(camera)
        if not 0 <= idx < self.n_cameras:
            raise UnknownCameraError(
                f"camera index {idx} is out of range for {self.n_cameras} cameras in {self.uri}"
            )
        return idx

    def _t(self, t: int) -> int:
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
            raise TypeError(f"frame index t must be an int, got {type(t).__name__}")
        if not 0 <= int(t) < self.n_frames:
            raise IndexError(f"frame index t={int(t)} is out of range for {self.n_frames} frames in {self.uri}")
        return int(t)

    def _update_attrs(self, updates: dict[str, Any]) -> None:
        """Read-modify-write the attrs from a fresh read, so keys other writers set survive."""
        if self._store.read_only:
            raise PermissionError(f"capture store {self.uri} is open read-only; open it with mode='r+'")
        fresh = zarr.open_group(self._store, mode="r+")
        fresh.attrs.update(updates)
        self.group = fresh

    def set_attr(self, key: str, value: Any) -> None:
        """Set one stage-owned attr (JSON-able), keeping every key other writers set meanwhile."""
        self._update_attrs({key: value})

    @property
    def holdout(self) -> dict[str, Any] | None:
        """The sequence's hold-out record (``cameras``, ``method``, ``reason``), or None before a stage chose one."""
        value = self.group.attrs.get("holdout")
        return None if value is None else dict(value)

    def set_holdout(self, record: Mapping[str, Any]) -> None:
        """Record the sequence's hold-out set (chosen by ``stages.geometry.holdout``); unknown serials are refused."""
        cameras = [str(c) for c in record.get("cameras", [])]
        unknown = [c for c in cameras if c not in self.cameras]
        if unknown:
            raise UnknownCameraError(f"hold-out camera(s) {unknown} are not in the capture store {self.uri}")
        self._update_attrs({"holdout": {**dict(record), "cameras": cameras}})

    def set_calibration(self, intrinsics: Mapping[str, Any], world_2_cam: Mapping[str, Any]) -> None:
        """Store K (for the stored frame size) and world_2_cam (4x4) for every camera."""
        cams = self.cameras
        self._update_attrs({
            "intrinsics": _matrices("intrinsics", intrinsics, cams, (3, 3)),
            "world_2_cam": _matrices("world_2_cam", world_2_cam, cams, (4, 4)),
        })

    def set_frame_count(self, n_frames: int, frame_indices: list[int] | None = None) -> None:
        """Change the time axis of frames/alpha/depth, e.g. when the videos were shorter than planned.

        Ingest allocates the store before decoding (so per-camera writers can fan out) and
        trims it afterwards. Shrinking drops the chunks past the end and truncates
        ``frame_indices``; growing needs the full new ``frame_indices``.
        """
        n_frames = int(n_frames)
        if n_frames < 1:
            raise ValueError(f"n_frames must be positive, got {n_frames}")
        if frame_indices is None:
            if n_frames > self.n_frames:
                raise ValueError(
                    f"growing {self.uri} from {self.n_frames} to {n_frames} frames needs frame_indices"
                )
            indices = self.frame_indices[:n_frames]
        else:
            indices = [int(i) for i in frame_indices]
            if len(indices) != n_frames:
                raise ValueError(f"frame_indices has {len(indices)} entries, expected {n_frames}")
        if self._store.read_only:
            raise PermissionError(f"capture store {self.uri} is open read-only; open it with mode='r+'")
        for name in ("frames", "alpha", "depth"):
            arr = self._array(name)
            arr.resize((arr.shape[0], n_frames, *arr.shape[2:]))
        self._update_attrs({"frame_indices": indices})

    # ------------------------------------------------------------------ reads

    def read_frame(self, camera: CameraKey, t: int) -> np.ndarray:
        """(H, W, 3) uint8; decodes one chunk."""
        return np.asarray(self.frames[self._cam(camera), self._t(t)])

    def read_alpha(self, camera: CameraKey, t: int) -> np.ndarray:
        """(H, W) uint8, 0 = background, 255 = foreground; decodes one chunk."""
        return np.asarray(self.alpha[self._cam(camera), self._t(t)])

    def read_depth(self, camera: CameraKey, t: int) -> np.ndarray:
        """(H, W) float32 z-depth in metres, 0 = invalid; decodes one chunk."""
        return np.asarray(self.depth[self._cam(camera), self._t(t)])

    def read_background(self, camera: CameraKey) -> np.ndarray:
        """(H, W, 3) uint8 background plate (zeros if none was written).

        Stores that list their plates (``attrs["background_cameras"]``, written by ingest) refuse a listed
        plate whose chunk is missing; an unlisted camera has no plate and reads as zeros.
        """
        c = self._cam(camera)
        listed = self.group.attrs.get("background_cameras")
        if listed is not None and self.cameras[c] not in listed:
            return np.zeros((self.height, self.width, 3), np.uint8)
        if listed is None:  # a store from before plates were listed: absence cannot be told from loss
            return np.asarray(self.backgrounds._zarr[c])
        return np.asarray(self.backgrounds[c])

    def read_frames(self, camera: CameraKey, t_start: int = 0, t_stop: int | None = None) -> np.ndarray:
        """(T', H, W, 3) uint8 for a run of frames of one camera (sequential readers: export, matting)."""
        c = self._cam(camera)
        stop = self.n_frames if t_stop is None else t_stop
        if not 0 <= t_start <= stop <= self.n_frames:
            raise IndexError(f"frame range [{t_start}, {stop}) is out of range for {self.n_frames} frames")
        return np.asarray(self.frames[c, t_start:stop])

    def read_pixels(
        self, array_name: str, camera: CameraKey, t: int | None, ys: np.ndarray, xs: np.ndarray
    ) -> np.ndarray:
        """Pixels at (ys, xs) of one (camera, t): shape ``ys.shape`` (+ ``(3,)`` for colour).

        Training samples random pixels from random (camera, t) pairs; this fetches and decodes
        only that one chunk. For ``backgrounds`` ``t`` is ignored.
        """
        arr = self._array(array_name)
        ys_arr = np.asarray(ys)
        xs_arr = np.asarray(xs)
        if ys_arr.shape != xs_arr.shape:
            raise ValueError(f"ys and xs must have the same shape, got {ys_arr.shape} and {xs_arr.shape}")
        for label, v, limit in (("ys", ys_arr, self.height), ("xs", xs_arr, self.width)):
            if v.size and not np.issubdtype(v.dtype, np.integer):
                raise TypeError(f"{label} must be integers, got {v.dtype}")
            if v.size and (v.min() < 0 or v.max() >= limit):
                raise IndexError(f"{label} out of range [0, {limit}): min {v.min()}, max {v.max()}")
        c = self._cam(camera)
        trailing = arr.shape[4:] if array_name != "backgrounds" else arr.shape[3:]
        if ys_arr.size == 0:
            return np.zeros(ys_arr.shape + tuple(trailing), dtype=arr.dtype)
        # Basic indexing pinned to one (camera, t) touches exactly one chunk; the bounding box
        # keeps the copy small when the batch is local (e.g. a patch).
        y0, y1 = int(ys_arr.min()), int(ys_arr.max()) + 1
        x0, x1 = int(xs_arr.min()), int(xs_arr.max()) + 1
        if array_name == "backgrounds":
            window = np.asarray(arr[c, y0:y1, x0:x1])
        else:
            window = np.asarray(arr[c, self._t(t), y0:y1, x0:x1])  # type: ignore[arg-type]
        return window[ys_arr - y0, xs_arr - x0]

    # ------------------------------------------------------------------ writes

    def _check_image(self, name: str, image: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        arr = np.asarray(image)
        if arr.shape != shape:
            raise ValueError(f"{name} must have shape {shape} for store {self.uri}, got {arr.shape}")
        if dtype == np.uint8 and arr.dtype != np.uint8:
            if name == "alpha" and arr.dtype == np.bool_:
                return arr.astype(np.uint8) * 255
            raise TypeError(f"{name} must be uint8, got {arr.dtype} (scale and convert explicitly)")
        if dtype == np.float32 and not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"{name} must be floating point (metres), got {arr.dtype}")
        return np.ascontiguousarray(arr, dtype=dtype)

    def write_frame(self, camera: CameraKey, t: int, image: np.ndarray) -> None:
        """Write one (H, W, 3) uint8 frame: exactly one chunk."""
        c, ti = self._cam(camera), self._t(t)
        self.frames[c, ti] = self._check_image("frame", image, (self.height, self.width, 3), np.dtype(np.uint8))

    def write_frames(self, camera: CameraKey, t_start: int, images: np.ndarray) -> None:
        """Write (T', H, W, 3) uint8 frames of one camera starting at ``t_start``.

        One call lets zarr compress the chunks concurrently, so ingest should prefer it.
        """
        c = self._cam(camera)
        arr = np.asarray(images)
        if arr.ndim != 4:
            raise ValueError(f"frames must have shape (T, {self.height}, {self.width}, 3), got {arr.shape}")
        stop = t_start + arr.shape[0]
        if not 0 <= t_start <= stop <= self.n_frames:
            raise IndexError(f"frames [{t_start}, {stop}) do not fit in {self.n_frames} frames")
        arr = self._check_image("frames", arr, (arr.shape[0], self.height, self.width, 3), np.dtype(np.uint8))
        self.frames[c, t_start:stop] = arr

    def chunk_writer(self, name: str) -> ChunkWriter:
        """A writer of whole chunks of ``name`` that bypasses zarr's per-chunk path (storage/chunk_writer.py).

        For writers that hold one chunk at a time (ingest's one frame per camera): same bytes, less overhead.
        """
        return ChunkWriter(self.uri, self._array(name)._zarr)

    def write_alpha(self, camera: CameraKey, t: int, alpha: np.ndarray) -> None:
        """Write one (H, W) uint8 matte (bool masks become 0/255)."""
        c, ti = self._cam(camera), self._t(t)
        self.alpha[c, ti] = self._check_image("alpha", alpha, (self.height, self.width), np.dtype(np.uint8))

    def write_depth(self, camera: CameraKey, t: int, depth: np.ndarray) -> None:
        """Write one (H, W) z-depth map in metres (0 = invalid), stored as float32."""
        c, ti = self._cam(camera), self._t(t)
        self.depth[c, ti] = self._check_image("depth", depth, (self.height, self.width), np.dtype(np.float32))

    def write_background(self, camera: CameraKey, image: np.ndarray) -> None:
        """Write one camera's (H, W, 3) uint8 background plate."""
        c = self._cam(camera)
        self.backgrounds[c] = self._check_image("background", image, (self.height, self.width, 3), np.dtype(np.uint8))

    # ------------------------------------------------------------------ stage records

    def stage_records(self) -> dict[str, StageRecord]:
        """All stage records, freshly read from the store."""
        self.refresh()
        raw = self.group.attrs.get("stages") or {}
        return {name: StageRecord.from_json(rec) for name, rec in raw.items()}

    def stage_record(self, stage: str) -> StageRecord | None:
        """The stage's record as currently stored, or None if it has not finished."""
        return self.stage_records().get(stage)

    def is_complete(
        self, stage: str, config_hash: str, input_digest: str | None = None, *, version: str | None = None
    ) -> bool:
        """True if the stage finished with this config hash (and input digest / version, when given)."""
        record = self.stage_record(stage)
        if record is None or not record.matches(config_hash, input_digest, version):
            return False
        return not self.damaged_outputs(stage)

    def damaged_outputs(self, stage: str) -> list[str]:
        """What is missing from the arrays a finished stage wrote ("frames: camera 2, frame 5", ...).

        A record over missing chunks does not count as complete: the stage runs again and rewrites them.
        Depth may leave whole cameras out (those it does not compute), so only partly written cameras count there.
        """
        problems = []
        names = STAGE_ARRAYS.get(stage, ())
        if stage == "ingest":
            names = (*names, "backgrounds")
        for name in names:
            missing = self.missing_chunks(name, skip_unwritten_cameras=(name == "depth"))
            problems += [f"{name}: camera {self.cameras[c]}" + ("" if name == "backgrounds" else f", frame {t}")
                         for c, t in missing]
        return problems

    def write_stage_record(self, record: StageRecord) -> None:
        """Mark a stage finished; call this LAST, after all its outputs are written."""
        self.refresh()
        stages = dict(self.group.attrs.get("stages") or {})
        stages[record.stage] = record.to_json()
        self._update_attrs({"stages": stages})

    def clear_stage_record(self, stage: str) -> None:
        """Forget a stage's record; call this BEFORE rewriting its outputs, so a crash mid-way reruns it."""
        self.refresh()
        stages = dict(self.group.attrs.get("stages") or {})
        if stages.pop(stage, None) is not None:
            self._update_attrs({"stages": stages})
