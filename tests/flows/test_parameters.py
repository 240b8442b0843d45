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
