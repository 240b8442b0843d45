"""A capture from another studio, end to end: 24 cameras all around the head at three heights, two-digit serials,
one frame, no background plates. Every stage runs through the CLI with its default options (only the model and
the training and render lengths are shrunk; the hold-out set is the automatic one), then the archive flow finds the sequence
finished, drops its arrays, keeps counting it as finished, and a stage that needs them says how to get them back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.archive import process_archive
from pipeline.cli import app
from pipeline.synthetic import synthesize_capture
from stages.config import PipelineConfig
from storage import CaptureStore, SequenceWorkDir

# A model small enough to train a handful of steps in seconds on one CPU thread (as in tests/flows/test_flows.py).
TINY = {
    "hash.n_levels": 6, "hash.log2_table_size": 12, "rays_per_batch": 256, "target_samples_per_batch": 0,
    "images_per_batch": 2, "repeat_images": 4, "step_size": 0.12, "occupancy.warmup_steps": 4, "eval.chunk": 2048,
}
# Only what keeps a 2-core test short; everything else is each stage's default.
CONFIG = {
    "optimize": {"steps": 6, "overrides": TINY, "threads": 1},
    "export": {"seconds": 0.5, "fps": 4, "threads": 1},
    "evaluate": {"lpips": False, "threads": 1},
}
runner = CliRunner()


def _cli(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def ring(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ring")
    out = _cli("synth", root / "archive", "--cameras", 24, "--layout", "ring", "--rows", 3, "--serial-format",
               "{:02d}", "--no-plates", "--frames", 1, "--width", 48, "--height", 64)
    assert "24 cameras" in out
    config = root / "config.json"
    config.write_text(json.dumps(CONFIG))
    return root, config


@pytest.mark.slow
def test_the_whole_chain_runs_on_a_ring_rig_and_its_arrays_can_be_dropped(ring, prefect_harness):
    root, config = ring
    raw, work_root = root / "archive" / "001" / "sequences" / "EXP-1-head", root / "work"
    work = SequenceWorkDir.for_sequence(str(work_root), "001", "EXP-1-head")
    seq = Path(work.uri)

    out = _cli("ingest", raw, "--work", work_root, "--config", config)
    assert out.count("no background plates") == 1 and "24/24 cameras" in out
    report = work.read_report("ingest")
    assert report["cameras_without_plate"] == [f"{i:02d}" for i in range(24)] and report["codec"] == "zstd"

    _cli("calibrate", seq, "--config", config)
    out = _cli("matte", seq, "--config", config)
    assert out.count("no background plates") == 1 and "24/24 cameras: matting with rembg" in out
    assert {c["method"] for c in work.read_report("matte")["cameras"].values()} == {"rembg"}
    _cli("depth", seq, "--config", config)

    out = _cli("optimize", seq, "--config", config)  # CliRunner's output is not a terminal: plain lines
    assert re.search(r"training step 6/6 \(100%\), [\d.]+ steps/s, took \d+s", out), out
    assert "\r" not in out
    out = _cli("export", seq, "--config", config)
    assert re.search(r"rendering frame \d+/\d+ \(100%\)", out), out
    out = _cli("evaluate", seq, "--config", config)
    assert re.search(r"evaluating frame \d+/\d+", out) and "PSNR" in out

    # the archive flow (called directly: Prefect's console logging and CliRunner's closed streams do not mix):
    # the sequence's stages all skip, it is recorded as finished, then its arrays are dropped
    config_model = PipelineConfig(**CONFIG)
    [row] = process_archive(str(root / "archive"), str(work_root), config=config_model, drop_arrays=True)
    assert row["status"] == "completed" and row["dropped_bytes"] > 0 and 0 < row["store_bytes"]
    store = CaptureStore.open(work.capture_uri)
    dropped = store.attrs["dropped_arrays"]
    assert dropped["arrays"] == ["alpha", "depth", "frames"] and dropped["bytes_freed"] == row["dropped_bytes"]
    assert not any((Path(work.capture_uri) / name / "c").exists() for name in dropped["arrays"])
    assert work.exists("export", "turntable.mp4") and work.exists("reports", "evaluate.json")

    [row] = process_archive(str(root / "archive"), str(work_root), config=config_model, drop_arrays=True)
    assert row["status"] == "skipped" and row["dropped_bytes"] is None  # still finished: nothing re-ingested

    result = runner.invoke(app, ["optimize", str(seq), "--config", str(config), "--steps", "7"])
    assert result.exit_code == 1
    assert "dropped" in result.output and "ingest the sequence again" in result.output
