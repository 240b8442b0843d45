"""Config field types that several stages share, declared once."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field


# Export and evaluate both choose the render step of a trained model (the weights do not depend on it).
RenderSubsteps = Annotated[int | None, Field(ge=1, description="renders march the model's training step / this; "
                                                               "default: as trained (the optimize preset's "
                                                               "sampler.eval_substeps)")]


def without_defaulted_render_step(fields: dict) -> dict:
    """Result fields minus an unset ``eval_substeps``, so records written before that option existed still match."""
    if fields.get("eval_substeps") is None:
        fields.pop("eval_substeps", None)
    return fields
