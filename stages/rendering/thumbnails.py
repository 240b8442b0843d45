"""Small pictures for the Prefect UI: thumbnails of the previews and a strip of turntable frames as data URIs.

The UI renders markdown images only from URLs the browser can fetch; a studio's work folder is not one, but a
``data:`` URI is part of the artifact itself. Artifacts live in the server's database, so each picture is a
thumbnail: at most ``MAX_WIDTH`` wide, JPEG for photographs and PNG for line plots (JPEG smears thin lines).
"""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

import cv2
import numpy as np

from stages.core.video import iter_frames, probe_video
from storage import SequenceWorkDir

MAX_WIDTH = 720  # wide enough to read a contact sheet's labels on the artifact page, small enough to store
MAX_HEIGHT = 900
JPEG_QUALITY = 80
STRIP_FRAMES = 6
STRIP_HEIGHT = 150


def _fit(image: np.ndarray, max_width: int = MAX_WIDTH, max_height: int = MAX_HEIGHT) -> np.ndarray:
    """Downscaled (area averaging) to fit the box; never upscaled."""
    height, width = image.shape[:2]
    scale = min(1.0, max_width / width, max_height / height)
    if scale >= 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def data_uri(rgb: np.ndarray, photo: bool = True, max_width: int = MAX_WIDTH) -> str:
    """An RGB uint8 image (downscaled to a thumbnail) as a ``data:image/jpeg`` or ``data:image/png`` URI."""
    bgr = np.ascontiguousarray(_fit(rgb, max_width=max_width)[..., ::-1])
    if photo:
        ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        mime = "image/jpeg"
    else:
        ok, data = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 9])
        mime = "image/png"
    if not ok:
        raise ValueError("could not encode the thumbnail")
    return f"data:{mime};base64,{base64.b64encode(data.tobytes()).decode('ascii')}"


def decode_image(data: bytes) -> np.ndarray:
    """PNG or JPEG bytes -> RGB uint8 (alpha composited on white, as the sheets are meant to be seen)."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError("not a PNG or JPEG image")
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.dtype != np.uint8:  # 16-bit PNGs: keep the top byte
        image = (image >> 8).astype(np.uint8)
    if image.shape[2] == 4:
        alpha = image[..., 3:].astype(np.float32) / 255.0
        image = (image[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(image[..., ::-1])


def image_file_uri(work: SequenceWorkDir, rel_path: str, photo: bool = True) -> str | None:
    """A thumbnail of an image file inside the work folder, or None when the file is not there."""
    data = work.read_bytes(rel_path)
    return None if data is None else data_uri(decode_image(data), photo=photo)


def _local_copy(work: SequenceWorkDir, rel_path: str, folder: str) -> Path | None:
    """A path ffmpeg can open: the file itself on local disks, else a copy in ``folder``."""
    if work.is_local:
        path = Path(work.path(*rel_path.split("/")))
        return path if path.is_file() else None
    data = work.read_bytes(rel_path)
    if data is None:
        return None
    path = Path(folder) / Path(rel_path).name
    path.write_bytes(data)
    return path


def video_strip(path: str | Path, frames: int = STRIP_FRAMES, height: int = STRIP_HEIGHT) -> np.ndarray:
    """``frames`` frames spread over the video, each ``height`` pixels tall, side by side."""
    info = probe_video(path)
    total = info.estimated_frames or frames
    stride = max(1, total // frames)
    width = max(2, round(info.width * height / info.height)) // 2 * 2
    tiles = list(iter_frames(path, start=stride // 2, stride=stride, count=frames, size=(width, height)))
    if not tiles:
        raise ValueError(f"{path}: no frames decoded")
    return np.concatenate(tiles, axis=1)


def video_strip_uri(work: SequenceWorkDir, rel_path: str) -> str | None:
    """A strip of frames of a video inside the work folder as a JPEG data URI, or None when it is missing."""
    with tempfile.TemporaryDirectory(prefix="strip-") as folder:
        path = _local_copy(work, rel_path, folder)
        if path is None:
            return None
        strip = video_strip(path)
    return data_uri(strip, max_width=STRIP_FRAMES * 200)


def markdown_image(alt: str, uri: str) -> str:
    return f"![{alt}]({uri})"
