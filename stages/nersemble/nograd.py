"""The model's no-grad queries on the CPU fast path: the MLPs as batched matrix products around the C kernels.

A render or a visibility pass queries millions of samples without autograd. Torch's GEMM runs the MLPs far
faster than per-sample loops in C would, so the MLPs stay in torch, as copies of the current weights laid out
for large batches; the posenc, warp and encoding between them are the C ops (:mod:`.kernels.cpu.ops`).
:class:`NoGradDeformation` and :class:`NoGradField` name their twins.
"""

from __future__ import annotations

import torch

from .deformation import posenc_dim
from .hash_encoding import TorchHashEnsemble
from .kernels.cpu import ops as cpu_ops
from .kernels.cpu.build import MAX_FREQUENCIES
from .schedules import cosine_window


def query_supported(model) -> bool:  # noqa: ANN001 - NeRSembleModel (which imports this module)
    """The model's encoding is the plain torch backend with rows the kernels' buffers hold, and its MLPs are
    plain ReLU stacks."""
    encoding = model.field.encoding
    frequencies = model.deformation.config.n_frequencies if model.deformation is not None else 0
    return (type(encoding) is TorchHashEnsemble and cpu_ops.fits(encoding.n_levels, encoding.table.shape[1])
            and frequencies <= MAX_FREQUENCIES and _is_relu_mlp(model.field.density_mlp)
            and _is_relu_mlp(model.field.color_mlp))


class NoGradDeformation:
    """The deformation MLP's screw axis ``cat(v, r)`` ``[N, 6]`` for large no-grad batches.

    :meth:`SE3DeformationField.screw_axis` is the twin. Each layer's weight is split by the inputs it reads
    (posenc, code, hidden), so no concatenation is ever built; the code's share of a layer is a per-timestep
    bias ``[T, width]`` computed once; the two heads are one product. Only the order of the sums differs from
    the twin (float32 rounding). Build one per batch of queries: it copies the current weights.
    """

    def __init__(self, field, code_table: torch.Tensor, scene_box: torch.Tensor) -> None:  # noqa: ANN001
        c = field.config
        self.config = c
        self.n_pe = posenc_dim(c.n_frequencies, c.include_input)
        self.fparams = scene_box.detach().float().cpu().contiguous().view(-1)
        n_pe, n_code = posenc_dim(c.n_frequencies, c.include_input), code_table.shape[1]
        codes = code_table.detach().float()
        self.layers: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]] = []
        for i, layer in enumerate(field.layers):
            w = layer.weight.detach().float()
            b = layer.bias.detach().float() if layer.bias is not None else torch.zeros(w.shape[0])
            if i == 0 or i in c.skip_connections:  # reads cat(posenc, code[, hidden])
                w_h = w[:, n_pe + n_code:].t().contiguous() if i > 0 else None
                self.layers.append((w[:, :n_pe].t().contiguous(), codes @ w[:, n_pe:n_pe + n_code].t() + b, w_h))
            else:
                self.layers.append((None, b, w.t().contiguous()))
        heads = (field.head_translation, field.head_rotation)
        self.head_w = torch.cat([h.weight.detach().float() for h in heads]).t().contiguous()
        self.head_b = torch.cat([h.bias.detach().float() if h.bias is not None else torch.zeros(3) for h in heads])

    def posenc(self, positions: torch.Tensor, alpha: float) -> torch.Tensor:
        """:func:`stages.nersemble.deformation.windowed_posenc` of the box-normalised ``positions``, in C."""
        c = self.config
        return cpu_ops.posenc(positions, self.fparams, c.n_frequencies, cosine_window(alpha, c.n_frequencies),
                              c.include_input)

    def __call__(self, positions: torch.Tensor, timesteps: torch.Tensor | int, alpha: float) -> torch.Tensor:
        """``cat(v, r)`` ``[N, 6]`` at world ``positions``, per-sample ``timesteps`` or one for all."""
        pe = self.posenc(positions, alpha)
        h: torch.Tensor | None = None
        for w_pe, bias, w_h in self.layers:
            if bias.dim() == 2:
                bias = bias[timesteps] if isinstance(timesteps, int) else torch.index_select(bias, 0, timesteps)
            if w_pe is None:
                out = torch.addmm(bias, h, w_h)
            else:
                out = torch.addmm(bias, pe, w_pe)
                if w_h is not None:
                    out.addmm_(h, w_h)
            h = out.clamp_min_(0.0)
        return torch.addmm(self.head_b, h, self.head_w)


def _is_relu_mlp(sequential: torch.nn.Module) -> bool:
    """Whether a Sequential is ``Linear, ReLU, ..., Linear`` (checked per query: no weights are copied)."""
    modules = list(sequential)
    linears, relus = modules[0::2], modules[1::2]
    return (all(isinstance(m, torch.nn.Linear) for m in linears) and all(isinstance(m, torch.nn.ReLU) for m in relus)
            and len(relus) == len(linears) - 1)


def _relu_mlp(sequential: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None]] | None:
    """(weight [in, out], bias) per layer of a ``Linear, ReLU, ..., Linear`` Sequential; None for any other."""
    if not _is_relu_mlp(sequential):
        return None
    return [(m.weight.detach().float().t().contiguous(), None if m.bias is None else m.bias.detach().float())
            for m in list(sequential)[0::2]]


def _run(layers: list[tuple[torch.Tensor, torch.Tensor | None]], h: torch.Tensor) -> torch.Tensor:
    """The ReLU MLP on ``h`` with in-place activations (no fresh buffer per ReLU)."""
    for i, (w, b) in enumerate(layers):
        h = torch.mm(h, w) if b is None else torch.addmm(b, h, w)
        if i + 1 < len(layers):
            h.clamp_min_(0.0)
    return h


class NoGradField:
    """The field's density and colour MLPs for large no-grad batches; :class:`NeRSembleField` is the twin.

    ReLUs run in place, and the colour MLP's first layer reads the density MLP's output as it is: its
    direction columns multiply ``(d + 1) / 2`` in a product of their own, the geometry columns are placed
    under the geometry features (a zero row under the raw density), and the constant-ones padding is a bias.
    Only the order of the sums differs from the twin (float32 rounding). Build one per batch of queries.
    """

    def __init__(self, field) -> None:  # noqa: ANN001 - NeRSembleField
        self.density = _relu_mlp(field.density_mlp)  # query_supported checked the MLPs' form
        color = _relu_mlp(field.color_mlp)
        first = field.color_mlp[0]
        w = first.weight.detach().float()  # [hidden, in]: (d 3, geo G, ones ...)
        n_out = self.density[-1][0].shape[1]  # 1 + G
        n_real = 3 + n_out - 1
        bias = w[:, n_real:].sum(dim=1)
        if first.bias is not None:
            bias = bias + first.bias.detach().float()
        self.color_dir = w[:, :3].t().contiguous()
        self.color_geo = torch.cat([torch.zeros(1, w.shape[0]), w[:, 3:n_real].t()]).contiguous()
        self.color_bias = bias
        self.color_rest = color[1:]

    def __call__(self, features: torch.Tensor, inside: torch.Tensor,
                 shifted_directions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Density ``[N]`` and (given ``(d + 1) / 2``) colour ``[N, 3]`` from the hash features."""
        h = _run(self.density, features)
        sigma = torch.exp(h[:, 0]) * inside
        if shifted_directions is None:
            return sigma, None
        x = torch.addmm(self.color_bias, h, self.color_geo)
        x.addmm_(shifted_directions, self.color_dir)
        if self.color_rest:
            x = _run(self.color_rest, x.clamp_min_(0.0))
        return sigma, torch.sigmoid_(x)
