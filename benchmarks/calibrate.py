"""Calibrate quality and time per phase on the synthetic 16-camera rig (synthesize_capture defaults).

The capture is 16 cameras x 24 frames at 220x320.

Rows: ``colmap`` with the default settings (the provided K kept, extrinsics estimated: the issue's goals are
checked on this row), ``colmap`` with per-camera focal lengths estimated too, and ``refine`` started from the
provided calibration perturbed by ~0.25 deg / 4 mm per camera. Errors are measured here against the synthetic
rig's exact calibration after a similarity alignment (not read from the stage report). Prints a table and
writes ``benchmarks/results/calibrate.json``. The machine is shared, so read the phase times as rough.

    .venv/bin/python benchmarks/calibrate.py [--cameras 16] [--frames 24] [--timesteps 8] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stages.core.cameras import read_camera_params  # noqa: E402
from stages.calibrate.config import CalibrateConfig
from stages.ingest.config import IngestConfig
from pipeline.synthetic import synthesize_capture  # noqa: E402
from stages.calibrate.stage import calibrate_sequence  # noqa: E402
from stages.calibrate.geometry import align_to, pose_differences, summarize  # noqa: E402
from stages.ingest.stage import ingest_sequence  # noqa: E402
from storage import CaptureStore, SequenceWorkDir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GOALS = {"registered": "all", "rotation_deg_median": 0.2, "center_mm_median": 2.0, "reprojection_px_mean": 0.5}
PHASES = ("export", "extract", "match", "verify", "map", "ba", "total")


def ingest(sequence_dir: Path, root: Path) -> SequenceWorkDir:
    report = ingest_sequence(sequence_dir, str(root), IngestConfig())
    return SequenceWorkDir.for_sequence(str(root), report["participant"], report["sequence"])


def perturb(work: SequenceWorkDir, degrees: float, metres: float, seed: int = 5) -> None:
    """Nudge every provided pose a little, before calibrate first keeps its copy of the provided calibration."""
    store = CaptureStore.open(work.capture_uri, mode="r+")
    rng = np.random.default_rng(seed)
    moved = {}
    for serial, pose in store.world_2_cam.items():
        axis = rng.normal(size=3)
        pose = pose.copy()
        pose[:3, :3] = cv2.Rodrigues(axis / np.linalg.norm(axis) * np.radians(degrees))[0] @ pose[:3, :3]
        pose[:3, 3] += rng.normal(size=3) * metres
        moved[serial] = pose
    store.set_calibration(store.intrinsics, moved)


def errors_against(poses: dict, truth: dict) -> dict:
    """Rotation (deg) and centre (mm) errors after a similarity alignment onto the exact rig."""
    common = {s: truth[s] for s in poses}
    differences = pose_differences(align_to(poses, common).apply_poses(poses), common)
    return {"rotation_deg": summarize([d["rotation_deg"] for d in differences.values()]),
            "center_mm": summarize([d["center_mm"] for d in differences.values()])}


def run(name: str, work: SequenceWorkDir, config: CalibrateConfig, truth) -> dict:
    store = CaptureStore.open(work.capture_uri, mode="r+")
    store.clear_stage_record("calibrate")  # measure, never skip
    before = errors_against(store.world_2_cam, truth.world_2_cam) if config.mode == "refine" else None
    started = time.perf_counter()
    report = calibrate_sequence(work.uri, config)
    wall = time.perf_counter() - started
    store = CaptureStore.open(work.capture_uri)
    focal = [abs(store.intrinsics[s][0, 0] / truth.intrinsics[s][0, 0] - 1) for s in store.cameras]
    return {
        "name": name, "status": report["status"], "solution": report["solution"],
        "registered": report["registered_cameras"], "cameras": report["cameras_total"],
        "errors": errors_against(store.world_2_cam, truth.world_2_cam), "errors_before": before,
        "focal_relative_error": summarize(focal),
        "reprojection_px": report.get("reprojection_error_px"), "points": report.get("points"),
        "timesteps": report.get("timesteps_used"), "timings_s": report["timings_s"], "wall_s": wall,
        "motion": report.get("motion"), "config": config.result_fields(),
    }


def print_table(rows: list[dict]) -> None:
    head = (f"{'run':28} {'written':>9} {'reg':>6} {'rot med/max deg':>16} {'centre med/max mm':>18} "
            f"{'reproj px':>9} {'points':>7}")
    print(head + "".join(f" {p:>7}" for p in PHASES))
    for row in rows:
        e = row["errors"]
        line = (f"{row['name']:28} {row['solution']:>9} {row['registered']:>3}/{row['cameras']:<2} "
                f"{e['rotation_deg']['median']:7.3f}/{e['rotation_deg']['max']:<8.3f} "
                f"{e['center_mm']['median']:8.2f}/{e['center_mm']['max']:<9.2f} "
                f"{(row['reprojection_px'] or {}).get('mean', float('nan')):9.3f} {row['points'] or 0:>7}")
        print(line + "".join(f" {row['timings_s'].get(p, 0.0):7.2f}" for p in PHASES))
        if row["errors_before"]:
            b = row["errors_before"]
            print(f"{'  (provided, before refine)':28} {'':9} {'':6} {b['rotation_deg']['median']:7.3f}/"
                  f"{b['rotation_deg']['max']:<8.3f} {b['center_mm']['median']:8.2f}/{b['center_mm']['max']:<9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cameras", type=int, default=16)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--timesteps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="only the default colmap row")
    parser.add_argument("--out", default=str(RESULTS / "calibrate.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="calibrate-bench-") as tmp:
        started = time.perf_counter()
        capture = synthesize_capture(Path(tmp) / "archive", cameras=args.cameras, frames=args.frames)
        truth = read_camera_params(capture.calibration_path)
        work = ingest(capture.sequence_dir, Path(tmp) / "work")
        print(f"synthetic capture + ingest: {time.perf_counter() - started:.1f}s")
        common = {"timesteps": args.timesteps, "threads": args.threads}
        rows = [run("colmap (provided K)", work, CalibrateConfig(mode="colmap", **common), truth)]
        if not args.quick:
            estimated = CalibrateConfig(mode="colmap", focal="refine", **common)
            rows.append(run("colmap (focal estimated)", work, estimated, truth))
            perturbed = ingest(capture.sequence_dir, Path(tmp) / "work-perturbed")
            perturb(perturbed, degrees=0.25, metres=0.004)
            refine = CalibrateConfig(mode="refine", **common)
            rows.append(run("refine (perturbed provided)", perturbed, refine, truth))

    headline = rows[0]
    checks = {
        "registered": headline["registered"] == headline["cameras"],
        "rotation_deg_median": headline["errors"]["rotation_deg"]["median"] < GOALS["rotation_deg_median"],
        "center_mm_median": headline["errors"]["center_mm"]["median"] < GOALS["center_mm_median"],
        "reprojection_px_mean": headline["reprojection_px"]["mean"] < GOALS["reprojection_px_mean"],
    }
    print(f"\n{args.cameras} cameras x {args.frames} frames at 220x320, {args.timesteps} timesteps per camera, "
          f"{args.threads} threads; errors against the exact rig after similarity alignment; phases in seconds")
    print_table(rows)
    print("goals (first row): " + ", ".join(f"{k} {'PASS' if ok else 'FAIL'}" for k, ok in checks.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cameras": args.cameras, "frames": args.frames, "size": [220, 320],
                               "goals": GOALS, "checks": checks, "runs": rows}, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
