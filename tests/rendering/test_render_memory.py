"""A render that runs out of GPU memory stops with the values to lower, for export and evaluate alike.

No GPU here: the model's forward pass over one chunk raises torch's ``OutOfMemoryError``, as a CUDA allocation
inside the chunk loop of ``render_image`` would (on either query path, eager or fast), and the real model, camera
and render path do the rest.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.core.errors import PipelineError
from stages.nersemble import NeRSembleModel
from stages.nersemble.config import preset
from stages.rendering.paths import CameraView
from stages.rendering.render import render_view


def _model_and_view() -> tuple[NeRSembleModel, CameraView]:
    torch.manual_seed(0)
    model = NeRSembleModel(preset("preview"), 2, torch.tensor([[-0.2, -0.2, 0.8], [0.2, 0.2, 1.2]]), backend="torch")
    K = np.array([[20.0, 0, 8], [0, 20.0, 6], [0, 0, 1]])
    return model, CameraView(K, np.eye(4), 16, 12, 0.0)


def test_out_of_gpu_memory_in_a_render_names_chunk_and_substeps(monkeypatch):
    model, view = _model_and_view()
    rendered = render_view(model, view, 2, chunk=64)  # the same render, with memory to spare
    assert rendered.rgb.shape == (12, 16, 3)

    def exhausted(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setattr(model, "forward", exhausted)
    with pytest.raises(PipelineError) as error:
        render_view(model, view, 2, chunk=64)
    message = str(error.value)
    assert "16x12 view ran out of GPU memory" in message
    substeps = model.config.sampler.eval_substeps
    assert "chunk (64) with --chunk" in message and f"eval_substeps ({substeps}) with --eval-substeps" in message
    assert "--device cpu" in message
