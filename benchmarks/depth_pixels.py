"""Depth's CPU cost per pixel, phase by phase, at a store's size and at half of it: does any phase grow faster
than linearly in pixels?

Takes one timestep of an ingested, calibrated and matted store (for instance the scale benchmark's work store,
``benchmarks/results/scale/work/1604x1100-c16-f24/001/EXP-1-head/capture.zarr``), and runs the sweep's phases
on it twice: on the frames and mattes area-downscaled to half size (cameras resized to match), then at full size.
Both sizes see the same content, so a per-pixel ratio (full / half) near 1 is linear and 2 means the cost per
pixel doubles with the frame's area. CPU seconds are read per function with cProfile on one torch thread, which
a shared machine disturbs far less than wall time. Nothing is written to the store.

    .venv/bin/python benchmarks/depth_pixels.py --store PATH/capture.zarr [--views 2] [--t 0]

Prints a table and writes ``benchmarks/results/depth-pixels.{json,md}``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import sys
import time
from datetime import date
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.depth.config import DepthConfig  # noqa: E402
from stages.depth.consistency import filter_consistent  # noqa: E402
from stages.depth.stage import plan_depth, sweep_settings  # noqa: E402
from stages.depth.sweep import build_pyramid, sweep_view, to_grey  # noqa: E402
from stages.geometry.hull import visual_hull  # noqa: E402
from storage import CaptureStore  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (phase, function name in the profile, counted per view or per timestep)
PHASES = (("hull", "visual_hull", "timestep"), ("pyramid", "build_pyramid", "timestep"),
          ("depth bounds", "depth_bounds", "view"), ("coarse sweep", "_plane_sweep", "view"),
          ("local search (finer levels)", "_local_search", "view"), ("sweep in all", "sweep_view", "view"),
          ("consistency", "filter_consistent", "timestep"))


def cumulative_seconds(profile: cProfile.Profile) -> dict[str, float]:
    """Cumulative seconds per function name (of our modules and torch's alike)."""
    seconds: dict[str, float] = {}
    for (_, _, name), (_, _, _, cumulative, _) in pstats.Stats(profile).stats.items():  # type: ignore[attr-defined]
        seconds[name] = seconds.get(name, 0.0) + cumulative
    return seconds


def measure(store: CaptureStore, t: int, views_swept: int, factor: int) -> dict:
    """CPU seconds per phase for timestep ``t`` with the frames shrunk by ``factor``."""
    config = DepthConfig()
    plan = plan_depth(store, config)
    frames = np.stack([store.read_frame(c, t) for c in plan.indices])
    alpha = np.stack([store.read_alpha(c, t) for c in plan.indices])
    views = plan.views
    if factor > 1:
        size = (views.width // factor, views.height // factor)
        frames = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])
        alpha = np.stack([cv2.resize(a, size, interpolation=cv2.INTER_AREA) for a in alpha])
        views = views.resized(*size)
    masks = alpha >= config.matte_threshold
    refs = list(range(min(views_swept, views.count)))
    profile = cProfile.Profile(time.process_time)
    profile.enable()
    hull = visual_hull(views, masks, config.hull_resolution, config.hull_misses, config.hull_dilation_px)
    pyramid = build_pyramid(views, to_grey(frames, views.device), torch.as_tensor(alpha).float() / 255.0,
                            config.coarse_size)
    raw = torch.zeros(masks.shape)
    for ref in refs:
        raw[ref] = sweep_view(pyramid, ref, plan.sources[ref], hull, sweep_settings(config)).depth
    filter_consistent(views, raw, config.consistency_tolerance, config.min_consistent_views)
    profile.disable()
    seconds = cumulative_seconds(profile)
    mpx = views.width * views.height / 1e6
    phases = {phase: {"cpu_s": round(seconds.get(function, 0.0), 3),
                      "cpu_s_per_mpx": round(seconds.get(function, 0.0) / mpx / (len(refs) if per == "view" else 1), 4),
                      "per": per}
              for phase, function, per in PHASES}
    return {"height": views.height, "width": views.width, "views_swept": len(refs),
            "valid_fraction": round(float((raw[refs] > 0).float().mean()), 4), "phases": phases}


def markdown(result: dict) -> str:
    half, full = result["sizes"]
    lines = [f"# Depth cost per pixel by phase ({result['date']}, {result['machine']}, one torch thread)", "",
             f"Command: `{result['command']}`", "",
             f"Store: `{result['store']}`, timestep {result['t']}, {full['views_swept']} views swept; the half size "
             "is the same frames area-downscaled. CPU s per Mpx is per view-Mpx for per-view phases and per Mpx of "
             "one frame for per-timestep phases (the consistency filter only sees the swept views' maps).", "",
             f"| phase | per | {half['height']}x{half['width']} CPU s/Mpx | {full['height']}x{full['width']} CPU s/Mpx "
             "| full / half per pixel |", "| --- | --- | --- | --- | --- |"]
    for phase, row in full["phases"].items():
        small = half["phases"][phase]["cpu_s_per_mpx"]
        ratio = f"{row['cpu_s_per_mpx'] / small:.2f}" if small else "-"
        lines.append(f"| {phase} | {row['per']} | {small} | {row['cpu_s_per_mpx']} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="an ingested, calibrated and matted capture.zarr")
    parser.add_argument("--t", type=int, default=0, help="the timestep measured")
    parser.add_argument("--views", type=int, default=2, help="reference views swept (the first ones)")
    parser.add_argument("--out", default=str(RESULTS / "depth-pixels.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    store = CaptureStore.open(args.store)
    measure(store, args.t, 1, 4)  # warm-up: torch's first calls would otherwise count against the first size
    sizes = [measure(store, args.t, args.views, factor) for factor in (2, 1)]
    result = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
              "command": "benchmarks/depth_pixels.py " + " ".join(sys.argv[1:]), "store": args.store, "t": args.t,
              "sizes": sizes}
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
