"""CPU speed of the NeRSemble preview: the eager torch reference path and the fast path side by side, one run.

    .venv/bin/python benchmarks/cpu_speed.py [--rays 2048] [--warmup-steps 1500] [--steps 10] [--reps 3]
                                             [--quality-steps 0] [--seeds 0,1] [--profile]

One in-memory synthetic capture (12 training cameras x ``--frames`` frames at 220x320, exact images; see
benchmarks/cpu_scene.py) and one preview model warmed up for ``--warmup-steps`` steps, so the occupancy grid
has pruned empty space as in a real run. The default, 1500 steps, is a trained head: most steps of a preview and
every export render a model like it (about a minute and a half of warm-up on the fast path). 200 steps gives the
early fog, translucent everywhere, where the matrix products both paths share are most of a render. From that
same state, each path (``NERSEMBLE_FAST=0`` / fast) then
runs, interleaved old/new/old/new so both see the same machine load (the medians are reported):

- training: ``--steps`` preview steps at a fixed ``--rays`` rays per step (no sample budget), from a copy of the
  warmed-up model and optimiser; steps/s and trained samples/s;
- render: one 220x320 hold-out image (``render_image``, the evaluation/export call), rays/s;
- turntable: ``--turntable-frames`` frames of an orbit at 72x104 (the export benchmark's size), frames/s.

``--quality-steps N`` also trains both paths from scratch for N steps with every seed of ``--seeds`` and scores
the hold-out cameras (PSNR against the exact images, after the official occupancy filter): equal quality means
each seed's fast-minus-reference difference is smaller than the reference's spread over seeds. ``--profile``
writes torch-profiler tables of a training step and a render, per path, to benchmarks/results/cpu_profile.md.

Writes benchmarks/results/cpu_speed.json (``train_samples_per_s_ratio``, ``render_rays_per_s_ratio``: new / old,
beside the raw figures) and cpu_speed.md. One torch thread per path, as the preview on a shared CPU runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cpu_scene import HEIGHT, WIDTH, SyntheticSource, build, holdout_psnr, split  # noqa: E402
from stages.nersemble.kernels.cpu import build as fast  # noqa: E402
from stages.nersemble.config import preset  # noqa: E402
from stages.nersemble.optim import choose_fused  # noqa: E402
from stages.rendering.paths import render_intrinsics, rig_frame, turntable_path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PATHS = ("reference", "fast")


def use(path: str) -> None:
    """Select a path for everything that follows in this process."""
    os.environ[fast.ENV] = "1" if path == "fast" else "0"


def config(rays: int):
    return preset("preview").with_overrides({"train.target_samples_per_batch": 0, "train.rays_per_batch": rays})


def time_training(trainer, state: dict, steps: int) -> dict:
    """``steps`` steps from a copy of ``state`` (model, optimiser, trainer state, generator)."""
    trainer.model.load_state_dict(state["model"])
    # A copy: the optimiser adopts the state's tensors and steps them in place, so without it each repetition
    # would start from the moments the previous one left.
    trainer.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
    choose_fused(trainer.optimizer)  # the path now in use: the saved state carries the warm-up's choice
    trainer.state = copy.deepcopy(state["trainer"])
    trainer.generator.set_state(state["generator"])
    samples = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        row = trainer.train_step()
        samples += row["samples"] * row["rays"]
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "steps_per_s": steps / seconds, "samples_per_s": samples / seconds,
            "samples_per_step": samples / steps}


def time_render(model, view) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    model.render_image(view.K, view.world_2_cam, view.width, view.height, 0)
    return time.perf_counter() - t0


def turntable_views(source: SyntheticSource, frames: int, width: int = 72, height: int = 104) -> list:
    centre = np.array([0.0, -0.04, 0.0])
    rig = rig_frame([v.world_2_cam for v in source.views], centre)
    K = render_intrinsics([v.K for v in source.views], (WIDTH, HEIGHT), (width, height))
    return turntable_path(rig, K, width, height, frames)


def time_turntable(model, views: list, n_timesteps: int) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    for view in views:
        model.render_image(view.K, view.world_2_cam, view.width, view.height, view.timestep(n_timesteps))
    return time.perf_counter() - t0


def median(rows: list[dict], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def speed(args: argparse.Namespace, source: SyntheticSource, holdout: SyntheticSource) -> dict:
    cfg = config(args.rays)
    use("fast")  # the warm-up is setup, not a measurement: take the quicker path
    trainer = build(cfg, source, seed=0)
    t0 = time.perf_counter()
    for _ in range(args.warmup_steps):
        trainer.train_step()
    print(f"warm-up: {args.warmup_steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    state = {"model": copy.deepcopy(trainer.model.state_dict()),
             "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
             "trainer": copy.deepcopy(trainer.state), "generator": trainer.generator.get_state()}
    view = holdout.views[0]
    tt_views = turntable_views(source, args.turntable_frames)
    train_rows: dict[str, list[dict]] = {p: [] for p in PATHS}
    render_s: dict[str, list[float]] = {p: [] for p in PATHS}
    turntable_s: dict[str, list[float]] = {p: [] for p in PATHS}
    for rep in range(args.reps):
        for path in PATHS:  # ABAB: both paths see the same load
            use(path)
            train_rows[path].append(time_training(trainer, state, args.steps))
            trainer.model.load_state_dict(state["model"])
            render_s[path].append(time_render(trainer.model, view))
            turntable_s[path].append(time_turntable(trainer.model, tt_views, source.n_timesteps))
            print(f"rep {rep} {path:9s}: {train_rows[path][-1]['steps_per_s']:.2f} steps/s, "
                  f"{train_rows[path][-1]['samples_per_s']:.0f} samples/s, render {render_s[path][-1]:.2f} s, "
                  f"turntable {turntable_s[path][-1]:.2f} s", flush=True)
    rays = view.width * view.height
    figures = {}
    for path in PATHS:
        figures[path] = {
            "train_steps_per_s": median(train_rows[path], "steps_per_s"),
            "train_samples_per_s": median(train_rows[path], "samples_per_s"),
            "train_samples_per_step": median(train_rows[path], "samples_per_step"),
            "render_seconds": float(statistics.median(render_s[path])),
            "render_rays_per_s": rays / float(statistics.median(render_s[path])),
            "turntable_frames_per_s": args.turntable_frames / float(statistics.median(turntable_s[path])),
            "raw": {"train": train_rows[path], "render_s": render_s[path], "turntable_s": turntable_s[path]},
        }
    old, new = figures["reference"], figures["fast"]
    return {
        "train_samples_per_s_ratio": new["train_samples_per_s"] / old["train_samples_per_s"],
        "train_steps_per_s_ratio": new["train_steps_per_s"] / old["train_steps_per_s"],
        "render_rays_per_s_ratio": new["render_rays_per_s"] / old["render_rays_per_s"],
        "turntable_frames_per_s_ratio": new["turntable_frames_per_s"] / old["turntable_frames_per_s"],
        "paths": figures,
    }


def quality(args: argparse.Namespace, source: SyntheticSource, holdout: SyntheticSource) -> dict:
    """Both paths trained from scratch for the same steps, per seed; hold-out PSNR of each."""
    cfg = preset("preview")
    timesteps = sorted({0, source.n_timesteps - 1})
    rows: dict[str, dict[int, float]] = {p: {} for p in PATHS}
    seconds: dict[str, dict[int, float]] = {p: {} for p in PATHS}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for path in PATHS:
            use(path)
            trainer = build(cfg, source, seed=seed)
            t0 = time.perf_counter()
            for _ in range(args.quality_steps):
                trainer.train_step()
            seconds[path][seed] = time.perf_counter() - t0
            use("fast")  # score both with the same renderer: the question is the training path
            rows[path][seed] = holdout_psnr(trainer.model, holdout, timesteps)
            print(f"quality {path:9s} seed {seed}: {args.quality_steps} steps in {seconds[path][seed]:.0f} s, "
                  f"hold-out PSNR {rows[path][seed]:.2f}", flush=True)
    return quality_summary(args.quality_steps, rows, seconds)


def quality_summary(steps: int, rows: dict[str, dict], seconds: dict[str, dict]) -> dict:
    """Equal quality: each seed's fast-minus-reference difference is smaller than the reference's spread over
    seeds. Same seed, same batches: the paired difference isolates the path, the spread is what a seed changes."""
    ref = list(rows["reference"].values())
    paired = [rows["fast"][seed] - rows["reference"][seed] for seed in rows["reference"]]
    spread = max(ref) - min(ref)
    return {"steps": steps, "psnr": rows, "train_seconds": seconds,
            "reference_spread": [min(ref), max(ref)],
            "fast_within_spread": all(min(ref) - 1e-9 <= v <= max(ref) + 1e-9 for v in rows["fast"].values()),
            "mean_difference_db": float(np.mean(paired)),
            "largest_paired_difference_db": float(max(abs(d) for d in paired)),
            "equal_quality": max(abs(d) for d in paired) < spread}


def profile_tables(args: argparse.Namespace, source: SyntheticSource, holdout: SyntheticSource) -> str:
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    cfg = config(args.rays)
    use("fast")
    trainer = build(cfg, source, seed=0)
    for _ in range(args.warmup_steps):
        trainer.train_step()
    state = copy.deepcopy(trainer.model.state_dict())
    lines = ["# CPU profile: a preview training step and a 220x320 render", "",
             f"`benchmarks/cpu_speed.py --profile --rays {args.rays} --warmup-steps {args.warmup_steps}`, "
             f"1 torch thread, {platform.processor() or platform.machine()}; self CPU time, top 25 ops.", ""]
    for path in PATHS:
        use(path)
        trainer.model.load_state_dict(state)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                trainer.train_step()
        lines += [f"## {path}: 5 training steps of {args.rays} rays", "", "```",
                  prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), "```", ""]
        trainer.model.load_state_dict(state)
        view = holdout.views[0]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.model.render_image(view.K, view.world_2_cam, view.width, view.height, 0)
        lines += [f"## {path}: one 220x320 render", "", "```",
                  prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), "```", ""]
    return "\n".join(lines)


def markdown(result: dict, command: str) -> str:
    lines = ["# CPU speed: reference (eager torch) vs fast path", "", f"`{command}`", "",
             f"{result['machine']}, {result['threads']} torch thread(s), {result['date']}.", ""]
    if "speed" in result:
        lines += speed_lines(result)
    q = result.get("quality")
    if q:
        lines += quality_lines(q)
    return "\n".join(lines)


def speed_lines(result: dict) -> list[str]:
    s = result["speed"]
    ref, new = s["paths"]["reference"], s["paths"]["fast"]
    return [f"Medians of {result['args']['reps']} interleaved repetitions.", "",
             "| figure | reference | fast | ratio |", "| --- | --- | --- | --- |",
             f"| training steps/s ({result['args']['rays']} rays) | {ref['train_steps_per_s']:.2f} | "
             f"{new['train_steps_per_s']:.2f} | {s['train_steps_per_s_ratio']:.2f}x |",
             f"| training samples/s | {ref['train_samples_per_s']:.0f} | {new['train_samples_per_s']:.0f} | "
             f"{s['train_samples_per_s_ratio']:.2f}x |",
             f"| render rays/s (220x320) | {ref['render_rays_per_s']:.0f} | {new['render_rays_per_s']:.0f} | "
             f"{s['render_rays_per_s_ratio']:.2f}x |",
             f"| turntable frames/s (72x104) | {ref['turntable_frames_per_s']:.2f} | "
             f"{new['turntable_frames_per_s']:.2f} | {s['turntable_frames_per_s_ratio']:.2f}x |", "",
             "Each repetition's own ratio (the spread the medians hide): " + ", ".join(
                 f"{label} {min(r):.2f}-{max(r):.2f}x" for label, r in repetition_ratios(ref["raw"], new["raw"])) + ".",
             ""]


def repetition_ratios(old: dict, new: dict) -> list[tuple[str, list[float]]]:
    """Fast / reference within each repetition (the two ran back to back, under the same load)."""
    return [("training samples/s", [n["samples_per_s"] / o["samples_per_s"] for o, n in zip(old["train"], new["train"],
                                                                                          strict=True)]),
            ("render", [o / n for o, n in zip(old["render_s"], new["render_s"], strict=True)]),
            ("turntable", [o / n for o, n in zip(old["turntable_s"], new["turntable_s"], strict=True)])]


def quality_lines(q: dict) -> list[str]:
    lines = [f"Quality: both paths trained from scratch for {q['steps']} preview steps per seed, hold-out "
             "PSNR (dB) against the exact images:", "", "| seed | reference | fast |", "| --- | --- | --- |"]
    for seed in q["psnr"]["reference"]:
        lines.append(f"| {seed} | {q['psnr']['reference'][seed]:.2f} | {q['psnr']['fast'][seed]:.2f} |")
    lo, hi = q["reference_spread"]
    lines += ["", f"Largest same-seed difference {q['largest_paired_difference_db']:.3f} dB against a seed "
              f"spread of {hi - lo:.2f} dB: equal quality {q['equal_quality']}; mean difference "
              f"{q['mean_difference_db']:+.3f} dB.", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rays", type=int, default=2048, help="rays per training step (fixed)")
    parser.add_argument("--frames", type=int, default=4, help="frames of the synthetic capture")
    parser.add_argument("--warmup-steps", type=int, default=1500, help="steps trained before timing (the state)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per repetition and path")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions per path")
    parser.add_argument("--turntable-frames", type=int, default=8)
    parser.add_argument("--quality-steps", type=int, default=0, help="0: no quality comparison")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="also write benchmarks/results/cpu_profile.md")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--name", default="cpu_speed", help="results file stem")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if fast.library() is None:
        raise SystemExit(f"the fast path's kernels are not available here: {fast._state['failed']}")
    train, held = split()
    t0 = time.perf_counter()
    source, holdout = SyntheticSource(train, args.frames), SyntheticSource(held, args.frames)
    print(f"capture: {len(train)} + {len(held)} cameras x {args.frames} frames in {time.perf_counter() - t0:.0f} s",
          flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.profile:
        (RESULTS / "cpu_profile.md").write_text(profile_tables(args, source, holdout))
        print(f"wrote {RESULTS / 'cpu_profile.md'}", flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "args": vars(args)}
    if not args.skip_speed:
        result["speed"] = speed(args, source, holdout)
        result["train_samples_per_s_ratio"] = result["speed"]["train_samples_per_s_ratio"]
        result["render_rays_per_s_ratio"] = result["speed"]["render_rays_per_s_ratio"]
    if args.quality_steps:
        result["quality"] = quality(args, source, holdout)
    result["seconds"] = round(time.perf_counter() - started, 1)
    command = " ".join(["benchmarks/cpu_speed.py", *sys.argv[1:]])
    result["command"] = command
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{args.name}.md").write_text(markdown(result, command))
    print(json.dumps({k: v for k, v in result.items() if k.endswith("ratio")}, indent=1))
    print(f"wrote {RESULTS / (args.name + '.json')} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
