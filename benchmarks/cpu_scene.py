"""An in-memory synthetic capture for CPU speed work: the synthetic rig's exact images, no stages, no disk.

Speed questions need a model whose occupancy grid has pruned empty space (an untrained model marches the
whole box), not the ingest/matte/depth stages, so the images come straight from :func:`render_subject`
(exact RGB, alpha and z-depth) and the model is warmed up by a few hundred preview steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.synthetic import SERIALS, frame_times, render_background, render_subject, rig_cameras  # noqa: E402
from stages.nersemble.config import NeRSembleConfig  # noqa: E402
from stages.nersemble.model import NeRSembleModel  # noqa: E402
from stages.nersemble.rays import scene_box_from_cameras  # noqa: E402
from stages.nersemble.image_cache import TrainImage, TrainView  # noqa: E402
from stages.nersemble.trainer import Trainer  # noqa: E402
from stages.optimize.config import PAPER_HOLDOUT_CAMERAS  # noqa: E402

WIDTH, HEIGHT = 220, 320


class SyntheticSource:
    """``ImageSource`` over the synthetic head: every (camera, frame) rendered once, kept in memory."""

    def __init__(self, serials: list[str], frames: int, width: int = WIDTH, height: int = HEIGHT,
                 seed: int = 0) -> None:
        params = rig_cameras(width, height, serials, seed=seed)
        self.serials, self.n_timesteps = serials, frames
        self.views = [TrainView(params.intrinsics[s], params.world_2_cam[s], width, height) for s in serials]
        times = frame_times(frames)
        self.images: dict[tuple[int, int], TrainImage] = {}
        for v, serial in enumerate(serials):
            view = self.views[v]
            plate = render_background(view.K, view.world_2_cam, width, height, seed=seed)
            for t, time in enumerate(times):
                r = render_subject(view.K, view.world_2_cam, width, height, float(time), seed=seed, background=plate)
                self.images[v, t] = TrainImage(r.rgb, r.alpha, r.depth)

    def load(self, view: int, timestep: int) -> TrainImage:
        return self.images[view, timestep]


def split() -> tuple[list[str], list[str]]:
    """(train, hold-out) serials as the optimize stage splits the 16-camera rig."""
    holdout = [s for s in SERIALS if s in PAPER_HOLDOUT_CAMERAS]
    return [s for s in SERIALS if s not in holdout], holdout


def build(config: NeRSembleConfig, source: SyntheticSource, seed: int = 0) -> Trainer:
    """A fresh model (weights fixed by ``seed``) and its trainer on ``source``, on the CPU."""
    box = scene_box_from_cameras([v.world_2_cam for v in source.views], config.scene.box_size_m,
                                 config.scene.world_scale)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = NeRSembleModel(config, source.n_timesteps, box, backend="torch")
    return Trainer(model, source, torch.device("cpu"), seed=seed)


def holdout_psnr(model: NeRSembleModel, source: SyntheticSource, timesteps: list[int]) -> float:
    """Mean PSNR of hold-out renders (after the official occupancy filter, on a copy) against exact images."""
    import copy  # noqa: PLC0415

    evaluated = copy.deepcopy(model)
    evaluated.filter_occupancy()
    values = []
    for v, view in enumerate(source.views):
        for t in timesteps:
            out = evaluated.render_image(view.K, view.world_2_cam, view.width, view.height, t)["rgb"]
            image = source.load(v, t)
            a = image.alpha.astype(np.float32)[..., None] / 255.0
            target = torch.from_numpy(image.rgb.astype(np.float32) / 255.0 * a + (1.0 - a))
            mse = float(torch.mean((out.float() - target) ** 2))
            values.append(-10.0 * np.log10(max(mse, 1e-10)))
    return float(np.mean(values))
