"""Matting quality and speed per method on the synthetic rig, against its exact ground-truth alpha.

Synthesises a capture (default: the full 16 cameras x 24 frames at 220x320), ingests it, then runs the matte
stage once per method and compares the stored alpha with ``ground_truth.zarr``:

- IoU of ``alpha > 0.5`` with the true mask (mean and worst frame), the goal for ``fused`` being >= 0.97;
- mean absolute alpha error (alpha in [0, 1]);
- flicker: mean |alpha_t - alpha_t-1| over pixels whose true alpha never changes in the take (static backdrop);
- frames per second of the whole stage (all cameras, the model included, on this machine).

``plate`` is also run without temporal smoothing, to show what the neighbouring frames buy. ``--shading-drift``
relights every ingested frame with a smooth gain ramp (0.8-1.15 across, 1.05-0.9 down) after the plates were
taken, the case where plate matting alone starts to fail. Prints a table and writes
``benchmarks/results/matting.json`` (``matting-shading.json`` with the drift).

    .venv/bin/python benchmarks/matting.py [--cameras 16] [--frames 24] [--width 220] [--height 320]
                                           [--methods plate,fused] [--shading-drift]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.ingest.config import IngestConfig
from stages.matte.config import MatteConfig
from pipeline.synthetic import synthesize_capture  # noqa: E402
from stages.ingest.stage import ingest_sequence  # noqa: E402
from stages.matte.stage import matte_sequence  # noqa: E402
from storage import CaptureStore, SequenceWorkDir  # noqa: E402

RUNS = [
    ("plate", MatteConfig(method="plate")),
    ("plate (no temporal)", MatteConfig(method="plate", temporal_radius=0)),
    ("rembg", MatteConfig(method="rembg")),
    ("fused", MatteConfig(method="fused")),
]
FUSED_IOU_GOAL = 0.97


def score(store: CaptureStore, truth: zarr.Group) -> dict[str, float]:
    """IoU / MAE / flicker of the store's alpha against the ground truth, camera by camera (bounded memory)."""
    order = [list(truth.attrs["cameras"]).index(serial) for serial in store.cameras]
    ious, errors, flicker = [], [], []
    for c, g in enumerate(order):
        predicted = np.asarray(store.alpha[c]).astype(np.float32) / 255.0
        true = np.asarray(truth["alpha"][g]).astype(np.float32) / 255.0
        for p, a in zip(predicted, true):
            hit, want = p > 0.5, a > 0.5
            ious.append((hit & want).sum() / max((hit | want).sum(), 1))
            errors.append(np.abs(p - a).mean())
        static = (true == true[0]).all(axis=0)  # backdrop the subject never crosses, the torso's still core
        if static.any() and len(true) > 1:
            flicker.append(np.abs(predicted[1:] - predicted[:-1])[:, static].mean())
    return {
        "iou_mean": float(np.mean(ious)),
        "iou_min": float(np.min(ious)),
        "mae": float(np.mean(errors)),
        "flicker": float(np.mean(flicker)) if flicker else 0.0,
    }


def relight(store: CaptureStore) -> None:
    """Multiply every frame by a smooth gain ramp, one camera at a time: the light drifted after the plates."""
    across = np.linspace(0.8, 1.15, store.width)[None, :, None]
    down = np.linspace(1.05, 0.9, store.height)[:, None, None]
    for c in range(store.n_cameras):
        frames = store.read_frames(c).astype(np.float32)
        store.write_frames(c, 0, np.clip(np.round(frames * (across * down)), 0, 255).astype(np.uint8))


def run_method(work: SequenceWorkDir, truth: zarr.Group, config: MatteConfig) -> dict:
    started = time.perf_counter()
    report = matte_sequence(work, config)
    wall = time.perf_counter() - started
    store = CaptureStore.open(work.capture_uri)
    return {**score(store, truth), "fps": report["frames_per_second"], "seconds": round(wall, 2),
            "coverage": report["coverage"], "warnings": report["warnings"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cameras", type=int, default=16)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--width", type=int, default=220)
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--methods", default=",".join(name for name, _ in RUNS),
                        help="comma-separated subset of: " + ", ".join(name for name, _ in RUNS))
    parser.add_argument("--shading-drift", action="store_true", help="relight the frames after the plates")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/matting[-shading].json")
    args = parser.parse_args()
    results_dir = Path(__file__).resolve().parent / "results"
    out = Path(args.out or results_dir / ("matting-shading.json" if args.shading_drift else "matting.json"))
    wanted = [m.strip() for m in args.methods.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench-matting-") as tmp:
        started = time.perf_counter()
        capture = synthesize_capture(Path(tmp) / "archive", cameras=args.cameras, frames=args.frames,
                                     width=args.width, height=args.height)
        ingest_sequence(capture.sequence_dir, str(Path(tmp) / "work"), IngestConfig())
        print(f"capture: {args.cameras} cameras x {args.frames} frames at {args.width}x{args.height} "
              f"({time.perf_counter() - started:.0f} s to synthesise and ingest)", flush=True)
        work = SequenceWorkDir.for_sequence(str(Path(tmp) / "work"), capture.participant_dir.name,
                                            capture.sequence_dir.name)
        if args.shading_drift:
            relight(CaptureStore.open(work.capture_uri, mode="r+"))
        truth = zarr.open_group(capture.ground_truth_uri, mode="r")
        results = {}
        for name, config in RUNS:
            if name in wanted:
                results[name] = run_method(work, truth, config)
                print(f"  {name}: done in {results[name]['seconds']} s", flush=True)

    print(f"\n{'method':<20} {'IoU mean':>9} {'IoU min':>8} {'MAE':>8} {'flicker':>8} {'frames/s':>9}")
    for name, r in results.items():
        print(f"{name:<20} {r['iou_mean']:>9.4f} {r['iou_min']:>8.4f} {r['mae']:>8.4f} {r['flicker']:>8.4f} "
              f"{r['fps']:>9.2f}")
    fused = results.get("fused")
    if fused:
        verdict = "meets" if fused["iou_mean"] >= FUSED_IOU_GOAL else "MISSES"
        print(f"\nfused {verdict} the IoU goal of {FUSED_IOU_GOAL}")
    output = {
        "capture": {"cameras": args.cameras, "frames": args.frames, "width": args.width, "height": args.height,
                    "shading_drift": args.shading_drift},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "fused_iou_goal": FUSED_IOU_GOAL,
        "methods": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(output, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
