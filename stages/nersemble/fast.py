"""The CPU fast path: fused C kernels for the hash ensemble, built on first use and cached.

On a CPU a preview step runs a few thousand samples through ~150 small ops and a render a few million;
either way most of the time goes to writing intermediates ([L, N, 8] int64 corner indices, [L, N, K*F]
interpolated rows) to memory and reading them back, not to arithmetic. The kernels in
:mod:`stages.nersemble.fast_kernels` compute the encoding per sample with nothing of that size in memory.

Which path runs: ``NERSEMBLE_FAST=0`` forces the eager torch reference everywhere; otherwise float32 CPU
tensors take the kernels when they build. No C compiler, or a build that fails: one warning line naming
the fallback, then the reference path, never a crash. Builds are cached under ``NERSEMBLE_CACHE`` (default
``~/.cache/nersemble``) in a folder named by a hash of the source, the compiler, the flags, the CPU and
the torch version, so a stale build is rebuilt, never loaded.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from .fast_kernels import SOURCE
from .schedules import cosine_window

ENV = "NERSEMBLE_FAST"  # "0"/"false"/"off": the eager reference path
CACHE_ENV = "NERSEMBLE_CACHE"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c99"]
MAX_WIDTH = 256  # K*F columns the kernels' stack buffers hold (MAXW in the source)
MAX_LEVELS = 32  # levels the kernels' stack buffers hold (MAXL in the source)
MAX_FREQUENCIES = 16  # posenc frequencies the kernel's buffers hold (MAXF in the source)

_state: dict[str, object] = {"lib": None, "failed": None, "warned": False}


def requested() -> bool:
    """The fast path is wanted: ``NERSEMBLE_FAST`` unset, or anything but 0/false/no/off."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def compiler() -> str | None:
    """The C compiler to build with: ``CC``, else cc/gcc/clang on PATH."""
    names = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def _warn_once(reason: str) -> None:
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(f"nersemble fast path unavailable ({reason}); falling back to the torch reference path",
                      RuntimeWarning, stacklevel=4)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("model name", "flags")):
                    return line
    except OSError:
        pass
    return platform.processor()


def build_key(cc: str) -> str:
    """Hash of everything a build depends on: a change in any of them gives a new cache folder."""
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    parts = [SOURCE, " ".join(FLAGS), version, torch.__version__, platform.machine(), _cpu_name()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "nersemble")


def _build(cc: str, target: Path) -> None:
    """Compile into a temporary file beside ``target`` and rename it into place (safe with parallel builds)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / "kernels.c", Path(tmp) / target.name
        src.write_text(SOURCE)
        result = subprocess.run([cc, *FLAGS, str(src), "-o", str(out), "-lm"], capture_output=True, text=True,
                                timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(result.stderr or result.stdout).strip().splitlines()[:1]}")
        os.replace(out, target)


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.hash_forward.argtypes = [p, p, p, i64, i32, i32, i32, p, p, p, p, i32, p, i32]
    lib.hash_forward.restype = None
    lib.hash_backward.argtypes = [p, p, p, p, i64, i32, i32, i32, p, p, p, p, i32, p, p, p, i32]
    lib.hash_backward.restype = None
    lib.warp_encode.argtypes = [p, p, p, i64, p, i32, p, i32, i32, i32, p, p, p, p, i32, p, p, p, i32]
    lib.warp_encode.restype = None
    lib.se3_warp.argtypes = [p, p, p, i64, ctypes.c_float, p, i32]
    lib.se3_warp.restype = None
    lib.se3_warp_backward.argtypes = [p, p, p, p, i64, ctypes.c_float, p, p, p, i32]
    lib.se3_warp_backward.restype = None
    lib.posenc.argtypes = [p, i64, p, i32, p, i32, p, i32]
    lib.posenc.restype = None
    lib.slab_take.argtypes = [i64, p, p, p, p, i64, p, p, p, p, p, p, p, p, p, p]
    lib.slab_take.restype = i64
    lib.slab_update.argtypes = [i64, p, p, p, p, p, p, p, ctypes.c_float, ctypes.c_double, p, p, p, p, p, p]
    lib.slab_update.restype = None
    lib.march.argtypes = [p, p, p, p, p, i64, ctypes.c_float, p, p, i32, i32, i32, i32, p, p, p, p, p, p, i32]
    lib.march.restype = None


def library() -> ctypes.CDLL | None:
    """The built kernels (building them on first use), or None with one warning when they cannot be had."""
    if _state["lib"] is not None or _state["failed"] is not None:
        return _state["lib"]  # type: ignore[return-value]
    cc = compiler()
    if cc is None:
        _state["failed"] = "no C compiler (cc, gcc or clang) on PATH"
        _warn_once(_state["failed"])
        return None
    target = cache_dir() / f"fast-{build_key(cc)}" / "libnersemble_fast.so"
    try:
        if not target.exists():
            _build(cc, target)
        try:
            lib = ctypes.CDLL(str(target))
        except OSError:  # a truncated or foreign file under the right name: rebuild it once
            _build(cc, target)
            lib = ctypes.CDLL(str(target))
        _declare(lib)
    except Exception as error:  # noqa: BLE001 - any build or load failure means: fall back
        _state["failed"] = f"building the kernels failed: {error}"
        _warn_once(str(_state["failed"])[:300])
        return None
    _state["lib"] = lib
    return lib


def available() -> bool:
    """The fast path is requested and its kernels are built (builds them if needed)."""
    return requested() and library() is not None


def applies(*tensors: torch.Tensor) -> bool:
    """Whether these tensors should take the fast path: float32 on the CPU, and the kernels are there."""
    if not requested():
        return False
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return False
    return library() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _Geometry:
    """The level geometry of a :class:`TorchHashEnsemble` as contiguous CPU buffers for the kernels."""

    def __init__(self, encoding) -> None:  # noqa: ANN001 - TorchHashEnsemble (import cycle)
        layout = encoding.layout
        self.n_levels, self.n_grids, self.feats = encoding.n_levels, encoding.n_grids, encoding.features_per_level
        self.n_dense = layout.n_dense
        self.scales = torch.tensor(layout.scales, dtype=torch.float32)
        self.res = torch.tensor(layout.resolutions, dtype=torch.int64)
        self.sizes = torch.tensor(layout.sizes, dtype=torch.int64)
        self.offsets = torch.tensor(layout.offsets, dtype=torch.int64)

    def args(self) -> tuple:
        return (self.n_levels, self.n_grids, self.feats, _ptr(self.scales), _ptr(self.res), _ptr(self.sizes),
                _ptr(self.offsets), self.n_dense)


class _FusedHash(torch.autograd.Function):
    """Fused hash-ensemble encoding: ``(x [N, 3], blend [N, K], table [E, K*F]) -> [N, L*F]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, blend: torch.Tensor, table: torch.Tensor, geometry: _Geometry):
        x, blend = x.contiguous(), blend.contiguous()
        t = table.detach()
        out = torch.empty(x.shape[0], geometry.n_levels * geometry.feats)
        library().hash_forward(_ptr(x), _ptr(blend), _ptr(t), x.shape[0], *geometry.args(), _ptr(out),
                               torch.get_num_threads())
        ctx.save_for_backward(x, blend, table)
        ctx.geometry = geometry
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, blend, table = ctx.saved_tensors
        geometry = ctx.geometry
        need_x, need_blend, need_table = ctx.needs_input_grad[:3]
        grad_out = grad_out.float().contiguous()
        grad_x = torch.empty_like(x) if need_x else None
        grad_blend = torch.empty_like(blend) if need_blend else None
        grad_table = torch.zeros_like(table) if need_table else None
        library().hash_backward(_ptr(x), _ptr(blend), _ptr(table.detach()), _ptr(grad_out), x.shape[0],
                                *geometry.args(), _ptr(grad_x), _ptr(grad_blend), _ptr(grad_table),
                                torch.get_num_threads())
        return grad_x, grad_blend, grad_table, None


def fused_hash_encoding(encoding, x: torch.Tensor, blend: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """The ensemble's ``forward(x, blend)`` through the C kernels (callers check :func:`applies` first)."""
    return _FusedHash.apply(x, blend, encoding.table, _geometry(encoding))


class _SE3Warp(torch.autograd.Function):
    """The deformation's warp ``(x_n, v, r) -> R x_n + V v`` (NaN guarded) as one C pass each way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, v: torch.Tensor, r: torch.Tensor, eps: float):
        x, v, r = x.contiguous(), v.contiguous(), r.contiguous()
        out = torch.empty_like(x)
        library().se3_warp(_ptr(x), _ptr(v), _ptr(r), x.shape[0], eps, _ptr(out), torch.get_num_threads())
        ctx.save_for_backward(x, v, r)
        ctx.eps = eps
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, v, r = ctx.saved_tensors
        grad_out = grad_out.float().contiguous()
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_v, grad_r = torch.empty_like(v), torch.empty_like(r)
        library().se3_warp_backward(_ptr(x), _ptr(v), _ptr(r), _ptr(grad_out), x.shape[0], ctx.eps, _ptr(grad_x),
                                    _ptr(grad_v), _ptr(grad_r), torch.get_num_threads())
        return grad_x, grad_v, grad_r, None


def se3_warp(x: torch.Tensor, v: torch.Tensor, r: torch.Tensor, eps: float) -> torch.Tensor:
    """:meth:`stages.nersemble.deformation.SE3DeformationField.forward`'s warp of box-normalised ``x`` by the
    screw axes ``(v, r)``, ``[N, 3]`` each, with gradients; callers check :func:`applies` first.

    Its torch twin (``se3_exp``, the transform, the NaN guard) is some forty small ops forward and as many
    autograd nodes back, over the few thousand samples of a training step: per-op overhead, not arithmetic.
    """
    return _SE3Warp.apply(x, v, r, float(eps))


# --- the no-grad query: torch's matrix products for the MLPs, one C pass for the rest -----------------------


def query_supported(model) -> bool:  # noqa: ANN001 - NeRSembleModel
    """The model's encoding is the plain torch backend with rows the kernels' buffers hold."""
    from .hash_encoding import TorchHashEnsemble  # noqa: PLC0415 - import cycle

    encoding = model.field.encoding
    frequencies = model.deformation.config.n_frequencies if model.deformation is not None else 0
    return (type(encoding) is TorchHashEnsemble and fits(encoding) and frequencies <= MAX_FREQUENCIES
            and _is_relu_mlp(model.field.density_mlp) and _is_relu_mlp(model.field.color_mlp))


def fits(encoding) -> bool:  # noqa: ANN001 - TorchHashEnsemble
    """The encoding's rows and levels fit the kernels' stack buffers."""
    return encoding.table.shape[1] <= MAX_WIDTH and encoding.n_levels <= MAX_LEVELS


def _geometry(encoding) -> _Geometry:  # noqa: ANN001 - TorchHashEnsemble
    geometry = getattr(encoding, "_fast_geometry", None)
    if geometry is None:
        geometry = _Geometry(encoding)
        encoding._fast_geometry = geometry
    return geometry


def box_params(scene_box: torch.Tensor, eps: float) -> torch.Tensor:
    """``warp_encode``'s fparams: box min[3], box max[3], the exp map's eps."""
    return torch.cat([scene_box.detach().float().cpu().view(-1), torch.tensor([eps], dtype=torch.float32)])


def warp_encode(encoding, positions: torch.Tensor, screw: torch.Tensor | None, blend: torch.Tensor,  # noqa: ANN001
                fparams: torch.Tensor, box_units: bool, want_offset: bool = True,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Hash features ``[N, L*F]``, inside mask ``[N]`` (1.0/0.0) and offset ``[N, 3]`` of world ``positions``.

    ``screw`` ``[N, 6]`` is the deformation MLP's ``cat(v, r)`` (None: no deformation); the kernel applies the
    SE(3) warp (:func:`stages.nersemble.deformation.deform_positions`), normalises to the box and encodes
    (:meth:`NeRSembleField.density` up to the density MLP): the twins of what it computes. ``fparams``:
    :func:`box_params`.
    """
    geometry = _geometry(encoding)
    n = positions.shape[0]
    positions, blend = positions.detach().float().contiguous(), blend.detach().float().contiguous()
    screw = None if screw is None else screw.detach().float().contiguous()
    features = torch.empty(n, geometry.n_levels * geometry.feats)
    inside = torch.empty(n)
    offset = torch.empty(n, 3) if want_offset else None
    library().warp_encode(_ptr(positions), _ptr(screw), _ptr(blend), n, _ptr(fparams), int(box_units),
                          _ptr(encoding.table.detach()), *geometry.args(), _ptr(features), _ptr(inside),
                          _ptr(offset), torch.get_num_threads())
    return features, inside, offset


class NoGradDeformation:
    """The deformation MLP's screw axis ``cat(v, r)`` ``[N, 6]`` for large no-grad batches.

    :meth:`SE3DeformationField.screw_axis` is the twin. Each layer's weight is split by the inputs it reads
    (posenc, code, hidden), so no concatenation is ever built; the code's share of a layer is a per-timestep
    bias ``[T, width]`` computed once; the two heads are one product. Only the order of the sums differs from
    the twin (float32 rounding). Build one per batch of queries: it copies the current weights.
    """

    def __init__(self, field, code_table: torch.Tensor, scene_box: torch.Tensor) -> None:  # noqa: ANN001
        from .deformation import posenc_dim  # noqa: PLC0415 - import cycle

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
        positions = positions.detach().float().contiguous()
        window = cosine_window(alpha, c.n_frequencies).contiguous()
        out = torch.empty(positions.shape[0], self.n_pe)
        library().posenc(_ptr(positions), positions.shape[0], _ptr(self.fparams), c.n_frequencies, _ptr(window),
                         int(c.include_input), _ptr(out), torch.get_num_threads())
        return out

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


class FrontToBack:
    """Early ray termination over packed samples: pick each alive ray's next samples, then update from their
    densities which samples are kept and which rays go on (``NeRSembleModel._visible`` is the twin).

    Samples are grouped by ray (``ray_indices`` sorted); the state (per-ray next sample, float64 optical depth,
    alive flag; per-sample keep flag and the kept samples' values) lives in buffers the kernels update in place.
    """

    def __init__(self, ray_indices: torch.Tensor, t_starts: torch.Tensor, t_ends: torch.Tensor,
                 rays_o: torch.Tensor, rays_d: torch.Tensor, timesteps: torch.Tensor, full_query: bool) -> None:
        n_rays, n = rays_o.shape[0], ray_indices.shape[0]
        self.counts = torch.bincount(ray_indices, minlength=n_rays)
        self.first = torch.cumsum(self.counts, 0) - self.counts
        self.next = torch.zeros(n_rays, dtype=torch.int64)
        self.alive = torch.ones(n_rays, dtype=torch.uint8)
        self.optical_depth = torch.zeros(n_rays, dtype=torch.float64)
        self.keep = torch.zeros(n, dtype=torch.uint8)
        self.t_starts, self.t_ends = t_starts.float().contiguous(), t_ends.float().contiguous()
        self.o, self.d = rays_o.float().contiguous(), rays_d.float().contiguous()
        self.timesteps = timesteps.long().contiguous()
        self.sigma = torch.zeros(n) if full_query else None
        self.rgb = torch.zeros(n, 3) if full_query else None
        self.offset = torch.zeros(n, 3) if full_query else None
        self.ids = torch.empty(n, dtype=torch.int64)
        self.ray_ids = torch.empty(n, dtype=torch.int64)
        self.positions, self.directions = torch.empty(n, 3), torch.empty(n, 3)
        self.sample_timesteps = torch.empty(n, dtype=torch.int64)

    def take(self, slab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next ``slab`` samples of every alive ray: sample ids, ray ids, midpoint positions ``[M, 3]``,
        their rays' directions ``[M, 3]`` and timesteps ``[M]``."""
        m = library().slab_take(self.counts.shape[0], _ptr(self.first), _ptr(self.counts), _ptr(self.next),
                                _ptr(self.alive), slab, _ptr(self.o), _ptr(self.d), _ptr(self.timesteps),
                                _ptr(self.t_starts), _ptr(self.t_ends), _ptr(self.ids), _ptr(self.ray_ids),
                                _ptr(self.positions), _ptr(self.directions), _ptr(self.sample_timesteps))
        return self.ids[:m], self.ray_ids[:m], self.positions[:m], self.directions[:m], self.sample_timesteps[:m]

    def update(self, ids: torch.Tensor, ray_ids: torch.Tensor, sigma: torch.Tensor, rgb: torch.Tensor | None,
               offset: torch.Tensor | None, alpha_threshold: float, eps: float) -> None:
        sigma = sigma.float().contiguous()
        rgb = None if rgb is None else rgb.float().contiguous()
        offset = None if offset is None else offset.float().contiguous()
        library().slab_update(ids.shape[0], _ptr(ids), _ptr(ray_ids), _ptr(sigma), _ptr(rgb), _ptr(offset),
                              _ptr(self.t_starts), _ptr(self.t_ends), float(alpha_threshold), float(eps),
                              _ptr(self.optical_depth), _ptr(self.alive), _ptr(self.keep), _ptr(self.sigma),
                              _ptr(self.rgb), _ptr(self.offset))


def march_occupied(rays_o: torch.Tensor, rays_d: torch.Tensor, t0: torch.Tensor, k_first: torch.Tensor,
                   counts: torch.Tensor, step_size: float, aabb: torch.Tensor, occupied: torch.Tensor,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The occupied samples of each ray's lattice ``t0 + (k_first + j) dt``, ``j < counts``, packed by ray.

    :func:`stages.nersemble.sampling.march_rays`'s expansion and occupancy test without materialising the
    unoccupied samples; returns ``(ray_indices, t_starts, t_ends)``.
    """
    lib = library()
    o, d = rays_o.float().contiguous(), rays_d.float().contiguous()
    t0, k_first, counts = t0.float().contiguous(), k_first.long().contiguous(), counts.long().contiguous()
    box = aabb.float().contiguous().view(-1)
    occ = occupied.to(torch.uint8).contiguous()
    n_rays = o.shape[0]
    args = (_ptr(o), _ptr(d), _ptr(t0), _ptr(k_first), _ptr(counts), n_rays, float(step_size), _ptr(box), _ptr(occ),
            *occ.shape)
    kept, span = torch.empty(n_rays, dtype=torch.int64), torch.empty(n_rays, 2, dtype=torch.int64)
    lib.march(*args, 0, _ptr(kept), _ptr(span), None, None, None, None, torch.get_num_threads())
    first = torch.cumsum(kept, 0) - kept
    total = int(kept.sum())
    ray_indices = torch.empty(total, dtype=torch.int64)
    t_starts, t_ends = torch.empty(total), torch.empty(total)
    lib.march(*args, 1, None, _ptr(span), _ptr(first), _ptr(ray_indices), _ptr(t_starts), _ptr(t_ends),
              torch.get_num_threads())
    return ray_indices, t_starts, t_ends
