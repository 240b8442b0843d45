"""NeRSemble hold-out quality against training *steps*, over several seeds, resumable: the convergence study.

    .venv/bin/python benchmarks/nersemble_convergence.py --name preview-tuning --preset preview \
        --steps 6000 --eval-every 500 --seeds 0,1 [--capture-seed 1] [--frames 24] [--override k=v ...]

Quality questions compare runs at equal steps, so this script trains for a number of steps (no time budget)
and scores the hold-out cameras every ``--eval-every`` steps, on a copy of the model after the official
occupancy filter, against the synthetic capture's exact images (the headline) and against the matte
reference (what a real capture has). Each seed is one run in ``benchmarks/results/convergence/<name>/seed-<k>/``
with a checkpoint and its curve so far: start the same command again and every run continues where it stopped
(an hours-long study survives being killed). The summary (mean and spread over seeds at each step) goes to
``benchmarks/results/convergence-<name>.{json,md,png}``.

Tune on a tuning capture (``--capture-seed 1``: another head, texture and motion) and report on the scored one
(``--capture-seed 0``, the default capture every other benchmark uses); the summary records which one it was.
``--frames 1`` gives the static problem (one timestep), whose ceiling bounds the dynamic one.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import cv2  # noqa: F401 - before pycolmap (zlib clash)
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.nersemble import prepare  # noqa: E402
from stages.core.devices import resolve_device  # noqa: E402
from stages.evaluate.metrics import psnr, ssim  # noqa: E402
from stages.evaluate.stage import evaluation_timesteps  # noqa: E402
from stages.evaluate.truth import SyntheticTruth, matte_reference  # noqa: E402
from stages.nersemble.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from stages.optimize.config import OptimizeConfig  # noqa: E402
from stages.optimize.curves import line_panels_png  # noqa: E402
from stages.optimize.stage import build_trainer, model_config, split_cameras  # noqa: E402
from stages.rendering.backend import resolve_backend  # noqa: E402
from storage import CaptureStore  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SCORED_CAPTURE_SEED = 0  # the capture every benchmark reports on; never tune on it


def parse_overrides(items: list[str]) -> dict:
    """``k=v`` pairs, values read as JSON when they parse (numbers, lists), else kept as strings."""
    overrides = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return overrides


def score(model, store: CaptureStore, truth: SyntheticTruth | None, holdout: list[str],
          timesteps: list[int]) -> dict:
    """Mean PSNR/SSIM of the hold-out renders against the exact images (when known) and the matte reference."""
    evaluated = copy.deepcopy(model)
    evaluated.filter_occupancy()  # the official evaluation protocol, on a copy: training goes on unfiltered
    scores: dict[str, list[tuple[float, float]]] = {"exact": [], "matte": []}
    for serial in holdout:
        for t in timesteps:
            out = evaluated.render_image(store.intrinsics[serial], store.world_2_cam[serial], store.width,
                                         store.height, t)["rgb"].cpu()
            references = {"matte": matte_reference(store, serial, t)}
            if truth is not None:
                references["exact"] = truth.reference(serial, t)
            for name, ref in references.items():
                target = torch.as_tensor(ref.image)
                scores[name].append((psnr(out, target), ssim(out, target)))
    return {name: {"psnr": float(np.mean([p for p, _ in rows])), "ssim": float(np.mean([s for _, s in rows]))}
            for name, rows in scores.items() if rows}


def _without_length(config: dict | None) -> dict | None:
    """A model config minus its step count: a study may be extended to more steps and still resume."""
    if config is None:
        return None
    return {**config, "train": {k: v for k, v in config["train"].items() if k != "steps"}}


def run_seed(store: CaptureStore, truth: SyntheticTruth | None, config: OptimizeConfig, run_dir: Path,
             steps: int, eval_every: int, eval_timesteps: int, device: torch.device, use_depth: bool) -> list[dict]:
    """Train one seed to ``steps``, scoring every ``eval_every`` steps; resumes from ``run_dir``."""
    cfg = model_config(config)
    train, holdout = split_cameras(store.cameras, None, store.world_2_cam)  # auto: the paper's four, else a spread
    checkpoint_file, curve_file = run_dir / "checkpoint.pt", run_dir / "curve.json"
    resumed = None
    if checkpoint_file.exists() and curve_file.exists():
        resumed = load_checkpoint(checkpoint_file.read_bytes())
        if _without_length(resumed.get("config")) != _without_length(cfg.to_dict()):
            raise SystemExit(f"{run_dir}: holds a run with another config; choose another --name or delete it")
    trainer, _ = build_trainer(store, train, cfg, device, resolve_backend("auto", device), use_depth, resumed=resumed)
    curve = json.loads(curve_file.read_text()) if resumed is not None else []
    timesteps = evaluation_timesteps(store.n_frames, eval_timesteps)
    run_dir.mkdir(parents=True, exist_ok=True)
    while trainer.state.step < steps:
        target = min(steps, (trainer.state.step // eval_every + 1) * eval_every)
        trainer.train(until_step=target)
        t0 = time.perf_counter()
        point = {"step": trainer.state.step, "train_seconds": round(trainer.state.elapsed_s, 1),
                 "rays": trainer.state.rays, **score(trainer.model, store, truth, holdout, timesteps),
                 "score_seconds": 0.0}
        point["score_seconds"] = round(time.perf_counter() - t0, 1)
        curve.append(point)
        checkpoint_file.write_bytes(save_checkpoint(trainer.state_dict()))
        curve_file.write_text(json.dumps(curve, indent=1))  # written after the checkpoint it describes
        shown = " ".join(f"{k} {v['psnr']:.2f}/{v['ssim']:.3f}" for k, v in point.items() if isinstance(v, dict))
        print(f"  {run_dir.name} step {point['step']:6d}  {point['train_seconds']:7.0f} s  {shown}", flush=True)
    return curve


def summarise(curves: dict[int, list[dict]]) -> list[dict]:
    """Mean and spread (min, max) over seeds at every step all seeds reached."""
    by_step: dict[int, list[dict]] = {}
    for curve in curves.values():
        for point in curve:
            by_step.setdefault(point["step"], []).append(point)
    rows = []
    for step in sorted(s for s, points in by_step.items() if len(points) == len(curves)):
        points, row = by_step[step], {"step": step}
        for reference in ("exact", "matte"):
            for metric in ("psnr", "ssim"):
                values = [p[reference][metric] for p in points if reference in p]
                if values:
                    row[f"{reference}_{metric}"] = {"mean": float(np.mean(values)), "min": float(min(values)),
                                                    "max": float(max(values))}
        rows.append(row)
    return rows


def write_summary(name: str, meta: dict, curves: dict[int, list[dict]]) -> None:
    rows = summarise(curves)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"convergence-{name}.json").write_text(json.dumps({**meta, "summary": rows,
                                                                  "curves": curves}, indent=1))
    headline = "exact" if rows and "exact_psnr" in rows[0] else "matte"
    lines = [f"# Convergence: {name}", "", f"`{meta['command']}`", "",
             f"capture seed {meta['capture_seed']} ({meta['capture_role']}), {meta['frames']} frames, "
             f"seeds {', '.join(map(str, curves))}; mean [min, max] over seeds; headline against the "
             f"{'exact images' if headline == 'exact' else 'matte reference'}.", "",
             "| step | exact PSNR | exact SSIM | matte PSNR | matte SSIM |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        cells = [f"{row[k]['mean']:.2f} [{row[k]['min']:.2f}, {row[k]['max']:.2f}]" if k in row else "-"
                 for k in ("exact_psnr", "exact_ssim", "matte_psnr", "matte_ssim")]
        lines.append(f"| {row['step']} | " + " | ".join(cells) + " |")
    (RESULTS / f"convergence-{name}.md").write_text("\n".join(lines) + "\n")
    if len(rows) >= 2:
        x = np.array([r["step"] for r in rows], float)
        series = {f"seed {seed}": np.array([p[headline]["psnr"] for p in curve if p["step"] in set(x)], float)
                  for seed, curve in curves.items()}
        series["mean"] = np.array([r[f"{headline}_psnr"]["mean"] for r in rows])
        (RESULTS / f"convergence-{name}.png").write_bytes(
            line_panels_png([(f"hold-out PSNR vs {headline} (dB)", x, series)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="study name: results and run folders are named after it")
    parser.add_argument("--preset", default="preview")
    parser.add_argument("--override", action="append", default=[], help="model hyper-parameter k=v (repeat)")
    parser.add_argument("--steps", type=int, required=True, help="train every seed to this many steps")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-timesteps", type=int, default=5, help="evenly spaced frames scored per camera")
    parser.add_argument("--seeds", default="0,1", help="training seeds (two at least for a spread)")
    parser.add_argument("--capture-seed", type=int, default=1,
                        help=f"synthetic capture seed; {SCORED_CAPTURE_SEED} is the scored capture, others tune")
    parser.add_argument("--frames", type=int, default=24, help="frames of the capture (1: the static problem)")
    parser.add_argument("--no-depth", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device, "benchmark")
    capture_dir = RESULTS / "convergence" / f"capture-seed{args.capture_seed}-frames{args.frames}"
    work = prepare(capture_dir, args.capture_seed, args.frames, depth=not args.no_depth)
    store = CaptureStore.open(work.capture_uri)
    truth_uri = Path(json.loads((capture_dir / "capture.json").read_text())["sequence_dir"]) / "ground_truth.zarr"
    truth = SyntheticTruth(str(truth_uri), store) if truth_uri.exists() else None
    use_depth = store.stage_record("depth") is not None and not args.no_depth
    overrides = parse_overrides(args.override)
    curves: dict[int, list[dict]] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        config = OptimizeConfig(preset=args.preset, overrides=overrides, steps=args.steps, seed=seed)
        run_dir = RESULTS / "convergence" / args.name / f"seed-{seed}"
        print(f"{args.name}: seed {seed}, {args.steps} steps -> {run_dir}", flush=True)
        curves[seed] = run_seed(store, truth, config, run_dir, args.steps, args.eval_every, args.eval_timesteps,
                                device, use_depth)
    meta = {"command": " ".join(["benchmarks/nersemble_convergence.py", *sys.argv[1:]]), "preset": args.preset,
            "overrides": overrides, "steps": args.steps, "capture_seed": args.capture_seed,
            "capture_role": "scored" if args.capture_seed == SCORED_CAPTURE_SEED else "tuning",
            "frames": args.frames, "use_depth": use_depth, "device": str(device),
            "threads": torch.get_num_threads()}
    write_summary(args.name, meta, curves)
    print(f"wrote {RESULTS / f'convergence-{args.name}.json'} (.md, .png)")


if __name__ == "__main__":
    main()
