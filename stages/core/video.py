"""Video I/O through ffmpeg-python and the ffmpeg binary that imageio-ffmpeg ships.

Frames stream through a pipe, so memory stays at a few frames whatever the video's length. No ffprobe is
shipped, so stream facts come from ``ffmpeg -i`` and frame counts from decoding, never from metadata.
"""

from __future__ import annotations

import re
import subprocess
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import ffmpeg
import numpy as np

from stages.core.errors import VideoError

_STREAM_LINE = re.compile(r"Stream #\d+:\d+.*?: Video: (?P<codec>\w+).*?, (?P<w>\d{2,5})x(?P<h>\d{2,5})")
_FPS = re.compile(r"(?P<fps>\d+(?:\.\d+)?) (?:fps|tbr)")
_DURATION = re.compile(r"Duration: (?P<h>\d+):(?P<m>\d+):(?P<s>\d+(?:\.\d+)?)")


@cache
def ffmpeg_exe() -> str:
    """Path of the bundled static ffmpeg (libx264 included); nothing is needed on PATH."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


@dataclass(frozen=True)
class VideoInfo:
    path: str
    width: int
    height: int
    fps: float
    codec: str
    duration: float | None = None  # seconds, from the container: a hint for sizing, never a frame count

    @property
    def estimated_frames(self) -> int | None:
        return round(self.duration * self.fps) if self.duration and self.fps else None


def probe_video(path: str | Path) -> VideoInfo:
    """Size, frame rate and codec of the first video stream, parsed from ``ffmpeg -i``."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: video file not found")
    result = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)], capture_output=True, text=True, errors="replace"
    )
    duration_match = _DURATION.search(result.stderr)
    duration = None
    if duration_match:
        duration = int(duration_match["h"]) * 3600 + int(duration_match["m"]) * 60 + float(duration_match["s"])
    for line in result.stderr.splitlines():
        match = _STREAM_LINE.search(line)
        if match:
            fps_match = _FPS.search(line)
            return VideoInfo(
                path=str(path),
                width=int(match["w"]),
                height=int(match["h"]),
                fps=float(fps_match["fps"]) if fps_match else 0.0,
                codec=match["codec"],
                duration=duration,
            )
    reason = _last_lines(result.stderr) or "no video stream found"
    raise VideoError(f"{path}: cannot read video ({reason})")


def _last_lines(text: str, n: int = 3) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:])


class _StderrCollector(threading.Thread):
    """Drains ffmpeg's stderr so a chatty decoder can never block on a full pipe."""

    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self._stream = stream
        self.text = ""

    def run(self) -> None:
        self.text = self._stream.read().decode(errors="replace")


def _select_filter(start: int, stride: int) -> str | None:
    terms = []
    if start > 0:
        terms.append(f"gte(n,{start})")
    if stride > 1:
        terms.append(f"not(mod(n-{start},{stride}))")
    return "*".join(terms) or None


def iter_frames(
    path: str | Path,
    *,
    start: int = 0,
    count: int | None = None,
    stride: int = 1,
    size: tuple[int, int] | None = None,
    threads: int = 0,
    info: VideoInfo | None = None,
) -> Iterator[np.ndarray]:
    """Decode frames ``start, start+stride, ...`` (at most ``count``) as (H, W, 3) RGB uint8.

    ``size`` = (width, height) resamples in ffmpeg with area averaging, which keeps pixel centres where a
    K rescale expects them. Frame selection also happens inside ffmpeg, so skipped frames never cross the
    pipe. A truncated or corrupt file raises :class:`VideoError` after the frames that did decode.
    """
    if start < 0 or stride < 1 or (count is not None and count < 0):
        raise ValueError(f"invalid frame range: start={start}, count={count}, stride={stride}")
    info = info or probe_video(path)
    width, height = size or (info.width, info.height)
    stream = ffmpeg.input(str(path), threads=threads)
    select = _select_filter(start, stride)
    if select:
        stream = stream.filter("select", select)
    if size:
        stream = stream.filter("scale", width, height, flags="area")
    output_args: dict = {"format": "rawvideo", "pix_fmt": "rgb24", "fps_mode": "passthrough"}
    if count is not None:
        output_args["frames:v"] = count
    args = stream.output("pipe:", **output_args).global_args("-nostdin", "-v", "error").compile(cmd=ffmpeg_exe())
    if count == 0:
        return
    frame_bytes = width * height * 3
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    collector = _StderrCollector(process.stderr)
    collector.start()
    finished = False
    try:
        while True:
            buffer = process.stdout.read(frame_bytes)
            if len(buffer) < frame_bytes:
                break
            yield np.frombuffer(buffer, dtype=np.uint8).reshape(height, width, 3)
        finished = True
    finally:
        if not finished:  # the consumer stopped early: no need to decode the rest
            process.kill()
        process.stdout.close()
        returncode = process.wait()
        collector.join()
    if returncode != 0 or collector.text.strip() or len(buffer) not in (0, frame_bytes):
        raise VideoError(f"{path}: video is truncated or corrupt ({_last_lines(collector.text) or f'exit {returncode}'})")


def count_frames(path: str | Path) -> int:
    """Number of frames, by decoding the whole stream (container metadata can be wrong)."""
    probe_video(path)  # a clear error for a missing or unreadable file
    args = [ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path), "-map", "0:v:0"]
    args += ["-f", "null", "-progress", "pipe:1", "-nostats", "-"]
    result = subprocess.run(args, capture_output=True, text=True, errors="replace")
    frames = re.findall(r"^frame=(\d+)", result.stdout, flags=re.MULTILINE)
    if result.returncode != 0 or result.stderr.strip() or not frames:
        raise VideoError(f"{path}: video is truncated or corrupt ({_last_lines(result.stderr) or 'no frames'})")
    return int(frames[-1])


class VideoWriter:
    """Streams RGB uint8 frames into an H.264 (libx264, yuv420p) mp4.

    yuv420p needs even sizes; odd sizes are padded by repeating the last column/row, so the decoded
    video is at most one pixel larger and the original image is its top-left corner.
    """

    def __init__(self, path: str | Path, *, width: int, height: int, fps: float, crf: int = 18,
                 preset: str = "medium") -> None:
        self.path, self.width, self.height = Path(path), width, height
        self.frames_written = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._pad = (height % 2, width % 2)
        padded_size = f"{width + self._pad[1]}x{height + self._pad[0]}"
        stream = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=padded_size, r=fps)
        args = (
            stream.output(str(self.path), vcodec="libx264", pix_fmt="yuv420p", crf=crf, preset=preset,
                          movflags="+faststart")
            .global_args("-nostdin", "-v", "error", "-y")
            .compile(cmd=ffmpeg_exe())
        )
        self._process = subprocess.Popen(args, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        self._stderr = _StderrCollector(self._process.stderr)
        self._stderr.start()

    def write(self, frame: np.ndarray) -> None:
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise ValueError(f"{self.path}: expected ({self.height}, {self.width}, 3) uint8, got {frame.shape} {frame.dtype}")
        if any(self._pad):
            frame = np.pad(frame, ((0, self._pad[0]), (0, self._pad[1]), (0, 0)), mode="edge")
        try:
            self._process.stdin.write(np.ascontiguousarray(frame).tobytes())
        except BrokenPipeError:
            self._process.wait()
            self._stderr.join()
            raise VideoError(f"{self.path}: encoder stopped ({_last_lines(self._stderr.text)})") from None
        self.frames_written += 1

    def close(self) -> None:
        if self._process.stdin.closed:
            return
        self._process.stdin.close()
        returncode = self._process.wait()
        self._stderr.join()
        if returncode != 0:
            raise VideoError(f"{self.path}: encoding failed ({_last_lines(self._stderr.text)})")

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def encode_video(path: str | Path, frames: Iterable[np.ndarray], fps: float, crf: int = 18,
                 preset: str = "medium") -> int:
    """Encode an iterable of (H, W, 3) uint8 frames; returns the number of frames written."""
    writer: VideoWriter | None = None
    try:
        for frame in frames:
            if writer is None:
                writer = VideoWriter(path, width=frame.shape[1], height=frame.shape[0], fps=fps, crf=crf, preset=preset)
            writer.write(frame)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise VideoError(f"{path}: no frames to encode")
    return writer.frames_written
