"""Hash-ensemble encoding: tcnn's layout and hashing, and the torch backend held against the reference."""

from __future__ import annotations

import pytest
import torch

from stages.nersemble.config import HashEnsembleConfig, preset
from stages.nersemble._reference import ReferenceHashEnsemble, tcnn_grid_index
from stages.nersemble.encodings import make_encoding
from stages.nersemble.hash_encoding import TcnnHashEnsemble, TorchHashEnsemble, grid_layout, trilinear_rows
from stages.nersemble.kernels.registry import auto_backend, tcnn_available

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# Small configs that still mix dense and hashed levels, non-integer scales and several grids.
SMALL_CONFIGS = {
    "preview": preset("preview").hash,
    "mixed": HashEnsembleConfig(n_grids=3, n_levels=5, log2_table_size=12, base_resolution=8, per_level_scale=1.5),
    "all_hashed": HashEnsembleConfig(n_grids=2, n_levels=4, log2_table_size=8, base_resolution=16, per_level_scale=2.0),
    "four_features": HashEnsembleConfig(n_grids=2, n_levels=3, features_per_level=4, log2_table_size=10,
                                        base_resolution=4, per_level_scale=1.7),
}


def test_paper_layout_matches_tcnn():
    layout = grid_layout(16, 16, 1.4472692012786865, 19)
    assert layout.resolutions[:5] == (16, 24, 34, 49, 71)
    assert layout.resolutions[5] == 102 and layout.resolutions[-1] == 4096
    assert layout.dense == (True,) * 5 + (False,) * 11
    assert layout.sizes[:5] == (4096, 13824, 39304, 117656, 357912)  # res^3 rounded up to a multiple of 8
    assert layout.n_entries == 6_299_960  # x 64 features = the ~403M parameters of the method doc


def test_hash_indices_match_hand_computed_tcnn_values():
    t = 2**19
    by_hand = (3 ^ (7 * 2654435761 % 2**32) ^ (11 * 805459861 % 2**32)) % t
    assert by_hand == 364723
    cases = [  # (coords, resolution, size, hashed, expected)
        ((3, 7, 11), 102, t, True, 364723),
        ((4, 7, 11), 102, t, True, 364724),
        ((50, 60, 70), 102, t, True, 227312),
        ((4000, 123, 4095), 4096, t, True, 102336),
        ((3, 7, 11), 16, 4096, False, 3 + 7 * 16 + 11 * 256),
        ((16, 0, 0), 16, 4096, False, 16),  # the +1 corner past the border: dense wrap-around
        ((15, 15, 16), 16, 4096, False, (15 + 15 * 16 + 16 * 256) % 4096),
    ]
    for coords, res, size, hashed, expected in cases:
        index = tcnn_grid_index([torch.tensor([c]) for c in coords], res, size, hashed)
        assert int(index) == expected, coords


def test_torch_backend_uses_the_same_indices():
    config = HashEnsembleConfig(n_grids=1, n_levels=6)  # the paper's levels 0..5, one grid: a small table
    encoding = TorchHashEnsemble(config)
    layout = encoding.layout
    level = 5  # hashed, resolution 102
    cell = torch.tensor([3.0, 7.0, 11.0])
    x = (cell / layout.scales[level]).double()[None]  # p * s + 0.5 = cell + 0.5: the cell is known
    index, frac = encoding.double().corners(x)
    assert torch.allclose(frac[level], torch.full((1, 3), 0.5, dtype=torch.float64))
    corner0, corner_x = index[level, 0, 0], index[level, 0, 4]  # corner order: x slowest, z fastest
    assert int(corner0) == layout.offsets[level] + 364723
    assert int(corner_x) == layout.offsets[level] + 364724
    x0 = torch.tensor([[15.0 / 15.0, 0.0, 0.0]], dtype=torch.float64)  # p = 1 at level 0: pos 15.5
    index0, _ = encoding.corners(x0)
    assert int(index0[0, 0, 4]) == 16  # corner (16, 0, 0) wraps into the next row, as in tcnn


def test_init_is_tcnn_uniform():
    table = TorchHashEnsemble(SMALL_CONFIGS["preview"]).table
    assert table.abs().max() <= 1e-4 and table.abs().max() > 0.9e-4
    assert abs(float(table.detach().mean())) < 1e-6


def _pair(config: HashEnsembleConfig) -> tuple[TorchHashEnsemble, ReferenceHashEnsemble]:
    fast = TorchHashEnsemble(config).double()
    with torch.no_grad():
        fast.table.normal_()  # O(1) values make value and gradient errors visible
    return fast, ReferenceHashEnsemble(config, table=fast.table)


@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
def test_torch_matches_reference_values_and_gradients(name):
    torch.manual_seed(0)
    config = SMALL_CONFIGS[name]
    fast, reference = _pair(config)
    x = torch.rand(300, 3, dtype=torch.float64)
    x[:4] = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.5], [0.999, 0.001, 1.0]])
    x.requires_grad_()
    blend = torch.randn(300, config.n_grids, dtype=torch.float64, requires_grad=True)
    out_fast, out_ref = fast(x, blend), reference(x, blend)
    assert out_fast.shape == (300, config.n_levels * config.features_per_level)
    torch.testing.assert_close(out_fast, out_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.grid_features(x), reference.grid_features(x), atol=1e-5, rtol=0)
    grad_out = torch.randn_like(out_fast)
    grads_fast = torch.autograd.grad(out_fast, [x, blend, fast.table], grad_out)
    grads_ref = torch.autograd.grad(out_ref, [x, blend, reference.table], grad_out)
    for g_fast, g_ref, what in zip(grads_fast, grads_ref, ["x", "blend", "table"]):
        scale = max(1.0, float(g_ref.abs().max()))
        torch.testing.assert_close(g_fast / scale, g_ref / scale, atol=1e-5, rtol=0, msg=what)


def test_gradcheck_custom_backward():
    torch.manual_seed(1)
    # Tiny: numerical Jacobians need one forward per input element (a dense and a hashed level of 16 rows).
    config = HashEnsembleConfig(n_grids=2, n_levels=2, log2_table_size=4, base_resolution=2, per_level_scale=1.5)
    encoding = TorchHashEnsemble(config).double()
    with torch.no_grad():
        encoding.table.normal_()
    # Through the custom autograd Function alone (indices fixed) ...
    x = torch.rand(20, 3, dtype=torch.float64)
    index, frac = encoding.corners(x)
    frac = frac.detach().requires_grad_()
    table = encoding.table.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda f, t: trilinear_rows(index, f, t), (frac, table))
    # ... and end to end w.r.t. positions and blend weights (interior points: no cell-boundary crossings).
    x = (0.2 + 0.6 * torch.rand(8, 3, dtype=torch.float64)).requires_grad_()
    blend = torch.randn(8, config.n_grids, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, b: encoding(p, b), (x, blend), eps=1e-7, atol=1e-5)


def test_float32_forward_close_to_float64():
    config = SMALL_CONFIGS["preview"]
    fast = TorchHashEnsemble(config)
    x = torch.rand(200, 3)
    blend = torch.randn(200, config.n_grids)
    out32 = fast(x, blend)
    fast64 = TorchHashEnsemble(config, table=torch.nn.Parameter(fast.table.detach().double()))
    torch.testing.assert_close(out32.double(), fast64(x.double(), blend.double()), atol=1e-8, rtol=1e-4)


def test_make_encoding_backends():
    config = SMALL_CONFIGS["preview"]
    assert type(make_encoding(config, "torch")) is TorchHashEnsemble
    assert type(make_encoding(config, "reference")) is ReferenceHashEnsemble
    expected = {"tcnn": "TcnnHashEnsemble", "triton": "TritonHashEnsemble", "torch": "TorchHashEnsemble"}
    assert type(make_encoding(config, "auto")).__name__ == expected[auto_backend()]
    assert auto_backend("cpu") == "torch"  # tcnn and triton both need CUDA
    with pytest.raises(ValueError, match="cuda"):
        make_encoding(config, "cuda")


@pytest.mark.skipif(not tcnn_available(), reason="tinycudann and CUDA are not available")
def test_tcnn_matches_torch():
    config = SMALL_CONFIGS["preview"]
    tcnn_encoding = TcnnHashEnsemble(config, dtype=torch.float32).cuda()
    fast = TorchHashEnsemble(config).cuda()
    with torch.no_grad():
        fast.table.normal_(std=0.1)
    tcnn_encoding.load_table(fast.table.detach())
    torch.testing.assert_close(tcnn_encoding.export_table(), fast.table.detach())
    x = torch.rand(4096, 3, device="cuda", requires_grad=True)
    blend = torch.randn(4096, config.n_grids, device="cuda")
    out_tcnn, out_fast = tcnn_encoding(x, blend), fast(x, blend)
    torch.testing.assert_close(out_tcnn, out_fast, atol=1e-4, rtol=1e-3)
    (g_tcnn,) = torch.autograd.grad(out_tcnn.sum(), x)
    (g_fast,) = torch.autograd.grad(out_fast.sum(), x)
    torch.testing.assert_close(g_tcnn, g_fast, atol=1e-2, rtol=1e-2)
