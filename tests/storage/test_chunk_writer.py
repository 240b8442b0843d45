"""The direct chunk writer writes the store zarr would have written: same chunk bytes, same reads, same metadata."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from storage import CaptureStore
from storage import uri as uris
from storage.capture_store import CODECS

CAMERAS, FRAMES, HEIGHT, WIDTH = ["cam_a", "07"], 3, 6, 5


def _create(uri: str, codec: str) -> CaptureStore:
    return CaptureStore.create(uri, cameras=CAMERAS, n_frames=FRAMES, height=HEIGHT, width=WIDTH, fps=30.0,
                               frame_indices=list(range(FRAMES)), intrinsics=None, world_2_cam=None, codec=codec)


def _frames() -> np.ndarray:
    """Smooth images with noise, as video frames are: compressible, but not trivially."""
    rng = np.random.default_rng(7)
    ramp = np.arange(HEIGHT * WIDTH * 3, dtype=np.int16).reshape(HEIGHT, WIDTH, 3) % 200
    noise = rng.integers(0, 30, (len(CAMERAS), FRAMES, HEIGHT, WIDTH, 3))
    return (ramp + noise).astype(np.uint8)


def _read_bytes(uri: str, key: str) -> bytes:
    fs, path = uris.filesystem(uris.normalize(uri))
    return fs.cat_file(f"{path.rstrip('/')}/{key}")


@pytest.fixture(params=["local", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    return str(tmp_path) if request.param == "local" else f"memory://chunk-writer-{uuid.uuid4().hex}"


@pytest.mark.parametrize("codec", CODECS)
def test_direct_writes_read_back_and_match_zarrs_own_bytes(root: str, codec: str) -> None:
    images = _frames()
    through_zarr, direct = _create(f"{root}/zarr.zarr", codec), _create(f"{root}/direct.zarr", codec)
    for camera in range(len(CAMERAS)):
        through_zarr.write_frames(camera, 0, images[camera])
    writer = direct.chunk_writer("frames")
    assert writer.direct  # every codec the store offers takes the fast path
    for camera in range(len(CAMERAS)):
        for t in range(FRAMES):
            writer.write((camera, t, 0, 0, 0), images[camera, t][np.newaxis, np.newaxis])

    reopened = CaptureStore.open(f"{root}/direct.zarr")
    assert np.array_equal(np.asarray(reopened.frames[:]), images)
    assert np.array_equal(reopened.read_frame("07", 2), images[1, 2])
    assert not reopened.missing_chunks("frames")
    for camera in range(len(CAMERAS)):
        for t in range(FRAMES):
            key = f"frames/c/{camera}/{t}/0/0/0"
            assert _read_bytes(direct.uri, key) == _read_bytes(through_zarr.uri, key), key
    meta = [json.loads(_read_bytes(s.uri, "frames/zarr.json")) for s in (through_zarr, direct)]
    assert meta[0] == meta[1]  # the writer never touches metadata: zarr.json is zarr's own
    # a plain zarr reader, without our wrapper, reads the same values
    assert np.array_equal(zarr.open_array(store=_zarr_store(direct.uri), path="frames", mode="r")[:], images)


def _zarr_store(uri: str) -> Any:
    uri = uris.normalize(uri)
    return zarr.storage.LocalStore(uri, read_only=True) if uris.is_local(uri) else \
        zarr.storage.FsspecStore.from_url(uri, read_only=True)


def test_a_wrong_chunk_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    store = _create(str(tmp_path / "s.zarr"), "zstd")
    writer = store.chunk_writer("frames")
    with pytest.raises(ValueError, match=r"chunk must be \(1, 1, 6, 5, 3\) uint8"):
        writer.write((0, 0, 0, 0, 0), np.zeros((1, 1, HEIGHT, WIDTH + 1, 3), np.uint8))
    with pytest.raises(IndexError, match="outside the grid"):
        writer.write((0, FRAMES, 0, 0, 0), np.zeros((1, 1, HEIGHT, WIDTH, 3), np.uint8))
    assert len(store.missing_chunks("frames")) == len(CAMERAS) * FRAMES
    assert not list((tmp_path / "s.zarr").rglob("*.partial"))


def test_an_unknown_codec_chain_falls_back_to_zarr(tmp_path: Path) -> None:
    """An array whose encoding is not known byte for byte (here: a transposed one) is written through zarr."""
    array = zarr.create_array(zarr.storage.LocalStore(str(tmp_path / "t.zarr")), shape=(2, 4, 3), chunks=(1, 4, 3),
                              dtype="uint8", filters=[zarr.codecs.TransposeCodec(order=(0, 2, 1))])
    from storage.chunk_writer import ChunkWriter

    writer = ChunkWriter(str(tmp_path / "t.zarr"), array)
    assert not writer.direct
    chunk = np.arange(12, dtype=np.uint8).reshape(1, 4, 3)
    writer.write((1, 0, 0), chunk)
    assert np.array_equal(array[1], chunk[0])
