"""Checks of a capture's rig, calibration and frame size that ingest runs before it writes anything.

A capture from another studio can be wrong in ways that only show hours later (a calibration for the full-size
frames beside half-size videos, cameras that do not look at the subject, frames too large for the workers'
memory). Each check here turns one of those into an error that names the camera and the value.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from stages.core.cameras import CameraParams, camera_center, project
from stages.core.errors import CaptureLayoutError

MIN_CAMERAS = 2  # multi-view reconstruction needs two views of every point
OFF_CENTRE = 0.3  # principal point further than this fraction of the frame from its centre: K is for another size
FRAMES_IN_FLIGHT = 12  # per decoder: the pipe, the frame read, its colour-corrected copy and
#                        its encoded chunk here, and ffmpeg's own decode and resize buffers in its process
ASPECT_TOLERANCE = 0.01  # relative: rounding of odd sizes, not a crop or a swap
MEMORY_SHARE = 0.8  # of the available memory ingest may plan to use: the OS and other processes keep the rest
MAX_CHUNK_BYTES = 2**31 - 1  # one frame is one chunk; compressors take at most 2 GiB per buffer


class RigError(CaptureLayoutError):
    """The rig cannot give a reconstruction (too few cameras that see the subject)."""


class FrameSizeError(CaptureLayoutError):
    """A frame does not fit the chunking or the memory ingest would need."""


def check_calibration_size(calibrated_for: tuple[int, int], source_size: tuple[int, int], serial: str,
                           video: Path) -> None:
    """Refuse a ``--calibration-size`` with another aspect ratio than the videos (width and height swapped, or
    a crop): rescaling K to the videos would stretch it unevenly and every ray would be off."""
    (cal_w, cal_h), (width, height) = calibrated_for, source_size
    if abs(cal_w / cal_h - width / height) > ASPECT_TOLERANCE * width / height:
        swapped = " (width and height swapped?)" if abs(cal_h / cal_w - width / height) <= 0.01 * width / height else ""
        raise CaptureLayoutError(
            f"--calibration-size {cal_w} {cal_h}: the calibration's frames have another aspect ratio than the videos "
            f"(camera {serial}, {video}, is {width}x{height}){swapped}; give the size as WIDTH HEIGHT of the frames "
            "the calibration was made for")


def check_principal_points(calibration: CameraParams, serials: list[str], calibrated_for: tuple[int, int],
                           path: Path | None) -> None:
    """Refuse a K whose principal point is far from the centre of the frames it is said to be for.

    The calibration file carries no image size, so a K for full-size frames beside downscaled videos shows
    only here: its principal point lies near or past the videos' far corner.
    """
    width, height = calibrated_for
    for serial in serials:
        cx, cy = calibration.intrinsics[serial][:2, 2]
        if abs(cx / width - 0.5) > OFF_CENTRE or abs(cy / height - 0.5) > OFF_CENTRE:
            guess = f"{2 * cx:.0f}x{2 * cy:.0f}"
            raise CaptureLayoutError(
                f"{path or 'calibration'}: camera {serial}'s principal point ({cx:.1f}, {cy:.1f}) is far from the "
                f"centre of {width}x{height} frames, so its K is for another image size (about {guess}?); pass "
                f"--calibration-size W H with the size the calibration was made for")


def subject_point(calibration: CameraParams, serials: list[str]) -> np.ndarray:
    """The point closest to every camera's optical axis (least squares): where the rig looks."""
    rows, rhs = [], []
    for serial in serials:
        world_2_cam = np.asarray(calibration.world_2_cam[serial], dtype=np.float64)
        centre, axis = camera_center(world_2_cam), world_2_cam[2, :3]  # the camera's z axis in world coordinates
        projector = np.eye(3) - np.outer(axis, axis)  # distance to the axis, perpendicular to it
        rows.append(projector)
        rhs.append(projector @ centre)
    point, *_ = np.linalg.lstsq(np.concatenate(rows), np.concatenate(rhs), rcond=None)
    return point


def check_cameras_see_subject(calibration: CameraParams | None, serials: list[str], calibrated_for: tuple[int, int],
                              warnings: list[str]) -> None:
    """At least two cameras, and at least two whose view holds the point the rig looks at."""
    if len(serials) < MIN_CAMERAS:
        raise RigError(f"a rig needs at least {MIN_CAMERAS} cameras that see the subject; this capture has "
                       f"{len(serials)} ({', '.join(f'camera {s}' for s in serials) or 'none'})")
    if calibration is None:
        return
    point = subject_point(calibration, serials)
    width, height = calibrated_for
    blind = {}
    for serial in serials:
        uv, z = project(point, calibration.intrinsics[serial], calibration.world_2_cam[serial])
        if not (z > 0 and 0 <= uv[0] < width and 0 <= uv[1] < height):
            blind[serial] = "behind it" if z <= 0 else f"at pixel ({uv[0]:.0f}, {uv[1]:.0f})"
    seeing = len(serials) - len(blind)
    if seeing < MIN_CAMERAS:
        where = "; ".join(f"camera {s}: {text}" for s, text in blind.items())
        raise RigError(f"only {seeing} of {len(serials)} cameras see the point the rig looks at "
                       f"({point[0]:.2f}, {point[1]:.2f}, {point[2]:.2f}) in {width}x{height} frames, at least "
                       f"{MIN_CAMERAS} must; {where}")
    if blind:
        warnings.append(f"{len(blind)}/{len(serials)} cameras do not see the point the rig looks at: "
                        + "; ".join(f"camera {s} {text}" for s, text in blind.items()))


def available_memory() -> int | None:
    """Bytes this process may still use: the smaller of the machine's available memory and a cgroup limit."""
    limits = []
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            limits.append(int(text))
    if not limits and hasattr(os, "sysconf"):
        try:
            limits.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    return min(limits) if limits else None


def check_frame_memory(serial: str, source_size: tuple[int, int], size: tuple[int, int], workers: int,
                       available: int | None = None) -> int:
    """Refuse frames that cannot be one chunk, or whose in-flight copies would not fit memory; returns the need."""
    frame_bytes = max(source_size[0] * source_size[1], size[0] * size[1]) * 3
    if size[0] * size[1] * 3 > MAX_CHUNK_BYTES:
        raise FrameSizeError(f"camera {serial}: a stored frame of {size[0]}x{size[1]} is "
                             f"{size[0] * size[1] * 3 / 2**30:.1f} GiB, more than one chunk can hold "
                             f"({MAX_CHUNK_BYTES / 2**30:.0f} GiB); ingest with --downscale")
    need = workers * FRAMES_IN_FLIGHT * frame_bytes
    available = available_memory() if available is None else available
    if available is not None and need > MEMORY_SHARE * available:
        raise FrameSizeError(
            f"camera {serial}: frames of {source_size[0]}x{source_size[1]} ({frame_bytes / 2**20:.0f} MiB each) "
            f"with {workers} decoders need about {need / 2**30:.1f} GiB, but only {available / 2**30:.1f} GiB is "
            "available; lower --workers or ingest with --downscale")
    return need
