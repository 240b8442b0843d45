"""Render a list of camera views with the trained model and stream them into videos (and PNG frames).

One frame at a time: the model renders ``chunk`` rays at once, the frame goes straight into ffmpeg's pipe, so
memory stays at one frame's buffers at any resolution and any length. Videos are written to a hidden temporary
name and renamed into place when complete, so a killed export never leaves a truncated mp4 under the real name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.core.errors import PipelineError
from stages.core.video import VideoWriter
from stages.rendering.paths import CameraView
from stages.rendering.sheets import colourise_depth, encode_png, grey_to_rgb, to_uint8, unpremultiply_on_white
from storage import SequenceWorkDir

Tick = Callable[[], None]  # called once per rendered frame
DEPTH_MIN_ALPHA = 0.5  # depth videos show a surface only where the render is mostly opaque



def progress_ticker(progress: Callable[[int, int], None] | None, total: int) -> Callable[[], None]:
    """A ``tick()`` that reports one more of ``total`` rendered images to ``progress`` (0 of total at once)."""
    done = 0
    if progress:
        progress(0, total)

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    return tick

@dataclass(frozen=True)
class Rendered:
    """One frame on the CPU: rgb (H, W, 3) on white, alpha (H, W), z_depth (H, W) metres (0 = nothing)."""

    rgb: np.ndarray
    alpha: np.ndarray
    z_depth: np.ndarray


def render_view(model: Any, view: CameraView, n_timesteps: int, chunk: int) -> Rendered:
    try:
        out = model.render_image(view.K, view.world_2_cam, view.width, view.height, view.timestep(n_timesteps),
                                 chunk=chunk)
    except torch.cuda.OutOfMemoryError:
        raise PipelineError(out_of_memory_message(model, view, chunk)) from None
    return Rendered(*(out[key].detach().float().clamp_min(0).cpu().numpy() for key in ("rgb", "alpha", "z_depth")))


def out_of_memory_message(model: Any, view: CameraView, chunk: int) -> str:
    """What to lower when a render runs out of GPU memory: the rays per chunk first (memory grows with them), then
    the samples per ray (``eval_substeps`` multiplies them), else the CPU. Export and evaluate share the options."""
    substeps = model.config.sampler.eval_substeps
    return (f"rendering a {view.width}x{view.height} view ran out of GPU memory; lower chunk ({chunk}) with "
            f"--chunk, or eval_substeps ({substeps}) with --eval-substeps, or render on the CPU with --device cpu")


@dataclass(frozen=True)
class VideoJob:
    """What to render into ``export/<name>.mp4`` and which companion outputs to write beside it."""

    name: str  # path under export/ without the extension, e.g. "turntable" or "holdout/cam_222200040"
    views: list[CameraView]
    fps: float
    crf: int
    depth: bool = False  # <name>_depth.mp4 (z-depth, turbo, near = warm, black = no surface)
    alpha: bool = False  # <name>_alpha.mp4 (grey matte as a 3-channel video)
    rgba_frames: bool = False  # <name>_rgba/00000.png ... (transparent background)
    depth_range_m: tuple[float, float] = (0.5, 1.5)


@contextmanager
def local_output(work: SequenceWorkDir, rel_path: str) -> Iterator[Path]:
    """A local file to write ``rel_path`` into; it appears under its real name only if the block succeeds."""
    suffix = Path(rel_path).suffix
    if work.is_local:
        target = Path(work.path(*rel_path.split("/")))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".partial{suffix}", dir=target.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        folder = tempfile.mkdtemp(prefix="export-")
        try:
            tmp = Path(folder) / f"out{suffix}"
            yield tmp
            work.write_bytes(rel_path, tmp.read_bytes())
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def render_job(model: Any, job: VideoJob, work: SequenceWorkDir, n_timesteps: int, chunk: int,
               tick: Tick | None = None) -> dict[str, Any]:
    """Render every view of ``job`` into its videos; returns what was written (paths relative to the work dir)."""
    if not job.views:
        raise ValueError(f"{job.name}: nothing to render")
    width, height = job.views[0].width, job.views[0].height
    outputs = {"video": f"export/{job.name}.mp4"}
    if job.depth:
        outputs["depth_video"] = f"export/{job.name}_depth.mp4"
    if job.alpha:
        outputs["alpha_video"] = f"export/{job.name}_alpha.mp4"
    started = time.perf_counter()
    render_seconds = 0.0
    with ExitStack() as stack:
        writers = {key: VideoWriter(stack.enter_context(local_output(work, rel)), width=width, height=height,
                                    fps=job.fps, crf=job.crf) for key, rel in outputs.items()}
        for writer in writers.values():
            stack.callback(writer.close)
        for index, view in enumerate(job.views):
            clock = time.perf_counter()
            frame = render_view(model, view, n_timesteps, chunk)
            render_seconds += time.perf_counter() - clock
            writers["video"].write(to_uint8(frame.rgb))
            if job.depth:
                surface = np.where(frame.alpha >= DEPTH_MIN_ALPHA, frame.z_depth, 0.0)  # fog has no depth
                writers["depth_video"].write(colourise_depth(surface, *job.depth_range_m))
            if job.alpha:
                writers["alpha_video"].write(grey_to_rgb(frame.alpha))
            if job.rgba_frames:
                work.write_bytes(f"export/{job.name}_rgba/{index:05d}.png",
                                 encode_png(unpremultiply_on_white(frame.rgb, frame.alpha)))
            if tick:
                tick()
        for writer in writers.values():
            writer.close()  # before the rename: the file must be complete
        counts = {key: writer.frames_written for key, writer in writers.items()}
    result: dict[str, Any] = {**outputs, "frames": counts["video"], "size": [width, height], "fps": job.fps,
                              "crf": job.crf, "seconds": round(time.perf_counter() - started, 3),
                              "render_seconds": round(render_seconds, 3)}
    if job.rgba_frames:
        result["rgba_frames"] = f"export/{job.name}_rgba/"
    if job.depth:
        result["depth_range_m"] = [round(v, 4) for v in job.depth_range_m]
    if len(set(counts.values())) != 1 or counts["video"] != len(job.views):
        raise RuntimeError(f"{job.name}: wrote {counts} frames for {len(job.views)} views")
    return result


def depth_range_for(views: list[CameraView], centre: np.ndarray, half_extent: float) -> tuple[float, float]:
    """A fixed depth scale for a whole video: the cameras' distances to the subject's centre, +- its half extent."""
    distances = [float(np.linalg.norm(-view.world_2_cam[:3, :3].T @ view.world_2_cam[:3, 3] - centre))
                 for view in views]
    return max(min(distances) - half_extent, 1e-3), max(distances) + half_extent
