"""The fused C SE(3) warp against its torch twin (``se3_exp``, the transform and the NaN guard), values and
gradients, at rotations small enough that the exponential map's angle is clamped and at large ones."""

from __future__ import annotations

import pytest
import torch

from stages.nersemble.kernels.cpu import build as fast
from stages.nersemble.kernels.cpu import ops
from stages.nersemble.deformation import se3_exp

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EPS = 1e-4


def _twin(x: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    rotation, translation = se3_exp(v, r, EPS)
    warped = (rotation @ x[..., None])[..., 0] + translation
    return torch.where(torch.isnan(warped), x, warped)


def _inputs(rotation_scale: float, n: int = 400) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(n, 3, generator=gen, dtype=torch.float64)
    v = 0.1 * torch.randn(n, 3, generator=gen, dtype=torch.float64)
    r = rotation_scale * torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return x, v, r


@pytest.mark.parametrize("rotation_scale", [1e-5, 1e-2, 0.7])  # clamped angle, either side of it, large
def test_fused_warp_matches_the_torch_twin(rotation_scale):
    if fast.library() is None:
        pytest.skip("the fast path's kernels are not available here")
    x64, v64, r64 = _inputs(rotation_scale)
    grad = torch.randn(x64.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    # The twin in float64 is the truth; the kernel takes float32 inputs and sums its gradients in double.
    leaves64 = [t.clone().requires_grad_() for t in (x64, v64, r64)]
    expected = _twin(*leaves64)
    expected_grads = torch.autograd.grad(expected, leaves64, grad)
    leaves = [t.float().requires_grad_() for t in (x64, v64, r64)]
    warped = ops.se3_warp(*leaves, EPS)
    grads = torch.autograd.grad(warped, leaves, grad.float())
    torch.testing.assert_close(warped.double(), expected.detach(), rtol=0, atol=2e-6)
    for name, got, want in zip(("x", "v", "r"), grads, expected_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), msg=name)


def test_a_nan_warp_falls_back_to_the_input_and_passes_its_gradient_to_it():
    if fast.library() is None:
        pytest.skip("the fast path's kernels are not available here")
    x = torch.rand(3, 3, requires_grad=True)
    v = torch.zeros(3, 3)
    v[1, 2] = float("nan")
    warped = ops.se3_warp(x, v, torch.full((3, 3), 0.2), EPS)
    (grad_x,) = torch.autograd.grad(warped.sum(), x)
    assert torch.equal(warped[1, 2], x[1, 2]) and not torch.isnan(warped).any()
    assert grad_x[1, 2] == 1.0
