"""The fused C hash-ensemble kernels against their torch twin (TorchHashEnsemble.reference_forward).

Values and all three gradients (positions, blend weights, table), on a config with dense and hashed levels,
plus the fallback when no compiler is found and the cache key that keeps stale builds from being loaded.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch

from stages.nersemble.kernels.cpu import build as fast
from stages.nersemble.config import HashEnsembleConfig
from stages.nersemble.hash_encoding import TorchHashEnsemble

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 6 levels from 16 to 512 with 2^10 entries: the first two levels are dense (with the border wrap-around),
# the rest hashed; 4 grids x 2 features as the preview has.
CONFIG = HashEnsembleConfig(n_grids=4, n_levels=6, features_per_level=2, log2_table_size=10, base_resolution=4,
                            per_level_scale=HashEnsembleConfig.per_level_scale_for(4, 512, 6), init_scale=0.5)


def _kernels_or_skip() -> None:
    if fast.compiler() is None:
        pytest.skip("no C compiler on PATH: the fast path cannot be built here (the fallback is tested below)")
    if fast.library() is None:
        pytest.fail(f"a compiler is present but the kernels did not build: {fast._state['failed']}")


def _inputs(n: int = 500, seed: int = 0, config: HashEnsembleConfig = CONFIG,
            ) -> tuple[TorchHashEnsemble, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    encoding = TorchHashEnsemble(config)
    x = torch.rand(n, 3, generator=gen)
    x[:5] = torch.tensor([0.0, 1.0, 0.5]) + torch.zeros(5, 3)  # box faces: the dense levels' wrap-around
    blend = torch.randn(n, config.n_grids, generator=gen)
    return encoding, x, blend


def test_layout_has_dense_and_hashed_levels():
    layout = TorchHashEnsemble(CONFIG).layout
    assert 0 < layout.n_dense < CONFIG.n_levels


# Rows of 8, 16 and 64 columns with 2 features take the kernels' vectorised readers, 6 and 3 x 3 the generic loop.
@pytest.mark.parametrize(("n_grids", "features"), [(4, 2), (8, 2), (32, 2), (3, 2), (3, 3)])
def test_fused_forward_matches_the_torch_twin(n_grids, features):
    _kernels_or_skip()
    config = replace(CONFIG, n_grids=n_grids, features_per_level=features)
    encoding, x, blend = _inputs(config=config)
    fused = encoding(x, blend)
    twin = encoding.reference_forward(x, blend)
    assert fused.shape == twin.shape == (x.shape[0], config.n_levels * config.features_per_level)
    torch.testing.assert_close(fused, twin, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("n_grids", "features"), [(4, 2), (32, 2), (3, 2)])  # constant sizes (4 x 2); run-time ones
def test_fused_gradients_match_the_torch_twin(n_grids, features):
    _kernels_or_skip()
    config = replace(CONFIG, n_grids=n_grids, features_per_level=features)
    encoding, x, blend = _inputs(config=config)
    grad_out = torch.randn(x.shape[0], config.n_levels * config.features_per_level)
    grads = []
    for forward in (encoding.forward, encoding.reference_forward):
        xi, bi = x.clone().requires_grad_(True), blend.clone().requires_grad_(True)
        encoding.table.grad = None
        (forward(xi, bi) * grad_out).sum().backward()
        grads.append((xi.grad, bi.grad, encoding.table.grad.clone()))
    for fused, twin, name in zip(grads[0], grads[1], ("x", "blend", "table"), strict=True):
        # float32 sums in another order: agreement to rounding, relative to the gradient's magnitude
        torch.testing.assert_close(fused, twin, rtol=1e-4, atol=1e-6 * float(twin.abs().max()),
                                   msg=f"gradient of {name}")


def test_gradients_do_not_depend_on_the_thread_count():
    """One thread scatters the table's gradient in the positions' pass, more threads in a pass of its own: the
    same sums in the same order, so every gradient is bit-for-bit the same."""
    _kernels_or_skip()
    encoding, x, blend = _inputs()
    grad_out = torch.randn(x.shape[0], CONFIG.n_levels * CONFIG.features_per_level)
    grads = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        xi, bi = x.clone().requires_grad_(True), blend.clone().requires_grad_(True)
        encoding.table.grad = None
        (encoding(xi, bi) * grad_out).sum().backward()
        grads.append((xi.grad, bi.grad, encoding.table.grad.clone()))
    torch.set_num_threads(1)
    for one, two, name in zip(*grads, ("x", "blend", "table"), strict=True):
        assert torch.equal(one, two), f"gradient of {name}"


def test_fused_input_gradient_matches_finite_differences():
    """A second witness for d/dx: central differences in float64 of the fused forward (inside one cell)."""
    _kernels_or_skip()
    encoding, x, blend = _inputs(n=20, seed=3)
    xi = x.clone().requires_grad_(True)
    encoding(xi, blend).sum().backward()
    h = 2e-5
    for axis in range(3):
        step = torch.zeros_like(x)
        step[:, axis] = h
        numeric = (encoding(x + step, blend).double().sum(1) - encoding(x - step, blend).double().sum(1)) / (2 * h)
        # Samples whose +-h crosses a cell boundary on some level are not differentiable there: skip them.
        smooth = torch.ones(x.shape[0], dtype=torch.bool)
        for scale in encoding.layout.scales:
            pos = x[:, axis] * scale + 0.5
            smooth &= torch.floor(pos - h * scale) == torch.floor(pos + h * scale)
        assert smooth.sum() >= 3
        torch.testing.assert_close(xi.grad[smooth, axis].double(), numeric[smooth], rtol=2e-2, atol=2e-2 * float(numeric.abs().max()))


def test_reference_path_when_forced(monkeypatch):
    monkeypatch.setenv(fast.ENV, "0")
    encoding, x, blend = _inputs(n=50)
    assert not fast.applies(x, blend, encoding.table)
    torch.testing.assert_close(encoding(x, blend), encoding.reference_forward(x, blend), rtol=0, atol=0)


def test_no_compiler_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(fast, "_state", {"lib": None, "failed": None, "warned": False})
    monkeypatch.setattr(fast, "compiler", lambda: None)
    encoding, x, blend = _inputs(n=50)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = encoding(x, blend)
        encoding(x, blend)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "torch reference path" in messages[0] and "no C compiler" in messages[0]
    torch.testing.assert_close(out, encoding.reference_forward(x, blend), rtol=0, atol=0)


def test_failed_build_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(fast, "_state", {"lib": None, "failed": None, "warned": False})
    monkeypatch.setattr(fast, "compiler", lambda: "/bin/false")
    monkeypatch.setenv(fast.CACHE_ENV, str(tmp_path))
    encoding, x, blend = _inputs(n=50)
    with pytest.warns(RuntimeWarning, match="building the kernels failed"):
        out = encoding(x, blend)
    torch.testing.assert_close(out, encoding.reference_forward(x, blend), rtol=0, atol=0)


def test_stale_cache_is_rebuilt_not_loaded(monkeypatch, tmp_path):
    """Another source gives another cache folder; a corrupt file under the right name is rebuilt."""
    cc = fast.compiler()
    if cc is None:
        pytest.skip("no C compiler on PATH")
    key = fast.build_key(cc)
    monkeypatch.setattr(fast, "SOURCE", fast.SOURCE + "\n/* changed */\n")
    assert fast.build_key(cc) != key
    monkeypatch.setattr(fast, "SOURCE", fast.SOURCE.replace("\n/* changed */\n", ""))
    monkeypatch.setenv(fast.CACHE_ENV, str(tmp_path))
    target = tmp_path / f"fast-{fast.build_key(cc)}" / "libnersemble_fast.so"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not a shared library")
    monkeypatch.setattr(fast, "_state", {"lib": None, "failed": None, "warned": False})
    assert fast.library() is not None
    assert target.read_bytes()[:4] == b"\x7fELF"
