"""The compiled Triton hash-ensemble kernels on a CUDA GPU, held against the torch backend (skipped without one).

If this process already built the kernels under Triton's interpreter (test_triton_encoding ran first in the same
pytest process), ``test_in_a_compiled_process`` runs this file again in a child process without it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Before triton is imported: on a CPU machine test_triton_encoding must be the first to import it, with
    # its interpreter switched on.
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton", reason="triton does not import here (pip install triton; it is in the test extra)")

from stages.nersemble.config import HashEnsembleConfig, preset  # noqa: E402
from stages.nersemble.encodings import make_encoding  # noqa: E402
from stages.nersemble.hash_encoding import TorchHashEnsemble, TritonHashEnsemble  # noqa: E402
from stages.nersemble.kernels.cuda.hash_encoding import kernels_interpreted as interpreting  # noqa: E402

CONFIGS = {
    "mixed": HashEnsembleConfig(n_grids=3, n_levels=5, log2_table_size=12, base_resolution=8, per_level_scale=1.5),
    "preview": preset("preview").hash,
    "paper": preset("paper").hash,  # 1.6 GB table
}


@pytest.fixture(scope="module")
def compiled():
    if interpreting():
        pytest.skip("the kernels here were built by the interpreter; test_in_a_compiled_process runs this file")


def test_in_a_compiled_process():
    if not interpreting():
        return
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                           cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compiled_kernels_match_the_torch_backend(compiled, name):
    config = CONFIGS[name]
    torch.manual_seed(0)
    fast = TritonHashEnsemble(config).cuda()
    with torch.no_grad():
        fast.table.normal_()
    reference = TorchHashEnsemble(config, table=fast.table)
    n = 20000
    x = torch.rand(n, 3, device="cuda")
    x[:2] = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], device="cuda")
    x.requires_grad_()
    blend = torch.randn(n, config.n_grids, device="cuda", requires_grad=True)
    out_fast, out_ref = fast(x, blend), reference(x, blend)
    torch.testing.assert_close(out_fast, out_ref, atol=1e-4, rtol=1e-4)
    grad_out = torch.randn_like(out_fast)
    grads_fast = torch.autograd.grad(out_fast, [x, blend, fast.table], grad_out)
    grads_ref = torch.autograd.grad(out_ref, [x, blend, reference.table], grad_out)
    for g_fast, g_ref, what in zip(grads_fast, grads_ref, ["positions", "blend", "table"]):
        scale = max(1.0, float(g_ref.abs().max()))
        # Positions: a sample within float rounding of a cell face may floor differently (FMA on the GPU),
        # and the position gradient jumps there; all but a handful must agree.
        bad = ((g_fast - g_ref).abs() > 1e-3 * scale).flatten(1).any(1) if g_ref.dim() > 1 else None
        if what == "positions":
            assert int(bad.sum()) <= n // 1000, f"{int(bad.sum())} of {n} position gradients differ"
        else:
            torch.testing.assert_close(g_fast / scale, g_ref / scale, atol=1e-4, rtol=0, msg=what)


def test_model_with_the_triton_backend_trains_a_step_on_cuda(compiled):
    encoding = make_encoding(CONFIGS["preview"], "triton").cuda()
    assert encoding.uses_kernels(torch.zeros(1, 3, device="cuda"))
    x = torch.rand(4096, 3, device="cuda", requires_grad=True)
    blend = torch.rand(4096, CONFIGS["preview"].n_grids, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        out = encoding(x, blend)
    out.float().square().mean().backward()
    assert torch.isfinite(encoding.table.grad).all() and torch.isfinite(x.grad).all()


def _ragged_samples(n_rays: int, device: str) -> dict:
    generator = torch.Generator(device=device).manual_seed(0)
    counts = torch.randint(0, 160, (n_rays,), device=device, generator=generator)
    counts[::7] = 0  # empty rays among them
    ray_indices = torch.repeat_interleave(torch.arange(n_rays, device=device), counts)
    s = ray_indices.shape[0]
    t_starts = 0.5 + 0.01 * (torch.arange(s, device=device) - (torch.cumsum(counts, 0) - counts)[ray_indices])
    return {"sigmas": 20 * torch.rand(s, device=device, generator=generator) ** 2,
            "rgbs": torch.rand(s, 3, device=device, generator=generator), "t_starts": t_starts,
            "t_ends": t_starts + 0.01, "ray_indices": ray_indices, "n_rays": n_rays}


def test_compiled_compositing_matches_the_torch_twin(compiled):
    from stages.nersemble.rendering import accumulate_along_rays  # noqa: PLC0415
    from stages.nersemble.kernels.cuda.packed import composite_packed  # noqa: PLC0415

    p = _ragged_samples(4096, "cuda")
    sigmas, rgbs = p["sigmas"].requires_grad_(), p["rgbs"].requires_grad_()
    args = (p["t_starts"], p["t_ends"], p["ray_indices"], p["n_rays"])
    fast, ref = composite_packed(sigmas, rgbs, *args), accumulate_along_rays(sigmas, rgbs, *args)
    grad_outs = [torch.randn_like(r) for r in ref]
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, atol=1e-4, rtol=1e-4)
    for f, r in zip(torch.autograd.grad(fast, [sigmas, rgbs], grad_outs),
                    torch.autograd.grad(ref, [sigmas, rgbs], grad_outs)):
        scale = max(1.0, float(r.abs().max()))
        torch.testing.assert_close(f / scale, r / scale, atol=1e-4, rtol=0)


def test_compiled_marcher_matches_the_torch_marcher(compiled):
    """Same samples but for a handful whose midpoint lies within rounding of a cell face (FMA on the GPU)."""
    from stages.nersemble.sampling import march_rays  # noqa: PLC0415

    generator = torch.Generator(device="cuda").manual_seed(1)
    n = 8192
    origins = torch.nn.functional.normalize(torch.randn(n, 3, device="cuda", generator=generator), dim=-1) * 3
    directions = torch.nn.functional.normalize(0.5 * torch.rand(n, 3, device="cuda", generator=generator) - origins,
                                               dim=-1)
    occupied = torch.rand(64, 64, 64, device="cuda", generator=generator) > 0.5
    box = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]], device="cuda")
    fast, ref = (march_rays(origins, directions, box, 0.01, 0.2, 100.0, occupied=occupied, fused=fused)
                 for fused in (True, False))
    counts_fast = torch.bincount(fast.ray_indices, minlength=n)
    counts_ref = torch.bincount(ref.ray_indices, minlength=n)
    assert len(ref) > 100 * n // 10 and abs(len(fast) - len(ref)) <= len(ref) // 10000
    assert int((counts_fast != counts_ref).sum()) <= n // 500


def test_model_on_the_triton_backend_trains_with_fused_marching_and_compositing(compiled):
    from stages.nersemble import NeRSembleModel  # noqa: PLC0415

    config = preset("preview")
    model = NeRSembleModel(config, 2, torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]), backend="triton").cuda()
    origins = torch.tensor([[0.0, 0.0, -3.0]], device="cuda").expand(512, 3)
    directions = torch.nn.functional.normalize(torch.randn(512, 3, device="cuda") * 0.1
                                               + torch.tensor([0.0, 0.0, 1.0], device="cuda"), dim=-1)
    assert model._fused(origins)
    model.train()
    out = model(origins, directions, torch.zeros(512, dtype=torch.long, device="cuda"), step=0)
    (out["rgb"].square().mean() + out["weights"].sum()).backward()
    assert len(out["samples"]) > 512 and torch.isfinite(model.field.encoding.table.grad).all()
