"""What the Prefect run form shows: every flow parameter and every stage config field with a description."""

import pytest
from prefect.utilities.callables import parameter_schema

from flows.archive import process_archive
from flows.optimize import optimize_sequence
from flows.sequence import process_sequence
from stages.config import PipelineConfig
from stages.table import STAGE_NAMES


@pytest.mark.parametrize("flow", [process_sequence, process_archive, optimize_sequence], ids=lambda f: f.name)
def test_every_flow_parameter_is_described_in_the_run_form(flow):
    schema = parameter_schema(flow).model_dump()
    undescribed = [name for name, spec in schema["properties"].items() if not spec.get("description")]
    assert not undescribed, f"{flow.name}: no description for {undescribed}"


def test_the_pipeline_config_form_describes_every_stage_and_field():
    schema = parameter_schema(process_sequence).model_dump()
    definitions = schema["definitions"]
    pipeline = definitions["PipelineConfig"]["properties"]
    assert list(pipeline) == list(STAGE_NAMES)
    for stage in STAGE_NAMES:
        assert pipeline[stage].get("description")
        fields = definitions[PipelineConfig.stage_model(stage).__name__]["properties"]
        assert all(spec.get("description") for spec in fields.values()), stage
    assert schema["properties"]["config"]["default"] == PipelineConfig().model_dump(mode="json")


def _cli_defaults(command) -> dict:  # noqa: ANN001 - a typer command function
    import inspect

    return {name: p.default for name, p in inspect.signature(command).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_deployment_defaults_are_the_command_line_defaults():
    """prefect.yaml sets no parameters, so the run form starts from the flows' defaults: those of the CLI."""
    from pathlib import Path

    import yaml

    from pipeline.cli import archive_command, run

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "prefect.yaml").read_text())
    assert all(not deployment.get("parameters") for deployment in spec["deployments"])
    archive = {name: p["default"] for name, p in parameter_schema(process_archive).model_dump()["properties"].items()
               if "default" in p}
    cli = _cli_defaults(archive_command)
    assert archive["max_concurrent"] == cli["concurrency"]
    assert archive["rerun_finished"] == cli["rerun"]
    assert archive["sequence_deployment"] == cli["deployment"]
    assert archive["optimize_deployment"] == cli["optimize_deployment"] == _cli_defaults(run)["optimize_deployment"]
    assert archive["config"] == PipelineConfig().model_dump(mode="json")


def test_the_matte_default_says_what_it_costs():
    from stages.matte.config import MatteConfig

    field = MatteConfig.model_fields["method"]
    assert field.default == "auto" and "slower than plate" in field.description
