"""The command line generated from the config models: one option per field, old names as aliases, --config files.

Most tests parse a command line through the real commands (click's own parser, the real option table) and look at
the config it builds, without running the stage; a few run the cheap ingest stage end to end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.synthetic import synthesize_capture
from stages.config import PipelineConfig
from stages.core.errors import PipelineError
from stages.table import STAGE_NAMES
from storage import SequenceWorkDir

REPO = Path(__file__).resolve().parents[2]
PIPELINE_COMMANDS = ("run", "archive")


def _command(name: str):
    return typer.main.get_command(app).commands[name]


def _spec(name: str):
    callback = next(c.callback for c in app.registered_commands if (c.name or c.callback.__name__) == name)
    return callback.config_options


def parsed(*argv: str):
    """The config a command line gives, parsed by the real command, without running it."""
    command = _command(argv[0])
    ctx = command.make_context(argv[0], list(argv[1:]))
    with ctx:
        return _spec(argv[0]).config(ctx, dict(ctx.params))


def _dashed(name: str) -> str:
    return "--" + name.replace("_", "-")


def _all_options(command) -> dict[str, object]:
    return {opt: param for param in command.params for opt in [*param.opts, *getattr(param, "secondary_opts", [])]}


def _visible_options(command) -> dict[str, object]:
    return {opt: param for opt, param in _all_options(command).items() if not getattr(param, "hidden", False)}


# --- one option per field ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_every_field_of_a_stage_config_is_an_option_of_its_command(stage):
    model = PipelineConfig.stage_model(stage)
    options = _visible_options(_command(stage))
    for name, field in model.model_fields.items():
        param = options.get(_dashed(name))
        assert param is not None, f"{stage}: no option {_dashed(name)}"
        assert param.help.startswith(field.description), f"{stage} {_dashed(name)}: help is not the description"
    assert "--config" in options


@pytest.mark.parametrize("command", PIPELINE_COMMANDS)
def test_run_and_archive_expose_every_field_of_every_stage_in_a_panel_per_stage(command):
    options = _visible_options(_command(command))
    for stage in STAGE_NAMES:
        for name, field in PipelineConfig.stage_model(stage).model_fields.items():
            param = options.get(_dashed(f"{stage}_{name}"))
            assert param is not None, f"{command}: no option {_dashed(f'{stage}_{name}')}"
            assert param.help.startswith(field.description)
            assert param.rich_help_panel.startswith(f"{stage} stage")
    assert "--config" in options


def test_bools_are_on_off_pairs_and_defaults_come_from_the_model():
    options = _visible_options(_command("evaluate"))
    assert options["--lpips"] is options["--no-lpips"] and options["--lpips"].default is True
    export = _visible_options(_command("export"))
    assert export["--benchmark-size"].default == (1100, 1604) and export["--crf"].default == 14
    assert _visible_options(_command("run"))["--optimize-preset"].default == "preview"


def test_choices_are_shown_in_help():
    result = CliRunner().invoke(app, ["depth", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "[auto|sweep|colmap]" in result.output and "[auto|cpu|cuda]" in result.output


def test_defaults_give_the_model_defaults_and_equal_the_flows_defaults():
    import inspect

    from flows.archive import process_archive
    from flows.sequence import process_sequence

    for stage in STAGE_NAMES:
        args = ["--work", "w"] if stage == "ingest" else []
        assert parsed(stage, "somewhere", *args) == PipelineConfig.stage_model(stage)()
    for flow in (process_sequence, process_archive):
        assert inspect.signature(flow.fn).parameters["config"].default == PipelineConfig()
    assert parsed("run", "raw", "--work", "w") == PipelineConfig()
    assert parsed("archive", "raw", "--work", "w") == PipelineConfig()


def test_lists_repeat_and_comma_separate_tuples_take_several_values():
    config = parsed("ingest", "raw", "--work", "w", "--cameras", "a,b", "--cameras", "c", "--calibration-size",
                    "2200", "3208")
    assert config.cameras == ["a", "b", "c"] and config.calibration_size == (2200, 3208)
    box = parsed("optimize", "w", "--scene-box", "-1", "-2", "-3", "1", "2", "3").scene_box
    assert box == ((-1, -2, -3), (1, 2, 3))
    assert parsed("optimize", "w", "--holdout-cameras", "").holdout_cameras == []  # none held out
    assert parsed("optimize", "w").holdout_request() is None  # the sequence's recorded set, else auto
    overrides = parsed("optimize", "w", "--overrides", "hash.n_grids=8", "--overrides", "name=text").overrides
    assert overrides == {"hash.n_grids": 8, "name": "text"}


# --- old names ----------------------------------------------------------------------------------------------

ALIASES = [
    (("calibrate", "w", "--masks"), ("calibrate", "w", "--use-masks")),
    (("export", "w", "--radius", "1.5", "--elevation", "10", "--arc", "120"),
     ("export", "w", "--radius-m", "1.5", "--elevation-deg", "10", "--arc-deg", "120")),
    (("export", "w", "--through-cameras", "a,b", "--through-cameras", "c"),
     ("export", "w", "--path-cameras", "a", "--path-cameras", "b,c")),
    (("optimize", "w", "--time-budget", "30", "--no-depth"),
     ("optimize", "w", "--time-budget-s", "30", "--no-use-depth")),
    (("optimize", "w", "--override", "rays_per_batch=2048", "--override", "hash.n_grids=8"),
     ("optimize", "w", "--overrides", "rays_per_batch=2048", "--overrides", "hash.n_grids=8")),
    (("run", "r", "--work", "w", "--preset", "paper", "--steps", "7", "--time-budget", "60", "--device", "cpu",
      "--matte-method", "plate", "--downscale", "2", "--stride", "3", "--count", "4"),
     ("run", "r", "--work", "w", "--optimize-preset", "paper", "--optimize-steps", "7",
      "--optimize-time-budget-s", "60", "--optimize-device", "cpu", "--matte-method", "plate",
      "--ingest-downscale", "2", "--ingest-stride", "3", "--ingest-count", "4")),
    (("archive", "a", "--work", "w", "--preset", "paper", "--count", "1"),
     ("archive", "a", "--work", "w", "--optimize-preset", "paper", "--ingest-count", "1")),
]


@pytest.mark.parametrize("old, new", ALIASES, ids=lambda argv: " ".join(argv[2:4]))
def test_old_option_names_give_the_same_config_as_the_new_ones(old, new):
    assert parsed(*old) == parsed(*new)
    assert parsed(*old) != parsed(*old[:2], *(["--work", "w"] if "--work" in old else []))


def test_holdout_names_the_sequence_set_on_depth_and_optimize_and_keeps_its_old_meaning_on_optimize():
    """optimize --holdout was an older name of --holdout-cameras; it is the holdout field's own option now, on
    depth too: serials mean what they meant, '' still holds none out, and it also takes the keywords."""
    for argv in (("--holdout", "1,2"), ("--holdout", "1", "--holdout", "2"), ("--holdout-cameras", "1,2")):
        assert parsed("optimize", "w", *argv).holdout_request() == ["1", "2"], argv
    assert parsed("optimize", "w", "--holdout", "").holdout_request() == ["none"]
    assert parsed("optimize", "w", "--holdout-cameras", "").holdout_request() == ["none"]
    assert parsed("optimize", "w", "--holdout", "auto").holdout_request() == ["auto"]
    assert parsed("optimize", "w", "--holdout", "2,1", "--holdout-cameras", "1,2").holdout_request() == ["2", "1"]
    with pytest.raises(PipelineError, match="--holdout: .*disagree"):
        parsed("optimize", "w", "--holdout", "1", "--holdout-cameras", "2")

    assert parsed("depth", "w", "--holdout", "1,2").holdout == ["1", "2"]
    assert parsed("depth", "w", "--holdout", "paper").holdout == ["paper"]
    assert parsed("depth", "w", "--holdout", "").holdout == ["none"]
    assert parsed("depth", "w").holdout is None
    config = parsed("run", "r", "--work", "w", "--depth-holdout", "none", "--optimize-holdout", "1,2")
    assert config.depth.holdout == ["none"] and config.optimize.holdout_request() == ["1", "2"]
    assert not _all_options(_command("optimize"))["--holdout"].hidden  # the field's own option, in the help


def test_old_names_are_hidden_from_help():
    options = _all_options(_command("export"))
    assert options["--radius"].hidden and not options["--radius-m"].hidden
    assert options["--through-cameras"].hidden
    assert _visible_options(_command("run")).get("--preset") is None


def test_old_run_options_keep_their_meaning():
    config = parsed("run", "r", "--work", "w", "--device", "cuda")
    assert config.optimize.device == "cuda" and config.depth.device == "auto"  # --device was training's
    assert parsed("calibrate", "w", "--masks", "--no-masks").use_masks is False


@pytest.mark.parametrize("argv, turntable, holdout", [
    ((), True, True),
    (("--turntable",), True, False),
    (("--holdout",), False, True),
    (("--benchmark",), False, False),
    (("--path", "cams.json"), False, False),
    (("--through-cameras", "a"), False, False),
    (("--path-cameras", "a", "--holdout"), False, True),
    (("--no-turntable",), False, True),
])
def test_export_renders_turntable_and_holdout_unless_told_what_to_render(argv, turntable, holdout):
    config = parsed("export", "w", *argv)
    assert (config.turntable, config.holdout) == (turntable, holdout)


# --- --config files ------------------------------------------------------------------------------------------


def _write(path: Path, data: dict) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps(data))
    else:
        import yaml

        path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_config_file_sets_values_and_typed_options_win(tmp_path, suffix):
    file = _write(tmp_path / f"pipeline{suffix}", {
        "ingest": {"count": 2, "stride": 3}, "optimize": {"preset": "paper", "steps": 5, "scene_box": [[0, 0, 0],
                                                                                                      [1, 1, 1]]},
        "export": {"radius_m": 1.2, "benchmark_size": [550, 802]}})
    config = parsed("run", "r", "--work", "w", "--config", str(file), "--steps", "9", "--export-radius-m", "2")
    assert (config.ingest.count, config.ingest.stride) == (2, 3)
    assert (config.optimize.preset, config.optimize.steps) == ("paper", 9)
    assert config.optimize.scene_box == ((0, 0, 0), (1, 1, 1))
    assert (config.export.radius_m, config.export.benchmark_size) == (2.0, (550, 802))
    assert PipelineConfig.from_file(file) == parsed("archive", "a", "--work", "w", "--config", str(file))
    # a stage command reads its section of a whole config ...
    assert parsed("export", "w", "--config", str(file)).radius_m == 1.2
    assert parsed("export", "w", "--config", str(file), "--radius", "3").radius_m == 3.0
    # ... or a file holding only that section
    section = _write(tmp_path / f"export{suffix}", {"radius_m": 1.5, "trajectory": "official"})
    config = parsed("export", "w", "--config", str(section), "--fps", "12")
    assert (config.radius_m, config.trajectory, config.fps) == (1.5, "official", 12.0)


def test_an_option_left_at_its_default_does_not_override_the_file(tmp_path):
    file = _write(tmp_path / "c.yaml", {"evaluate": {"lpips": False, "timesteps": 3}})
    assert parsed("evaluate", "w", "--config", str(file)).lpips is False
    assert parsed("evaluate", "w", "--config", str(file), "--lpips").lpips is True


def test_the_demo_config_round_trips_through_a_file(tmp_path):
    from pipeline.demo import demo_config

    config = demo_config(60.0)
    file = _write(tmp_path / "demo.json", config.model_dump(mode="json"))
    assert PipelineConfig.from_file(file) == config


@pytest.mark.parametrize("content, expected", [
    ({"ingest": {"strde": 2}}, "ingest.strde: unknown key"),
    ({"exprt": {}}, "exprt: unknown key"),
    ({"optimize": {"preset": "fast"}}, "optimize.preset: Input should be 'preview', 'standard' or 'paper'"),
])
def test_a_bad_config_file_is_one_line_naming_the_file_and_the_key(tmp_path, content, expected):
    file = _write(tmp_path / "bad.yaml", content)
    for argv in (["run", "r", "--work", "w"], ["optimize", "w"]):
        result = CliRunner().invoke(app, [*argv, "--config", str(file)])
        assert result.exit_code == 1, result.output
        assert str(file) in result.output and expected in result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("name, text, expected", [
    ("broken.yaml", "ingest: [\n", "not valid YAML"),
    ("broken.json", '{"ingest": ', "not valid JSON"),
    ("list.yaml", "- 1\n", "expected a mapping"),
    ("missing.yaml", None, "cannot read it"),
])
def test_an_unreadable_config_file_is_one_line_naming_it(tmp_path, name, text, expected):
    file = tmp_path / name
    if text is not None:
        file.write_text(text)
    result = CliRunner().invoke(app, ["matte", "w", "--config", str(file)])
    assert result.exit_code == 1 and str(file) in result.output and expected in result.output
    assert "Traceback" not in result.output


def test_a_section_file_with_a_key_of_another_stage_names_it(tmp_path):
    file = _write(tmp_path / "depth.yaml", {"radius_m": 1.0})
    result = CliRunner().invoke(app, ["depth", "w", "--config", str(file)])
    assert result.exit_code == 1 and "radius_m: unknown key" in result.output and "depth section" in result.output


# --- errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, option", [
    (["export", "w", "--radius-m", "-1"], "--radius-m"),
    (["export", "w", "--radius", "-1"], "--radius"),
    (["calibrate", "w", "--mode", "sfm"], "--mode"),
    (["matte", "w", "--method", "bogus"], "--method"),
    (["run", "r", "--work", "w", "--ingest-count", "0"], "--ingest-count"),
    (["run", "r", "--work", "w", "--count", "0"], "--count"),
    (["archive", "a", "--work", "w", "--optimize-preset", "fast"], "--optimize-preset"),
])
def test_a_bad_value_is_one_line_naming_the_option(argv, option):
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 1, result.output
    assert f"{option}:" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_malformed_override_names_the_option_as_typed():
    result = CliRunner().invoke(app, ["optimize", "w", "--override", "rays_per_batch"])
    assert result.exit_code == 1 and "--override 'rays_per_batch'" in result.output and "NAME=VALUE" in result.output


def test_help_imports_no_torch_zarr_or_prefect():
    code = ("import sys; from pipeline.cli import app; "
            "print(sorted(m for m in ('torch', 'zarr', 'prefect') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert out.stdout.strip() == "[]"


# --- end to end: the ingest stage through the command line ----------------------------------------------------


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    return synthesize_capture(tmp_path_factory.mktemp("archive"), cameras=2, frames=4, width=32, height=48)


def _frames(work_root: Path, capture) -> list[int]:
    from storage import CaptureStore

    work = SequenceWorkDir.for_sequence(str(work_root), capture.participant_dir.name, capture.sequence_dir.name)
    return list(CaptureStore.open(work.capture_uri).frame_indices)


def test_ingest_runs_with_a_config_file_and_an_overriding_option(capture, tmp_path):
    file = _write(tmp_path / "ingest.yaml", {"ingest": {"stride": 2, "count": 2, "workers": 1}})
    result = CliRunner().invoke(app, ["ingest", str(capture.sequence_dir), "--work", str(tmp_path / "a"),
                                      "--config", str(file)])
    assert result.exit_code == 0, result.output
    assert "ingest completed" in result.output
    assert _frames(tmp_path / "a", capture) == [0, 2]
    result = CliRunner().invoke(app, ["ingest", str(capture.sequence_dir), "--work", str(tmp_path / "b"),
                                      "--config", str(file), "--stride", "1", "--count", "3"])
    assert result.exit_code == 0, result.output
    assert _frames(tmp_path / "b", capture) == [0, 1, 2]
