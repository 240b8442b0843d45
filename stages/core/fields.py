"""Config field types that several stages share, declared once, and the base every stage config builds on.

A field's flags say what its stage's config hash covers, so no stage keeps an exclude list by hand:
``knob`` marks an execution knob (where or how fast a stage runs, not what it writes), left out of the hash;
``HASHED_WHEN_SET`` marks a field added after stores were written, left out while unset so their records still
match. The flags travel in ``json_schema_extra``, where the Prefect run form shows them too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticUndefined

KNOB = "execution_knob"
HASHED_WHEN_SET = "hashed_when_set"


def knob(default: Any = PydanticUndefined, **kwargs: Any) -> Any:
    """A pydantic ``Field`` flagged as an execution knob: it changes how a stage runs, never what it writes."""
    return Field(default, json_schema_extra={KNOB: True}, **kwargs)


LockTimeout = Annotated[float, knob(ge=0.0, description="seconds to wait for another writer of the sequence")]
Device = Annotated[Literal["auto", "cpu", "cuda"], knob(description="auto: CUDA if torch sees a GPU, else CPU")]
Threads = Annotated[int, knob(ge=0, description="torch CPU threads; 0 = torch's default")]
Workers = Annotated[int, knob(ge=0, description="tasks run in parallel; 0 = one per CPU core")]
RayChunk = Annotated[int, knob(ge=256, description="rays rendered at once (bounds memory at any resolution)")]
PreviewCameras = Annotated[int, knob(ge=1, description="cameras in the preview sheet")]

# Export and evaluate both choose the render step of a trained model (the weights do not depend on it).
RenderSubsteps = Annotated[int | None, Field(ge=1, json_schema_extra={HASHED_WHEN_SET: True},
                                             description="renders march the model's training step / this; "
                                                         "default: as trained (the optimize preset's "
                                                         "sampler.eval_substeps)")]


def _split_holdout(value: Any) -> list[str] | None:
    """``"a,b"``, ``["a,b", "c"]`` -> ``["a", "b", "c"]``; None -> None (the sequence's set); given but empty ->
    ``["none"]`` (an empty list of hold-out cameras holds none out, as ``optimize --holdout ''`` always did)."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    serials = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    return serials or ["none"]


# Depth and optimize both take the sequence's hold-out request (rules in stages.geometry.holdout). Neither hashes
# the request: each folds the set it resolves to into its input digest; unset, it stays out of result_fields too.
HOLDOUT_HELP = ("hold-out cameras of the sequence, kept out of everything training uses: auto (the paper's four "
                "where all are present, else a quarter of the rig spread over its viewing directions, none below "
                "8 cameras), paper, none (train on every camera), or serials (comma-separated or repeated); "
                "default: the set the sequence recorded, else auto")
HoldoutRequest = Annotated[list[str] | None, BeforeValidator(_split_holdout),
                           Field(json_schema_extra={HASHED_WHEN_SET: True}, description=HOLDOUT_HELP)]


def _flagged(model: type[BaseModel], flag: str) -> frozenset[str]:
    extras = {name: field.json_schema_extra for name, field in model.model_fields.items()}
    return frozenset(name for name, extra in extras.items() if isinstance(extra, dict) and extra.get(flag))


class StageConfig(BaseModel):
    """A stage's settings. Unknown keys are an error, so a typo in a config file or a run form cannot pass."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def knobs(cls) -> frozenset[str]:
        """The fields flagged as execution knobs: outside the config hash."""
        return _flagged(cls, KNOB)

    def result_fields(self) -> dict:
        """The fields that decide the stage's outputs, for its config hash (knobs out, unset late additions out)."""
        fields = self.model_dump(exclude=set(self.knobs()))
        for name in _flagged(type(self), HASHED_WHEN_SET):
            if fields.get(name) is None:
                fields.pop(name, None)
        return fields
