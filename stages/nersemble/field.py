"""The radiance field in canonical space: hash-ensemble features -> density and view-dependent colour.

Also the per-timestep latent codes and the ensemble blend rules, which decide how much each hash grid
contributes at a given step of the warm-up.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import FieldConfig, HashEnsembleConfig, TimeCodeConfig
from .encodings import make_encoding
from .hash_encoding import Backend, HashEnsembleEncoding
from .schedules import cosine_window


class _TruncExp(torch.autograd.Function):
    """exp in the forward, exp(clamp(x)) in the backward: large raw densities cannot blow up the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, clamp: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.clamp = clamp
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad * torch.exp(torch.clamp(x, -ctx.clamp, ctx.clamp)), None


def trunc_exp(x: torch.Tensor, clamp: float = 15.0) -> torch.Tensor:
    """nerfstudio's ``trunc_exp``, always evaluated in float32 (fp16 exp overflows at 11)."""
    return _TruncExp.apply(x.float(), clamp)


class TimeCodes(nn.Module):
    """Per-timestep latent codes: blend weights (one per hash grid) and deformation codes.

    Both ~ Normal(0, init_scale / sqrt(dim)); no regulariser acts on them (none upstream).
    """

    def __init__(self, n_timesteps: int, n_grids: int, config: TimeCodeConfig) -> None:
        super().__init__()
        self.blend = nn.Embedding(n_timesteps, n_grids)
        self.deformation = nn.Embedding(n_timesteps, config.deformation_dim)
        nn.init.normal_(self.blend.weight, std=config.init_scale / math.sqrt(n_grids))
        nn.init.normal_(self.deformation.weight, std=config.init_scale / math.sqrt(config.deformation_dim))


def grid_window(window: float, n_grids: int, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-grid fade-in ``[K]``: grid h is off at window <= h and fully on once window >= h + 1."""
    return cosine_window(window, n_grids, device=device, dtype=dtype)


def ensemble_weights(codes: torch.Tensor | None, window: float, n_grids: int, disable_initial: bool = True,
                     soft_transition: bool = True, n_samples: int | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Each sample's final per-grid weights ``[N, K]`` from its raw blend code (no softmax/normalisation).

    1. ``window == 1`` exactly (and ``disable_initial``): codes replaced by ones, so the model is a single
       canonical grid and no gradient reaches the codes (``codes`` may then be None);
    2. else, with ``soft_transition`` and ``window < 2``: a = window - 1, codes <- a * codes, and grid 0
       gets + (1 - a), fading its weight from the fixed 1 to its learned value;
    3. every grid's weight is multiplied by its cosine window.
    """
    if window == 1.0 and disable_initial:
        n = n_samples if codes is None else codes.shape[0]
        device = device if codes is None else codes.device
        beta = torch.ones(n, n_grids, device=device)
    else:
        if codes is None:
            raise ValueError("blend codes are needed once the hash window has opened")
        beta = codes
        if soft_transition and window < 2.0:
            a = window - 1.0
            beta = a * beta
            beta = torch.cat([beta[:, :1] + (1.0 - a), beta[:, 1:]], dim=1)
    return beta * grid_window(window, n_grids, device=beta.device, dtype=beta.dtype)


TCNN_INPUT_GRANULARITY = 16  # tcnn pads a network's input width to a multiple of this


def padded_width(n_inputs: int) -> int:
    """The input width tcnn gives a network of ``n_inputs`` inputs: the next multiple of 16."""
    return -(-n_inputs // TCNN_INPUT_GRANULARITY) * TCNN_INPUT_GRANULARITY


def pad_with_ones(x: torch.Tensor, width: int) -> torch.Tensor:
    """``[N, n]`` -> ``[N, width]``: the extra columns are ones, as tcnn's Identity encoding fills its padding."""
    if x.shape[-1] == width:
        return x
    return torch.cat([x, x.new_ones(*x.shape[:-1], width - x.shape[-1])], dim=-1)


def _mlp(in_dim: int, hidden: int, n_hidden: int, out_dim: int, bias: bool) -> nn.Sequential:
    """ReLU MLP like a tcnn FullyFusedMLP: ``n_hidden`` hidden layers, Xavier-uniform weights, no biases.

    tcnn also pads the output width to a multiple of 16 and initialises that padded matrix, so the last
    layer's Xavier bound counts the padded outputs (16 for RGB), though only ``out_dim`` rows are used.
    """
    dims = [in_dim] + [hidden] * n_hidden + [out_dim]
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        linear = nn.Linear(dims[i], dims[i + 1], bias=bias)
        fan_out = padded_width(dims[i + 1]) if i == len(dims) - 2 else dims[i + 1]
        nn.init.uniform_(linear.weight, -math.sqrt(6.0 / (dims[i] + fan_out)), math.sqrt(6.0 / (dims[i] + fan_out)))
        if bias:
            nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class NeRSembleField(nn.Module):
    """Canonical-space density and colour, zero outside the scene box.

    Density MLP 32 -> 64 -> 16 (trunc_exp density + 15-d geometry feature); colour MLP on
    ``cat((d + 1) / 2, geo)`` (18 -> 64 -> 64 -> 3, sigmoid). The view direction enters raw, shifted to
    [0, 1]: upstream's spherical-harmonics degree 0 is tcnn's Identity encoding, not an SH basis.

    Input padding, as tcnn does it (decided: match). Upstream's MLPs are ``tcnn.Network``s, which tcnn builds
    behind an Identity encoding that pads the input width to a multiple of 16 with constant ones: the colour
    MLP's 18 inputs reach it as 32, 14 of them 1. Those ones times their (trained, Xavier-initialised over the
    padded width) weights are a first-layer bias, the only one a bias-free tcnn MLP has; without it every
    first-layer unit of the colour head passes through the origin of its inputs. The colour MLP here takes
    the padded width (:func:`padded_width`, :func:`pad_with_ones`), so its function class, initialisation
    and the optimiser's view of that bias (14 weights, each with its own Adam state) are upstream's.

    The density MLP is not padded: every preset feeds it 16 or 32 hash features, which tcnn leaves as they
    are. Only the tests' tiny grids have other widths, and a ones-bias there (which no preset has) starts
    training from a denser field. Checkpoints from before the padding load with zero weights on the padded
    inputs, which computes exactly what they did.
    """

    def __init__(self, hash_config: HashEnsembleConfig, field_config: FieldConfig, scene_box: torch.Tensor,
                 backend: Backend = "auto") -> None:
        super().__init__()
        self.config = field_config
        self.hash_config = hash_config
        self.register_buffer("scene_box", torch.as_tensor(scene_box, dtype=torch.float32).clone())
        self.encoding: HashEnsembleEncoding = make_encoding(hash_config, backend)
        c = field_config
        self.density_mlp = _mlp(self.encoding.out_dim, c.hidden_dim, c.num_layers - 1, 1 + c.geo_feat_dim, c.use_bias)
        self.color_mlp = _mlp(padded_width(3 + c.geo_feat_dim), c.hidden_dim_color, c.num_layers_color - 1, 3,
                              c.use_bias)
        self._register_load_state_dict_pre_hook(_pad_unpadded_first_layers, with_module=True)

    def normalize(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Box-normalised positions (0 outside the box) and the inside mask (the open unit cube)."""
        x = (positions - self.scene_box[0]) / (self.scene_box[1] - self.scene_box[0])
        inside = ((x > 0.0) & (x < 1.0)).all(dim=-1)
        return x * inside[:, None].to(x.dtype), inside

    def density(self, positions: torch.Tensor, blend: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Density ``[N]`` (float32) and geometry feature ``[N, geo]`` at canonical world ``positions``."""
        x, inside = self.normalize(positions)
        features = self.encoding(x, blend)
        h = self.density_mlp(features.to(self.density_mlp[0].weight.dtype))
        sigma = trunc_exp(h[:, 0], self.config.trunc_exp_clamp) * inside.float()
        return sigma, h[:, 1:]

    def color(self, directions: torch.Tensor, geo: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] from unit world directions (not warped, as upstream) and the geometry feature."""
        d = (directions + 1.0) / 2.0
        inputs = pad_with_ones(torch.cat([d.to(geo.dtype), geo], dim=-1), self.color_mlp[0].in_features)
        return torch.sigmoid(self.color_mlp(inputs))


def _pad_unpadded_first_layers(module: NeRSembleField, state_dict: dict, prefix: str, *args: object) -> None:
    """Load a checkpoint saved before the input padding: zero weights on the padded inputs (the same function)."""
    key = f"{prefix}color_mlp.0.weight"
    weight = state_dict.get(key)
    width = module.color_mlp[0].in_features
    if weight is not None and weight.dim() == 2 and weight.shape[1] < width:
        state_dict[key] = torch.cat([weight, weight.new_zeros(weight.shape[0], width - weight.shape[1])], dim=1)
