"""What a sequence and the whole archive cost, stage by stage, at the benchmark resolution.

The synthetic rig is rendered at each size (H x W, portrait as NeRSemble's 1604 x 1100) with the largest frame
count asked for; smaller counts ingest its first frames. Each stage then runs once per (size, frames) in a child
process of its own, so its peak RSS is its own: ingest (with every codec), calibrate (colmap, then provided, which
the later stages use), matte (plate, then fused), depth, a few hundred optimize steps and a 24-frame export.
Beside ingest, the same images (every camera's frames and its background plate) are decoded and compressed with
each codec at the same parallelism, one frame per chunk, with the store's own compressor and level, in the same
run: ingest's goal is to keep pace with that, not with bare decoding. Both are timed after their imports, and
alternate ``--repeats`` times (the fastest of each is kept); the ratio is also given by CPU seconds, which a
shared machine disturbs far less than wall time.

From the rows, a line ``seconds = fixed + per_pixel * (cameras x frames x H x W)`` is fitted per stage (the exponent
of a log-log fit says whether it grows faster than linearly), and extrapolated to a typical sequence (16 cameras x
430 frames at 1604 x 1100) and to the archive (9.4k sequences). Optimize scales with steps, not pixels: its rate
per step is extrapolated to the preset's step count.

    .venv/bin/python benchmarks/scale.py [--sizes 1604x1100,802x550] [--frames 24,73] [--stages ingest,...]

Writes benchmarks/results/scale.json ({"rows": [...], "ingest_vs_decode_compress": ratio, ...}) and scale.md.
Captures are cached under benchmarks/results/scale/ (ignored by git): rendering 1604 x 1100 takes long, and the
estimate is printed before it starts. Only ``--distinct-frames`` poses are rendered and looped back and forth
over the frames: no stage's cost depends on which pose a frame shows, and a 73-frame capture at 1604 x 1100 would
otherwise take hours to render. ``--matte`` and ``--calibrate`` choose the methods measured, so the slow ones can
be left out of long runs, and ``--combine`` merges the rows of several runs into one table and fit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
CACHE = RESULTS / "scale"
STAGES = ("ingest", "calibrate", "matte", "depth", "optimize", "export")
CODECS = ("zstd", "lz4", "none")
TYPICAL = {"cameras": 16, "frames": 430, "height": 1604, "width": 1100}
ARCHIVE_SEQUENCES = 9400
TURNTABLE_FRAMES = 96  # the extrapolated export: a 4 s turntable at 24 fps
EXPORT_FRAMES = 24
METHODS = {"calibrate": ("colmap", "provided"), "matte": ("plate", "fused")}
MEMORY_GOAL_MB = 4096


# --- the capture -------------------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """'1604x1100' -> (height, width): the benchmark quotes NeRSemble's portrait frames as H x W."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--sizes: {text!r} is not HxW (e.g. 1604x1100)") from None
    return height, width


def even(value: int) -> int:
    """H.264 (yuv420p) needs even sizes: an odd size is rendered one pixel larger."""
    return value + (value % 2)


def synthesis_estimate(height: int, width: int, cameras: int, frames: int) -> float:
    """Seconds to render ``frames`` distinct poses of every camera, from one frame rendered now (video encoding
    runs beside it)."""
    from pipeline.synthetic import SERIALS, render_subject, rig_cameras

    params = rig_cameras(width, height, SERIALS[:1])
    started = time.perf_counter()
    render_subject(params.intrinsics[SERIALS[0]], params.world_2_cam[SERIALS[0]], width, height, 0.5)
    return (time.perf_counter() - started) * cameras * (frames + 1)


def cached_capture(height: int, width: int, cameras: int, frames: int, distinct: int) -> tuple[Path, dict]:
    """The synthetic capture for this size, rendered once and kept; returns its sequence folder and synth info."""
    from pipeline.synthetic import synthesize_capture

    distinct = min(distinct, frames)
    for longer in sorted(CACHE.glob(f"captures/{height}x{width}-c{cameras}-f*-d{distinct}/synthesis.json"),
                         key=lambda p: json.loads(p.read_text())["frames"]):
        info = json.loads(longer.read_text())
        if info["frames"] >= frames:  # the stages read the first frames only: a longer capture serves
            return longer.parent / "archive" / "001" / "sequences" / "EXP-1-head", info
    folder = CACHE / "captures" / f"{height}x{width}-c{cameras}-f{frames}-d{distinct}"
    info_path = folder / "synthesis.json"
    sequence_dir = folder / "archive" / "001" / "sequences" / "EXP-1-head"
    estimate = synthesis_estimate(height, width, cameras, distinct)
    print(f"synthesising {cameras} cameras x {frames} frames ({distinct} distinct poses) at {height}x{width}: "
          f"about {estimate / 60:.1f} min (cached in {folder.relative_to(REPO)})", flush=True)
    started = time.perf_counter()
    synthesize_capture(folder / "archive", cameras=cameras, frames=frames, width=width, height=height,
                       distinct_frames=distinct)
    info = {"seconds": round(time.perf_counter() - started, 2), "estimate_seconds": round(estimate, 2),
            "cameras": cameras, "frames": frames, "distinct_frames": distinct, "height": height, "width": width}
    info_path.write_text(json.dumps(info, indent=2))
    return sequence_dir, info


# --- one stage in a child process ---------------------------------------------------------------------------------


def bytes_under(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


STAGE_OUTPUTS = {  # what each stage adds to the work folder: its store bytes
    "ingest": ("capture.zarr/frames", "capture.zarr/backgrounds"), "calibrate": ("calibration",),
    "matte": ("capture.zarr/alpha",), "depth": ("capture.zarr/depth",), "optimize": ("nersemble",),
    "export": ("export",),
}


def child_main(spec: dict) -> None:
    """Run one stage (or the decode+compress baseline) here; print wall time and peak memory as JSON.

    The stage's modules are imported before the clock starts: a stage that imports zarr, OpenCV and pydantic
    must not look slower than a baseline that imports numcodecs only.
    """
    prepare(spec)
    cpu_started = cpu_seconds()
    started = time.perf_counter()
    detail = run_spec(spec)
    wall = time.perf_counter() - started
    self_peak = own_peak_rss_mb()
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("RESULT " + json.dumps({"seconds": wall, "cpu_seconds": round(cpu_seconds() - cpu_started, 3),
                                  "peak_rss_mb": self_peak, "child_peak_rss_mb": children_peak, **detail}))


def own_peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's ``ru_maxrss`` also counts the parent's memory this child was
    forked with (it survives the exec), so the benchmark's own footprint would show in every stage; the memory
    map's high-water mark (``VmHWM``) starts at the exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system time of this process and its finished children (ffmpeg, colmap): what the work cost, which
    a busy machine changes far less than the wall time."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


CHILD_MODULES = {"decode+compress": ("stages.core.video", "storage.chunk_writer", "cv2"),
                 "ingest": ("stages.ingest.stage",), "calibrate": ("stages.calibrate.stage",),
                 "matte": ("stages.matte.stage",), "depth": ("stages.depth.stage",),
                 "optimize": ("stages.optimize.stage",), "export": ("stages.export.stage",)}


def prepare(spec: dict) -> None:
    """Import what the child will run, outside its timing."""
    import importlib

    for module in CHILD_MODULES.get(spec["kind"], ()):
        importlib.import_module(module)


def run_spec(spec: dict) -> dict:
    kind, work = spec["kind"], spec.get("work")
    if kind == "decode+compress":
        return decode_and_compress(Path(spec["sequence_dir"]), spec["frames"], spec["codec"], spec["workers"])
    if kind == "ingest":
        from stages.ingest.config import IngestConfig
        from stages.ingest.stage import ingest_sequence

        report = ingest_sequence(spec["sequence_dir"], spec["work_root"],
                                 IngestConfig(count=spec["frames"], codec=spec["codec"]))
        return {"workers": report["workers"]}
    if kind == "calibrate":
        from stages.calibrate.config import CalibrateConfig
        from stages.calibrate.stage import calibrate_sequence

        calibrate_sequence(work, CalibrateConfig(mode=spec["mode"]))
    elif kind == "matte":
        from stages.matte.config import MatteConfig
        from stages.matte.stage import matte_sequence

        report = matte_sequence(work, MatteConfig(method=spec["method"]))
        return {"onnx_providers": report.get("onnx_providers")}
    elif kind == "depth":
        from stages.depth.config import DepthConfig
        from stages.depth.stage import depth_sequence

        return {"device": depth_sequence(work, DepthConfig()).get("device")}
    elif kind == "optimize":
        from stages.optimize.config import OptimizeConfig
        from stages.optimize.stage import optimize_sequence

        report = optimize_sequence(work, OptimizeConfig(steps=spec["steps"]))
        return {"device": report.get("device"), "steps": report.get("steps")}
    elif kind == "export":
        from stages.export.config import ExportConfig
        from stages.export.stage import export_sequence

        fps = 24.0
        report = export_sequence(work, ExportConfig(seconds=spec["frames"] / fps, fps=fps, holdout=False))
        return {"rendered_frames": report.get("frames")}
    else:
        raise ValueError(f"unknown stage {kind!r}")
    return {}


def frame_encoder(codec: str, height: int, width: int):  # noqa: ANN201 - a chunk encoder or None
    """Exactly the encoding ingest gives one frame chunk with this codec: an array made the way the capture
    store makes its frames array (same compressor, level and chunk shape), encoded the way ingest writes it."""
    import zarr

    from storage.capture_store import _codecs
    from storage.chunk_writer import chunk_encoder

    array = zarr.create_array(zarr.storage.MemoryStore(), shape=(1, 1, height, width, 3),
                              chunks=(1, 1, height, width, 3), dtype="uint8", compressors=_codecs(codec)["frames"])
    return chunk_encoder(array)


def decode_and_compress(sequence_dir: Path, frames: int, codec: str, workers: int) -> dict:
    """Decode the images ingest stores (every camera's first ``frames`` frames and its background plate) and
    compress each as one chunk with the store's ``codec``, ``workers`` cameras at a time, as ingest does."""
    import cv2

    from stages.core.video import iter_frames, probe_video

    videos = sorted((sequence_dir / "images").glob("cam_*.mp4"))
    plates = sequence_dir.parent / "BACKGROUND"
    first = probe_video(videos[0])
    encode = frame_encoder(codec, first.height, first.width)

    def one(video: Path) -> int:
        total = 0
        for frame in iter_frames(video, count=frames, info=probe_video(video)):
            total += len(encode(frame[None, None]))
        plate = plates / f"image_{video.stem[len('cam_'):]}.jpg"
        if plate.is_file():
            image = cv2.cvtColor(cv2.imread(str(plate), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            total += len(encode(np.ascontiguousarray(image)[None, None]))
        return total

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return {"compressed_bytes": sum(pool.map(one, videos))}


def run_child(spec: dict) -> dict:
    """One stage in a fresh interpreter (its own peak RSS); the stage's error text if it failed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail) or f"exit status {proc.returncode}"}


# --- the measurement ---------------------------------------------------------------------------------------------


def row(size: str, frames: int, cameras: int, stage: str, result: dict, output_frames: int,
        store_bytes: int | None) -> dict:
    seconds = result.get("seconds")
    out = {"size": size, "frames": frames, "cameras": cameras, "stage": stage,
           "seconds": None if seconds is None else round(seconds, 3),
           "frames_per_s": round(output_frames / seconds, 3) if seconds else None,
           "peak_rss_mb": None if "peak_rss_mb" not in result else round(result["peak_rss_mb"], 1),
           "store_bytes": store_bytes}
    extra = {k: v for k, v in result.items() if k not in ("seconds", "peak_rss_mb")}
    return {**out, **extra}


def measure(sequence_dir: Path, height: int, width: int, cameras: int, frames: int, stages: list[str],
            codecs: list[str], steps: int, workers: int, repeats: int = 1,
            methods: dict[str, tuple[str, ...]] | None = None, export_frames: int = EXPORT_FRAMES) -> list[dict]:
    """Every wanted stage on one (size, frames) in a fresh work folder, in pipeline order."""
    size = f"{height}x{width}"
    work_root = CACHE / "work" / f"{size}-c{cameras}-f{frames}"
    subprocess.run(["rm", "-rf", str(work_root)], check=True)
    work = work_root / "001" / "EXP-1-head"
    images = cameras * frames
    rows = []

    def measured(stage: str, spec: dict, output_frames: int, outputs: tuple[str, ...], into: Path = work) -> dict:
        print(f"  {size} x {frames} frames: {stage} ...", flush=True)
        result = run_child({**spec, "work": str(into)})
        store = sum(bytes_under(into / part) for part in outputs) if outputs else None
        shown = row(size, frames, cameras, stage, result, output_frames, store)
        print(f"    {shown['seconds']} s, {shown['frames_per_s']} frames/s, {shown['peak_rss_mb']} MB peak"
              + (f"  ERROR {result['error']}" if "error" in result else ""), flush=True)
        return shown

    def stage_row(stage: str, spec: dict, output_frames: int, outputs: tuple[str, ...], into: Path = work) -> None:
        rows.append(measured(stage, spec, output_frames, outputs, into))

    if "ingest" in stages:
        for codec in codecs:
            # The baseline and ingest alternate, so both meet the same machine; noise only ever adds time, so
            # the fastest of each is kept. Each ingest starts from nothing: the codec is a knob, so an existing
            # store would be skipped.
            root = work_root if codec == "zstd" else work_root.with_name(f"{work_root.name}-{codec}")
            name = "ingest" if codec == "zstd" else f"ingest:{codec}"
            best: dict[str, dict] = {}
            for _ in range(repeats):
                subprocess.run(["rm", "-rf", str(root)], check=True)
                base = measured(f"decode+compress:{codec}", {
                    "kind": "decode+compress", "sequence_dir": str(sequence_dir), "frames": frames, "codec": codec,
                    "workers": workers}, images, ())
                base["store_bytes"] = base.pop("compressed_bytes", None)
                ingest = measured(name, {"kind": "ingest", "sequence_dir": str(sequence_dir), "work_root": str(root),
                                         "frames": frames, "codec": codec}, images, STAGE_OUTPUTS["ingest"],
                                  into=root / "001" / "EXP-1-head")
                for shown in (base, ingest):
                    kept = best.get(shown["stage"])
                    if kept is None or (shown["seconds"] or float("inf")) < (kept["seconds"] or float("inf")):
                        best[shown["stage"]] = {**shown, "repeats": repeats}
            rows += list(best.values())
            if root != work_root:
                subprocess.run(["rm", "-rf", str(root)], check=True)
    methods = {**METHODS, **(methods or {})}
    if "calibrate" in stages:
        # provided runs last whatever the order asked: the later stages use the rig's own calibration
        for mode in sorted(methods["calibrate"], key=lambda m: m == "provided"):
            stage_row(f"calibrate:{mode}", {"kind": "calibrate", "mode": mode}, images, STAGE_OUTPUTS["calibrate"])
    if "matte" in stages:
        for method in methods["matte"]:
            stage_row(f"matte:{method}", {"kind": "matte", "method": method}, images, STAGE_OUTPUTS["matte"])
    if "depth" in stages:
        stage_row("depth", {"kind": "depth"}, images, STAGE_OUTPUTS["depth"])
    if "optimize" in stages:
        stage_row("optimize", {"kind": "optimize", "steps": steps}, steps, STAGE_OUTPUTS["optimize"])
        rows[-1]["steps_per_s"] = rows[-1].pop("frames_per_s")
    if "export" in stages:
        stage_row("export", {"kind": "export", "frames": export_frames}, export_frames, STAGE_OUTPUTS["export"])
        rows[-1]["export_frames"] = export_frames
    return rows


# --- fits and extrapolation --------------------------------------------------------------------------------------


def pixels(row_: dict) -> float:
    height, width = parse_size(row_["size"])
    return images(row_) * height * width


def images(row_: dict) -> float:
    if row_["stage"] == "export":
        return float(row_.get("export_frames", EXPORT_FRAMES))
    return float(images_for(row_["stage"], row_["cameras"], row_["frames"]))


def images_for(stage: str, cameras: int, frames: int) -> int:
    """The images a stage works through: every camera's frames, except calibration, which matches a fixed
    number of timesteps spread over the sequence whatever its length."""
    if stage.startswith("calibrate"):
        from stages.calibrate.config import CalibrateConfig

        return cameras * min(frames, CalibrateConfig().timesteps)
    return cameras * frames


def nonnegative_line(design: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0: a term that comes out negative (a noisy row can make a
    per-image term pay back time) is dropped and the rest refitted. Costs are never negative, and with as many
    rows as terms an unconstrained fit would only interpolate the noise."""
    active = [j for j in range(design.shape[1]) if design[:, j].any()]
    while True:
        coef = np.zeros(design.shape[1])
        if active:
            coef[active] = np.linalg.lstsq(design[:, active], y, rcond=None)[0]
        negative = [j for j in active if coef[j] < 0]
        if not negative:
            return coef
        active.remove(min(negative, key=lambda j: coef[j]))


def as_line(coef: np.ndarray) -> dict[str, float]:
    """A fitted cost line's terms by name."""
    return {"fixed_seconds": float(coef[0]), "seconds_per_image": float(coef[1]),
            "seconds_per_megapixel": float(coef[2])}


def line_seconds(line: dict[str, float], count: float, mpx: float) -> float:
    """A cost line's seconds for ``count`` images of ``mpx`` megapixels in all."""
    return max(0.0, line["fixed_seconds"] + line["seconds_per_image"] * count + line["seconds_per_megapixel"] * mpx)


def exponent(mpx: np.ndarray, seconds: np.ndarray) -> float | None:
    """The log-log slope of seconds over pixels: 1 is linear, above 1 grows faster (None from one size)."""
    if len(set(mpx)) < 2:
        return None
    return round(float(np.polyfit(np.log(mpx), np.log(seconds), 1)[0]), 3)


def fit(rows: list[dict]) -> dict[str, dict]:
    """Per stage, least squares: seconds = fixed + per_image * images + per_megapixel * Mpx, as far as the rows
    tell these apart (a per-image term matters where a model works at its own resolution, as rembg does), the
    same line for CPU seconds (what the work costs in core-seconds, which a busy machine disturbs far less), the
    log-log exponent of seconds over pixels, and stored bytes per pixel."""
    fits = {}
    for stage in sorted({r["stage"] for r in rows}):
        good = [r for r in rows if r["stage"] == stage and r.get("seconds")]
        if not good:
            continue
        mpx = np.array([pixels(r) / 1e6 for r in good])
        count = np.array([images(r) for r in good])
        sizes = {r["size"] for r in good}
        if len(sizes) >= 2 and len(set(count)) >= 2 and len(good) >= 3:
            design = np.stack([np.ones_like(mpx), count, mpx], 1)
        elif len(set(mpx)) >= 2:
            design = np.stack([np.ones_like(mpx), np.zeros_like(mpx), mpx], 1)
        else:
            design = np.stack([np.zeros_like(mpx), np.zeros_like(mpx), mpx], 1)
        seconds = np.array([r["seconds"] for r in good])
        coef = nonnegative_line(design, seconds)
        basis = " + ".join(name for name, c in zip(("fixed", "per image", "per pixel"), coef, strict=True) if c > 0)
        if not design[:, 0].any():
            basis = "one size and count measured: proportional to pixels"
        cpu = np.array([r.get("cpu_seconds") or np.nan for r in good])
        cpu_known = not np.isnan(cpu).any()
        stored = [r["store_bytes"] / pixels(r) for r in good if r.get("store_bytes")]
        fits[stage] = {**as_line(coef), "basis": basis,
                       "cpu": as_line(nonnegative_line(design, cpu)) if cpu_known else None,
                       "exponent": exponent(mpx, seconds), "cpu_exponent": exponent(mpx, cpu) if cpu_known else None,
                       "points": len(good),
                       "bytes_per_pixel": float(np.mean(stored)) if stored else None,
                       "peak_rss_mb": max(r["peak_rss_mb"] or 0 for r in good)}
    return fits


def preset_steps() -> int:
    from stages.nersemble.config import preset
    from stages.optimize.config import OptimizeConfig

    return int(preset(OptimizeConfig().preset).train.steps)


def extrapolate(fits: dict[str, dict], rows: list[dict]) -> dict:
    """Hours (and bytes) per stage for a typical sequence and for the archive, from the fitted lines."""
    table = {}
    for stage, f in fits.items():
        if stage.startswith("decode+compress") or stage.startswith("synthesize"):
            continue
        if stage == "optimize":
            runs = [r for r in rows if r["stage"] == "optimize" and r.get("steps_per_s")]
            if not runs:
                continue
            seconds = preset_steps() / float(np.median([r["steps_per_s"] for r in runs]))
            cpu_per_step = [r["cpu_seconds"] / r["steps"] for r in runs if r.get("cpu_seconds") and r.get("steps")]
            cpu_seconds = preset_steps() * float(np.median(cpu_per_step)) if cpu_per_step else None
            note = f"{preset_steps()} steps (the default preset) at the measured steps/s"
            stored = None
        else:
            count = TURNTABLE_FRAMES if stage == "export" else images_for(stage, TYPICAL["cameras"], TYPICAL["frames"])
            mpx = count * TYPICAL["height"] * TYPICAL["width"] / 1e6
            seconds = line_seconds(f, count, mpx)
            cpu_seconds = None if f["cpu"] is None else line_seconds(f["cpu"], count, mpx)
            note = f["basis"]
            stored = None if f["bytes_per_pixel"] is None else f["bytes_per_pixel"] * mpx * 1e6
        table[stage] = {"sequence_hours": seconds / 3600, "archive_hours": seconds * ARCHIVE_SEQUENCES / 3600,
                        "sequence_cpu_hours": None if cpu_seconds is None else cpu_seconds / 3600,
                        "archive_cpu_hours": None if cpu_seconds is None else cpu_seconds * ARCHIVE_SEQUENCES / 3600,
                        "sequence_bytes": stored,
                        "archive_bytes": None if stored is None else stored * ARCHIVE_SEQUENCES, "basis": note}
    return table


def ingest_ratio(rows: list[dict], cpu: bool = False) -> tuple[float | None, dict]:
    """Ingest (zstd) frames/s over decode+compress (zstd) frames/s, per run and for the largest run.

    ``cpu``: the same ratio by CPU seconds (process and children) instead of wall time: what each costs,
    which a machine shared with other work changes far less.
    """
    def rate(r: dict) -> float | None:
        if not cpu:
            return r.get("frames_per_s")
        return images(r) / r["cpu_seconds"] if r.get("cpu_seconds") else None

    ratios = {}
    for r in rows:
        if r["stage"] != "ingest" or not rate(r):
            continue
        base = [b for b in rows if b["stage"] == "decode+compress:zstd" and b["size"] == r["size"]
                and b["frames"] == r["frames"] and rate(b)]
        if base:
            ratios[f"{r['size']}x{r['frames']}"] = (pixels(r), rate(r) / rate(base[0]))
    if not ratios:
        return None, {}
    headline = max(ratios.values())[1]
    return round(headline, 3), {key: round(value, 3) for key, (_, value) in ratios.items()}


# --- output ------------------------------------------------------------------------------------------------------


def _hours(value: float) -> str:
    return f"{value:,.0f} h" if value >= 100 else f"{value:.2f} h" if value >= 0.1 else f"{value * 60:.1f} min"


def _bytes(value: float | None) -> str:
    if value is None:
        return ""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value / 1e3:.1f} kB"


def markdown(result: dict) -> str:
    lines = [f"# Scale benchmark ({result['date']}, {result['machine']})", "",
             f"Command: `{result['command']}`", ""]
    lines += [f"- combines `{c}`" for c in result.get("combined", [])] + ([""] if result.get("combined") else [])
    lines += ["| size (HxW) | frames | stage | seconds | CPU s | frames/s | peak RSS MB | store bytes |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        rate = r.get("frames_per_s") if r.get("frames_per_s") is not None else r.get("steps_per_s")
        flag = " (over 4 GB)" if (r.get("peak_rss_mb") or 0) > MEMORY_GOAL_MB else ""
        lines.append(f"| {r['size']} | {r['frames']} | {r['stage']} | {r['seconds']} | {r.get('cpu_seconds')} | {rate} | "
                     f"{r['peak_rss_mb']}{flag} | {_bytes(r.get('store_bytes'))} |"
                     + (f" error: {r['error']}" if r.get("error") else ""))
    lines += ["", f"Ingest / decode+compress (zstd, same workers): **{result['ingest_vs_decode_compress']}** "
                  f"(per run: {result['ingest_vs_decode_compress_by_run']}); by CPU seconds: "
                  f"{result.get('ingest_vs_decode_compress_cpu')} (per run: "
                  f"{result.get('ingest_vs_decode_compress_cpu_by_run')})", "",
              "## Fitted cost", "",
              "| stage | s per Mpx | s per image | fixed s | exponent | CPU exponent | bytes per px | peak RSS MB | basis |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for stage, f in result["fits"].items():
        bpp = "" if f["bytes_per_pixel"] is None else f"{f['bytes_per_pixel']:.3f}"
        lines.append(f"| {stage} | {f['seconds_per_megapixel']:.4f} | {f['seconds_per_image']:.4f} | "
                     f"{f['fixed_seconds']:.2f} | {f['exponent']} | {f['cpu_exponent']} | {bpp} | {f['peak_rss_mb']} | {f['basis']} |")
    typical = TYPICAL
    lines += ["", f"## Extrapolated: one sequence ({typical['cameras']} x {typical['frames']} frames at "
                  f"{typical['height']}x{typical['width']}) and the archive ({ARCHIVE_SEQUENCES} sequences)", "",
              "Hours on this machine (wall), and core-hours (CPU time: what the work costs whatever the core count).",
              "",
              "| stage | per sequence | archive | core-hours per sequence | archive core-hours | bytes per sequence "
              "| archive bytes | basis |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for stage, e in result["extrapolated"].items():
        cpu = e.get("sequence_cpu_hours")
        lines.append(f"| {stage} | {_hours(e['sequence_hours'])} | {_hours(e['archive_hours'])} | "
                     f"{'' if cpu is None else _hours(cpu)} | "
                     f"{'' if cpu is None else _hours(e['archive_cpu_hours'])} | "
                     f"{_bytes(e['sequence_bytes'])} | {_bytes(e['archive_bytes'])} | {e['basis']} |")
    lines += ["", "Synthesis (not a pipeline stage, cached): " + ", ".join(
        f"{s['height']}x{s['width']} x {s['frames']} frames {s['seconds']} s" for s in result["synthesis"]), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1604x1100,802x550", help="frame sizes HxW, comma-separated")
    parser.add_argument("--frames", default="24,73", help="frames per camera, comma-separated")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"of {','.join(STAGES)}")
    parser.add_argument("--cameras", type=int, default=16)
    parser.add_argument("--codecs", default=",".join(CODECS), help="ingest codecs to compare (zstd always runs)")
    parser.add_argument("--steps", type=int, default=300, help="optimize steps measured")
    parser.add_argument("--export-frames", type=int, default=EXPORT_FRAMES,
                        help="turntable frames rendered by export (its cost is per rendered pixel)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="ingest and its baseline alternate this many times; the fastest of each is kept")
    parser.add_argument("--workers", type=int, default=0, help="decoders for the baseline; 0: as ingest chooses")
    parser.add_argument("--distinct-frames", type=int, default=6,
                        help="poses rendered per camera, looped over the frames (cost does not depend on the pose)")
    parser.add_argument("--matte", default=",".join(METHODS["matte"]), help="matte methods measured")
    parser.add_argument("--calibrate", default=",".join(METHODS["calibrate"]), help="calibrate modes measured")
    parser.add_argument("--combine", nargs="+", metavar="JSON",
                        help="merge the rows of these earlier runs into --out (nothing is measured); where two "
                             "runs measured the same size, frames and stage, the later one is kept")
    parser.add_argument("--out", default=str(RESULTS / "scale.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(json.loads(args.child))
        return
    command = "benchmarks/scale.py " + " ".join(sys.argv[1:])
    if args.combine:
        runs = [json.loads(Path(path).read_text()) for path in args.combine]
        rows = {(r["size"], r["frames"], r["stage"]): r for run in runs for r in run["rows"]}  # later runs win
        synthesis = {(s["height"], s["width"], s["frames"]): s for run in runs for s in run["synthesis"]}
        write_result(list(rows.values()), list(synthesis.values()), command, Path(args.out),
                     combined=[run["command"] for run in runs])
        return

    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    frame_counts = sorted(int(f) for f in args.frames.split(",") if f)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"--stages: unknown {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    methods = {"matte": tuple(m for m in args.matte.split(",") if m),
               "calibrate": tuple(m for m in args.calibrate.split(",") if m)}
    for stage, chosen in methods.items():
        if any(m not in METHODS[stage] for m in chosen):
            raise SystemExit(f"--{stage}: choose from {', '.join(METHODS[stage])}, got {','.join(chosen)}")
    codecs = sorted({*args.codecs.split(","), "zstd"}, key=CODECS.index)
    workers = args.workers or min(args.cameras, os.cpu_count() or 1)

    rows, synthesis = [], []
    for height, width in sizes:
        height, width = even(height), even(width)
        sequence_dir, info = cached_capture(height, width, args.cameras, max(frame_counts), args.distinct_frames)
        synthesis.append(info)
        for frames in frame_counts:
            rows += measure(sequence_dir, height, width, args.cameras, frames, stages, codecs, args.steps, workers,
                            args.repeats, methods, args.export_frames)
            write_result(rows, synthesis, command, Path(args.out), quiet=True)  # an interrupted run keeps its rows
    write_result(rows, synthesis, command, Path(args.out))


def write_result(rows: list[dict], synthesis: list[dict], command: str, out: Path,
                 combined: list[str] | None = None, quiet: bool = False) -> None:
    """Fit, extrapolate and write the JSON and markdown of these rows."""
    fits = fit(rows)
    ratio, by_run = ingest_ratio(rows)
    cpu_ratio, cpu_by_run = ingest_ratio(rows, cpu=True)
    try:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        device = "cpu"
    result = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, {device}",
              "command": command, "rows": rows,
              "ingest_vs_decode_compress": ratio, "ingest_vs_decode_compress_by_run": by_run,
              "ingest_vs_decode_compress_cpu": cpu_ratio, "ingest_vs_decode_compress_cpu_by_run": cpu_by_run,
              "fits": fits,
              "extrapolated": extrapolate(fits, rows), "synthesis": synthesis, "typical_sequence": TYPICAL,
              "archive_sequences": ARCHIVE_SEQUENCES}
    if combined:
        result["combined"] = combined
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    if not quiet:
        print(markdown(result))


if __name__ == "__main__":
    main()
