"""NeRSemble quality within a CPU time budget, and the ensemble-vs-single-grid ablation, on the synthetic capture.

    .venv/bin/python benchmarks/nersemble.py [--budget 600] [--variants ensemble,single-grid] [--threads 0]
                                            [--device auto|cpu|cuda] [--frames 24] [--no-depth] [--steps 0]

The default synthetic capture (16 cameras x 24 frames at 220x320) goes through the real ingest, calibrate
(provided), matte (plate) and depth stages once (kept in benchmarks/results/nersemble-capture for re-runs).
Each variant then trains the ``preview`` preset for ``--budget`` seconds on the 12 training cameras (the
preset's 3000 steps are no limit unless ``--steps`` says so); the model is snapshotted every
``--curve-every`` seconds of training (checkpoint-free: a state_dict copy) and every snapshot is scored
afterwards, so evaluation never eats into the budget. Scores follow the paper's protocol: the 4 hold-out
cameras at 15 evenly spaced timesteps, the frame composited on white with the matting stage's alpha, after
the official occupancy-grid filter; PSNR and SSIM (Gaussian 11, sigma 1.5, data range 1). "Non-rigid" frames
are those where the synthetic jaw is open by more than half its range, where a deformation field alone
struggles.
Curve points score the middle frame of each hold-out camera to keep scoring short; the final row uses all 15.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path

import cv2  # noqa: F401 - before pycolmap (zlib clash)
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.calibrate.config import CalibrateConfig
from stages.depth.config import DepthConfig
from stages.ingest.config import IngestConfig
from stages.matte.config import MatteConfig
from stages.optimize.config import OptimizeConfig
from pipeline.synthetic_scene import scene_for_seed  # noqa: E402
from stages.core.devices import resolve_device  # noqa: E402
from stages.evaluate.stage import evaluation_timesteps  # noqa: E402
from stages.evaluate.truth import matte_reference  # noqa: E402
from stages.evaluate.metrics import psnr, ssim  # noqa: E402
from stages.nersemble import NeRSembleModel  # noqa: E402
from stages.optimize.stage import build_trainer, model_config, split_cameras  # noqa: E402
from stages.rendering.backend import resolve_backend  # noqa: E402
from storage import CaptureStore, SequenceWorkDir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
UNLIMITED_STEPS = 10**9  # the time budget stops training first
VARIANTS = {
    "ensemble": {},
    # Deformation + one hash grid: the paper's "w/o ensemble" ablation.
    "single-grid": {"hash.n_grids": 1, "hash.window": [1.0, 1.0, 0, 1]},
    # The preview without its sample budget: a fixed 1024 rays per step, as upstream's fixed batches.
    "fixed-batch": {"train.target_samples_per_batch": 0, "train.rays_per_batch": 1024},
}


def prepare(root: Path, seed: int, frames: int, depth: bool) -> SequenceWorkDir:
    """The synthetic capture through ingest, calibrate, matte and depth (skipped when already done).

    The stages are imported here, so that scoring a prepared capture needs neither pycolmap nor ffmpeg.
    """
    from pipeline.synthetic import synthesize_capture
    from stages.calibrate.stage import calibrate_sequence
    from stages.depth.stage import depth_sequence
    from stages.ingest.stage import ingest_sequence
    from stages.matte.stage import matte_sequence

    raw, work_root = root / "raw", root / "work"
    capture_marker = root / "capture.json"
    recorded = json.loads(capture_marker.read_text()) if capture_marker.exists() else None
    # Markers written before --frames existed hold the default 24 frames.
    if recorded is None or recorded.get("seed") != seed or recorded.get("frames", 24) != frames:
        shutil.rmtree(root, ignore_errors=True)
        capture = synthesize_capture(raw, seed=seed, frames=frames)
        capture_marker.write_text(json.dumps({"sequence_dir": str(capture.sequence_dir), "seed": seed,
                                              "frames": frames}))
    sequence_dir = Path(json.loads(capture_marker.read_text())["sequence_dir"])
    ingest_sequence(sequence_dir, str(work_root), IngestConfig())
    work = SequenceWorkDir.for_sequence(str(work_root), sequence_dir.parent.parent.name, sequence_dir.name)
    calibrate_sequence(work.uri, CalibrateConfig(mode="provided"))
    matte_sequence(work.uri, MatteConfig(method="plate"))
    if depth:
        depth_sequence(work.uri, DepthConfig())
    return work


def nonrigid_timesteps(store: CaptureStore, seed: int) -> set[int]:
    """Store timesteps whose jaw opening is more than half the motion's range."""
    motion = scene_for_seed(seed).motion
    times = [i / max(store.n_frames - 1, 1) for i in store.frame_indices]
    angles = np.array([motion.jaw_angle(t) for t in times])
    return {t for t, a in enumerate(angles) if a > angles.min() + 0.5 * (angles.max() - angles.min())}


def score(model: NeRSembleModel, store: CaptureStore, holdout: list[str], timesteps: list[int],
          nonrigid: set[int]) -> dict:
    rows = []
    for serial in holdout:
        for t in timesteps:
            ref = matte_reference(store, serial, t)
            out = model.render_image(store.intrinsics[serial], store.world_2_cam[serial], store.width, store.height,
                                     t)["rgb"].cpu()
            target = torch.as_tensor(ref.image)
            rows.append({"camera": serial, "t": t, "psnr": psnr(out, target), "ssim": ssim(out, target),
                         "nonrigid": t in nonrigid})
    nonrigid_rows = [r for r in rows if r["nonrigid"]]
    return {
        "psnr": float(np.mean([r["psnr"] for r in rows])),
        "ssim": float(np.mean([r["ssim"] for r in rows])),
        "psnr_nonrigid": float(np.mean([r["psnr"] for r in nonrigid_rows])) if nonrigid_rows else math.nan,
        "ssim_nonrigid": float(np.mean([r["ssim"] for r in nonrigid_rows])) if nonrigid_rows else math.nan,
        "images": rows,
    }


def train_variant(store: CaptureStore, overrides: dict, budget: float, curve_every: float, seed: int,
                  device: torch.device, use_depth: bool, steps: int | None = None) -> dict:
    cfg = model_config(OptimizeConfig(overrides=overrides, steps=steps))
    train, holdout = split_cameras(store.cameras, None, store.world_2_cam)  # auto: the paper's four, else a spread
    trainer, _ = build_trainer(store, train, cfg, device, resolve_backend("auto", device), use_depth)
    model = trainer.model
    snapshots: list[tuple[float, int, dict]] = []
    next_snapshot = [curve_every]

    def on_progress(p) -> None:  # noqa: ANN001
        if p.elapsed_s >= next_snapshot[0]:
            snapshots.append((p.elapsed_s, p.step, copy.deepcopy(model.state_dict())))
            next_snapshot[0] += curve_every
        print(f"  step {p.step:5d}  {p.elapsed_s:6.1f} s  batch psnr {p.psnr:5.2f}  {p.rays_per_s:6.0f} rays/s  "
              f"{p.samples_per_ray:4.1f} samples/ray  {p.rays_per_step:4.0f} rays/step", flush=True)

    stopped = trainer.train(time_budget_s=budget, progress=on_progress, progress_every=50)
    final_state = (trainer.state.elapsed_s, trainer.state.step, copy.deepcopy(model.state_dict()))
    nonrigid = nonrigid_timesteps(store, seed)
    curve = []
    for elapsed, step, state in snapshots:
        model.load_state_dict(state)
        model.filter_occupancy()  # as the evaluate stage does (the official protocol)
        quick = score(model, store, holdout, [store.n_frames // 2], nonrigid)
        curve.append({"seconds": round(elapsed, 1), "step": step, "psnr": quick["psnr"], "ssim": quick["ssim"]})
    model.load_state_dict(final_state[2])
    model.filter_occupancy()
    t0 = time.perf_counter()
    final = score(model, store, holdout, evaluation_timesteps(store.n_frames, cfg.eval.max_eval_timesteps), nonrigid)
    render_s = (time.perf_counter() - t0) / max(len(final["images"]), 1)
    curve.append({"seconds": round(final_state[0], 1), "step": final_state[1], "psnr": final["psnr"],
                  "ssim": final["ssim"]})
    return {"overrides": overrides, "device": str(device), "encoding": type(model.field.encoding).__name__,
            "use_depth": use_depth, "stopped_by": stopped, "steps": final_state[1], "rays": trainer.state.rays,
            "train_seconds": round(final_state[0], 1), "seconds_per_render": round(render_s, 2),
            "holdout": holdout, "curve": curve, **final}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=600.0, help="training seconds per variant")
    parser.add_argument("--curve-every", type=float, default=120.0, help="seconds between curve points")
    parser.add_argument("--variants", default="ensemble,single-grid")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic capture seed")
    parser.add_argument("--capture", type=Path, default=RESULTS / "nersemble-capture")
    parser.add_argument("--frames", type=int, default=24, help="frames of the synthetic capture")
    parser.add_argument("--no-depth", action="store_true", help="skip the depth stage and the depth losses")
    parser.add_argument("--device", default="cpu", help="auto, cpu or cuda")
    parser.add_argument("--steps", type=int, default=0,
                        help="step limit (0: none, the budget decides; the preset's schedules stay as they are)")
    args = parser.parse_args()
    device = resolve_device(args.device, "benchmark")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    work = prepare(args.capture, args.seed, args.frames, depth=not args.no_depth)
    print(f"capture ready in {time.perf_counter() - t0:.0f} s: {work.uri}")
    store = CaptureStore.open(work.capture_uri)
    results = {}
    for name in args.variants.split(","):
        print(f"training {name} for {args.budget:.0f} s")
        results[name] = train_variant(store, VARIANTS[name], args.budget, args.curve_every, args.seed, device,
                                      use_depth=store.stage_record("depth") is not None and not args.no_depth,
                                      steps=args.steps or UNLIMITED_STEPS)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} torch threads"
    print(f"\nhold-out cameras, frames on white with the matte ({where}, {store.n_frames} frames)")
    print(f"{'variant':<12} {'steps':>6} {'M rays':>7} {'train s':>8} {'PSNR':>7} {'SSIM':>7} {'PSNR non-rigid':>15} "
          f"{'SSIM non-rigid':>15} {'s/render':>9}")
    for name, r in results.items():
        print(f"{name:<12} {r['steps']:>6} {r['rays'] / 1e6:>7.2f} {r['train_seconds']:>8.0f} {r['psnr']:>7.2f} "
              f"{r['ssim']:>7.4f} {r['psnr_nonrigid']:>15.2f} {r['ssim_nonrigid']:>15.4f} {r['seconds_per_render']:>9.2f}")
    for name, r in results.items():
        print(f"\nPSNR vs training time ({name}):")
        for point in r["curve"]:
            print(f"  {point['seconds']:6.0f} s  step {point['step']:5d}  PSNR {point['psnr']:6.2f}  "
                  f"SSIM {point['ssim']:.4f}")
    if {"ensemble", "single-grid"} <= results.keys():
        gain = results["ensemble"]["psnr_nonrigid"] - results["single-grid"]["psnr_nonrigid"]
        print(f"\nensemble - single grid on non-rigid frames: {gain:+.2f} dB PSNR, "
              f"{results['ensemble']['ssim_nonrigid'] - results['single-grid']['ssim_nonrigid']:+.4f} SSIM")
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = {"budget_s": args.budget, "device": str(device), "frames": store.n_frames, "variants": results}
    (RESULTS / "nersemble.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {RESULTS / 'nersemble.json'}")


if __name__ == "__main__":
    main()
