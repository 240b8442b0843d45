"""NeRSemble: a dynamic radiance field of a head -- SE(3) deformation + hash-grid ensemble -- in plain torch.

Implements the official method (``tobias-kirschstein/nersemble``; spec: ``reference/nersemble-method.md``) as
small, separately testable parts. Imports only torch, numpy and the standard library; runs unchanged on CPU
and CUDA (fp16 autocast on CUDA only, when ``config.train.mixed_precision``); tiny-cuda-nn is used for the
hash grids when it imports, else an equivalent pure-torch encoding.

Spaces
    Cameras are the pipeline's: metric OpenCV ``world_2_cam`` (4x4) and ``K`` (3x3) for the frame size.
    The model works in *model units* = metres x ``config.scene.world_scale`` (9, as upstream): rays, scene
    box, step size, depth targets and the losses' epsilon are in model units. Camera-level entry points
    (``render_image``, ``set_training_cameras``, ``camera_rays``, ``scene_box_from_cameras``) scale for you.

Configuration (``config.py``)
    ``preset("paper" | "preview") -> NeRSembleConfig``; ``cfg.with_overrides(steps=500, hash__n_grids=..,
    **{"loss.lambda_alpha": ..})``; ``cfg.to_dict()`` / ``NeRSembleConfig.from_dict(d)`` for checkpoints.
    Sections: scene, codes, deformation, hash, field, occupancy, sampler, loss, optim, train, data, eval.

Model (``model.py``)
    ``model = NeRSembleModel(cfg, n_timesteps, scene_box, backend="auto"|"torch"|"tcnn"|"reference")``
    ``model.set_training_cameras(Ks, world_2_cams, sizes)``  once: cells seen by < 2 training cameras off
    ``model.update_occupancy(step, generator=None) -> bool``  every step, before the forward pass
    ``out = model(rays_o, rays_d, timesteps, step=step)``  rays in model units, unit directions;
        ``out``: rgb [N,3] (on white), alpha [N] (accumulated opacity), depth [N] (expected ray distance),
        deformation [N,3], weights [S] and samples (``RaySamples``: ray_indices, t_starts, t_ends; packed)
    ``model.param_groups(cfg) -> [{"name": "fields"|"deformation_field"|"embeddings", "params", "lr"}]``
    ``model.render_image(K, world_2_cam, width, height, timestep, chunk=None, step=None)``
        -> {rgb (H,W,3), alpha (H,W), depth (H,W) metres along the ray, z_depth (H,W) metres}; eval semantics
    ``timestep_index(time, n_timesteps)``: upstream's normalised time -> index ``round(t (T-1))``
    ``step=None`` everywhere means "after training": final warm-up windows, as upstream's eval/render see.

Training pieces for the trainer (``losses.py``, ``optim.py``, ``rays.py``)
    ``losses = nersemble_losses(out, rgb_target, alpha_target, depth_target, cfg.loss, step)``; total = sum
        (targets per ray: rgb composited on white, alpha in [0,1], depth in model units with 0 = none)
    ``optimizer = build_optimizer(model, cfg)``; ``scheduler = build_lr_scheduler(optimizer, cfg)`` (step it
        once per successful iteration -- skip it when a GradScaler just lowered its scale, as upstream)
    ``camera_rays(K, world_2_cam, uv, world_scale) -> Rays(origins, directions, z_dirs)`` for pixel batches
    ``scene_box_from_cameras(world_2_cams, cfg.scene.box_size_m, cfg.scene.world_scale)``

A training step, in full::

    model.train()
    model.update_occupancy(step)
    out = model(rays.origins, rays.directions, timesteps, step=step)
    loss = sum(nersemble_losses(out, rgb, alpha, depth * cfg.scene.world_scale, cfg.loss, step).values())
    optimizer.zero_grad(set_to_none=True); loss.backward(); optimizer.step(); scheduler.step()

The trainer (``trainer.py``) runs that step over any ``ImageSource`` (``image_cache.py``: cameras + ``load(view, t)``)::

    trainer = Trainer(model, source, device)          # sets the training cameras' frustum mask
    trainer.train(time_budget_s=..., progress=callback, checkpoint=save, checkpoint_every=N)

The checkpoint format (``checkpoint.py``)::

    save_checkpoint(trainer.state_dict(extra)) -> bytes; trainer.load_state_dict(load_checkpoint(data))
    model_from_checkpoint(checkpoint, device) -> NeRSembleModel (eval mode)

Rays come from a rotating cache of ``train.images_per_batch`` images (``image_cache.py``); a checkpoint restores
it, so a resumed run continues exactly. ``model.filter_occupancy()`` is upstream's evaluation-time
connected-component filter.

Building blocks, each usable alone: ``hash_encoding`` (the torch/triton/tcnn encodings; ``encodings.make_encoding``
builds one), ``deformation`` (``SE3DeformationField``, ``windowed_posenc``, ``se3_exp``, ``deform_positions``),
``field`` (``NeRSembleField``, ``TimeCodes``, ``ensemble_weights``, ``trunc_exp``), ``occupancy``
(``OccupancyGrid``, ``frustum_visibility_mask``), ``sampling`` (``march_rays``, ``ray_aabb_intersect``),
``rendering`` (``render_weights``, ``composite``, ``accumulate_along_rays``, ``render_samples``), ``schedules``
(``Schedule``, ``cosine_window``). Kernels live in ``kernels/`` (C for the CPU, Triton for CUDA, each held against
the torch code it replaces; ``kernels/registry.py`` says which runs where); ``nograd.py`` runs the CPU's batched
no-grad queries around them, and ``model.kernels_used()`` says which ran.
Decisions where the method is ambiguous or quirky are listed in ``README.md`` next to this file.
"""

from .config import PAPER_SCENE_BOXES, NeRSembleConfig, preset
from .encodings import make_encoding
from .losses import nersemble_losses
from .model import NeRSembleModel, Windows, timestep_index
from .optim import build_lr_scheduler, build_optimizer
from .rays import Rays, camera_rays, pixel_centers, scene_box_from_cameras
from .sampling import RaySamples
from .kernels.registry import tcnn_available
from .schedules import Schedule

__all__ = [
    "PAPER_SCENE_BOXES",
    "NeRSembleConfig",
    "NeRSembleModel",
    "Rays",
    "RaySamples",
    "Schedule",
    "Windows",
    "build_lr_scheduler",
    "build_optimizer",
    "camera_rays",
    "make_encoding",
    "nersemble_losses",
    "pixel_centers",
    "preset",
    "scene_box_from_cameras",
    "tcnn_available",
    "timestep_index",
]
