"""Other rigs from the synthetic generator: layouts, serials, plates, and the CLI that exposes them."""

from __future__ import annotations

import io

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline import synthetic as syn
from pipeline.cli import _Progress, app
from stages.core.cameras import camera_center, project


def _azimuths(positions) -> np.ndarray:
    return np.degrees(np.arctan2([p[0] for p in positions], [p[2] for p in positions])) % 360


def test_a_ring_surrounds_the_head_at_several_heights():
    positions = syn.ring_positions(24, rows=3)
    heights = sorted({round(float(p[1]), 3) for p in positions})
    assert len(positions) == 24 and heights == [-0.3, 0.0, 0.3]
    gaps = np.diff(np.sort(np.concatenate([_azimuths(positions), [360.0]])))
    assert gaps.max() <= 360 / 16 + 1e-6  # interleaved rings: no azimuth gap wider than half a ring's step
    assert all(abs(np.hypot(p[0], p[2]) - syn.RIG_RADIUS) < 1e-9 for p in positions)


def test_rows_split_the_cameras_as_evenly_as_possible():
    positions = syn.ring_positions(10, rows=3)
    counts = [sum(1 for p in positions if abs(p[1] - h) < 1e-9) for h in (0.3, 0.0, -0.3)]
    assert counts == [4, 3, 3]
    with pytest.raises(ValueError, match="rows"):
        syn.ring_positions(2, rows=3)


def test_a_generated_arc_stays_in_front_of_the_face():
    layout = syn.rig_layout(20, "nersemble", serial_format="cam{:03d}")
    assert list(layout)[:2] == ["cam000", "cam001"] and len(layout) == 20
    assert all(p[2] > 0.5 for p in layout.values())
    assert syn.rig_layout(8) is None  # the real serials on the real arc


@pytest.mark.parametrize("layout", syn.LAYOUTS)
def test_every_camera_of_a_generated_rig_sees_the_head(layout):
    rig = syn.layout_cameras(syn.rig_layout(32, layout, serial_format="{:02d}"), 64, 96, seed=1)
    for serial in rig.serials:
        uv, z = project(np.zeros(3), rig.intrinsics[serial], rig.world_2_cam[serial])
        assert 0.9 < z < 1.1 and 0 < uv[0] < 64 and 0 < uv[1] < 96
    assert len({tuple(np.round(camera_center(rig.world_2_cam[s]), 6)) for s in rig.serials}) == 32


@pytest.mark.parametrize("serial_format, match", [("x", "distinct"), ("{:02d}/", "file names"),
                                                  ("{name}", "cannot format")])
def test_bad_serial_formats_are_refused(serial_format, match):
    with pytest.raises(ValueError, match=match):
        syn.generated_serials(4, serial_format)


def test_camera_counts_beyond_64_and_unknown_layouts_are_refused():
    with pytest.raises(ValueError, match="64"):
        syn.rig_layout(65, "ring")
    with pytest.raises(ValueError, match="layout"):
        syn.rig_layout(4, "dome")


def test_a_ring_capture_without_plates(tmp_path):
    capture = syn.synthesize_capture(tmp_path, cameras=6, layout="ring", rows=2, serial_format="{:02d}",
                                     plates=False, frames=1, width=32, height=48)
    assert capture.cameras == ["00", "01", "02", "03", "04", "05"] and capture.frames == 1
    assert capture.background_paths == {} and not (capture.participant_dir / "sequences" / "BACKGROUND").exists()
    assert all(path.is_file() for path in capture.video_paths.values())


def test_synth_command_makes_another_rig(tmp_path):
    result = CliRunner().invoke(app, ["synth", str(tmp_path), "--cameras", "4", "--layout", "ring", "--rows", "1",
                                      "--serial-format", "{:02d}", "--no-plates", "--frames", "1", "--width", "32",
                                      "--height", "48"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "001" / "sequences" / "EXP-1-head" / "images").iterdir()) == [
        "cam_00.mp4", "cam_01.mp4", "cam_02.mp4", "cam_03.mp4"]
    refused = CliRunner().invoke(app, ["synth", str(tmp_path), "--layout", "dome"])
    assert refused.exit_code != 0 and "dome" in refused.output


def test_progress_in_a_log_is_plain_lines_with_rate_and_eta():
    stream = io.StringIO()  # not a terminal
    progress = _Progress("training", noun="step", every_s=0.0, stream=stream)
    progress.detail = "psnr 23.1 dB"
    for step in (0, 1200, 3000):
        progress(step, 3000)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "training step 0/3000 (0%), psnr 23.1 dB"
    assert lines[1].startswith("training step 1200/3000 (40%), ") and " steps/s, ETA " in lines[1]
    assert lines[2].startswith("training step 3000/3000 (100%), ") and ", took " in lines[2]
    assert "\r" not in stream.getvalue()


def test_progress_in_a_log_is_throttled():
    stream = io.StringIO()
    progress = _Progress("rendering", every_s=3600.0, stream=stream)
    for done in range(10):
        progress(done, 10)
    progress(10, 10)
    assert [line.split(",")[0] for line in stream.getvalue().splitlines()] == [
        "rendering frame 0/10 (0%)", "rendering frame 10/10 (100%)"]
