"""A store written before every chunk was stored: its all-zero mattes have no chunk.

zarr skips a chunk equal to the fill value unless told otherwise, and the capture store used to let it for alpha
and depth. Since missing chunks are refused on read, such a store reads as damaged: the matte record no longer
counts as complete, so the next ``matte`` or ``run`` redoes matte (saying why), and a stage that reads the mattes
refuses at once with the command to run, instead of failing on the missing chunk half-way.
"""

from pathlib import Path

import pytest
import zarr

from flows.sequence import process_sequence
from pipeline.synthetic import synthesize_capture
from stages.calibrate.config import CalibrateConfig
from stages.calibrate.stage import calibrate_sequence
from stages.config import PipelineConfig
from stages.core.errors import StageOrderError
from stages.depth.config import DepthConfig
from stages.depth.stage import depth_sequence
from stages.ingest.config import IngestConfig
from stages.ingest.stage import ingest_sequence
from stages.matte.config import MatteConfig
from stages.matte.stage import matte_sequence
from storage import CaptureStore, SequenceWorkDir

MATTE = MatteConfig(method="plate", workers=1)
DEPTH = DepthConfig(method="sweep", device="cpu", workers=1)


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    return synthesize_capture(tmp_path_factory.mktemp("raw"), cameras=3, frames=2, width=40, height=56, seed=4)


def _matted(capture, root: Path) -> SequenceWorkDir:
    ingest_sequence(capture.sequence_dir, str(root), IngestConfig())
    work = SequenceWorkDir.for_sequence(str(root), capture.participant_dir.name, capture.sequence_dir.name)
    calibrate_sequence(work.uri, CalibrateConfig())
    assert matte_sequence(work.uri, MATTE)["status"] == "completed"
    return work


def _as_the_old_code_wrote_it(store: CaptureStore, camera: int, t: int) -> Path:
    """An empty matte written the old way: through zarr's default config, which drops an all-zero chunk."""
    alpha = zarr.open_array(store.uri, path="alpha", mode="r+")
    assert not alpha.config.write_empty_chunks
    alpha[camera, t] = 0
    chunk = Path(store.uri) / store.alpha.chunk_key((camera, t, 0, 0))
    assert not chunk.exists()
    return chunk


def test_an_old_store_reruns_matte_on_the_next_matte_and_refuses_depth_up_front(capture, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    work = _matted(capture, tmp_path / "work")
    store = CaptureStore.open(work.capture_uri)
    chunk = _as_the_old_code_wrote_it(store, 1, 1)
    serial = store.cameras[1]

    with pytest.raises(StageOrderError, match=rf"reads the matte stage's outputs, and 1 chunk\(s\) of them are "
                                              rf"missing \(alpha: camera {serial}, frame 1\): run `nersemble-pipeline "
                                              rf"matte <SEQUENCE_WORK_DIR>` \(it rewrites them\), then depth again"):
        depth_sequence(work.uri, DEPTH)
    result = CliRunner().invoke(app, ["depth", work.uri, "--method", "sweep", "--device", "cpu"])
    assert result.exit_code == 1 and "run `nersemble-pipeline matte" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    store.refresh()
    assert store.stage_record("depth") is None and not store.depth.stored_chunks()  # refused before any work

    again = matte_sequence(work.uri, MATTE)
    assert again["status"] == "completed" and chunk.exists()
    assert again["warnings"][0].startswith(f"matte ran again: its record matched, but 1 chunk(s) of its outputs "
                                           f"were missing (alpha: camera {serial}, frame 1)")
    assert matte_sequence(work.uri, MATTE)["status"] == "skipped"
    assert depth_sequence(work.uri, DEPTH)["status"] == "completed"


def test_an_old_store_reruns_matte_on_the_next_run(prefect_harness, capture, tmp_path):
    work = _matted(capture, tmp_path / "work")
    chunk = _as_the_old_code_wrote_it(CaptureStore.open(work.capture_uri), 0, 0)
    config = PipelineConfig(matte=MATTE, depth=DEPTH)
    reports = process_sequence(str(capture.sequence_dir), str(tmp_path / "work"), config,
                               stages=["ingest", "calibrate", "matte", "depth"])
    assert [reports[s]["status"] for s in ("ingest", "calibrate", "matte", "depth")] == [
        "skipped", "skipped", "completed", "completed"]
    assert "matte ran again" in reports["matte"]["warnings"][0] and chunk.exists()
