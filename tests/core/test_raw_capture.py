"""Discovery of the NeRSemble v2 layout and the archive listing the batch flow relies on."""

import json

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from stages.core.errors import CaptureLayoutError
from stages.core.raw_capture import discover_sequence, list_archive
from pipeline.synthetic import synthesize_capture


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    synthesize_capture(root, participant="017", sequence="EXP-3-cheeks+nose", cameras=2, frames=1, width=32, height=48)
    synthesize_capture(root, participant="017", sequence="SEN-01-cramp_small_danger", cameras=2, frames=1,
                       width=32, height=48)
    synthesize_capture(root, participant="240", sequence="FREE", cameras=3, frames=1, width=32, height=48)
    (root / "240" / "calibration" / "camera_params.json").unlink()
    (root / "240" / "sequences" / "BROKEN" / "images").mkdir(parents=True)
    return root


def test_discover_sequence_keeps_names_and_serials_verbatim(archive):
    raw = discover_sequence(archive / "017" / "sequences" / "EXP-3-cheeks+nose")
    assert (raw.participant, raw.sequence) == ("017", "EXP-3-cheeks+nose")
    assert all(isinstance(s, str) and len(s) == 9 for s in raw.serials)
    assert raw.calibration is not None and raw.ground_truth is not None
    assert sorted(raw.backgrounds) == raw.serials
    assert raw.color_calibration is None


def test_list_archive_reports_what_each_sequence_has_and_isolates_broken_ones(archive):
    sequences, problems = list_archive(archive)
    names = [(s.participant, s.sequence) for s in sequences]
    assert names == [("017", "EXP-3-cheeks+nose"), ("017", "SEN-01-cramp_small_danger"), ("240", "FREE")]
    free = sequences[2].summary()
    assert free["cameras"] == 3 and free["calibration"] is False and free["background_plates"] == 3
    assert len(problems) == 1 and "BROKEN" in problems[0] and "no camera videos" in problems[0]
    only, _ = list_archive(archive, participants=["017"], sequences=["SEN-01-cramp_small_danger"])
    assert [s.sequence for s in only] == ["SEN-01-cramp_small_danger"]


def test_layout_errors_name_the_folder(archive, tmp_path):
    with pytest.raises(CaptureLayoutError, match="not found"):
        discover_sequence(tmp_path / "nope")
    with pytest.raises(CaptureLayoutError, match="parent is not 'sequences'"):
        discover_sequence(archive / "017")
    with pytest.raises(CaptureLayoutError, match="background plates"):
        discover_sequence(archive / "017" / "sequences" / "BACKGROUND")
    with pytest.raises(CaptureLayoutError, match="archive folder not found"):
        list_archive(tmp_path / "missing")


def test_cli_list(archive):
    result = CliRunner().invoke(app, ["list", str(archive), "--json"])
    assert result.exit_code == 0, result.output
    listing = json.loads(result.output)
    assert len(listing["sequences"]) == 3 and len(listing["problems"]) == 1
