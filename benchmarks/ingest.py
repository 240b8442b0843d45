"""Ingest throughput against the bundled ffmpeg decoding the same files to nothing, side by side.

The capture is the synthetic rig, looped and upscaled by ffmpeg into a longer, larger sequence so that one
ingest takes several seconds. Both sides use the same number of parallel decoders; runs alternate, and
the ratio of medians is the figure to read (the machine is noisy, absolute numbers less so).

    .venv/bin/python benchmarks/ingest.py [--cameras 16] [--loops 4] [--scale 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stages.core.cameras import read_camera_params, rescale_intrinsics, write_camera_params  # noqa: E402
from pipeline.synthetic import synthesize_capture  # noqa: E402
from stages.core.video import count_frames, ffmpeg_exe  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def build_capture(root: Path, cameras: int, loops: int, scale: int) -> Path:
    """A synthetic capture, each video looped ``loops`` times and upscaled ``scale``x (K rescaled to match)."""
    capture = synthesize_capture(root, cameras=cameras, frames=24)
    for video in capture.video_paths.values():
        bigger = video.with_suffix(".big.mp4")
        subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-stream_loop", str(loops - 1), "-i", str(video),
                        "-vf", f"scale=iw*{scale}:ih*{scale}:flags=bicubic", "-c:v", "libx264", "-crf", "18",
                        "-pix_fmt", "yuv420p", str(bigger)], check=True)
        bigger.replace(video)
    for plate in capture.background_paths.values():
        subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-i", str(plate), "-vf", f"scale=iw*{scale}:ih*{scale}",
                        "-q:v", "2", str(plate.with_suffix(".big.jpg"))], check=True)
        plate.with_suffix(".big.jpg").replace(plate)
    params = read_camera_params(capture.calibration_path)
    scaled = {s: rescale_intrinsics(K, scale) for s, K in params.intrinsics.items()}
    write_camera_params(capture.calibration_path, type(params)(params.world_2_cam, scaled, params.shared_intrinsics))
    return capture.sequence_dir


NULL_OUTPUT = ["-f", "null", "-"]
RGB_OUTPUT = ["-pix_fmt", "rgb24", "-f", "rawvideo", "-y", os.devnull]  # what ingest's decoder produces


def raw_decode_seconds(videos: list[Path], workers: int, output: list[str] = NULL_OUTPUT) -> float:
    """Wall time for ffmpeg to decode every video to nothing, ``workers`` at a time."""
    def decode(video: Path) -> None:
        subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(video), "-map", "0:v:0", *output],
                       check=True)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(decode, videos))
    return time.perf_counter() - started


def ingest_once(sequence_dir: Path, work: Path, workers: int) -> dict:
    """One ingest in a fresh interpreter, so its peak memory is its own."""
    code = (
        "import json, resource, sys, time\n"
        "from stages.ingest.config import IngestConfig\n"
        "from stages.ingest.stage import ingest_sequence\n"
        "t = time.perf_counter()\n"
        f"r = ingest_sequence({str(sequence_dir)!r}, {str(work)!r}, IngestConfig(workers={workers}))\n"
        "wall = time.perf_counter() - t\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
        "print(json.dumps({'wall': wall, 'report': r, 'peak_mb': peak, 'ffmpeg_peak_mb': child}))\n"
    )
    shutil.rmtree(work, ignore_errors=True)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parent.parent)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cameras", type=int, default=16)
    parser.add_argument("--loops", type=int, default=4)
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        sequence_dir = build_capture(Path(tmp) / "archive", args.cameras, args.loops, args.scale)
        videos = sorted((sequence_dir / "images").glob("cam_*.mp4"))
        frames = sum(count_frames(v) for v in videos)
        raw, rgb, ingest, last = [], [], [], {}
        for _ in range(args.repeats):
            raw.append(raw_decode_seconds(videos, args.workers))
            rgb.append(raw_decode_seconds(videos, args.workers, RGB_OUTPUT))
            last = ingest_once(sequence_dir, Path(tmp) / "work", args.workers)
            ingest.append(last["wall"])
        report = last["report"]

    width, height = report["size"]
    megabytes = frames * width * height * 3 / 1e6
    raw_s, rgb_s, ingest_s = statistics.median(raw), statistics.median(rgb), statistics.median(ingest)
    rows = [
        ("raw ffmpeg decode -> null", raw_s, frames / raw_s, megabytes / raw_s, None),
        ("ffmpeg decode -> rgb24, dropped", rgb_s, frames / rgb_s, megabytes / rgb_s, None),
        ("ingest -> capture.zarr", ingest_s, frames / ingest_s, megabytes / ingest_s, last["peak_mb"]),
    ]
    print(f"\n{args.cameras} cameras x {frames // len(videos)} frames at {width}x{height}, "
          f"{args.workers} parallel decoders, median of {args.repeats}")
    print(f"{'':32} {'seconds':>8} {'frames/s':>9} {'MB/s':>8} {'peak RSS MB':>12}")
    for name, seconds, fps, mbps, peak in rows:
        print(f"{name:32} {seconds:8.2f} {fps:9.1f} {mbps:8.1f} {'-' if peak is None else f'{peak:.0f}':>12}")
    ratio = raw_s / ingest_s
    print(f"ingest / rgb24 decode throughput: {rgb_s / ingest_s:.2f} (what storing costs beyond decoding)")
    print(f"ingest / raw decode throughput: {ratio:.2f} (goal >= 0.80); "
          f"ffmpeg child peak RSS {last['ffmpeg_peak_mb']:.0f} MB")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ingest.json").write_text(json.dumps({
        "cameras": args.cameras, "frames_total": frames, "size": [width, height], "workers": args.workers,
        "raw_decode_seconds": raw, "rgb_decode_seconds": rgb, "ingest_seconds": ingest, "throughput_ratio": ratio,
        "throughput_ratio_vs_rgb_decode": rgb_s / ingest_s,
        "ingest_peak_rss_mb": last["peak_mb"], "ffmpeg_peak_rss_mb": last["ffmpeg_peak_mb"],
        "ingest_frames_per_second": frames / ingest_s, "raw_frames_per_second": frames / raw_s,
    }, indent=2))


if __name__ == "__main__":
    main()
