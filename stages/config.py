"""The one pipeline config: every stage's settings under the stage's name, readable from a YAML or JSON file.

The flows take it as their one config parameter (the Prefect run form shows every stage's fields), and the CLI
builds its options from it, so each setting is declared once, in ``stages/<stage>/config.py``. Field names are
the stage names of ``stages.table``, in pipeline order.

A config file holds any part of it; what it leaves out keeps its default::

    optimize:
      preset: preview
      time_budget_s: 600
    export:
      radius_m: 1.2
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stages.calibrate.config import CalibrateConfig
from stages.core.errors import PipelineError
from stages.core.fields import StageConfig
from stages.depth.config import DepthConfig
from stages.evaluate.config import EvaluateConfig
from stages.export.config import ExportConfig
from stages.ingest.config import IngestConfig
from stages.matte.config import MatteConfig
from stages.optimize.config import OptimizeConfig
from stages.table import STAGES_BY_NAME


class ConfigFileError(PipelineError, ValueError):
    """A config file that cannot be read, or holds a key or value no stage takes."""


def _stage_field(model: type[StageConfig], stage: str) -> Any:
    return Field(default_factory=model, description=f"the {stage} stage: {STAGES_BY_NAME[stage].summary}")


class PipelineConfig(BaseModel):
    """Every stage's settings, one field per stage of ``stages.table``; unset stages keep their defaults."""

    model_config = ConfigDict(extra="forbid")

    ingest: IngestConfig = _stage_field(IngestConfig, "ingest")
    calibrate: CalibrateConfig = _stage_field(CalibrateConfig, "calibrate")
    matte: MatteConfig = _stage_field(MatteConfig, "matte")
    depth: DepthConfig = _stage_field(DepthConfig, "depth")
    optimize: OptimizeConfig = _stage_field(OptimizeConfig, "optimize")
    export: ExportConfig = _stage_field(ExportConfig, "export")
    evaluate: EvaluateConfig = _stage_field(EvaluateConfig, "evaluate")

    def stage(self, name: str) -> StageConfig:
        """The config of stage ``name``."""
        if name not in type(self).model_fields:
            raise KeyError(f"unknown stage {name!r}; available: {', '.join(type(self).model_fields)}")
        return getattr(self, name)

    @classmethod
    def stage_model(cls, name: str) -> type[StageConfig]:
        """The config class of stage ``name``."""
        return cls.model_fields[name].annotation

    @classmethod
    def from_file(cls, path: str | Path) -> PipelineConfig:
        """Read a YAML or JSON file holding any part of a pipeline config (stage name -> its fields)."""
        return validated(cls, read_config_file(path), path)

    @classmethod
    def stage_from_file(cls, path: str | Path, stage: str) -> StageConfig:
        """One stage's config from a file holding a whole pipeline config or only that stage's fields.

        A file whose top-level keys include a stage name is a pipeline config (its ``stage`` section is taken);
        any other mapping is the stage's own section.
        """
        data = read_config_file(path)
        if set(data) & set(cls.model_fields):
            return cls.from_file(path).stage(stage)
        return validated(cls.stage_model(stage), data, path, top=f"the {stage} section")


def read_config_file(path: str | Path) -> dict:
    """The mapping in a YAML or JSON file (JSON for ``.json``, YAML otherwise); an empty file is ``{}``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigFileError(f"config file {path}: cannot read it ({error.strerror or error})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as error:
            raise ConfigFileError(f"config file {path}: not valid JSON ({error})") from None
    else:
        import yaml  # only where a YAML file is read: the CLI's --help does without it

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ConfigFileError(f"config file {path}: not valid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"config file {path}: expected a mapping of stage names to settings, "
                              f"got {type(data).__name__}")
    return data


def validated(model: type[BaseModel], data: dict, path: str | Path, top: str = "the top level") -> Any:
    """``model`` from a file's data; pydantic's complaints become one line naming the file and each key."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigFileError(f"config file {path}: {problems(error, _key, model, top)}") from None


def problems(error: ValidationError, name: Callable[[tuple], str], model: type[BaseModel] | None = None,
             top: str = "the top level") -> str:
    """Each of pydantic's complaints as ``<name(location)>: <message>``, joined by '; '.

    With ``model``, unknown keys are followed by the keys their place takes (once per place).
    """
    lines, takes = [], {}
    for e in error.errors():
        loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{name(loc)}: unknown key")
            known = _known_keys(model, loc[:-1]) if model else None
            if known:
                takes[loc[:-1]] = known
        else:
            lines.append(f"{name(loc)}: {e['msg']}")
    lines += [f"{_key(place) if place else top} takes {', '.join(known)}" for place, known in takes.items()]
    return "; ".join(lines)


def _key(loc: tuple) -> str:
    return ".".join(map(str, loc)) or "(top level)"


def _known_keys(model: type[BaseModel], parents: tuple) -> list[str] | None:
    """The field names of the model at ``parents`` below ``model``; None where that is no model."""
    for part in parents:
        field = model.model_fields.get(str(part))
        model = field.annotation if field else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
    return list(model.model_fields)
