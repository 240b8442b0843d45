"""The capture store, stage records and work folder, on real zarr stores (local and memory://)."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import fsspec
import numpy as np
import pytest
import zarr
import zarr.storage
from zarr.codecs import BloscCodec, ZstdCodec

from storage.errors import MissingChunkError
from storage import (
    CaptureStore,
    CaptureStoreError,
    SequenceWorkDir,
    StageRecord,
    config_hash,
    digest_of,
)
from storage import uri as uris
from storage.capture_store import ARRAY_NAMES, _open_zarr_store

CAMS = ["222200037", "220700191", "000123"]
T, H, W = 4, 12, 10


def _k(f: float) -> np.ndarray:
    return np.array([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]], dtype=np.float64)


def _w2c(z: float) -> np.ndarray:
    m = np.eye(4)
    m[2, 3] = z
    return m


def _create(uri: str, **overrides: Any) -> CaptureStore:
    kwargs: dict[str, Any] = dict(
        cameras=CAMS, n_frames=T, height=H, width=W, fps=24.5, frame_indices=[0, 3, 6, 9],
        intrinsics={c: _k(100.0 + i) for i, c in enumerate(CAMS)},
        world_2_cam={c: _w2c(1.0 + i) for i, c in enumerate(CAMS)},
    )
    kwargs.update(overrides)
    return CaptureStore.create(uri, **kwargs)


@pytest.fixture(params=["local", "memory"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "local":
        return str(tmp_path / "P1" / "SEQ+A_1" / "capture.zarr")
    return f"memory://test-storage-{uuid.uuid4().hex}/P1/SEQ/capture.zarr"


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


# ---------------------------------------------------------------- layout


def test_create_open_round_trip(store_uri: str) -> None:
    created = _create(store_uri)
    assert CaptureStore.exists(store_uri)
    store = CaptureStore.open(store_uri)
    assert store.uri == created.uri
    assert store.cameras == CAMS and all(isinstance(c, str) for c in store.cameras)
    assert store.fps == 24.5
    assert store.frame_indices == [0, 3, 6, 9]
    assert (store.n_cameras, store.n_frames, store.height, store.width) == (3, T, H, W)
    assert store.frames.shape == (3, T, H, W, 3) and store.frames.dtype == np.uint8
    assert store.alpha.shape == (3, T, H, W) and store.alpha.dtype == np.uint8
    assert store.depth.shape == (3, T, H, W) and store.depth.dtype == np.float32
    assert store.backgrounds.shape == (3, H, W, 3) and store.backgrounds.dtype == np.uint8
    K = store.intrinsics
    assert K is not None and set(K) == set(CAMS)
    np.testing.assert_array_equal(K["222200037"], _k(100.0))
    assert K["222200037"].dtype == np.float64 and K["222200037"].shape == (3, 3)
    E = store.world_2_cam
    assert E is not None and E["000123"].shape == (4, 4)
    np.testing.assert_array_equal(E["000123"], _w2c(3.0))
    assert store.group.attrs["stages"] == {}
    # an unwritten chunk is never read as the fill value: the error names array, camera and frame
    with pytest.raises(MissingChunkError, match=r"frames chunk of camera 222200037 \(index 0\), frame 0 is missing"):
        store.read_frame(0, 0)
    with pytest.raises(MissingChunkError, match="depth chunk of camera 000123 .*frame 3.*run the depth stage"):
        store.read_depth("000123", T - 1)
    assert not store.read_background(0).any()  # a store that does not list its plates: no plate reads as zeros


def test_attrs_are_plain_json_with_string_serials(store_uri: str) -> None:
    _create(store_uri)
    fs, path = uris.filesystem(store_uri)
    meta = json.loads(fs.cat_file(f"{path}/zarr.json"))
    attrs = meta["attributes"]
    assert attrs["cameras"] == CAMS  # "000123" keeps its leading zeros
    assert list(attrs["intrinsics"]) == CAMS and list(attrs["world_2_cam"]) == CAMS
    assert attrs["intrinsics"]["222200037"][0][0] == 100.0
    assert attrs["frame_indices"] == [0, 3, 6, 9]
    assert attrs["stages"] == {}


def test_chunks_are_one_camera_one_frame_and_zstd(store_uri: str) -> None:
    store = _create(store_uri)
    assert store.frames.chunks == (1, 1, H, W, 3)
    assert store.alpha.chunks == (1, 1, H, W)
    assert store.depth.chunks == (1, 1, H, W)
    assert store.backgrounds.chunks == (1, H, W, 3)
    for name in ARRAY_NAMES:
        arr = getattr(store, name)
        (codec,) = arr.compressors
        assert isinstance(codec, (BloscCodec, ZstdCodec))
        if isinstance(codec, BloscCodec):
            assert codec.cname.value == "zstd"
        assert arr.fill_value == 0


def test_calibration_may_be_missing_and_set_later(store_uri: str) -> None:
    _create(store_uri, intrinsics=None, world_2_cam=None)
    store = CaptureStore.open(store_uri, "r+")
    assert store.intrinsics is None and store.world_2_cam is None
    store.set_calibration({c: _k(50.0) for c in CAMS}, {c: _w2c(2.0).tolist() for c in CAMS})
    again = CaptureStore.open(store_uri)
    np.testing.assert_array_equal(again.intrinsics["220700191"], _k(50.0))  # type: ignore[index]
    np.testing.assert_array_equal(again.world_2_cam["220700191"], _w2c(2.0))  # type: ignore[index]
    with pytest.raises(ValueError, match="missing"):
        store.set_calibration({CAMS[0]: _k(1.0)}, {c: _w2c(1.0) for c in CAMS})
    with pytest.raises(PermissionError, match="read-only"):
        again.set_calibration({c: _k(50.0) for c in CAMS}, {c: _w2c(2.0) for c in CAMS})


def test_create_validates_its_inputs_before_writing(store_uri: str) -> None:
    with pytest.raises(ValueError, match="frame_indices"):
        _create(store_uri, frame_indices=[0, 1])
    with pytest.raises(ValueError, match="unique"):
        _create(store_uri, cameras=["1", "1"])
    with pytest.raises(ValueError, match=r"intrinsics\['222200037'\] must be 3x3"):
        _create(store_uri, intrinsics={c: np.eye(4) for c in CAMS})
    assert not CaptureStore.exists(store_uri)


def test_create_refuses_to_overwrite(store_uri: str) -> None:
    store = _create(store_uri)
    store.write_frame(0, 0, _image(1))
    with pytest.raises(FileExistsError, match=str(store.uri).replace("+", r"\+")):
        _create(store_uri)
    # the existing data is untouched
    np.testing.assert_array_equal(CaptureStore.open(store_uri).read_frame(0, 0), _image(1))
    replaced = _create(store_uri, overwrite=True, fps=30.0)
    assert replaced.fps == 30.0
    assert replaced.missing_chunks("frames")[0] == (0, 0)  # the old chunk went with the old store


def test_open_missing_store_names_the_uri(tmp_path: Any) -> None:
    missing = str(tmp_path / "nowhere" / "capture.zarr")
    with pytest.raises(FileNotFoundError, match="nowhere/capture.zarr"):
        CaptureStore.open(missing)
    mem = f"memory://test-storage-{uuid.uuid4().hex}/capture.zarr"
    with pytest.raises(FileNotFoundError, match=mem):
        CaptureStore.open(mem)
    assert not CaptureStore.exists(missing) and not CaptureStore.exists(mem)


def test_open_rejects_non_capture_groups(store_uri: str) -> None:
    zarr.create_group(_open_zarr_store(store_uri, read_only=False), attributes={"hello": 1})
    with pytest.raises(CaptureStoreError, match="not a capture store"):
        CaptureStore.open(store_uri)
    with pytest.raises(ValueError, match="mode"):
        CaptureStore.open(store_uri, "w")


# ---------------------------------------------------------------- reads and writes


def test_write_and_read_every_array(store_uri: str) -> None:
    store = _create(store_uri)
    depth = np.linspace(0.5, 1.5, H * W, dtype=np.float64).reshape(H, W)
    store.write_frame("220700191", 2, _image(7))
    store.write_alpha(1, 2, _image(7)[..., 0])
    store.write_depth(1, 2, depth)
    store.write_background("000123", _image(8))
    store.write_frames(0, 1, np.stack([_image(20), _image(21)]))
    reader = CaptureStore.open(store_uri)
    np.testing.assert_array_equal(reader.read_frame(1, 2), _image(7))
    np.testing.assert_array_equal(reader.read_frame("220700191", 2), _image(7))
    np.testing.assert_array_equal(reader.read_alpha("220700191", 2), _image(7)[..., 0])
    np.testing.assert_allclose(reader.read_depth(1, 2), depth.astype(np.float32))
    assert reader.read_depth(1, 2).dtype == np.float32
    np.testing.assert_array_equal(reader.read_background(2), _image(8))
    np.testing.assert_array_equal(reader.read_frames(0, 1, 3), np.stack([_image(20), _image(21)]))


def test_writes_check_shape_and_dtype(store_uri: str) -> None:
    store = _create(store_uri)
    with pytest.raises(ValueError, match="shape"):
        store.write_frame(0, 0, np.zeros((H + 1, W, 3), np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        store.write_frame(0, 0, np.zeros((H, W, 3), np.float32))
    with pytest.raises(IndexError, match="t=4"):
        store.write_frame(0, T, _image(0))
    store.write_alpha(0, 0, np.ones((H, W), bool))
    assert (store.read_alpha(0, 0) == 255).all()


def test_set_frame_count_trims_the_time_axis(store_uri: str) -> None:
    store = _create(store_uri)
    store.write_frame(0, 1, _image(1))
    store.write_frame(0, T - 1, _image(2))
    store.set_frame_count(2)
    reader = CaptureStore.open(store_uri)
    assert reader.n_frames == 2 and reader.frame_indices == [0, 3]
    assert reader.alpha.shape[1] == reader.depth.shape[1] == 2
    np.testing.assert_array_equal(reader.read_frame(0, 1), _image(1))
    with pytest.raises(IndexError):
        reader.read_frame(0, 2)
    fs, root = fsspec.core.url_to_fs(store_uri)
    assert not fs.exists(f"{root}/frames/c/0/{T - 1}/0/0/0")  # chunks past the end are gone
    with pytest.raises(ValueError, match="frame_indices"):
        store.set_frame_count(5)
    store.set_frame_count(3, [0, 3, 6])
    assert CaptureStore.open(store_uri).frame_indices == [0, 3, 6]
    with pytest.raises(MissingChunkError, match="frame 2"):  # grown frames hold nothing until written
        CaptureStore.open(store_uri).read_frame(0, 2)


def test_camera_index_error_names_serial_and_known_cameras(store_uri: str) -> None:
    store = _create(store_uri)
    assert store.camera_index("000123") == 2
    with pytest.raises(KeyError) as info:
        store.camera_index("999")
    message = str(info.value)
    assert "'999'" in message and all(c in message for c in CAMS)
    with pytest.raises(KeyError, match="out of range"):
        store.read_frame(5, 0)


def test_read_pixels_matches_full_frame(store_uri: str) -> None:
    store = _create(store_uri)
    store.write_frame(2, 3, _image(3))
    store.write_depth(2, 3, _image(3)[..., 1].astype(np.float32) / 100)
    store.write_background(2, _image(4))
    rng = np.random.default_rng(0)
    ys = rng.integers(0, H, (5, 7))
    xs = rng.integers(0, W, (5, 7))
    px = store.read_pixels("frames", "000123", 3, ys, xs)
    assert px.shape == (5, 7, 3) and px.dtype == np.uint8
    np.testing.assert_array_equal(px, _image(3)[ys, xs])
    np.testing.assert_allclose(store.read_pixels("depth", 2, 3, ys, xs), _image(3)[ys, xs, 1].astype(np.float32) / 100)
    np.testing.assert_array_equal(store.read_pixels("backgrounds", 2, None, ys, xs), _image(4)[ys, xs])
    assert store.read_pixels("alpha", 2, 3, np.zeros(0, int), np.zeros(0, int)).shape == (0,)
    with pytest.raises(IndexError):
        store.read_pixels("frames", 2, 3, np.array([H]), np.array([0]))
    with pytest.raises(KeyError, match="unknown array"):
        store.read_pixels("normals", 2, 3, ys, xs)


class _KeyRecordingStore(zarr.storage.WrapperStore):  # type: ignore[type-arg]
    """A real store that remembers which keys were read."""

    def __init__(self, store: Any) -> None:
        super().__init__(store)
        self.keys: list[str] = []

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        self.keys.append(key)
        return await super().get(key, prototype, byte_range)


def _fill_every_chunk(store: CaptureStore) -> None:
    for c in range(store.n_cameras):
        store.write_frames(c, 0, np.stack([_image(10 * c + t) for t in range(T)]))


def test_reads_fetch_only_the_one_chunk(store_uri: str) -> None:
    _fill_every_chunk(_create(store_uri))
    recorder = _KeyRecordingStore(_open_zarr_store(store_uri, read_only=True))
    store = CaptureStore(store_uri, zarr.open_group(recorder, mode="r"), recorder)
    store.frames  # noqa: B018 - load the array metadata before counting
    recorder.keys.clear()
    np.testing.assert_array_equal(store.read_frame(1, 2), _image(12))
    assert recorder.keys == ["frames/c/1/2/0/0/0"]
    recorder.keys.clear()
    ys, xs = np.array([0, H - 1, 5]), np.array([W - 1, 0, 3])
    np.testing.assert_array_equal(store.read_pixels("frames", 2, 1, ys, xs), _image(21)[ys, xs])
    assert recorder.keys == ["frames/c/2/1/0/0/0"]


def test_reads_never_decode_other_chunks(store_uri: str) -> None:
    """Every other chunk is replaced by garbage; decoding any of them would raise."""
    store = _create(store_uri)
    _fill_every_chunk(store)
    fs, root = fsspec.core.url_to_fs(store_uri)
    keep = f"{root}/frames/c/0/3/0/0/0"
    chunk_files = [p for p in fs.find(f"{root}/frames/c") if not p.endswith("zarr.json")]
    assert len(chunk_files) == len(CAMS) * T
    for path in chunk_files:
        if path != keep:
            fs.pipe_file(path, b"not a blosc frame")
    reader = CaptureStore.open(store_uri)
    np.testing.assert_array_equal(reader.read_frame(0, 3), _image(3))
    np.testing.assert_array_equal(
        reader.read_pixels("frames", "222200037", 3, np.array([1, 2]), np.array([3, 4])),
        _image(3)[[1, 2], [3, 4]],
    )
    with pytest.raises(Exception):  # the garbage is really there
        reader.read_frame(0, 2)


# ---------------------------------------------------------------- stage records


def test_stage_records_and_is_complete(store_uri: str) -> None:
    store = _create(store_uri)
    _fill_every_chunk(store)  # an ingest record vouches for every frame chunk
    for c in range(store.n_cameras):  # and a matte record for every alpha chunk
        for t in range(T):
            store.write_alpha(c, t, np.zeros((H, W), np.uint8))  # all-zero mattes are chunks too
    h = config_hash({"stride": 2, "scale": 0.5})
    assert store.stage_record("ingest") is None
    assert not store.is_complete("ingest", h)
    record = StageRecord("ingest", "1", h, digest_of("cam_1.mp4", 1234, 1.5), report={"frames": np.int64(4)})
    store.write_stage_record(record)
    store.write_stage_record(StageRecord("matte", "2", "abc"))
    reader = CaptureStore.open(store_uri)
    got = reader.stage_record("ingest")
    assert got == StageRecord.from_json(record.to_json())
    assert got is not None and got.report == {"frames": 4} and got.finished_at.endswith("Z")
    assert reader.is_complete("ingest", h)
    assert reader.is_complete("ingest", h, record.input_digest)
    assert reader.is_complete("ingest", h, version="1")
    assert not reader.is_complete("ingest", config_hash({"stride": 3, "scale": 0.5}))
    assert not reader.is_complete("ingest", h, "other-digest")
    assert not reader.is_complete("ingest", h, version="2")
    assert reader.is_complete("matte", "abc")
    # another handle clears a record; the first handle sees it on its next look
    writer = CaptureStore.open(store_uri, "r+")
    writer.clear_stage_record("ingest")
    writer.clear_stage_record("never-ran")
    assert reader.stage_record("ingest") is None
    assert reader.is_complete("matte", "abc")


def test_record_writes_keep_attrs_written_by_other_handles(store_uri: str) -> None:
    _create(store_uri, intrinsics=None, world_2_cam=None)
    stale = CaptureStore.open(store_uri, "r+")
    other = CaptureStore.open(store_uri, "r+")
    other.set_calibration({c: _k(7.0) for c in CAMS}, {c: _w2c(1.0) for c in CAMS})
    other.write_stage_record(StageRecord("calibrate", "1", "h1"))
    stale.write_stage_record(StageRecord("matte", "1", "h2"))
    final = CaptureStore.open(store_uri)
    assert final.intrinsics is not None
    assert set(json.loads(json.dumps(final.group.attrs["stages"]))) == {"calibrate", "matte"}


def test_stage_record_json_round_trip() -> None:
    record = StageRecord("depth", "0.3", "0123456789abcdef", "fedcba", "2026-01-01T00:00:00Z", {"psnr": 31.5})
    assert StageRecord.from_json(record.to_json()) == record
    assert StageRecord.from_json(json.dumps(record.to_json())) == record
    assert StageRecord.from_json(record.to_json_text()) == record
    with pytest.raises(ValueError, match="config_hash"):
        StageRecord.from_json({"stage": "x", "version": "1"})


def test_config_hash_is_canonical() -> None:
    a = config_hash({"b": [1, 2], "a": {"y": 1.0, "x": "s"}})
    assert a == config_hash({"a": {"x": "s", "y": 1.0}, "b": (1, 2)})
    assert len(a) == 16 and int(a, 16) >= 0
    assert a != config_hash({"b": [2, 1], "a": {"y": 1.0, "x": "s"}})

    class FakeModel:  # pydantic-like: anything with model_dump()
        def model_dump(self, mode: str = "python") -> dict[str, Any]:
            return {"a": {"x": "s", "y": 1.0}, "b": [1, 2]}

    assert config_hash(FakeModel()) == a
    assert digest_of("f.mp4", 10, 1.0) == digest_of("f.mp4", np.int64(10), np.float64(1.0))
    assert digest_of("f.mp4", 10) != digest_of("f.mp4", 11)
    assert len(digest_of()) == 16


# ---------------------------------------------------------------- work folder


@pytest.fixture(params=["local", "memory"])
def work_root(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "local":
        return str(tmp_path / "work")
    return f"memory://test-work-{uuid.uuid4().hex}/work"


def test_work_dir_layout(work_root: str) -> None:
    wd = SequenceWorkDir.for_sequence(work_root, "017", "EXP-2_v10+emo")
    assert wd.participant == "017" and wd.sequence == "EXP-2_v10+emo"
    assert wd.uri.endswith("/work/017/EXP-2_v10+emo")
    assert wd.capture_uri == wd.uri + "/capture.zarr"
    assert wd.path("export", "turntable.mp4") == wd.uri + "/export/turntable.mp4"
    assert SequenceWorkDir(wd.uri + "/") == wd
    with pytest.raises(ValueError):
        SequenceWorkDir.for_sequence(work_root, "017", "a/b")


def test_work_dir_reports_and_files(work_root: str) -> None:
    wd = SequenceWorkDir.for_sequence(work_root, "017", "SEQ")
    assert wd.read_report("ingest") is None
    report = {"status": "ok", "seconds": np.float32(1.5), "cams": ("1", "2")}
    uri = wd.write_report("ingest", report)
    assert uri == wd.path("reports", "ingest.json")
    assert wd.read_report("ingest") == {"status": "ok", "seconds": 1.5, "cams": ["1", "2"]}
    wd.write_report("ingest", {"status": "rerun"})
    assert wd.read_report("ingest") == {"status": "rerun"}
    assert wd.listdir("reports") == ["ingest.json"]  # no temp files left behind
    wd.write_text("calibration/notes.txt", "hello")
    assert wd.read_bytes("calibration/notes.txt") == b"hello"
    assert wd.read_bytes("calibration/missing.txt") is None
    assert wd.exists("calibration") and not wd.exists("export")
    wd.makedirs("export")
    assert wd.exists("export")
    # the capture store lives where the work folder says
    _create(wd.capture_uri)
    assert CaptureStore.open(wd.capture_uri).uri == wd.capture_uri
    with pytest.raises(ValueError, match="stage name"):
        wd.write_report("../evil", {})


def test_local_work_dir_uses_os_paths(tmp_path: Any) -> None:
    wd = SequenceWorkDir(str(tmp_path / "P" / "S"))
    path = wd.write_report("matte", {"a": 1})
    assert os.path.isfile(path) and os.path.isabs(path)
    assert json.loads(open(path).read()) == {"a": 1}
