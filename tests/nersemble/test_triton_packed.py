"""The fused Triton compositing and marching kernels on the CPU, run by Triton's interpreter, held against their
torch twins (values and gradients) and against finite differences (gradcheck in float64).

As in test_triton_encoding: ``TRITON_INTERPRET=1`` is switched on before triton is first imported; where triton
was imported compiled earlier in this process, the tests skip and ``test_in_a_fresh_interpreter_process`` runs
this file again in a child process with the variable set.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton does not import here (pip install triton; it is in the test extra)")

from stages.nersemble.kernels.cuda import packed as triton_packed  # noqa: E402
from stages.nersemble.config import preset  # noqa: E402
from stages.nersemble.rendering import accumulate_along_rays, render_samples  # noqa: E402
from stages.nersemble.sampling import march_rays  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Samples per ray: empty rays first, last and in a row, a ray longer than the rest of its program's rays, and
# (with 70 rays) more rays than one program holds, so a second program starts mid-batch.
LAYOUTS = {
    "ragged": [0, 3, 0, 0, 5, 1, 12, 0],
    "all_empty": [0, 0, 0],
    "one_long_ray": [150],
    "two_programs": [(i * 7) % 5 for i in range(70)],
}


@pytest.fixture(scope="module")
def interpreted():
    if not triton_packed.kernels_interpreted():
        pytest.skip("triton was imported (compiled) before this module could switch its interpreter on; "
                    "test_in_a_fresh_interpreter_process runs these tests in a child process")


def test_in_a_fresh_interpreter_process(rerun_under_interpreter):
    if triton_packed.kernels_interpreted():
        return  # the tests below run in this process
    rerun_under_interpreter(__file__)


def _packed(counts: list[int], dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor | int]:
    """Packed samples of ``len(counts)`` rays: sorted intervals of varying length, densities that make some rays
    opaque and leave others half transparent, random colours."""
    generator = torch.Generator().manual_seed(seed)
    counts_t = torch.tensor(counts, dtype=torch.int64)
    ray_indices = torch.repeat_interleave(torch.arange(len(counts)), counts_t)
    s = int(counts_t.sum())
    deltas = 0.02 + 0.1 * torch.rand(s, generator=generator)
    first = torch.cumsum(counts_t, 0) - counts_t
    ends = torch.cumsum(deltas, 0)
    base = (ends - deltas)[first.clamp(max=max(s - 1, 0))][ray_indices] if s else ends
    t_starts = 1.0 + ends - deltas - base
    sigmas = 8.0 * torch.rand(s, generator=generator) ** 2
    rgbs = torch.rand(s, 3, generator=generator)
    return {"sigmas": sigmas.to(dtype), "rgbs": rgbs.to(dtype), "t_starts": t_starts.to(dtype),
            "t_ends": (t_starts + deltas).to(dtype), "ray_indices": ray_indices, "n_rays": len(counts)}


def _close(fast: torch.Tensor, ref: torch.Tensor, what: str, atol: float = 1e-5) -> None:
    scale = max(1.0, float(ref.detach().abs().max())) if ref.numel() else 1.0
    torch.testing.assert_close(fast / scale, ref / scale, atol=atol, rtol=0, msg=what)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_compositing_matches_the_torch_twin(interpreted, layout):
    """Weights and the three per-ray sums, and the gradients to densities and colours from all four outputs."""
    p = _packed(LAYOUTS[layout], torch.float32)
    sigmas, rgbs = p["sigmas"].requires_grad_(), p["rgbs"].requires_grad_()
    args = (p["t_starts"], p["t_ends"], p["ray_indices"], p["n_rays"])
    fast = triton_packed.composite_packed(sigmas, rgbs, *args)
    ref = accumulate_along_rays(sigmas, rgbs, *args)
    names = ["weights", "accumulation", "rgb_sum", "depth_sum"]
    for f, r, what in zip(fast, ref, names):
        assert f.shape == r.shape and f.dtype == torch.float32, what
        _close(f, r, what)
    empty = torch.tensor(LAYOUTS[layout]) == 0
    assert float(fast[1].detach()[empty].abs().sum()) == 0.0  # rays without samples: nothing accumulated
    if not len(sigmas):
        return
    generator = torch.Generator().manual_seed(1)
    grad_outs = [torch.randn(f.shape, generator=generator) for f in fast]
    grads_fast = torch.autograd.grad(fast, [sigmas, rgbs], grad_outs)
    grads_ref = torch.autograd.grad(ref, [sigmas, rgbs], grad_outs)
    for f, r, what in zip(grads_fast, grads_ref, ["sigmas", "rgbs"]):
        assert float(r.abs().max()) > 0, what  # the comparison must be able to fail
        _close(f, r, what, atol=2e-5)


@pytest.mark.parametrize("output", [0, 1, 2, 3])
def test_each_output_alone_carries_its_gradient(interpreted, output):
    """Autograd hands zeros for unused outputs: one output at a time must still give the twin's gradients."""
    p = _packed(LAYOUTS["ragged"], torch.float32, seed=2)
    sigmas, rgbs = p["sigmas"].requires_grad_(), p["rgbs"].requires_grad_()
    args = (p["t_starts"], p["t_ends"], p["ray_indices"], p["n_rays"])
    fast = triton_packed.composite_packed(sigmas, rgbs, *args)[output]
    ref = accumulate_along_rays(sigmas, rgbs, *args)[output]
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    g_fast = torch.autograd.grad(fast, [sigmas, rgbs], grad_out, allow_unused=True)
    g_ref = torch.autograd.grad(ref, [sigmas, rgbs], grad_out, allow_unused=True)
    for f, r, what in zip(g_fast, g_ref, ["sigmas", "rgbs"]):
        _close(f, torch.zeros_like(f) if r is None else r, f"output {output}: {what}", atol=2e-5)


def test_compositing_gradients_agree_with_finite_differences(interpreted):
    """gradcheck on the kernels themselves (they compute in float64 when given float64)."""
    p = _packed([2, 0, 4, 1], torch.float64, seed=4)
    sigmas, rgbs = p["sigmas"].requires_grad_(), p["rgbs"].requires_grad_()

    def run(s: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return triton_packed.composite_packed(s, c, p["t_starts"], p["t_ends"], p["ray_indices"], p["n_rays"])

    assert torch.autograd.gradcheck(run, (sigmas, rgbs), eps=1e-6, atol=1e-7)


def test_rendering_through_the_kernel_gives_the_twins_image(interpreted):
    """render_samples(fused=True) against the torch path: colour over the background, opacity, clipped depth."""
    p = _packed(LAYOUTS["ragged"], torch.float32, seed=5)
    args = (p["sigmas"], p["rgbs"], p["t_starts"], p["t_ends"], p["ray_indices"], p["n_rays"], (0.2, 0.5, 1.0))
    (w_fast, fast), (w_ref, ref) = render_samples(*args, fused=True), render_samples(*args, fused=False)
    _close(w_fast, w_ref, "weights")
    for what in ("rgb", "accumulation", "depth"):
        _close(getattr(fast, what), getattr(ref, what), what)


def _rays(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays from a ring of cameras towards the box, some missing it, some starting inside, some axis-aligned."""
    origins = torch.nn.functional.normalize(torch.randn(n, 3, generator=generator), dim=-1) * 3.0
    origins[: n // 8] *= 0.2  # inside the box
    targets = 0.8 * (2 * torch.rand(n, 3, generator=generator) - 1)
    targets[n // 8: n // 4] *= 6.0  # mostly misses
    directions = torch.nn.functional.normalize(targets - origins, dim=-1)
    directions[-3:] = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # zero components
    origins[-3:] = torch.tensor([[0.1, -0.3, -3.0], [-3.0, 0.2, 0.5], [0.4, 3.0, -0.7]])
    return origins, directions


@pytest.mark.parametrize(("grid", "stratified", "dtype"), [
    ("random", False, torch.float32), ("random", True, torch.float32), ("all_free", True, torch.float32),
    ("all_occupied", False, torch.float32), ("shell", True, torch.float32), ("shell", False, torch.float32),
    ("random", True, torch.float64)])
def test_marching_matches_the_torch_marcher_exactly(interpreted, monkeypatch, grid, stratified, dtype):
    """Same samples, same order, same interval bounds as the torch marcher (its C twin is switched off)."""
    monkeypatch.setenv("NERSEMBLE_FAST", "0")
    generator = torch.Generator().manual_seed(6)
    r = 16
    radius = (torch.stack(torch.meshgrid(*[torch.arange(r)] * 3, indexing="ij")) - 7.5).norm(dim=0)
    occupied = {
        "random": torch.rand(r, r, r, generator=generator) > 0.6,
        "all_free": torch.zeros(r, r, r, dtype=torch.bool),
        "all_occupied": torch.ones(r, r, r, dtype=torch.bool),
        "shell": (radius - 5).abs() < 1.5,
    }[grid]
    rays_o, rays_d = (t.to(dtype) for t in _rays(90, generator))
    box = torch.tensor([[-1.0, -0.8, -1.2], [1.0, 1.1, 0.9]], dtype=dtype)
    runs = []
    for fused in (True, False):
        jitter = torch.Generator().manual_seed(7)
        runs.append(march_rays(rays_o, rays_d, box, 0.05, 0.3, 5.5, occupied=occupied, stratified=stratified,
                               generator=jitter, fused=fused))
    fast, ref = runs
    if grid != "all_free":
        assert len(ref) > 100  # the comparison covers real samples
    assert torch.equal(fast.ray_indices, ref.ray_indices)
    assert torch.equal(fast.t_starts, ref.t_starts) and torch.equal(fast.t_ends, ref.t_ends)


def test_marching_without_rays_and_a_non_cubic_grid(interpreted):
    box = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
    none = march_rays(torch.zeros(0, 3), torch.zeros(0, 3), box, 0.1, occupied=torch.ones(4, 4, 4, dtype=torch.bool),
                      fused=True)
    assert len(none) == 0
    with pytest.raises(ValueError, match="cubic"):
        march_rays(torch.zeros(1, 3) - 3, torch.tensor([[0.0, 0.0, 1.0]]) + 1, box, 0.1,
                   occupied=torch.ones(4, 4, 2, dtype=torch.bool), fused=True)


def test_the_model_takes_the_fused_path_with_the_triton_encoding_and_renders_the_same(interpreted):
    """A model on the triton backend (its kernels, fused marching and compositing) against the same weights on the
    torch backend: rendered colour, opacity, depth and the gradients of a loss through all of it."""
    from stages.nersemble import NeRSembleModel  # noqa: PLC0415

    config = preset("preview")
    box = torch.tensor([[-0.3, -0.3, -0.3], [0.3, 0.3, 0.3]])
    models = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        models[backend] = NeRSembleModel(config, 2, box, backend=backend)
    models["triton"].load_state_dict(models["torch"].state_dict())
    generator = torch.Generator().manual_seed(8)
    rays_o, rays_d = _rays(6, generator)
    rays_o, rays_d = rays_o * 0.25, rays_d
    assert models["triton"]._fused(rays_o) and not models["torch"]._fused(rays_o)
    models["triton"].fused_packed = False
    assert not models["triton"]._fused(rays_o)  # the switch back to the torch twins
    models["triton"].fused_packed = True
    results = {}
    for backend, model in models.items():
        model.train()
        out = model(rays_o, rays_d, torch.tensor([0, 1, 1, 0, 1, 0]), step=config.train.steps - 1,
                    generator=torch.Generator().manual_seed(9))
        (out["rgb"].square().sum() + out["depth"].sum() + out["weights"].sum()).backward()
        results[backend] = [out["rgb"], out["alpha"], out["depth"], model.field.encoding.table.grad]
        assert len(out["samples"]) > 20
    for fast, ref, what in zip(results["triton"], results["torch"], ["rgb", "alpha", "depth", "table grad"]):
        scale = float(ref.detach().abs().max())  # relative to the largest value: the table gradient is ~1e-4
        assert scale > 0, what
        torch.testing.assert_close(fast / scale, ref / scale, atol=1e-4, rtol=0, msg=what)
