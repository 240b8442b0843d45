"""The Triton hash-ensemble kernels on the CPU, run by Triton's interpreter, held against the reference twin.

Triton decides interpreter-or-compiler when ``@triton.jit`` runs, for its own library functions too, i.e. when
``triton`` is first imported. So this module switches ``TRITON_INTERPRET=1`` on before that import; where
something in this process imported triton earlier (compiled), the tests here skip and
``test_in_a_fresh_interpreter_process`` runs this file again in a child process with the variable set.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton does not import here (pip install triton; it is in the test extra)")

from stages.nersemble._reference import ReferenceHashEnsemble  # noqa: E402
from stages.nersemble.config import HashEnsembleConfig, preset  # noqa: E402
from stages.nersemble.encodings import make_encoding  # noqa: E402
from stages.nersemble.hash_encoding import TorchHashEnsemble, TritonHashEnsemble  # noqa: E402
from stages.nersemble.kernels.cuda.hash_encoding import backward_block_points, block_points  # noqa: E402
from stages.nersemble.kernels.cuda.hash_encoding import kernels_interpreted as interpreting  # noqa: E402
from stages.nersemble.kernels.registry import auto_backend  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Small tables that still cover what the kernels branch on: dense levels (with the border wrap-around),
# hashed levels, hashed levels at the paper's finest resolutions (uint32 wrap of the prime products),
# ensembles whose K or F is not a power of two (padding lanes), one grid, and a block not filled by points.
CONFIGS = {
    "mixed": HashEnsembleConfig(n_grids=3, n_levels=5, log2_table_size=12, base_resolution=8, per_level_scale=1.5),
    "all_hashed": HashEnsembleConfig(n_grids=2, n_levels=3, log2_table_size=8, base_resolution=16,
                                     per_level_scale=2.0),
    "all_dense": HashEnsembleConfig(n_grids=4, n_levels=3, log2_table_size=14, base_resolution=4,
                                    per_level_scale=1.6),
    "fine_hashed": HashEnsembleConfig(n_grids=2, n_levels=2, log2_table_size=10, base_resolution=2048,
                                      per_level_scale=2.0),
    "three_features": HashEnsembleConfig(n_grids=2, n_levels=3, features_per_level=3, log2_table_size=10,
                                         base_resolution=4, per_level_scale=1.7),
    "one_grid": HashEnsembleConfig(n_grids=1, n_levels=4, log2_table_size=9, base_resolution=6,
                                   per_level_scale=1.9),
}
N_POINTS = 150


@pytest.fixture(scope="module")
def interpreted():
    """The kernels as Triton's interpreter built them; else skip (the child-process test runs this file)."""
    if not interpreting():
        pytest.skip("triton was imported (compiled) before this module could switch its interpreter on; "
                    "test_in_a_fresh_interpreter_process runs these tests in a child process")


def test_in_a_fresh_interpreter_process(rerun_under_interpreter):
    """Where the kernels here are compiled, run this file again under the interpreter, in a child process."""
    if interpreting():
        return  # the tests below run in this process
    rerun_under_interpreter(__file__)


def _pair(config: HashEnsembleConfig) -> tuple[TritonHashEnsemble, ReferenceHashEnsemble]:
    fast = TritonHashEnsemble(config)
    with torch.no_grad():
        fast.table.normal_()  # O(1) values make value and gradient errors visible
    return fast, ReferenceHashEnsemble(config, table=fast.table)


def _points(n: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.rand(n, 3, generator=generator)
    # The box corners and faces: p = 1 puts the +1 corner past the border of dense levels (tcnn wraps it).
    x[:4] = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.5], [0.999, 0.001, 1.0]])
    return x


def _close(fast: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    scale = max(1.0, float(ref.detach().abs().max()))
    torch.testing.assert_close(fast / scale, ref / scale, atol=2e-5, rtol=0, msg=what)


def test_the_interpreter_runs_the_kernels_here(interpreted):
    fast = TritonHashEnsemble(CONFIGS["mixed"])
    assert interpreting() and fast.uses_kernels(torch.zeros(1, 3))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_values_and_gradients_match_the_reference(interpreted, name):
    config = CONFIGS[name]
    generator = torch.Generator().manual_seed(0)
    fast, reference = _pair(config)
    x = _points(N_POINTS, generator).requires_grad_()
    blend = torch.randn(N_POINTS, config.n_grids, generator=generator, requires_grad=True)
    out_fast, out_ref = fast(x, blend), reference(x, blend)
    assert out_fast.shape == (N_POINTS, config.n_levels * config.features_per_level)
    _close(out_fast, out_ref, "values")
    grad_out = torch.randn(out_fast.shape, generator=generator)
    grads_fast = torch.autograd.grad(out_fast, [x, blend, fast.table], grad_out)
    grads_ref = torch.autograd.grad(out_ref, [x, blend, reference.table], grad_out)
    for g_fast, g_ref, what in zip(grads_fast, grads_ref, ["positions", "blend", "table"]):
        assert float(g_ref.abs().max()) > 0, what  # the comparison below must be able to fail
        _close(g_fast, g_ref, what)


def test_paper_levels_hash_like_the_reference(interpreted):
    """The paper's 16 levels (5 dense, 11 hashed up to resolution 4096) with one grid: a 50 MB table."""
    config = HashEnsembleConfig(n_grids=1, n_levels=16)
    generator = torch.Generator().manual_seed(1)
    fast, reference = _pair(config)
    x = _points(40, generator).requires_grad_()
    blend = torch.rand(40, 1, generator=generator)
    out_fast, out_ref = fast(x, blend), reference(x, blend)
    _close(out_fast, out_ref, "values")
    grad_out = torch.randn(out_fast.shape, generator=generator)
    (gx_fast, gt_fast), (gx_ref, gt_ref) = (torch.autograd.grad(o, [x, e.table], grad_out)
                                            for o, e in ((out_fast, fast), (out_ref, reference)))
    _close(gx_fast, gx_ref, "positions")
    _close(gt_fast, gt_ref, "table")


@pytest.mark.parametrize("needs", [("table",), ("positions", "table"), ("blend",), ("positions",)])
def test_only_the_requested_gradients(interpreted, needs):
    """The backward skips unrequested outputs (constexpr flags) without changing the requested ones."""
    config = CONFIGS["mixed"]
    generator = torch.Generator().manual_seed(2)
    fast, reference = _pair(config)
    x = _points(64, generator).requires_grad_("positions" in needs)
    blend = torch.randn(64, config.n_grids, generator=generator).requires_grad_("blend" in needs)
    fast.table.requires_grad_("table" in needs)
    inputs = {"positions": x, "blend": blend, "table": fast.table}
    wanted = [inputs[name] for name in needs]
    grad_out = torch.randn(64, config.n_levels * config.features_per_level, generator=generator)
    grads_fast = torch.autograd.grad(fast(x, blend), wanted, grad_out)
    grads_ref = torch.autograd.grad(reference(x, blend), wanted, grad_out)
    for g_fast, g_ref, what in zip(grads_fast, grads_ref, needs):
        _close(g_fast, g_ref, what)


def test_half_precision_inputs_as_under_autocast(interpreted):
    """fp16 positions and blend weights (a deformation MLP under autocast) come back with fp16 gradients."""
    config = CONFIGS["mixed"]
    generator = torch.Generator().manual_seed(3)
    fast, reference = _pair(config)
    x = (0.05 + 0.9 * torch.rand(32, 3, generator=generator)).half().requires_grad_()
    blend = torch.randn(32, config.n_grids, generator=generator).half().requires_grad_()
    out = fast(x, blend)
    assert out.dtype == torch.float32
    _close(out, reference(x.float(), blend.float()), "values")
    gx, gb = torch.autograd.grad(out.sum(), [x, blend])
    assert gx.dtype == torch.float16 and gb.dtype == torch.float16


def test_no_points(interpreted):
    fast = TritonHashEnsemble(CONFIGS["mixed"])
    x = torch.zeros(0, 3, requires_grad=True)
    out = fast(x, torch.zeros(0, 3))
    assert out.shape == (0, 10)
    out.sum().backward()
    assert x.grad.shape == (0, 3) and float(fast.table.grad.abs().sum()) == 0.0


def test_state_dict_moves_between_torch_and_triton(interpreted):
    config = CONFIGS["mixed"]
    torch_encoding = make_encoding(config, "torch")
    triton_encoding = make_encoding(config, "triton")
    assert type(triton_encoding) is TritonHashEnsemble
    with torch.no_grad():
        torch_encoding.table.normal_()
    state = torch_encoding.state_dict()
    assert {k: v.shape for k, v in triton_encoding.state_dict().items()} == {k: v.shape for k, v in state.items()}
    triton_encoding.load_state_dict(state)
    x, blend = torch.rand(50, 3), torch.randn(50, config.n_grids)
    _close(triton_encoding(x, blend), torch_encoding(x, blend), "values after torch -> triton")
    back = TorchHashEnsemble(config)
    back.load_state_dict(triton_encoding.state_dict())
    assert torch.equal(back.table, torch_encoding.table)


def test_block_points_is_a_power_of_two_tile():
    paper = preset("paper").hash
    assert block_points(paper.n_grids, paper.features_per_level) == 32  # 32 x 64 lanes
    assert backward_block_points(paper.n_grids, paper.features_per_level) == 8  # a quarter of the tile
    for k, f in [(1, 1), (3, 3), (32, 2), (64, 8)]:
        b, back = block_points(k, f), backward_block_points(k, f)
        assert b >= 16 and b & (b - 1) == 0 and back >= 8 and back & (back - 1) == 0 and back <= b


def test_auto_backend_on_the_cpu_is_torch():
    assert auto_backend("cpu") == "torch"


def test_encoding_triton_without_cuda_names_the_fallback():
    from stages.core.errors import PipelineError  # noqa: PLC0415
    from stages.optimize.stage import resolve_backend  # noqa: PLC0415

    assert resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(PipelineError, match=r"needs a CUDA GPU.*--encoding torch"):
        resolve_backend("triton", "cpu")


def test_encoding_triton_without_triton_names_what_is_missing(monkeypatch):
    from stages.core.errors import PipelineError  # noqa: PLC0415
    from stages.optimize.stage import resolve_backend  # noqa: PLC0415

    monkeypatch.setitem(sys.modules, "triton", None)  # what `import triton` does where it is not installed
    with pytest.raises(PipelineError, match=r"triton package does not import.*--encoding torch"):
        resolve_backend("triton", "cpu")
    with pytest.raises(ImportError, match="triton"):
        make_encoding(CONFIGS["mixed"], "triton")


def test_a_model_on_the_triton_backend_matches_the_torch_backend(interpreted):
    """The drop-in at model level: same weights, same densities, colours and gradients through the whole field."""
    from stages.nersemble import NeRSembleModel  # noqa: PLC0415

    config = preset("preview")
    box = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
    models = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        models[backend] = NeRSembleModel(config, 3, box, backend=backend)
    assert type(models["triton"].field.encoding) is TritonHashEnsemble
    models["triton"].load_state_dict(models["torch"].state_dict())
    generator = torch.Generator().manual_seed(4)
    positions = 1.8 * torch.rand(120, 3, generator=generator) - 0.9
    directions = torch.nn.functional.normalize(torch.randn(120, 3, generator=generator), dim=-1)
    timesteps = torch.randint(0, 3, (120,), generator=generator)
    results = {}
    for backend, model in models.items():
        windows = model.windows(config.train.steps - 1)  # all grids open: blend codes get gradients
        sigma, rgb, _ = model.query(positions, directions, timesteps, windows)
        (sigma.sum() + rgb.sum()).backward()
        results[backend] = (sigma, rgb, model.field.encoding.table.grad, model.codes.blend.weight.grad)
    for fast, ref, what in zip(results["triton"], results["torch"], ["sigma", "rgb", "table grad", "code grad"]):
        assert float(ref.detach().abs().max()) > 0, what
        _close(fast, ref, what)


# --- a kernel that fails on first use never crashes a run -------------------------------------------------------


def _broken(monkeypatch, kernel_name: str, error: str = "ptxas fatal: Unsupported .version 9.9") -> None:
    """Make every launch of ``kernel_name`` fail as a compiler or driver error would."""
    from stages.nersemble.kernels.cuda.launch import Launch  # noqa: PLC0415
    from stages.nersemble.kernels.registry import KernelError  # noqa: PLC0415

    run = Launch.run

    def failing(self):
        if self.name == kernel_name:
            raise KernelError(self.name, "NVIDIA Old GPU (sm_50)", RuntimeError(error))
        return run(self)

    monkeypatch.setattr(Launch, "run", failing)


@pytest.mark.parametrize("kernel", ["hash_ensemble_fwd", "hash_ensemble_bwd"])
def test_auto_falls_back_to_torch_with_one_warning_naming_the_kernel(interpreted, monkeypatch, kernel):
    config = CONFIGS["mixed"]
    encoding, reference = _pair(config)
    encoding.strict = False  # what --encoding auto builds
    _broken(monkeypatch, kernel)
    x = _points(N_POINTS, torch.Generator().manual_seed(1)).requires_grad_()
    blend = torch.rand(N_POINTS, config.n_grids).requires_grad_()
    with pytest.warns(RuntimeWarning, match=rf"{kernel} failed on NVIDIA Old GPU \(sm_50\).*Unsupported"):
        out = encoding(x, blend)
    assert encoding.failure is not None and kernel in encoding.failure
    _close(out, reference(x, blend), "values after the fallback")
    out.sum().backward()  # the step goes on: gradients through the torch path
    assert x.grad is not None and torch.isfinite(x.grad).all()
    import warnings  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning only: later calls run the torch path silently
        encoding(x, blend)


def test_an_explicit_triton_encoding_fails_with_the_kernel_and_the_alternative(interpreted, monkeypatch):
    from stages.nersemble.kernels.registry import KernelError  # noqa: PLC0415

    encoding, _ = _pair(CONFIGS["mixed"])
    assert encoding.strict  # make_encoding(config, "triton"), i.e. --encoding triton
    _broken(monkeypatch, "hash_ensemble_bwd")
    x = _points(N_POINTS, torch.Generator().manual_seed(1)).requires_grad_()
    with pytest.raises(KernelError, match=r"hash_ensemble_bwd failed on NVIDIA Old GPU.*--encoding torch"):
        encoding(x, torch.rand(N_POINTS, CONFIGS["mixed"].n_grids))


def test_a_kernel_giving_wrong_values_is_caught_on_first_use(interpreted, monkeypatch):
    """A miscompiled kernel that runs but computes the wrong thing falls back too, before training uses it."""
    from stages.nersemble.kernels.cuda.launch import Launch  # noqa: PLC0415

    run = Launch.run

    def off_by_a_half(self):
        run(self)
        if self.name == "hash_ensemble_fwd":
            self.args[3].mul_(0.5)  # the output

    monkeypatch.setattr(Launch, "run", off_by_a_half)
    encoding, reference = _pair(CONFIGS["mixed"])
    encoding.strict = False
    x, blend = _points(N_POINTS, torch.Generator().manual_seed(2)), torch.rand(N_POINTS, CONFIGS["mixed"].n_grids)
    with pytest.warns(RuntimeWarning, match="hash_ensemble.*differ from the torch twin"):
        out = encoding(x, blend)
    _close(out, reference(x, blend), "values after the fallback")


def test_the_model_reports_the_backends_and_falls_back_for_packed_kernels(interpreted, monkeypatch):
    from stages.nersemble import NeRSembleModel  # noqa: PLC0415

    model = NeRSembleModel(preset("preview"), 2, torch.tensor([[-1.0] * 3, [1.0] * 3]), backend="triton")
    model.allow_kernel_fallback()
    assert model.kernels_used() == {"encoding": "triton", "marching_compositing": "triton", "fallbacks": []}
    fresh = NeRSembleModel(preset("preview"), 2, torch.tensor([[-1.0] * 3, [1.0] * 3]), backend="triton")
    fresh.allow_kernel_fallback()
    _broken(monkeypatch, "march_kernel")
    with pytest.warns(RuntimeWarning, match="march_kernel failed.*torch marching and compositing"):
        used = fresh.kernels_used()
    assert used["marching_compositing"] != "triton" and "march_kernel" in used["fallbacks"][0]


def test_the_first_use_check_runs_inside_a_no_grad_render(interpreted):
    """A render's marching pass is the packed kernels' first use, under no_grad: the check still runs and passes."""
    from stages.nersemble import NeRSembleModel  # noqa: PLC0415

    model = NeRSembleModel(preset("preview"), 2, torch.tensor([[-1.0] * 3, [1.0] * 3]), backend="triton")
    model.allow_kernel_fallback(False)  # a failing check would raise here
    with torch.no_grad():
        assert model._fused(torch.zeros(1, 3))
    assert model.packed_failure is None and model.kernels_used()["marching_compositing"] == "triton"
