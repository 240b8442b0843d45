"""COLMAP PatchMatch stereo for one timestep, where pycolmap is a CUDA build.

PatchMatch estimates depth and normal per pixel (slanted windows, photometric and geometric consistency),
which is what the original NeRSemble depth maps came from. COLMAP only runs it on CUDA, so this path is
chosen only where ``pycolmap.has_cuda``; elsewhere the torch sweep does the job.

A timestep becomes a throw-away dense COLMAP workspace: the frames as images, a model with the store's
cameras (pinhole, so nothing to undistort) and poses but no points, and a ``patch-match.cfg`` that names
each image's sources, because COLMAP's automatic choice needs sparse points we do not have. The geometric
(consistency-filtered) depth maps are read back as z-depth in metres.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from stages.core.errors import PipelineError
from stages.geometry.views import Views


class ColmapUnavailableError(PipelineError):
    """COLMAP PatchMatch was asked for where pycolmap cannot run it."""


def colmap_has_cuda() -> bool:
    """True where pycolmap is importable and built with CUDA (PatchMatch stereo needs it)."""
    try:
        import pycolmap
    except ImportError:
        return False
    return bool(getattr(pycolmap, "has_cuda", False))


def require_colmap() -> None:
    """Raise a clear error unless PatchMatch stereo can run here."""
    if not colmap_has_cuda():
        raise ColmapUnavailableError(
            "depth --method colmap needs a CUDA build of pycolmap (pycolmap.has_cuda is False here); "
            "use --method sweep (the torch plane sweep, CPU or CUDA) or --method auto")


@dataclass(frozen=True)
class PatchMatchSettings:
    """The depth config's values that COLMAP's PatchMatch options take."""

    window: int
    min_consistent_views: int
    min_ncc: float
    depth_min: float
    depth_max: float
    gpu_index: int = -1


def image_name(serial: str) -> str:
    return f"cam_{serial}.png"


def read_colmap_array(path: str | Path) -> np.ndarray:
    """A COLMAP dense ``.bin`` map: text header ``width&height&channels&`` then float32, column-major."""
    data = Path(path).read_bytes()
    fields, offset = [], 0
    for _ in range(3):
        end = data.index(b"&", offset)
        fields.append(int(data[offset:end]))
        offset = end + 1
    width, height, channels = fields
    values = np.frombuffer(data, dtype="<f4", offset=offset, count=width * height * channels)
    array = values.reshape((width, height, channels), order="F").transpose(1, 0, 2)
    return array[..., 0] if channels == 1 else array


def write_colmap_array(path: str | Path, array: np.ndarray) -> None:
    """The inverse of :func:`read_colmap_array` (for tests and for seeding COLMAP with maps)."""
    array = np.asarray(array, dtype="<f4")
    if array.ndim == 2:
        array = array[..., None]
    height, width, channels = array.shape
    header = f"{width}&{height}&{channels}&".encode()
    Path(path).write_bytes(header + array.transpose(1, 0, 2).reshape(-1, order="F").tobytes())


def _reconstruction(views: Views):  # noqa: ANN202 - pycolmap.Reconstruction, imported lazily
    """A model holding the store's cameras (PINHOLE, K for the stored size) and poses, without points."""
    import pycolmap

    reconstruction = pycolmap.Reconstruction()
    for index, serial in enumerate(views.serials):
        K = views.K[index]
        camera = pycolmap.Camera(model="PINHOLE", width=views.width, height=views.height,
                                 params=[K[0, 0], K[1, 1], K[0, 2], K[1, 2]], camera_id=index + 1)
        reconstruction.add_camera_with_trivial_rig(camera)
        image = pycolmap.Image(name=image_name(serial), camera_id=index + 1, image_id=index + 1)
        reconstruction.add_image_with_trivial_frame(image, pycolmap.Rigid3d(views.world_2_cam[index][:3, :4]))
    return reconstruction


def write_patch_match_config(path: Path, views: Views, sources: dict[int, list[int]]) -> None:
    """``patch-match.cfg``: each reference image followed by its source images (ours, by viewing angle)."""
    lines = []
    for ref, srcs in sources.items():
        if srcs:
            lines += [image_name(views.serials[ref]), ", ".join(image_name(views.serials[s]) for s in srcs)]
    path.write_text("\n".join(lines) + "\n")


def prepare_workspace(root: Path, views: Views, frames: np.ndarray, sources: dict[int, list[int]]) -> Path:
    """Lay out a dense COLMAP workspace for one timestep's (C, H, W, 3) RGB frames; returns its path.

    This is the layout COLMAP's undistorter writes, made directly: the undistorter would resample the frames
    to a slightly different K even for distortion-free pinhole cameras, and the depth maps would not line up
    with the store's pixels.
    """
    images, sparse, stereo = root / "images", root / "sparse", root / "stereo"
    for folder in (images, sparse, stereo / "depth_maps", stereo / "normal_maps", stereo / "consistency_graphs"):
        folder.mkdir(parents=True, exist_ok=True)
    for index, serial in enumerate(views.serials):
        cv2.imwrite(str(images / image_name(serial)), np.ascontiguousarray(frames[index][..., ::-1]))
    _reconstruction(views).write(str(sparse))
    write_patch_match_config(stereo / "patch-match.cfg", views, sources)
    (stereo / "fusion.cfg").write_text("".join(f"{image_name(s)}\n" for s in views.serials))
    return root


def _options(settings: PatchMatchSettings):  # noqa: ANN202 - pycolmap.PatchMatchOptions
    import pycolmap

    options = pycolmap.PatchMatchOptions()
    options.window_radius = settings.window // 2
    options.depth_min = settings.depth_min
    options.depth_max = settings.depth_max
    options.geom_consistency = True
    options.filter = True
    options.filter_min_ncc = settings.min_ncc
    options.filter_min_num_consistent = settings.min_consistent_views
    options.gpu_index = str(settings.gpu_index)
    return options


def read_depth_maps(dense: Path, views: Views) -> np.ndarray:
    """(C, H, W) geometric depth maps from a finished workspace; a missing map is all invalid."""
    out = np.zeros((views.count, views.height, views.width), np.float32)
    for index, serial in enumerate(views.serials):
        path = dense / "stereo" / "depth_maps" / f"{image_name(serial)}.geometric.bin"
        if not path.is_file():
            continue
        depth = read_colmap_array(path)
        if depth.shape != (views.height, views.width):
            raise PipelineError(f"{path}: COLMAP wrote a {depth.shape[1]}x{depth.shape[0]} depth map for "
                                f"{views.width}x{views.height} frames (was max_image_size set?)")
        out[index] = np.where(np.isfinite(depth) & (depth > 0), depth, 0)
    return out


def patch_match_timestep(views: Views, frames: np.ndarray, sources: dict[int, list[int]],
                         settings: PatchMatchSettings, scratch: str | None = None) -> np.ndarray:
    """(C, H, W) z-depth in metres (0 = invalid) of one timestep by COLMAP PatchMatch + geometric filtering."""
    import pycolmap

    require_colmap()
    with tempfile.TemporaryDirectory(prefix="depth-colmap-", dir=scratch) as root:
        dense = prepare_workspace(Path(root), views, frames, sources)
        pycolmap.patch_match_stereo(str(dense), workspace_format="COLMAP", pmvs_option_name="option-all",
                                    options=_options(settings))
        return read_depth_maps(dense, views)
