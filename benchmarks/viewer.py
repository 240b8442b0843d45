"""Viewer speed: time to the first image, frames/s while the view moves, seconds to the full-size refine.

Measured through the viewer's own render path (``pipeline.viewer``: the progressive scheduler, the strip renderer
with its cancellation checks, the coarse and full models, the picture for the render mode), not a bare model
call; only the browser and the websocket are left out. The views are the page's: the viewer's starting pose (the
rig's mean camera) at the rig's aspect, so the full size is the stored frame's (220x320 on the synthetic rig) and
the coarse one 160 px wide.

- ``first_image_s``: from the page's first view to its first picture (coarse);
- ``coarse_fps``: pictures per second while the view orbits +-20 degrees, a new pose every 1/60 s (a drag);
- ``full_refine_s``: from the last pose of a drag (the view rests) to the full-size picture, median of rests.

Without ``--work`` it synthesises a 16-camera capture and trains a ``preview`` model first (``--train-seconds``,
cached under ``--cache`` and reused). CPU with 1 and 2 threads (the viewer's strip workers, torch on one thread
each; and for comparison one worker with torch on 2 threads), and CUDA where torch sees one. Writes
``benchmarks/results/viewer.json`` (headline keys for the CPU with 2 threads: 2 strip workers) and ``viewer.md``.

    .venv/bin/python benchmarks/viewer.py [--work WORK/PID/SEQ] [--drag-seconds 4] [--rests 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.viewer.camera import RenderSizes, ViewPose  # noqa: E402
from pipeline.viewer.progressive import Delivered, ProgressiveRenderer, ViewRequest  # noqa: E402
from pipeline.viewer.sequence import ViewerSequence, open_sequence  # noqa: E402
from pipeline.viewer.scene import initial_pose  # noqa: E402
from pipeline.viewer.session import SharedRendering, render_picture  # noqa: E402
from stages.core.cameras import quaternion_to_rotation, rotation_to_quaternion  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DRAG_HZ = 60.0
DRAG_DEGREES = 20.0
GOALS = {"first_image_s": 1.0, "coarse_fps": 10.0, "full_refine_s": 1.0}


def trained_sequence(cache: Path, train_seconds: float) -> str:
    """A synthetic 16-camera capture with a ``preview`` model, made once under ``cache``."""
    from pipeline.synthetic import synthesize_capture
    from stages.calibrate.config import CalibrateConfig
    from stages.calibrate.stage import calibrate_sequence
    from stages.ingest.config import IngestConfig
    from stages.ingest.stage import ingest_sequence
    from stages.matte.config import MatteConfig
    from stages.matte.stage import matte_sequence
    from stages.optimize.config import OptimizeConfig
    from stages.optimize.stage import optimize_sequence
    from storage import SequenceWorkDir

    work = SequenceWorkDir(str(cache / "work" / "001" / "EXP-1-head"))
    if work.listdir("nersemble", "checkpoints"):
        return work.uri
    print(f"training a preview model for {train_seconds:.0f} s under {cache} (once) ...", flush=True)
    capture = synthesize_capture(cache / "archive", frames=12)
    ingest_sequence(capture.sequence_dir, str(cache / "work"), IngestConfig())
    calibrate_sequence(work.uri, CalibrateConfig(mode="provided"))
    matte_sequence(work.uri, MatteConfig(method="plate", workers=1))
    optimize_sequence(work.uri, OptimizeConfig(preset="preview", time_budget_s=train_seconds, threads=1))
    return work.uri


def orbit(pose: ViewPose, centre: np.ndarray, up: np.ndarray, degrees: float) -> ViewPose:
    """The pose turned about the scene centre around ``up`` (a drag of the orbit controls)."""
    angle = math.radians(degrees)
    k = up / np.linalg.norm(up)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    turn = np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K
    position = centre + turn @ (np.asarray(pose.position) - centre)
    rotation = turn @ quaternion_to_rotation(np.asarray(pose.wxyz))
    return ViewPose.of(position, rotation_to_quaternion(rotation), pose.fov, pose.aspect)


class Recorder:
    """Collects delivered pictures with their arrival times."""

    def __init__(self) -> None:
        self.delivered: list[tuple[float, Delivered]] = []
        self.arrived = threading.Condition()

    def __call__(self, delivered: Delivered) -> None:
        with self.arrived:
            self.delivered.append((time.perf_counter(), delivered))
            self.arrived.notify_all()

    def wait(self, predicate, timeout: float = 120.0) -> tuple[float, Delivered]:  # noqa: ANN001
        deadline = time.perf_counter() + timeout
        with self.arrived:
            while True:
                found = next((item for item in self.delivered if predicate(item[1])), None)
                if found or time.perf_counter() > deadline:
                    if found is None:
                        raise TimeoutError("no picture arrived")
                    return found
                self.arrived.wait(0.05)


def measure(sequence: ViewerSequence, device: str, workers: int, drag_seconds: float, rests: int,
            intra_op: int = 0, aspect: float | None = None) -> dict:
    """One configuration through the viewer's render path: ``workers`` strip threads (torch on one thread each),
    or with ``intra_op`` one worker whose torch runs that many threads; the canvas has the rig's ``aspect``
    unless told otherwise (the full size keeps a stored frame's pixel count, the coarse one its 160 px width)."""
    cams = sequence.cameras
    aspect = aspect or cams.width / cams.height
    sizes = RenderSizes(coarse_width=160, full_pixels=cams.width * cams.height)
    rendering = SharedRendering.for_sequence(sequence, sizes, workers=workers)
    if intra_op:  # the comparison: one worker whose torch runs ``intra_op`` threads
        torch.set_num_threads(intra_op)
    recorder = Recorder()
    progressive = ProgressiveRenderer(lambda request, size, cancelled: render_picture(
        rendering, sequence.box, request, size, cancelled), recorder, rendering.sizes)
    start = initial_pose(sequence, aspect)
    up = -start.world_2_cam()[1, :3]
    try:
        # warm-up: the first render builds kernels and caches; the page's own first image comes after the load
        warm = ViewRequest(orbit(start, sequence.box_centre, up, 30.0), 0, "colour")
        progressive.show(warm)
        recorder.wait(lambda d: d.request == warm and d.full)
        opened = time.perf_counter()
        first_request = ViewRequest(start, 0, "colour")
        progressive.show(first_request)
        arrived, first = recorder.wait(lambda d: d.request == first_request)
        first_image_s = arrived - opened
        full_at, _ = recorder.wait(lambda d: d.request == first_request and d.full)
        coarse_fps, refine = [], []
        for rest in range(rests):
            before = len(recorder.delivered)
            began = time.perf_counter()
            last = None
            while time.perf_counter() - began < drag_seconds:
                phase = (time.perf_counter() - began) / drag_seconds
                last = ViewRequest(orbit(start, sequence.box_centre, up,
                                         DRAG_DEGREES * math.sin(2 * math.pi * (phase + rest / rests))), 0, "colour")
                progressive.show(last)
                time.sleep(1 / DRAG_HZ)
            rested = time.perf_counter()
            during = [d for t, d in recorder.delivered[before:] if t <= rested and not d.full]
            coarse_fps.append(len(during) / (rested - began))
            full_arrived, _ = recorder.wait(lambda d: d.request == last and d.full)
            refine.append(full_arrived - rested)
        full_render = [d.seconds for _, d in recorder.delivered if d.full]
        coarse_render = [d.seconds for _, d in recorder.delivered if not d.full]
    finally:
        progressive.stop()
        rendering.pool.shutdown()
    coarse_size, full_size = rendering.sizes.coarse(aspect), rendering.sizes.full(aspect)
    return {
        "device": device, "aspect": round(aspect, 4), "threads": workers if not intra_op else intra_op, "workers": workers,
        "intra_op_threads": intra_op or 1,
        "how": (f"{workers} strip worker{'s' if workers > 1 else ''}, torch 1 thread each" if not intra_op
                else f"1 strip worker, torch {intra_op} threads"),
        "coarse_size": list(coarse_size), "full_size": list(full_size),
        "first_image_s": round(first_image_s, 3),
        "first_full_image_s": round(full_at - opened, 3),
        "coarse_fps": round(statistics.median(coarse_fps), 2),
        "full_refine_s": round(statistics.median(refine), 3),
        "coarse_render_s": round(statistics.median(coarse_render), 3),
        "full_render_s": round(statistics.median(full_render), 3),
        "rests": rests, "drag_seconds": drag_seconds,
    }


def markdown(results: dict) -> str:
    rows = ["| device | threads | coarse / full px | first image s | coarse fps | full refine s | coarse render s | "
            "full render s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["runs"]:
        sizes = "x".join(map(str, r["coarse_size"])) + " / " + "x".join(map(str, r["full_size"]))
        rows.append(f"| {r['device']} | {r['how']} | {sizes} | {r['first_image_s']} | {r['coarse_fps']} | "
                    f"{r['full_refine_s']} | {r['coarse_render_s']} | {r['full_render_s']} |")
    head = results["headline"]
    goals = ", ".join(f"{key} {head[key]} (goal {'<' if key != 'coarse_fps' else '>='} {goal})"
                      for key, goal in GOALS.items())
    return (f"# Viewer speed\n\n{results['sequence']} (model step {results['model_step']}, "
            f"{results['preset_note']}), measured through pipeline.viewer's render path on "
            f"{results['machine']} (1-minute load average {results['load_average'][0]} before, "
            f"{results['load_average'][1]} after). Headline: the CPU with 2 threads (2 strip workers) at the rig's "
            f"aspect: {goals}. The last row is a 16:9 browser canvas.\n\n"
            + "\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="a trained sequence, WORK/PID/SEQ (default: train a preview model)")
    parser.add_argument("--cache", default=os.path.join(os.environ.get("NERSEMBLE_CACHE", Path.home() / ".cache"
                                                                       / "nersemble"), "viewer-bench"))
    parser.add_argument("--train-seconds", type=float, default=240.0)
    parser.add_argument("--drag-seconds", type=float, default=4.0)
    parser.add_argument("--rests", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "viewer.json"))
    args = parser.parse_args()

    work = args.work or trained_sequence(Path(args.cache), args.train_seconds)
    load_before = os.getloadavg()[0]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    runs = []
    for device in devices:
        sequence = open_sequence(work, device=device)
        configs = [(1, 0, None), (2, 0, None), (1, 2, None), (2, 0, 16 / 9)] if device == "cpu" else [(1, 0, None)]
        for workers, intra_op, aspect in configs:
            run = measure(sequence, device, workers, args.drag_seconds, args.rests, intra_op, aspect)
            runs.append(run)
            print(f"{device} {run['how']}, {run['coarse_size']} coarse: first image {run['first_image_s']} s, "
                  f"coarse {run['coarse_fps']} fps, full refine {run['full_refine_s']} s", flush=True)
    headline = runs[1]  # the CPU, 2 strip workers, the rig's aspect
    results = {
        "sequence": work, "model_step": sequence.trained.step,
        "preset_note": (f"full at step {sequence.trained.config.sampler.step_size:g} / eval_substeps "
                        f"{sequence.trained.config.sampler.eval_substeps}, coarse at step "
                        f"{sequence.coarse.config.sampler.step_size:g}"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # others' jobs share the cores
        "first_image_s": headline["first_image_s"], "coarse_fps": headline["coarse_fps"],
        "full_refine_s": headline["full_refine_s"], "goals": GOALS,
        "headline": {k: headline[k] for k in GOALS}, "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
