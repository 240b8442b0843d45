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

ENV = "NERSEMBLE_FAST"  # "0"/"false"/"off": the eager reference path
CACHE_ENV = "NERSEMBLE_CACHE"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c99"]
MAX_WIDTH = 256  # K*F columns the kernels' stack buffers hold (MAXW in the source)

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
    lib.query_forward.argtypes = [p, p, p, p, p, i64, p, p, p, p, i32, i32, i32, p, p, p, p, i32, p, p, p, p, i32]
    lib.query_forward.restype = None
    lib.march.argtypes = [p, p, p, p, p, i64, ctypes.c_float, p, p, i32, i32, i32, i32, p, p, p, p, p, i32]
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
    geometry = getattr(encoding, "_fast_geometry", None)
    if geometry is None:
        geometry = _Geometry(encoding)
        encoding._fast_geometry = geometry
    return _FusedHash.apply(x, blend, encoding.table, geometry)


# --- the whole no-grad query ----------------------------------------------------------------------------------


def _linear_layers(sequential: torch.nn.Module) -> list[tuple[torch.nn.Linear, int]]:
    """(Linear, activation) pairs of a ``_mlp`` Sequential: 1 when a ReLU follows, else 0."""
    modules = list(sequential)
    return [(m, int(i + 1 < len(modules) and isinstance(modules[i + 1], torch.nn.ReLU)))
            for i, m in enumerate(modules) if isinstance(m, torch.nn.Linear)]


class _Packer:
    """Weights transposed to [in][out] and packed into one float32 buffer, with their offsets."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []
        self.size = 0

    def add(self, t: torch.Tensor | None, transpose: bool = False) -> int:
        if t is None:
            return -1
        t = t.detach().float()
        flat = (t.t() if transpose else t).contiguous().view(-1)
        self.parts.append(flat)
        self.size += flat.numel()
        return self.size - flat.numel()

    def buffer(self) -> torch.Tensor:
        return torch.cat(self.parts) if self.parts else torch.zeros(1)


def _pack(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: ANN001 - NeRSembleModel
    """(spec int64, params float32, fparams float32) describing the model for ``query_forward``."""
    packer, spec = _Packer(), [0] * 11
    d = model.deformation
    if d is not None:
        c = d.config
        spec[:6] = [1, c.n_frequencies, int(c.include_input), model.codes.deformation.weight.shape[1], len(d.layers),
                    int(model.config.deformation.offset_units == "box")]
        spec[6:10] = [packer.add(d.head_translation.weight, True), packer.add(d.head_translation.bias),
                      packer.add(d.head_rotation.weight, True), packer.add(d.head_rotation.bias)]
        for i, layer in enumerate(d.layers):
            spec += [layer.in_features, layer.out_features, packer.add(layer.weight, True), packer.add(layer.bias),
                     int(i in c.skip_connections)]
    for mlp in (model.field.density_mlp, model.field.color_mlp):
        layers = _linear_layers(mlp)
        spec.append(len(layers))
        for layer, act in layers:
            spec += [layer.in_features, layer.out_features, packer.add(layer.weight, True), packer.add(layer.bias),
                     act]
    box = model.scene_box.detach().float().cpu().view(-1)
    eps = d.config.exp_map_eps if d is not None else 0.0
    fparams = torch.cat([box, torch.tensor([eps], dtype=torch.float32)])
    return torch.tensor(spec, dtype=torch.int64), packer.buffer(), fparams


def query_supported(model) -> bool:  # noqa: ANN001 - NeRSembleModel
    """The model's shapes fit the kernel's buffers and its encoding is the plain torch backend.

    The kernel wires the MLPs as :class:`NeRSembleField` does: the density MLP takes the encoding's features
    unpadded, the colour MLP ``cat((d + 1) / 2, geo)`` padded with ones to its first layer's width (32 since
    the tcnn padding, 18 in a field built before it). Any other wiring takes the eager path.
    """
    from .hash_encoding import TorchHashEnsemble  # noqa: PLC0415 - import cycle

    encoding = model.field.encoding
    if type(encoding) is not TorchHashEnsemble or encoding.table.shape[1] > MAX_WIDTH:
        return False
    density, color = _linear_layers(model.field.density_mlp), _linear_layers(model.field.color_mlp)
    if not density or not color or density[0][0].in_features != encoding.out_dim:
        return False
    if color[0][0].in_features < 3 + density[-1][0].out_features - 1:
        return False
    widths = [m.in_features + m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = 0
    if model.deformation is not None:
        c = model.deformation.config
        inputs = 6 * c.n_frequencies + 3 + model.codes.deformation.weight.shape[1]
    return max(widths, default=0) + inputs <= 1024 and encoding.out_dim <= 1024


def query_nograd(model, positions: torch.Tensor, directions: torch.Tensor | None, deformation_codes: torch.Tensor | None,
                 pe_window: torch.Tensor | None, blend: torch.Tensor, want_offset: bool = True,
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Density ``[N]``, colour ``[N, 3]`` (None without ``directions``) and offset ``[N, 3]`` without autograd.

    ``model.query`` / ``model.density`` in one C pass per sample (callers check :func:`applies` and
    :func:`query_supported`); ``pe_window`` is the posenc band weights repeated per axis, ``[3 n_freq]``.
    """
    lib = library()
    spec, params, fparams = _pack(model)
    encoding = model.field.encoding
    geometry = getattr(encoding, "_fast_geometry", None)
    if geometry is None:
        geometry = _Geometry(encoding)
        encoding._fast_geometry = geometry
    n = positions.shape[0]
    positions, blend = positions.detach().float().contiguous(), blend.detach().float().contiguous()
    directions = None if directions is None else directions.detach().float().contiguous()
    codes = None if deformation_codes is None else deformation_codes.detach().float().contiguous()
    window = None if pe_window is None else pe_window.detach().float().contiguous()
    sigma = torch.empty(n)
    rgb = torch.empty(n, 3) if directions is not None else None
    offset = torch.empty(n, 3) if want_offset else None
    lib.query_forward(_ptr(positions), _ptr(directions), _ptr(codes), _ptr(blend), _ptr(window), n, _ptr(spec),
                      _ptr(params), _ptr(fparams), _ptr(encoding.table.detach()), *geometry.args(), _ptr(sigma),
                      _ptr(rgb), _ptr(offset), None, torch.get_num_threads())
    return sigma, rgb, offset


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
    kept = torch.empty(n_rays, dtype=torch.int64)
    lib.march(*args, 0, _ptr(kept), None, None, None, None, torch.get_num_threads())
    first = torch.cumsum(kept, 0) - kept
    total = int(kept.sum())
    ray_indices = torch.empty(total, dtype=torch.int64)
    t_starts, t_ends = torch.empty(total), torch.empty(total)
    lib.march(*args, 1, None, _ptr(first), _ptr(ray_indices), _ptr(t_starts), _ptr(t_ends), torch.get_num_threads())
    return ray_indices, t_starts, t_ends
