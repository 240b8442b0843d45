"""A killed re-ingest and a damaged store: recovered by the next ingest, never read as data in between."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline.synthetic import synthesize_capture
from stages.calibrate.config import CalibrateConfig
from stages.calibrate.stage import calibrate_sequence
from stages.core.errors import StageOrderError
from stages.core.video import iter_frames
from stages.ingest.config import IngestConfig
from stages.ingest.stage import ingest_sequence
from stages.matte.config import MatteConfig
from stages.matte.stage import matte_sequence
from storage import CaptureStore, CaptureStoreError, SequenceWorkDir
from storage.errors import MissingChunkError

REPO = Path(__file__).resolve().parents[2]
CAMERAS, FRAMES, WIDTH, HEIGHT = 3, 4, 48, 64

# Re-ingests with --downscale 2 and stops dead (SIGSTOP-like: it waits) once the first camera wrote frames, so
# the parent can SIGKILL it in the middle of the rewrite, deterministically.
PAUSING_INGEST = textwrap.dedent("""
    import sys, time
    from stages.ingest.config import IngestConfig
    from stages.ingest.stage import ingest_sequence

    def pause(serial, frames):
        print("writing", flush=True)
        time.sleep(3600)

    ingest_sequence(sys.argv[1], sys.argv[2], IngestConfig(downscale=2, workers=1), progress=pause)
""")


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    return synthesize_capture(tmp_path_factory.mktemp("archive"), cameras=CAMERAS, frames=FRAMES, width=WIDTH,
                              height=HEIGHT, seed=5)


def _work(root: Path, capture) -> SequenceWorkDir:
    return SequenceWorkDir.for_sequence(str(root), capture.participant_dir.name, capture.sequence_dir.name)


def _assert_frames_are_the_videos(store: CaptureStore, capture, size: tuple[int, int]) -> None:
    assert (store.width, store.height) == size
    for index, serial in enumerate(store.cameras):
        for t, decoded in enumerate(iter_frames(capture.video_paths[serial], size=size)):
            np.testing.assert_array_equal(store.read_frame(index, t), decoded)


def test_a_reingest_killed_mid_rewrite_is_refused_then_rebuilt(capture, tmp_path):
    work = _work(tmp_path, capture)
    assert ingest_sequence(capture.sequence_dir, str(tmp_path), IngestConfig())["status"] == "completed"
    proc = subprocess.Popen([sys.executable, "-c", PAUSING_INGEST, str(capture.sequence_dir), str(tmp_path)],
                            cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    # Half old, half new: no stage may use it, and each says what to run.
    with pytest.raises(CaptureStoreError, match="did not finish.*run the ingest stage again"):
        CaptureStore.open(work.capture_uri)
    with pytest.raises(CaptureStoreError, match="run the ingest stage again"):
        calibrate_sequence(work.uri, CalibrateConfig(mode="provided"))

    report = ingest_sequence(capture.sequence_dir, str(tmp_path), IngestConfig(downscale=2))
    assert report["status"] == "completed" and report["size"] == [WIDTH // 2, HEIGHT // 2]
    assert not Path(work.capture_uri + ".incomplete").exists()
    _assert_frames_are_the_videos(CaptureStore.open(work.capture_uri), capture, (WIDTH // 2, HEIGHT // 2))
    assert ingest_sequence(capture.sequence_dir, str(tmp_path), IngestConfig(downscale=2))["status"] == "skipped"


def test_a_store_that_lost_an_array_says_what_to_run_and_ingest_rebuilds_it(capture, tmp_path):
    """What a killed rewrite did before the marker existed: frames/zarr.json gone, chunks orphaned."""
    work = _work(tmp_path, capture)
    ingest_sequence(capture.sequence_dir, str(tmp_path), IngestConfig())
    (Path(work.capture_uri) / "frames" / "zarr.json").unlink()
    with pytest.raises(CaptureStoreError, match=r"missing arrays \['frames'\].*run the ingest stage again"):
        CaptureStore.open(work.capture_uri)
    assert ingest_sequence(capture.sequence_dir, str(tmp_path), IngestConfig())["status"] == "completed"
    _assert_frames_are_the_videos(CaptureStore.open(work.capture_uri), capture, (WIDTH, HEIGHT))


def test_a_foreign_zarr_group_is_never_overwritten(capture, tmp_path):
    import zarr

    work = _work(tmp_path, capture)
    zarr.create_group(work.capture_uri, attributes={"owner": "someone else"})
    with pytest.raises(CaptureStoreError, match="not a capture store; ingest will not overwrite it"):
        ingest_sequence(capture.sequence_dir, str(tmp_path), IngestConfig())
    assert zarr.open_group(work.capture_uri, mode="r").attrs["owner"] == "someone else"


def test_a_missing_frame_chunk_is_named_never_matted_and_reingest_repairs_it(capture, tmp_path):
    work = _work(tmp_path, capture)
    ingest_sequence(capture.sequence_dir, str(tmp_path), IngestConfig())
    store = CaptureStore.open(work.capture_uri)
    serial = store.cameras[1]
    (Path(work.capture_uri) / "frames" / "c" / "1" / "2" / "0" / "0" / "0").unlink()

    # refused before any frame is matted, naming the chunk and the command that rewrites it
    with pytest.raises(StageOrderError, match=rf"missing \(frames: camera {serial}, frame 2\): run `nersemble-pipeline "
                                              rf"ingest"):
        matte_sequence(work.uri, MatteConfig(method="plate", workers=1))
    with pytest.raises(MissingChunkError, match=rf"frames chunk of camera {serial} \(index 1\), frame 2 is missing"):
        store.read_frame(1, 2)  # and a read names it too
    assert CaptureStore.open(work.capture_uri).stage_record("matte") is None  # never marked complete

    assert store.damaged_outputs("ingest") == [f"frames: camera {serial}, frame 2"]
    assert ingest_sequence(capture.sequence_dir, str(tmp_path), IngestConfig())["status"] == "completed"
    assert matte_sequence(work.uri, MatteConfig(method="plate", workers=1))["status"] == "completed"

    # A lost matte chunk: the matte record no longer counts, so matte runs again instead of "skipped".
    (Path(work.capture_uri) / "alpha" / "c" / "0" / "1" / "0" / "0").unlink()
    with pytest.raises(MissingChunkError, match="alpha chunk of camera .* frame 1 .*run the matte stage again"):
        CaptureStore.open(work.capture_uri).read_alpha(0, 1)
    assert matte_sequence(work.uri, MatteConfig(method="plate", workers=1))["status"] == "completed"
    assert CaptureStore.open(work.capture_uri).read_alpha(0, 1).shape == (HEIGHT, WIDTH)


def test_a_missing_background_plate_chunk_is_damage_not_no_plate(capture, tmp_path):
    work = _work(tmp_path, capture)
    ingest_sequence(capture.sequence_dir, str(tmp_path), IngestConfig())
    store = CaptureStore.open(work.capture_uri)
    assert store.attrs["background_cameras"] == store.cameras and store.read_background(0).any()
    (Path(work.capture_uri) / "backgrounds" / "c" / "0" / "0" / "0" / "0").unlink()
    with pytest.raises(MissingChunkError, match="backgrounds chunk of camera"):
        store.read_background(0)
    assert ingest_sequence(capture.sequence_dir, str(tmp_path), IngestConfig())["status"] == "completed"
