"""The one pipeline config: a field per stage of the stage table, readable from YAML and JSON files."""

import pytest

from stages.config import ConfigFileError, PipelineConfig
from stages.core.errors import PipelineError
from stages.table import STAGE_NAMES


def test_one_field_per_stage_in_table_order():
    assert tuple(PipelineConfig.model_fields) == STAGE_NAMES
    config = PipelineConfig()
    for stage in STAGE_NAMES:
        assert type(config.stage(stage)) is PipelineConfig.stage_model(stage)
    with pytest.raises(KeyError, match="unknown stage 'train'"):
        config.stage("train")


def test_a_partial_file_keeps_the_other_defaults(tmp_path):
    (tmp_path / "c.yaml").write_text("optimize:\n  preset: paper\nexport: {benchmark_size: [550, 802]}\n")
    config = PipelineConfig.from_file(tmp_path / "c.yaml")
    assert config.optimize.preset == "paper" and config.export.benchmark_size == (550, 802)
    assert config.model_copy(update={"optimize": PipelineConfig().optimize,
                                     "export": PipelineConfig().export}) == PipelineConfig()
    (tmp_path / "empty.yaml").write_text("")
    assert PipelineConfig.from_file(tmp_path / "empty.yaml") == PipelineConfig()


def test_a_stage_reads_its_section_or_a_file_of_its_own(tmp_path):
    (tmp_path / "whole.json").write_text('{"depth": {"neighbours": 5}, "matte": {"method": "plate"}}')
    (tmp_path / "section.json").write_text('{"neighbours": 6}')
    assert PipelineConfig.stage_from_file(tmp_path / "whole.json", "depth").neighbours == 5
    assert PipelineConfig.stage_from_file(tmp_path / "section.json", "depth").neighbours == 6


def test_file_errors_name_the_file_and_the_key_and_are_pipeline_errors(tmp_path):
    (tmp_path / "c.yaml").write_text("depth: {window: 8, neighbours: 0}\n")
    with pytest.raises(ConfigFileError) as raised:
        PipelineConfig.from_file(tmp_path / "c.yaml")
    message = str(raised.value)
    assert str(tmp_path / "c.yaml") in message and "depth.window" in message and "depth.neighbours" in message
    assert isinstance(raised.value, PipelineError) and isinstance(raised.value, ValueError)
