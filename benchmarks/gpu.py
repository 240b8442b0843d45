"""GPU figures: hash-ensemble encoding torch vs triton (vs tcnn) and whole-training steps/s and peak memory.

    python benchmarks/gpu.py [--points 262144] [--train-seconds 60] [--train-steps 200] [--out benchmarks/results]

Needs CUDA (exits with a message otherwise) and only ``stages.nersemble`` (torch, numpy; triton for the
triton rows): no zarr, Prefect or capture store, so it runs on a bare GPU machine with a CUDA torch.

1. Encoding, forward + backward (gradients to the table, the positions and the blend weights, as in training
   once the ensemble window has opened) at the paper configuration (32 grids x 16 levels x 2^19 entries, 2
   features: the ``paper`` preset's ``hash``), ``--points`` samples per call (4096 rays x ~64 samples).
   torch and triton share one table; triton is also timed at a few points-per-program block sizes.
2. Fused marching and compositing (``stages/nersemble/kernels/cuda/packed.py``) against their torch twins, at the paper's
   batch: ``--rays`` rays through a 128^3 occupancy grid holding a spherical shell (a head's surface), marched at
   the paper's step size, then compositing forward + backward over the marched samples.
3. Whole training: ``Trainer.train_step`` of the ``paper`` preset (and ``standard`` where that preset exists)
   per backend, on a synthetic capture made here (16 cameras on an arc around a coloured sphere, 1100 x 1604
   frames, 4 timesteps). A fresh run's first steps march a fully occupied grid through an untrained fog, so
   samples per ray are at their highest: steps/s here is the pessimistic end of a run (the samples per ray
   are recorded beside it). Peak memory is ``torch.cuda.max_memory_allocated``. The triton backend runs once with
   the fused marching and compositing and once with their torch twins (``fused_packed`` False).

Writes ``gpu.json`` and ``gpu.md`` (a table with the triton/torch ratios) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.nersemble.config import PRESETS, preset  # noqa: E402
from stages.nersemble.hash_encoding import TcnnHashEnsemble, TorchHashEnsemble  # noqa: E402
from stages.nersemble.kernels.registry import tcnn_available, triton_importable  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TRAIN_PRESETS = [name for name in ("paper", "standard") if name in PRESETS]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_encoding(encoding: torch.nn.Module, n_points: int, repeats: int) -> float:
    """Median seconds of one forward + backward over ``n_points`` random samples (after two warm-ups)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.rand(n_points, 3, device="cuda", generator=generator).requires_grad_()
    blend = torch.randn(n_points, encoding.n_grids, device="cuda", generator=generator).requires_grad_()
    grad_out = torch.randn(n_points, encoding.out_dim, device="cuda", generator=generator)
    times = []
    for i in range(repeats + 2):
        encoding.zero_grad(set_to_none=True)
        x.grad = blend.grad = None
        _sync()
        start = time.perf_counter()
        encoding(x, blend).backward(grad_out)
        _sync()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def encoding_rows(n_points: int, repeats: int) -> list[dict]:
    config = preset("paper").hash
    rows = []
    torch_encoding = TorchHashEnsemble(config).cuda()

    def row(backend: str, seconds: float, **extra) -> dict:
        return {"backend": backend, "points": n_points, "ms": 1e3 * seconds, "samples_per_s": n_points / seconds,
                **extra}

    rows.append(row("torch", time_encoding(torch_encoding, n_points, repeats)))
    if triton_importable():
        from stages.nersemble.hash_encoding import TritonHashEnsemble  # noqa: PLC0415
        from stages.nersemble.kernels.cuda.hash_encoding import block_points  # noqa: PLC0415

        default = block_points(config.n_grids, config.features_per_level)
        for block_n in sorted({16, default, 64}):
            encoding = TritonHashEnsemble(config, table=torch_encoding.table, block_n=block_n)
            rows.append(row("triton", time_encoding(encoding, n_points, repeats), block_n=block_n,
                            default_block=block_n == default))
    if tcnn_available():
        encoding = TcnnHashEnsemble(config, dtype=torch.float32).cuda()
        rows.append(row("tcnn", time_encoding(encoding, n_points, repeats)))
    return rows


# --- fused marching and compositing ------------------------------------------------------------------------------


def _median_ms(run, repeats: int) -> float:
    times = []
    for i in range(repeats + 2):
        _sync()
        start = time.perf_counter()
        run()
        _sync()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def packed_rows(n_rays: int, repeats: int, device: str = "cuda") -> list[dict]:
    """Marching and compositing, torch twin vs Triton kernel, on one batch of rays through a shell-shaped grid.

    ``device`` "cpu" runs it under ``TRITON_INTERPRET=1`` (a check that the code runs; the times mean nothing).
    """
    from stages.nersemble.rendering import accumulate_along_rays  # noqa: PLC0415
    from stages.nersemble.sampling import march_rays  # noqa: PLC0415
    from stages.nersemble.kernels.cuda.packed import composite_packed  # noqa: PLC0415

    sampler, r = preset("paper").sampler, 128
    generator = torch.Generator(device=device).manual_seed(0)
    cells = (torch.stack(torch.meshgrid(*[torch.arange(r, device=device)] * 3, indexing="ij")) + 0.5) / r * 2 - 1
    occupied = (cells.norm(dim=0) - 0.6).abs() < 0.15
    box = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]], device=device)
    origins = torch.nn.functional.normalize(torch.randn(n_rays, 3, device=device, generator=generator), dim=-1) * 3
    targets = 0.5 * (2 * torch.rand(n_rays, 3, device=device, generator=generator) - 1)
    directions = torch.nn.functional.normalize(targets - origins, dim=-1)

    def march(fused: bool):
        return march_rays(origins, directions, box, sampler.step_size, sampler.near_plane, sampler.far_plane,
                          occupied=occupied, stratified=True, fused=fused)

    samples = march(False)
    s = len(samples)
    sigmas = (20 * torch.rand(s, device=device, generator=generator)).requires_grad_()
    rgbs = torch.rand(s, 3, device=device, generator=generator).requires_grad_()
    grad_outs = [torch.randn(s, device=device), torch.randn(n_rays, device=device),
                 torch.randn(n_rays, 3, device=device), torch.randn(n_rays, device=device)]

    def composite(fn):
        def run():
            outs = fn(sigmas, rgbs, samples.t_starts, samples.t_ends, samples.ray_indices, n_rays)
            torch.autograd.grad(outs, [sigmas, rgbs], grad_outs)
        return run

    rows = []
    for op, torch_run, triton_run in (("march", lambda: march(False), lambda: march(True)),
                                      ("composite fwd+bwd", composite(accumulate_along_rays),
                                       composite(composite_packed))):
        for backend, run in (("torch", torch_run), ("triton", triton_run)):
            rows.append({"op": op, "backend": backend, "rays": n_rays, "samples": s,
                         "ms": _median_ms(run, repeats)})
    return rows


# --- whole training on a synthetic sphere -------------------------------------------------------------------


class SphereSource:
    """An in-memory ImageSource: a sphere (radius 0.1 m, colour by normal, growing with t) seen by an arc of cameras."""

    def __init__(self, n_cameras: int = 16, n_timesteps: int = 4, width: int = 1100, height: int = 1604,
                 distance_m: float = 1.0) -> None:
        from stages.nersemble.image_cache import TrainView  # noqa: PLC0415

        self.n_timesteps, self.width, self.height = n_timesteps, width, height
        focal = 1.4 * height
        self.K = np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], dtype=np.float64)
        self.views = []
        for i in range(n_cameras):
            yaw = math.radians(-70 + 140 * i / max(n_cameras - 1, 1))
            pitch = math.radians(-15 if i % 2 else 15)
            centre = distance_m * np.array([math.sin(yaw) * math.cos(pitch), math.sin(pitch),
                                            -math.cos(yaw) * math.cos(pitch)])
            forward = -centre / np.linalg.norm(centre)
            right = np.cross([0.0, 1.0, 0.0], forward)
            right /= np.linalg.norm(right)
            down = np.cross(forward, right)
            rotation = np.stack([right, down, forward])  # world -> camera rows (OpenCV: x right, y down, z ahead)
            w2c = np.eye(4)
            w2c[:3, :3], w2c[:3, 3] = rotation, -rotation @ centre
            self.views.append(TrainView(self.K, w2c, width, height))

    def load(self, view: int, timestep: int):
        from stages.nersemble.image_cache import TrainImage  # noqa: PLC0415

        w2c = self.views[view].world_2_cam
        radius = 0.1 * (1.0 + 0.1 * timestep / max(self.n_timesteps - 1, 1))
        u, v = np.meshgrid(np.arange(self.width) + 0.5, np.arange(self.height) + 0.5)
        d_cam = np.stack([(u - self.K[0, 2]) / self.K[0, 0], (v - self.K[1, 2]) / self.K[1, 1], np.ones_like(u)], -1)
        d = d_cam @ w2c[:3, :3]  # camera -> world directions (R^T d)
        d /= np.linalg.norm(d, axis=-1, keepdims=True)
        origin = -w2c[:3, :3].T @ w2c[:3, 3]
        b = d @ origin
        disc = b * b - (origin @ origin - radius * radius)
        hit = disc > 0
        t = -b - np.sqrt(np.maximum(disc, 0))
        normal = (origin + t[..., None] * d) / radius
        rgb = np.where(hit[..., None], (normal + 1) / 2, 1.0)
        z = np.where(hit, t * d_cam[..., 2] / np.linalg.norm(d_cam, axis=-1), 0.0)
        return TrainImage((rgb * 255).astype(np.uint8), (hit * 255).astype(np.uint8), z.astype(np.float32))


def train_row(preset_name: str, backend: str, source: SphereSource, seconds: float, max_steps: int,
              warmup_steps: int, fused: bool = True) -> dict:
    from stages.nersemble import NeRSembleModel, scene_box_from_cameras  # noqa: PLC0415
    from stages.nersemble.trainer import Trainer  # noqa: PLC0415

    cfg = preset(preset_name)
    row: dict = {"preset": preset_name, "backend": backend if fused else f"{backend} (torch march+composite)"}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        box = scene_box_from_cameras([v.world_2_cam for v in source.views], cfg.scene.box_size_m,
                                     cfg.scene.world_scale)
        torch.manual_seed(cfg.train.seed)
        model = NeRSembleModel(cfg, source.n_timesteps, box, backend=backend).cuda()
        model.fused_packed = fused
        row["encoding"] = type(model.field.encoding).__name__
        trainer = Trainer(model, source, torch.device("cuda"))
        for _ in range(warmup_steps):  # kernel compilation, the image cache, allocator growth
            trainer.train_step()
        _sync()
        start, steps, samples = time.perf_counter(), 0, []
        while steps < max_steps and time.perf_counter() - start < seconds:
            samples.append(trainer.train_step()["samples"])
            steps += 1
        _sync()
        elapsed = time.perf_counter() - start
        row.update(steps=steps, first_step=warmup_steps, seconds=elapsed, steps_per_s=steps / elapsed,
                   samples_per_ray=float(np.mean(samples)),
                   peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30)
    except torch.cuda.OutOfMemoryError:
        row.update(error="out of GPU memory", peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30)
    finally:
        model = trainer = None  # noqa: F841 - free the GPU before the next row
        torch.cuda.empty_cache()
    return row


class HeldOut:
    """``source`` without one camera: the cameras training sees."""

    def __init__(self, source: SphereSource, holdout: int) -> None:
        self.source, self.n_timesteps = source, source.n_timesteps
        self.views = [v for i, v in enumerate(source.views) if i != holdout]
        self._index = [i for i in range(len(source.views)) if i != holdout]

    def load(self, view: int, timestep: int):
        return self.source.load(self._index[view], timestep)


def track_row(preset_name: str, backend: str, source: SphereSource, steps: int, holdout: int = 5,
              every: int = 25) -> dict:
    """``steps`` steps of ``preset_name`` from its seed on every camera but ``holdout``: the loss every ``every``
    steps and the hold-out camera's PSNR at the end (a quarter-size render against the exact sphere). Run per
    backend from the same seed, the curves and scores should track each other."""
    from stages.nersemble import NeRSembleModel, scene_box_from_cameras  # noqa: PLC0415
    from stages.nersemble.trainer import Trainer  # noqa: PLC0415

    cfg = preset(preset_name)
    box = scene_box_from_cameras([v.world_2_cam for v in source.views], cfg.scene.box_size_m, cfg.scene.world_scale)
    torch.manual_seed(cfg.train.seed)
    model = NeRSembleModel(cfg, source.n_timesteps, box, backend=backend).cuda()
    trainer = Trainer(model, HeldOut(source, holdout), torch.device("cuda"))
    losses = []
    for step in range(1, steps + 1):
        loss = trainer.train_step()["total"]
        if step % every == 0:
            losses.append(round(float(loss), 6))
    small = SphereSource(len(source.views), source.n_timesteps, source.width // 4, source.height // 4)
    view = small.views[holdout]
    psnrs = []
    model.eval()
    with torch.no_grad():
        for t in range(source.n_timesteps):
            image = model.render_image(view.K, view.world_2_cam, small.width, small.height, t)["rgb"].float().cpu()
            exact = torch.from_numpy(small.load(holdout, t).rgb).float() / 255.0
            mse = float(((image.clamp(0, 1) - exact) ** 2).mean())
            psnrs.append(-10.0 * math.log10(max(mse, 1e-10)))
    row = {"preset": preset_name, "backend": backend, "steps": steps, "loss_every": every, "losses": losses,
           "holdout_psnr": float(np.mean(psnrs)), "kernels": model.kernels_used()}
    model = trainer = None  # noqa: F841 - free the GPU before the next row
    torch.cuda.empty_cache()
    return row


def _ratio(rows: list[dict], key: str, match: dict) -> float | None:
    def pick(backend: str) -> dict | None:
        found = [r for r in rows if r.get("backend") == backend and key in r
                 and all(r.get(k) == v for k, v in match.items()) and r.get("default_block", True)]
        return found[0] if found else None

    t, p = pick("triton"), pick("torch")
    return t[key] / p[key] if t and p else None


def markdown(result: dict) -> str:
    lines = [f"# GPU benchmark ({result['gpu']}, torch {result['torch']}, triton {result['triton']})", "",
             f"## Hash-ensemble encoding, forward + backward, paper config ({result['encoding_points']:,} samples)",
             "", "| backend | block | ms | samples/s |", "| --- | --- | ---: | ---: |"]
    for r in result["encoding"]:
        lines.append(f"| {r['backend']} | {r.get('block_n', '')} | {r['ms']:.2f} | {r['samples_per_s']:,.0f} |")
    ratio = result["encoding_ratio_triton_over_torch"]
    lines += ["", f"triton / torch samples/s: {ratio:.2f}x" if ratio else "triton / torch: not measured", "",
              "## Marching and compositing (paper step, 128^3 shell grid)", "",
              "| op | backend | rays | samples | ms |", "| --- | --- | ---: | ---: | ---: |"]
    for r in result["packed"]:
        lines.append(f"| {r['op']} | {r['backend']} | {r['rays']} | {r['samples']:,} | {r['ms']:.2f} |")
    for op, ratio in result["packed_speedup_triton_over_torch"].items():
        lines.append(f"\n{op}: torch ms / triton ms {ratio:.2f}x")
    lines += ["", "## Whole training (synthetic sphere, a fresh run's first steps)", "",
              "| preset | backend | steps/s | samples/ray | peak GiB | note |",
              "| --- | --- | ---: | ---: | ---: | --- |"]
    for r in result["training"]:
        lines.append(f"| {r['preset']} | {r['backend']} | {r.get('steps_per_s', float('nan')):.2f} | "
                     f"{r.get('samples_per_ray', float('nan')):.1f} | {r.get('peak_memory_gib', float('nan')):.1f} | "
                     f"{r.get('error', '')} |")
    for name, ratio in result["training_ratio_triton_over_torch"].items():
        lines.append(f"\n{name}: triton / torch steps/s {ratio:.2f}x" if ratio else f"\n{name}: ratio not measured")
    for name, ratio in result.get("training_ratio_fused_over_torch_march_composite", {}).items():
        lines.append(f"\n{name}: triton with / without fused marching and compositing, steps/s {ratio:.2f}x")
    if result.get("tracking"):
        lines += ["", "## standard, same seed and steps per backend (loss curve, hold-out PSNR against the exact sphere)",
                  "", "| backend | steps | hold-out PSNR (dB) | last losses | kernels |", "| --- | ---: | ---: | --- | --- |"]
        for r in result["tracking"]:
            lines.append(f"| {r['backend']} | {r['steps']} | {r['holdout_psnr']:.2f} | {r['losses'][-3:]} | "
                         f"{r['kernels']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1 << 18)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rays", type=int, default=4096, help="rays per batch in the marching/compositing rows")
    parser.add_argument("--train-seconds", type=float, default=60.0, help="timed training per preset and backend")
    parser.add_argument("--train-steps", type=int, default=200, help="at most this many timed steps per row")
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--track-steps", type=int, default=0,
                        help="also train `standard` this many steps per backend from one seed and compare loss "
                             "curves and hold-out PSNR (0: skip)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU: torch.cuda.is_available() is False here (a CPU build of "
                 "torch, or no driver). The CPU figures are benchmarks/encoding.py and benchmarks/nersemble.py.")

    import importlib.metadata as metadata  # noqa: PLC0415

    triton_version = metadata.version("triton") if triton_importable() else None
    result: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton_version,
                    "cuda": torch.version.cuda, "machine": platform.machine(), "tcnn_available": tcnn_available(),
                    "encoding_points": args.points, "encoding_config": "paper (32 grids, 16 levels, 2^19, F=2)"}
    print("encoding ...", flush=True)
    result["encoding"] = encoding_rows(args.points, args.repeats)
    result["encoding_ratio_triton_over_torch"] = _ratio(result["encoding"], "samples_per_s", {})
    for r in result["encoding"]:
        print(f"  {r['backend']:<7} block {r.get('block_n', '-')!s:>3}  {r['ms']:8.2f} ms  "
              f"{r['samples_per_s']:14,.0f} samples/s", flush=True)
    torch.cuda.empty_cache()
    result["packed"] = packed_rows(args.rays, args.repeats) if triton_importable() else []
    ms = {(r["op"], r["backend"]): r["ms"] for r in result["packed"]}
    result["packed_speedup_triton_over_torch"] = {
        op: ms[(op, "torch")] / ms[(op, "triton")] for op, backend in ms if backend == "triton"}
    for r in result["packed"]:
        print(f"  {r['op']:<18} {r['backend']:<7} {r['samples']:>10,} samples  {r['ms']:8.2f} ms", flush=True)
    torch.cuda.empty_cache()

    result["training"] = []
    if not args.skip_training:
        source = SphereSource()
        backends = ["torch"] + (["triton"] if triton_importable() else []) + (["tcnn"] if tcnn_available() else [])
        for name in TRAIN_PRESETS:
            for backend in backends:
                print(f"training {name} / {backend} ...", flush=True)
                for fused in (True, False) if backend == "triton" else (True,):
                    row = train_row(name, backend, source, args.train_seconds, args.train_steps, args.warmup_steps,
                                    fused)
                    print(f"  {row}", flush=True)
                    result["training"].append(row)
    result["training_ratio_triton_over_torch"] = {
        name: _ratio(result["training"], "steps_per_s", {"preset": name}) for name in TRAIN_PRESETS}
    steps_per_s = {(r["preset"], r["backend"]): r.get("steps_per_s") for r in result["training"]}
    fused_ratio = {}
    for name in TRAIN_PRESETS:
        fused, unfused = steps_per_s.get((name, "triton")), steps_per_s.get((name, "triton (torch march+composite)"))
        if fused and unfused:
            fused_ratio[name] = fused / unfused
    result["training_ratio_fused_over_torch_march_composite"] = fused_ratio

    result["tracking"] = []
    if args.track_steps and triton_importable():
        source = SphereSource(n_timesteps=2)
        for backend in ("torch", "triton"):
            print(f"tracking standard / {backend} for {args.track_steps} steps ...", flush=True)
            row = track_row("standard", backend, source, args.track_steps)
            print(f"  hold-out PSNR {row['holdout_psnr']:.2f} dB, last loss {row['losses'][-1:]}", flush=True)
            result["tracking"].append(row)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(result, indent=2))
    (out / "gpu.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'}")


if __name__ == "__main__":
    main()
