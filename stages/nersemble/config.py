"""Every hyper-parameter of NeRSemble in one typed, frozen config, plus the ``paper`` and ``preview`` presets.

Defaults of every section are the official values (``scripts/train/train_nersemble.py`` of the reference
repository, plus the library defaults it relies on), so ``NeRSembleConfig()`` *is* the ``paper`` preset.
Units: lengths are in model units, i.e. metres times ``scene.world_scale`` (9), as in the official code,
where the ray-marching step (0.011) and the depth-loss band (0.9 -> 0.01) were tuned for that scale.

Configs are frozen dataclasses (this package may import only torch/numpy/stdlib). Change them with
:meth:`NeRSembleConfig.with_overrides`, which takes a unique field name (``steps=500``), a dotted path
(``{"hash.n_grids": 4}``) or a double-underscore path (``hash__n_grids=4``); schedules accept a
:class:`Schedule`, a mapping or an ``(init, final, begin, end)`` tuple.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass, replace
from dataclasses import field as _field
from typing import Any, Literal

from .schedules import Schedule

# Official per-participant scene boxes [[xmin, ymin, zmin], [xmax, ymax, zmax]] in the official, z-up, x9
# world (x left->right, y front->back, z down->up). Our pipeline keeps the calibration's own world frame,
# so these only apply to data aligned like the official release; otherwise use scene_box_from_cameras.
PAPER_SCENE_BOXES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "18": ((-1.8, -2.3, -2.5), (1.8, 1.3, 2.0)),
    "30": ((-2.5, -1.8, -2.5), (2.2, 1.8, 2.0)),
    "38": ((-1.8, -1.5, -2.5), (2.2, 2.2, 2.0)),
    "85": ((-2.0, -1.8, -2.5), (2.2, 1.7, 2.0)),
    "97": ((-2.2, -2.8, -2.5), (2.2, 2.2, 2.0)),
    "124": ((-2.2, -2.5, -2.5), (2.2, 1.5, 2.0)),
    "175": ((-2.3, -2.0, -2.5), (2.0, 2.0, 2.0)),
    "default": ((-2.5, -2.0, -2.5), (2.5, 3.0, 2.0)),
}


@dataclass(frozen=True)
class SceneConfig:
    """How the metric capture maps into model space."""

    world_scale: float = 9.0  # model units per metre ("Instant NGP only really works if we scale the world")
    # Box edge lengths in metres for scene_box_from_cameras (not in the official code, whose boxes are
    # hand-set per subject); the default matches the extent of the official default box (5 x 5 x 4.5 / 9).
    box_size_m: tuple[float, float, float] = (0.56, 0.56, 0.5)


@dataclass(frozen=True)
class TimeCodeConfig:
    """Per-timestep latent codes. The blend-weight code has ``hash.n_grids`` entries (asserted equal upstream)."""

    deformation_dim: int = 128  # latent_dim_time_deform
    init_scale: float = 0.01  # both tables ~ Normal(0, init_scale / sqrt(dim))


@dataclass(frozen=True)
class DeformationConfig:
    """SE(3) deformation MLP with a windowed sinusoidal encoding of the box-normalised position."""

    enabled: bool = True
    n_frequencies: int = 7  # frequencies 2^0 .. 2^6 (class attribute upstream, not configurable there)
    include_input: bool = True  # appends 2*pi*x_n (not x_n): an upstream quirk kept on purpose
    num_layers: int = 6
    layer_width: int = 128
    skip_connections: tuple[int, ...] = (4,)
    head_init: float = 1e-5  # rotation/translation heads ~ U(-head_init, head_init), bias 0
    exp_map_eps: float = 1e-4  # theta = sqrt(max(|r|^2, eps)) in the SE(3) exponential
    # "paper": offset computed in box-normalised units, added to world positions unchanged (official code);
    # "box": offset scaled back by the box extent, so the warp is the SE(3) map of normalised coordinates.
    offset_units: Literal["paper", "box"] = "paper"
    window: Schedule = Schedule(0.0, 7.0, 0, 20000)  # posenc window alpha


@dataclass(frozen=True)
class HashEnsembleConfig:
    """The ensemble of multiresolution hash grids (tcnn HashGrid semantics) and its fade-in schedule."""

    n_grids: int = 32
    n_levels: int = 16
    features_per_level: int = 2
    log2_table_size: int = 19
    base_resolution: int = 16
    per_level_scale: float = 1.4472692012786865  # 256 ** (1 / 15): finest resolution 4096
    init_scale: float = 1e-4  # tables ~ U(-init_scale, init_scale), as tcnn initialises them
    window: Schedule = Schedule(1.0, 32.0, 40000, 80000)
    disable_initial_ensemble: bool = True  # window == 1: blend weights replaced by ones (single grid)
    soft_transition: bool = True  # 1 < window < 2: grid 0's weight fades from 1 to its learned value

    @property
    def feature_dim(self) -> int:
        """Width of the blended feature fed to the density MLP."""
        return self.n_levels * self.features_per_level

    @staticmethod
    def per_level_scale_for(base_resolution: int, finest_resolution: float, n_levels: int) -> float:
        """The per-level scale that makes level L-1 reach ``finest_resolution`` (the usual Instant-NGP b)."""
        if n_levels < 2:
            return 1.0
        return float(math.exp(math.log(finest_resolution / base_resolution) / (n_levels - 1)))


@dataclass(frozen=True)
class FieldConfig:
    """Density and colour networks (tcnn FullyFusedMLPs upstream: ReLU, no biases)."""

    hidden_dim: int = 64
    num_layers: int = 2  # density MLP: num_layers - 1 hidden layers -> 32 -> 64 -> 16
    geo_feat_dim: int = 15
    hidden_dim_color: int = 64
    num_layers_color: int = 3  # colour MLP: 18 -> 64 -> 64 -> 3, sigmoid
    use_bias: bool = False
    trunc_exp_clamp: float = 15.0  # backward of trunc_exp uses exp(clamp(x, -c, c))
    # Spherical-harmonics degree 0 upstream means tcnn's Identity: the raw unit direction mapped by (d+1)/2.
    direction_encoding: Literal["shifted_identity"] = "shifted_identity"
    background_color: tuple[float, float, float] = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class OccupancyConfig:
    """nerfacc OccGridEstimator as NeRSemble uses it for a dynamic scene."""

    enabled: bool = True  # False: density 1 everywhere (sequence 97), every cell stays occupied
    resolution: int = 128
    levels: int = 1
    occ_threshold: float = 0.01  # occupied = occ > min(mean(occ), occ_threshold)
    ema_decay: float = 0.95
    update_every: int = 16
    warmup_steps: int = 256  # before this step every cell is probed at each update
    frustum_min_cameras: int = 2  # a cell must be inside >= this many training frusta (0 disables)
    # Not upstream: also switch off cells outside the mattes' visual hull (union over the sequence), so
    # training never marches known-empty space. The trainer's caller supplies the mask; preview turns it on.
    matte_hull: bool = False


@dataclass(frozen=True)
class SamplerConfig:
    """Instant-NGP style ray marching through the occupancy grid."""

    step_size: float = 0.011  # render_step_size, model units
    near_plane: float = 0.2
    far_plane: float = 1000.0
    cone_angle: float = 0.0  # only 0 (constant step) is implemented, as used upstream
    alpha_threshold: float = 0.01  # training-only culling at min(alpha_threshold, mean(occ))
    # Upstream keeps 0 (its comment: other values made the scene explode); preview drops samples behind
    # T < 1e-3, which only cuts the cost of the occluded inside of the head.
    early_stop_eps: float = 0.0
    stratified: bool = True  # jitter the first step by U(0, step) in training
    # Rendering (not training) marches step_size / eval_substeps. Training's jittered steps average over where
    # the samples fall, i.e. they fit the continuous integral, which a finer fixed lattice approximates better
    # than the training step's own; upstream renders at its training step (1).
    eval_substeps: int = 1


@dataclass(frozen=True)
class LossConfig:
    """Loss weights and the depth-loss epsilon schedule."""

    masked_rgb: bool = True  # RGB MSE only on rays with alpha > alpha_mask_threshold
    alpha_mask_threshold: float = 0.0
    lambda_rgb: float = 1.0
    lambda_alpha: float = 1e-2
    lambda_empty: float = 1e-2
    lambda_near: float = 1e-4
    lambda_depth: float = 1e-4
    lambda_distortion: float = 1e-4
    distortion_max_rays: int = 5000
    depth_eps: Schedule = Schedule(0.9, 0.01, 0, 10000)
    near_std_is_variance: bool = True  # upstream passes (eps/3)^2 as the Normal's std: kept on purpose


@dataclass(frozen=True)
class OptimizerConfig:
    """Three Adam groups, each with its own StepLR decay."""

    lr_fields: float = 5e-3  # hash ensemble + density/colour MLPs
    lr_deformation: float = 1e-3
    lr_embeddings: float = 5e-3  # blend-weight and deformation codes
    adam_eps: float = 1e-15
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    lr_step_size: int = 20000
    gamma_fields: float = 0.8
    gamma_deformation: float = 0.5
    gamma_embeddings: float = 0.8
    grad_clip: float | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Trainer-level settings (the trainer lives outside this package; they are recorded here)."""

    steps: int = 300001  # max_num_iterations: steps 0..300000
    rays_per_batch: int = 4096  # rays per step; with a sample budget, the fewest
    # A sample budget per step (0 = off, as upstream's fixed batches): once the occupancy grid and early stopping
    # have cut the samples per ray, a step draws target / samples-per-ray rays (an EMA of recent steps), within
    # [rays_per_batch, max_rays_per_batch]. Much of a small step is fixed cost, so more rays then come cheap.
    target_samples_per_batch: int = 0
    max_rays_per_batch: int = 4096
    images_per_batch: int = 24  # rays are drawn from a cached set of this many (camera, timestep) images
    repeat_images: int = 20  # the set is redrawn every repeat_images + 1 iterations
    seed: int = 19980801
    mixed_precision: bool = True  # CUDA only: fp16 autocast (cache_enabled=False) + GradScaler
    checkpoint_every: int = 50000
    eval_every_batch: int = 500
    eval_every_image: int = 20000
    eval_every_all_images: int = 50000
    eval_rays_per_batch: int = 1024
    eval_images_per_batch: int = 36


@dataclass(frozen=True)
class DataConfig:
    """How training targets are prepared (applied by the trainer / earlier stages, recorded here)."""

    downscale_factor: int = 2  # relative to the 2200 x 3208 capture: 1100 x 1604 training frames
    color_correction: bool = True  # per-camera affine colour correction, train and eval alike
    depth_range_m: tuple[float, float] = (0.8, 1.4)  # depth targets outside are invalid (0)
    train_cameras: int = 12  # 4 of the 16 rig cameras are held out for evaluation


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation and rendering settings."""

    chunk: int = 8192  # rays per chunk when rendering whole images
    max_eval_timesteps: int = 15  # linspace(0, T - 1, 15) frames per hold-out camera
    # Largest-connected-component filtering of the occupancy grid before evaluation renders.
    occupancy_filter: bool = True
    filter_threshold: float = 0.05
    filter_sigma_thinning: float = 1.0
    filter_sigma_erosion: float = 7.0


@dataclass(frozen=True)
class NeRSembleConfig:
    """The whole method. ``NeRSembleConfig()`` equals ``preset("paper")``."""

    name: str = "paper"
    scene: SceneConfig = _field(default_factory=SceneConfig)
    codes: TimeCodeConfig = _field(default_factory=TimeCodeConfig)
    deformation: DeformationConfig = _field(default_factory=DeformationConfig)
    hash: HashEnsembleConfig = _field(default_factory=HashEnsembleConfig)
    field: FieldConfig = _field(default_factory=FieldConfig)
    occupancy: OccupancyConfig = _field(default_factory=OccupancyConfig)
    sampler: SamplerConfig = _field(default_factory=SamplerConfig)
    loss: LossConfig = _field(default_factory=LossConfig)
    optim: OptimizerConfig = _field(default_factory=OptimizerConfig)
    train: TrainConfig = _field(default_factory=TrainConfig)
    data: DataConfig = _field(default_factory=DataConfig)
    eval: EvalConfig = _field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        h, d = self.hash, self.deformation
        if h.window.final > h.n_grids or h.window.init < 1:
            raise ValueError(f"hash window must run within [1, n_grids={h.n_grids}], got {h.window}")
        if d.window.final > d.n_frequencies or d.window.init < 0:
            raise ValueError(f"deformation window must run within [0, {d.n_frequencies}], got {d.window}")
        if h.per_level_scale < 1.0:
            raise ValueError("per_level_scale < 1 would make coarse levels finer than fine ones")
        if h.features_per_level < 1 or h.n_levels < 1 or h.n_grids < 1:
            raise ValueError("hash ensemble needs at least one grid, level and feature")
        if self.sampler.cone_angle != 0.0:
            raise ValueError("only cone_angle=0 is implemented (the official setting)")
        if self.sampler.eval_substeps < 1:
            raise ValueError(f"eval_substeps must be >= 1, got {self.sampler.eval_substeps}")
        if not 0.0 <= self.sampler.early_stop_eps < 1.0:
            raise ValueError(f"early_stop_eps must lie in [0, 1), got {self.sampler.early_stop_eps}")
        if self.occupancy.levels != 1:
            raise ValueError("only a single occupancy-grid level is implemented (the official setting)")
        t = self.train
        if t.target_samples_per_batch < 0 or (t.target_samples_per_batch and t.max_rays_per_batch < t.rays_per_batch):
            raise ValueError(f"a sample budget needs target_samples_per_batch >= 0 and max_rays_per_batch "
                             f"({t.max_rays_per_batch}) >= rays_per_batch ({t.rays_per_batch})")
        if any(s >= d.num_layers or s < 1 for s in d.skip_connections):
            raise ValueError(f"skip connections {d.skip_connections} must index hidden layers 1..{d.num_layers - 1}")

    # --- overrides and (de)serialisation -----------------------------------------------------------

    def with_overrides(self, overrides: Mapping[str, Any] | None = None, **kwargs: Any) -> NeRSembleConfig:
        """A copy with fields replaced; see the module docstring for the accepted key forms."""
        merged = dict(overrides or {})
        merged.update({key.replace("__", "."): value for key, value in kwargs.items()})
        config = self.to_dict()
        for key, value in merged.items():
            path = _resolve_path(self, key)
            target = config
            for part in path[:-1]:
                target = target[part]
            target[path[-1]] = _plain(value)
        return NeRSembleConfig.from_dict(config)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON-friendly: tuples become lists) for checkpoints and reports."""
        return _plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NeRSembleConfig:
        return _build(cls, data)


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, data: Any) -> Any:
    """Rebuild a (nested) frozen dataclass from plain data, turning lists back into tuples."""
    if cls is Schedule and isinstance(data, (tuple, list)):
        return Schedule(*data)
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise TypeError(f"cannot build {cls.__name__} from {data!r}")
    hints = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(hints)
    if unknown:
        raise KeyError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        default = _default_of(hints[name])
        if is_dataclass(default):
            kwargs[name] = _build(type(default), value)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _leaf_paths(obj: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        paths.append(prefix + (f.name,))
        if is_dataclass(value):
            paths.extend(_leaf_paths(value, prefix + (f.name,)))
    return paths


def _resolve_path(config: NeRSembleConfig, key: str) -> tuple[str, ...]:
    """A dotted path as is, or a bare name that names exactly one field anywhere in the config."""
    paths = _leaf_paths(config)
    if "." in key:
        path = tuple(key.split("."))
        if path not in paths:
            raise KeyError(f"no config field {key!r}")
        return path
    matches = [p for p in paths if p[-1] == key]
    if len(matches) != 1:
        found = ", ".join(".".join(p) for p in matches) or "none"
        raise KeyError(f"config field {key!r} is {'ambiguous' if matches else 'unknown'} (matches: {found})")
    return matches[0]


# --- presets -------------------------------------------------------------------------------------------


def paper() -> NeRSembleConfig:
    """The official NeRSemble settings (needs a large GPU: ~403M hash-table parameters)."""
    return NeRSembleConfig()


def preview() -> NeRSembleConfig:
    """A CPU-sized variant for 220x320 x 12 cameras x 24 frames, trained for minutes.

    Capacity is cut: 4 grids x 8 levels x 2^14 entries up to resolution 512, a 4-layer 32-wide deformation
    MLP with 32-d codes (it dominates a sample's FLOPs, so a narrower one buys steps), a 32^3 occupancy grid
    probed every 4 steps, a 0.1 marching step (~1 cm, 9x the official one: a head ray gets ~20 samples;
    renders march 0.05) and 1024 to 4096 rays. The warm-up schedules are compressed by the ratio of step
    counts (3000 / 300000), so PE annealing, the single-grid phase and the grid fade-in keep their relative
    positions; the evaluation filter's blurs, given in occupancy cells, are scaled by the ratio of grid
    resolutions (32 / 128), so they keep their size in space. For a CPU time budget: alpha loss weight 1.0,
    depth loss weight 0.3 (with depth maps), learning-rate decay every 600 steps, the matte-hull occupancy
    mask, early termination at T < 1e-3 and a budget of 4096 samples per step. Why: README.md next to this
    file; the measurements: benchmarks/EXPERIMENTS.md.
    """
    base = NeRSembleConfig()
    steps = 3000
    factor = steps / (base.train.steps - 1)
    occupancy_resolution = 32
    cells = occupancy_resolution / base.occupancy.resolution
    n_grids = 4
    hash_window = base.hash.window.scaled(factor)
    return replace(
        base,
        name="preview",
        codes=replace(base.codes, deformation_dim=32),
        deformation=replace(base.deformation, num_layers=4, layer_width=32, skip_connections=(2,),
                            window=base.deformation.window.scaled(factor)),
        hash=replace(
            base.hash, n_grids=n_grids, n_levels=8, log2_table_size=14,
            per_level_scale=HashEnsembleConfig.per_level_scale_for(16, 512, 8),
            window=Schedule(1.0, float(n_grids), hash_window.begin, hash_window.end),
        ),
        # Probing 4x as often (every 4 steps, all cells for 64) lets empty space be pruned within the first
        # few hundred steps instead of a third of the run; R^3/2 = 16k probes per update stay cheap at 32^3.
        occupancy=replace(base.occupancy, resolution=occupancy_resolution, update_every=4, warmup_steps=64,
                          matte_hull=True),
        # Rendering marches half the training step: training's jittered lattice fits the continuous integral,
        # which a finer fixed lattice estimates better than one at this coarse step; finer still costs render
        # time for little more.
        sampler=replace(base.sampler, step_size=0.1, early_stop_eps=1e-3, eval_substeps=2),
        # The untrained field is a fog of density ~1 filling the box; at the official 0.01 the alpha loss
        # needs thousands of steps to clear it, which is the whole preview budget. At 1.0 the background
        # clears early and the occupancy grid can prune it.
        # The expected-depth loss at 0.3 instead of 1e-4 concentrates each ray's weight at the depth stage's
        # surface: fewer samples survive per ray, so the sample budget draws more rays a step. 0.3 sits in the
        # middle of a plateau of weights that all do better than upstream's within a CPU budget.
        loss=replace(base.loss, depth_eps=base.loss.depth_eps.scaled(factor), lambda_alpha=1.0, lambda_depth=0.3),
        # Learning rates decay every 600 steps instead of the compressed 200: on a CPU the run is cut by a time
        # budget long before step 3000, and at the compressed rate learning stalls long before the budget ends.
        optim=replace(base.optim, lr_step_size=600),
        # Steps start at 1024 rays; once pruning has cut the samples per ray, a 4096-sample budget draws more
        # rays per step. Much of a small step is fixed cost, so those rays come cheap; a larger budget makes
        # the early steps dearer, and a smaller first batch was not reliably better.
        train=replace(base.train, steps=steps, rays_per_batch=1024, target_samples_per_batch=4096,
                      max_rays_per_batch=4096, checkpoint_every=1000,
                      eval_every_batch=100, eval_every_image=500, eval_every_all_images=1000),
        # Upstream's sigmas of 1 and 7 cells are for its 128^3 grid: on 32^3, a 7-cell blur grows the largest
        # blob over the whole grid and the filter removes nothing. Scaled, it removes the floaters that only
        # the hold-out views see.
        eval=replace(base.eval, chunk=4096, filter_sigma_thinning=base.eval.filter_sigma_thinning * cells,
                     filter_sigma_erosion=base.eval.filter_sigma_erosion * cells),
    )


def standard() -> NeRSembleConfig:
    """One GPU, minutes to tens of minutes: the official method on a schedule ten times shorter.

    30k steps instead of 300k, and every step-valued schedule (positional-encoding and grid fade-in windows,
    the depth-loss band, the learning-rate decay) divided by ten, so each phase keeps its place relative to the
    run, as the paper's ablations of shorter runs do. Rays per step, marching step, losses and the occupancy
    grid stay official: only the length changes, so the preset isolates what a shorter schedule costs.
    Capacity is cut to 8 grids of 16 levels, 2^17 entries up to resolution 2048, and a 64-wide deformation
    MLP: with a tenth of the steps, each of the official 32 grids would see too few rays to train, and the
    smaller tables fit a 24 GB GPU with room for the ray batches.
    """
    base = NeRSembleConfig()
    factor = 0.1
    steps = int(round((base.train.steps - 1) * factor))
    n_grids = 8
    hash_window = base.hash.window.scaled(factor)
    return replace(
        base,
        name="standard",
        deformation=replace(base.deformation, layer_width=64, window=base.deformation.window.scaled(factor)),
        hash=replace(
            base.hash, n_grids=n_grids, n_levels=16, log2_table_size=17,
            per_level_scale=HashEnsembleConfig.per_level_scale_for(16, 2048, 16),
            window=Schedule(1.0, float(n_grids), hash_window.begin, hash_window.end),
        ),
        loss=replace(base.loss, depth_eps=base.loss.depth_eps.scaled(factor)),
        optim=replace(base.optim, lr_step_size=int(base.optim.lr_step_size * factor)),
        train=replace(base.train, steps=steps + 1, checkpoint_every=5000, eval_every_image=2000,
                      eval_every_all_images=5000),
    )


PRESETS = {"paper": paper, "standard": standard, "preview": preview}


def preset(name: str) -> NeRSembleConfig:
    """A named preset: ``paper`` or ``preview``."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
