"""Export speed and memory: a 96-frame turntable (upstream's 4 s at 24 fps) at the stored resolution.

Synthesises a capture, runs the real ingest -> calibrate (provided) -> matte (plate) -> optimize stages (a short
CPU-sized training run: render cost depends on how far the occupancy grid has pruned empty space, so an
untrained model would be unrepresentatively slow), then times ``export_sequence`` rendering the turntable:

- wall time, frames/s and rays/s of the whole export (render + H.264 encoding at CRF 14);
- peak resident memory during the export (model loading included) above the level before it, sampled every
  20 ms, and the same for a few frames at ``--memory-scale`` times the size with the same ray chunk: frames are
  rendered ``--chunk`` rays at a time and streamed to ffmpeg, so the working set is set by the chunk (its
  samples' encodings dominate), plus small per-pixel buffers; neither the video's length nor, beyond those
  buffers, its resolution should raise it.

Prints a table and writes ``benchmarks/results/export.json``.

    .venv/bin/python benchmarks/export.py [--cameras 8] [--frames 4] [--width 72] [--height 104]
                                          [--steps 200] [--device cpu] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.calibrate.config import CalibrateConfig
from stages.export.config import ExportConfig
from stages.ingest.config import IngestConfig
from stages.matte.config import MatteConfig
from pipeline.synthetic import synthesize_capture  # noqa: E402
from stages.core.video import count_frames, probe_video  # noqa: E402
from stages.calibrate.stage import calibrate_sequence  # noqa: E402
from stages.export.stage import export_sequence  # noqa: E402
from stages.ingest.stage import ingest_sequence  # noqa: E402
from stages.matte.stage import matte_sequence  # noqa: E402
from stages.optimize.stage import optimize_sequence  # noqa: E402
from storage import SequenceWorkDir  # noqa: E402

# A CPU-sized model that learns the synthetic head within a few hundred steps (as tests/test_optimize.py).
TRAIN_OVERRIDES = {
    "hash.n_levels": 6, "hash.log2_table_size": 12, "rays_per_batch": 256, "target_samples_per_batch": 0,
    "images_per_batch": 6, "repeat_images": 4, "step_size": 0.12, "lambda_alpha": 1.0, "occupancy.warmup_steps": 16,
    "deformation.window": [0, 7, 0, 30], "hash.window": [1, 4, 30, 60], "lr_step_size": 60, "eval.chunk": 2048,
}


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakRss:
    """Samples this process's resident memory in a thread while the block runs."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.before, self.peak = interval, 0.0, 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self.before = self.peak = rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())

    @property
    def growth(self) -> float:
        return self.peak - self.before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cameras", type=int, default=8)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--width", type=int, default=72)
    parser.add_argument("--height", type=int, default=104)
    parser.add_argument("--steps", type=int, default=200, help="training steps before the export")
    parser.add_argument("--turntable-frames", type=int, default=96)
    parser.add_argument("--memory-scale", type=float, default=2.0)
    parser.add_argument("--memory-frames", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=4096, help="rays per chunk (the preview preset's)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "export.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        clock = time.perf_counter()
        capture = synthesize_capture(Path(tmp) / "archive", cameras=args.cameras, frames=args.frames,
                                     width=args.width, height=args.height, seed=args.seed)
        ingest_sequence(capture.sequence_dir, str(Path(tmp) / "work"), IngestConfig())
        work = SequenceWorkDir.for_sequence(str(Path(tmp) / "work"), capture.participant_dir.name,
                                            capture.sequence_dir.name)
        calibrate_sequence(work.uri, CalibrateConfig(mode="provided"))
        matte_sequence(work.uri, MatteConfig(method="plate"))
        prepared = time.perf_counter() - clock
        clock = time.perf_counter()
        optimize = optimize_sequence(work.uri, OptimizeConfig(steps=args.steps, overrides=TRAIN_OVERRIDES,
                                                              device=args.device, encoding="torch", seed=3,
                                                              threads=args.threads))
        trained = time.perf_counter() - clock
        print(f"capture: {args.cameras} cameras x {args.frames} frames at {args.width}x{args.height}; prepared in "
              f"{prepared:.0f} s, trained {args.steps} steps in {trained:.0f} s", flush=True)

        fps = 24.0
        config = ExportConfig(holdout=False, seconds=args.turntable_frames / fps, fps=fps, device=args.device,
                              chunk=args.chunk, threads=args.threads)
        with PeakRss() as memory:
            report = export_sequence(work.uri, config)
        video = Path(work.uri) / report["videos"]["turntable"]["video"]
        info, decoded = probe_video(video), count_frames(video)

        big = ExportConfig(holdout=False, seconds=args.memory_frames / fps, fps=fps, device=args.device,
                           chunk=args.chunk, threads=args.threads, resolution_scale=args.memory_scale)
        with PeakRss() as big_memory:
            big_report = export_sequence(work.uri, big)

    frames = report["frames"]
    rays = frames * args.width * args.height
    wall, render = report["seconds"], report["render_seconds"]
    big_size = big_report["videos"]["turntable"]["size"]
    rows = [
        ("turntable", f"{frames} frames {info.width}x{info.height} {info.codec}, decoded {decoded}"),
        ("wall time", f"{wall:.1f} s ({render:.1f} s rendering, {wall - render:.1f} s encoding and I/O)"),
        ("frames/s", f"{frames / wall:.3f}"),
        ("rays/s", f"{rays / render:,.0f}"),
        ("peak RSS", f"{memory.peak:.0f} MB, +{memory.growth:.0f} MB over the {memory.before:.0f} MB before"),
        (f"at {args.memory_scale:g}x", f"{big_size[0]}x{big_size[1]}, {args.memory_frames} frames: peak "
                                        f"{big_memory.peak:.0f} MB, +{big_memory.growth:.0f} MB over the "
                                        f"{big_memory.before:.0f} MB before, "
                                        f"{big_report['frames_per_second']:.3f} frames/s"),
    ]
    print()
    for name, value in rows:
        print(f"  {name:<12} {value}")

    output = {
        "capture": {"cameras": args.cameras, "frames": args.frames, "width": args.width, "height": args.height,
                    "seed": args.seed},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch_threads": args.threads, "device": report["device"]},
        "training": {"steps": args.steps, "seconds": round(trained, 1), "overrides": TRAIN_OVERRIDES},
        "turntable": {"frames": frames, "decoded_frames": decoded, "width": info.width, "height": info.height,
                      "codec": info.codec, "crf": config.crf, "chunk": args.chunk},
        "seconds": wall,
        "render_seconds": render,
        "frames_per_second": round(frames / wall, 4),
        "rays_per_second": round(rays / render),
        "memory_mb": {"before": round(memory.before, 1), "peak": round(memory.peak, 1),
                      "growth": round(memory.growth, 1)},
        "memory_at_scale": {"scale": args.memory_scale, "size": big_size, "frames": args.memory_frames,
                            "before_mb": round(big_memory.before, 1), "peak_mb": round(big_memory.peak, 1),
                            "growth_mb": round(big_memory.growth, 1),
                            "frames_per_second": big_report["frames_per_second"]},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(output, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
