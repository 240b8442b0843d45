"""pycolmap for the calibrate stage: features over several timesteps, one COLMAP image per camera.

The rig is fixed, so a camera has one pose for the whole sequence. Every selected timestep of a camera is
exported and gets SIFT features; images are matched only against the other cameras *at the same
timestep* (the head moves between timesteps, the cameras do not). The features of all timesteps of a
camera are then merged into a single COLMAP image (keypoints concatenated, matches offset), so COLMAP
sees one image per camera with the matches of every timestep: one pose and one set of intrinsics per
camera, many more correspondences than any one timestep has, and the epipolar geometry of each camera
pair verified against all of them at once. Tracks never join two timesteps, so the moving head is fine.

Everything here runs in a temporary folder of PNGs and SQLite databases; the caller removes it.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2  # before pycolmap: the other import order crashes cv2.imwrite (a zlib clash)
import numpy as np
import pycolmap

from stages.calibrate.geometry import Similarity
from storage import CaptureStore


def image_name(serial: str) -> str:
    """The COLMAP image that stands for one camera (all its timesteps)."""
    return f"cam_{serial}.png"


def serial_of(name: str) -> str:
    return name.removeprefix("cam_").removesuffix(".png")


@contextlib.contextmanager
def quiet_colmap(level: int = 1) -> Iterator[None]:
    """COLMAP logs every image and iteration at INFO; keep warnings and errors only while we run.

    pycolmap 4.2.1 honours this for extraction, matching and mapping, but its bundle adjustment and point
    triangulation still print a few INFO lines.
    """
    previous = pycolmap.logging.minloglevel
    pycolmap.logging.minloglevel = level
    try:
        yield
    finally:
        pycolmap.logging.minloglevel = previous


class Timer:
    """Seconds per phase, in the order the phases ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


# --- intrinsics as COLMAP sees them ------------------------------------------------------------------


@dataclass(frozen=True)
class CameraSetup:
    """Starting intrinsics per camera, and whether COLMAP may change the focal length.

    A fixed K goes in as PINHOLE (fx, fy kept exactly). A refined focal length goes in as SIMPLE_PINHOLE:
    letting PINHOLE's fx and fy move independently on a small rig converges to a wrong, low-residual
    solution (install-facts.md). The principal point is never refined; it is poorly constrained by a rig of
    narrow-field cameras looking at one subject.
    """

    intrinsics: dict[str, np.ndarray]
    refine_focal: bool
    shared: bool
    has_prior: bool  # the starting focal length came from a calibration, not a guess

    def colmap_camera(self, serial: str, width: int, height: int) -> pycolmap.Camera:
        K = self.intrinsics[serial]
        if self.refine_focal:
            camera = pycolmap.Camera(model="SIMPLE_PINHOLE", width=width, height=height,
                                     params=[float(np.sqrt(K[0, 0] * K[1, 1])), K[0, 2], K[1, 2]])
        else:
            camera = pycolmap.Camera(model="PINHOLE", width=width, height=height,
                                     params=[K[0, 0], K[1, 1], K[0, 2], K[1, 2]])
        camera.has_prior_focal_length = self.has_prior
        return camera


# --- export, extract, match ---------------------------------------------------------------------------


@dataclass
class Workspace:
    """The temporary COLMAP folder: PNGs per (camera, timestep), the per-timestep and the per-camera databases."""

    root: Path
    cameras: list[str]
    timesteps: list[int]
    use_masks: bool = False

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def masks(self) -> Path:
        return self.root / "masks"

    @property
    def scratch_db(self) -> Path:
        return self.root / "timesteps.db"

    @property
    def db(self) -> Path:
        return self.root / "cameras.db"

    def frame_name(self, serial: str, t: int) -> str:
        return f"{serial}/{t:06d}.png"

    def names(self) -> list[str]:
        return [self.frame_name(s, t) for s in self.cameras for t in self.timesteps]


def export_frames(store: CaptureStore, workspace: Workspace, erode_px: int = 3) -> None:
    """Write the selected frames (and masks, when used) as PNG; COLMAP reads images from files only.

    The first selected frame is also written as the per-camera image ``cam_<serial>.png``, which COLMAP
    reads for point colours. Masks are eroded so that features on the silhouette (where foreground and
    background mix) are dropped.
    """
    kernel = np.ones((2 * erode_px + 1, 2 * erode_px + 1), np.uint8) if erode_px > 0 else None
    for serial in workspace.cameras:
        index = store.camera_index(serial)
        (workspace.images / serial).mkdir(parents=True, exist_ok=True)
        if workspace.use_masks:
            (workspace.masks / serial).mkdir(parents=True, exist_ok=True)
        for t in workspace.timesteps:
            name = workspace.frame_name(serial, t)
            bgr = np.ascontiguousarray(store.read_frame(index, t)[..., ::-1])
            cv2.imwrite(str(workspace.images / name), bgr)
            if t == workspace.timesteps[0]:
                cv2.imwrite(str(workspace.images / image_name(serial)), bgr)
            if workspace.use_masks:
                mask = np.where(np.asarray(store.alpha[index, t]) >= 128, 255, 0).astype(np.uint8)
                if kernel is not None:
                    mask = cv2.erode(mask, kernel)
                cv2.imwrite(str(workspace.masks / f"{name}.png"), mask)  # COLMAP's rule: <mask_path>/<image name>.png


def extract_features(workspace: Workspace, threads: int, max_features: int) -> None:
    """SIFT on the CPU for every exported frame (learned extractors abort the CPU wheel)."""
    options = pycolmap.FeatureExtractionOptions()
    options.type = pycolmap.FeatureExtractorType.SIFT
    options.num_threads = threads
    options.sift.max_num_features = max_features
    reader = pycolmap.ImageReaderOptions()
    if workspace.use_masks:
        reader.mask_path = str(workspace.masks)
    pycolmap.extract_features(workspace.scratch_db, workspace.images, image_names=workspace.names(),
                              camera_mode=pycolmap.CameraMode.PER_FOLDER, reader_options=reader,
                              extraction_options=options, device=pycolmap.Device.cpu)


def match_same_timestep(workspace: Workspace, threads: int) -> None:
    """Match every camera pair at each timestep, without verification (that happens per camera pair later)."""
    pairs_path = workspace.root / "pairs.txt"
    lines = [f"{workspace.frame_name(a, t)} {workspace.frame_name(b, t)}"
             for t in workspace.timesteps for a, b in itertools.combinations(workspace.cameras, 2)]
    pairs_path.write_text("\n".join(lines) + "\n")
    matching = pycolmap.FeatureMatchingOptions()
    matching.num_threads = threads
    matching.skip_geometric_verification = True
    pairing = pycolmap.ImportedPairingOptions()
    pairing.match_list_path = str(pairs_path)
    pycolmap.match_image_pairs(workspace.scratch_db, matching_options=matching, pairing_options=pairing,
                               device=pycolmap.Device.cpu)


@dataclass
class MergedFeatures:
    """What the per-camera database holds: COLMAP image id per camera and the counts the report shows."""

    image_ids: dict[str, int]
    camera_ids: dict[str, int]
    keypoints: dict[str, int]
    raw_matches: int = 0
    verified_pairs: int = 0
    inlier_matches: int = 0
    pair_inliers: dict[str, int] = field(default_factory=dict)


def _write_camera_image(db: pycolmap.Database, camera_id: int, serial: str) -> int:
    """One image in its own frame, with the camera's trivial rig (rig id == camera id)."""
    image_id = db.write_image(pycolmap.Image(name=image_name(serial), camera_id=camera_id))
    frame = pycolmap.Frame()
    frame.rig_id = camera_id
    frame.add_data_id(pycolmap.data_t(pycolmap.sensor_t(pycolmap.SensorType.CAMERA, camera_id), image_id))
    db.write_frame(frame)
    return image_id


def _write_cameras(db: pycolmap.Database, setup: CameraSetup, cameras: list[str],
                   size: tuple[int, int]) -> dict[str, int]:
    """One COLMAP camera (and rig) per serial, or a single one for all when intrinsics are shared."""
    camera_ids: dict[str, int] = {}
    for serial in cameras:
        if setup.shared and camera_ids:
            camera_ids[serial] = next(iter(camera_ids.values()))
            continue
        camera_id = db.write_camera(setup.colmap_camera(serial, *size))
        rig = pycolmap.Rig()
        rig.add_ref_sensor(pycolmap.sensor_t(pycolmap.SensorType.CAMERA, camera_id))
        rig_id = db.write_rig(rig)
        if rig_id != camera_id:
            raise RuntimeError(f"COLMAP database numbered rig {rig_id} for camera {camera_id}; expected equal ids")
        camera_ids[serial] = camera_id
    return camera_ids


def merge_timesteps(workspace: Workspace, setup: CameraSetup, size: tuple[int, int]) -> MergedFeatures:
    """Build the per-camera database: each camera's keypoints over all timesteps, matches offset to suit."""
    with pycolmap.Database.open(workspace.scratch_db) as scratch, pycolmap.Database.open(workspace.db) as db:
        ids = {image.name: image.image_id for image in scratch.read_all_images()}
        camera_ids = _write_cameras(db, setup, workspace.cameras, size)
        image_ids, keypoints, offsets = {}, {}, {}
        for serial in workspace.cameras:
            blocks, offset = [], 0
            for t in workspace.timesteps:
                block = scratch.read_keypoints(ids[workspace.frame_name(serial, t)])
                offsets[(serial, t)] = offset
                offset += len(block)
                blocks.append(block)
            image_ids[serial] = _write_camera_image(db, camera_ids[serial], serial)
            merged = np.concatenate(blocks) if offset else np.zeros((0, 6), np.float32)
            db.write_keypoints(image_ids[serial], merged.astype(np.float32))
            keypoints[serial] = offset
        raw = 0
        for a, b in itertools.combinations(workspace.cameras, 2):
            blocks = []
            for t in workspace.timesteps:
                name_a, name_b = workspace.frame_name(a, t), workspace.frame_name(b, t)
                matches = scratch.read_matches(ids[name_a], ids[name_b]).astype(np.int64)
                if len(matches):
                    blocks.append(matches + np.array([offsets[(a, t)], offsets[(b, t)]]))
            if blocks:
                merged = np.concatenate(blocks).astype(np.uint32)
                db.write_matches(image_ids[a], image_ids[b], merged)
                raw += len(merged)
    return MergedFeatures(image_ids=image_ids, camera_ids=camera_ids, keypoints=keypoints, raw_matches=raw)


def verify_pairs(workspace: Workspace, merged: MergedFeatures, threads: int, min_inliers: int, seed: int) -> None:
    """Two-view geometry per camera pair, over the matches of every timestep at once."""
    verifier = pycolmap.GeometricVerifierOptions()
    verifier.num_threads = threads
    geometry = pycolmap.TwoViewGeometryOptions()
    geometry.min_num_inliers = min_inliers
    geometry.ransac.random_seed = seed
    geometry.detect_watermark = False  # a static backdrop matches at the same pixels in every camera pair
    pycolmap.geometric_verification(workspace.db, verifier_options=verifier, two_view_geometry_options=geometry)
    by_id = {image_id: serial for serial, image_id in merged.image_ids.items()}
    with pycolmap.Database.open(workspace.db) as db:
        merged.verified_pairs = int(db.num_verified_image_pairs())
        merged.inlier_matches = int(db.num_inlier_matches())
        pair_ids, geometries = db.read_two_view_geometries()
        for pair_id, two_view in zip(pair_ids, geometries):
            a, b = pycolmap.pair_id_to_image_pair(pair_id)
            merged.pair_inliers[f"{by_id[a]}-{by_id[b]}"] = len(two_view.inlier_matches)


# --- solving ------------------------------------------------------------------------------------------


def _pipeline_options(refine_focal: bool, threads: int, seed: int,
                      min_inliers: int) -> pycolmap.IncrementalPipelineOptions:
    options = pycolmap.IncrementalPipelineOptions()
    options.num_threads = threads
    options.random_seed = seed
    options.mapper.random_seed = seed
    options.triangulation.random_seed = seed
    options.multiple_models = False
    options.min_num_matches = min_inliers
    options.ba_refine_focal_length = refine_focal
    options.ba_refine_principal_point = False
    options.ba_refine_extra_params = False
    options.mapper.abs_pose_refine_focal_length = refine_focal
    options.mapper.abs_pose_refine_extra_params = False
    return options


def incremental_map(workspace: Workspace, refine_focal: bool, threads: int, seed: int,
                    min_inliers: int) -> pycolmap.Reconstruction | None:
    """COLMAP's incremental mapper on the per-camera database; the model with the most cameras, or None."""
    output = workspace.root / "sparse"
    output.mkdir(exist_ok=True)
    options = _pipeline_options(refine_focal, threads, seed, min_inliers)
    models = pycolmap.incremental_mapping(workspace.db, workspace.images, output, options)
    if not models:
        return None
    return max(models.values(), key=lambda model: model.num_reg_images())


def bundle_adjust(reconstruction: pycolmap.Reconstruction, refine_focal: bool, threads: int,
                  robust: bool = True, max_iterations: int = 30) -> None:
    """Global BA over poses and points (focal lengths when asked).

    The mapper's own BA is least squares; a final pass with a Cauchy loss (1 px) lets the few wrong matches
    that survived its 4 px filter stop pulling: on the synthetic rig it cuts the median rotation error by a
    third, and it converges within ~20 iterations.
    """
    options = pycolmap.BundleAdjustmentOptions()
    options.refine_focal_length = refine_focal
    options.refine_principal_point = False
    options.refine_extra_params = False
    options.print_summary = False
    options.ceres.solver_options.num_threads = threads
    options.ceres.solver_options.max_num_iterations = max_iterations
    if robust:
        options.ceres.loss_function_type = pycolmap.LossFunctionType.CAUCHY
        options.ceres.loss_function_scale = 1.0
    pycolmap.bundle_adjustment(reconstruction, options)


def reconstruction_with_poses(setup: CameraSetup, merged: MergedFeatures, world_2_cam: dict[str, np.ndarray],
                              size: tuple[int, int]) -> pycolmap.Reconstruction:
    """A model with the database's ids, the given poses and no points: the input of triangulation."""
    reconstruction = pycolmap.Reconstruction()
    for serial, camera_id in merged.camera_ids.items():
        if reconstruction.exists_camera(camera_id):
            continue
        camera = setup.colmap_camera(serial, *size)
        camera.camera_id = camera_id
        reconstruction.add_camera_with_trivial_rig(camera)
    for serial, image_id in merged.image_ids.items():
        image = pycolmap.Image(name=image_name(serial), camera_id=merged.camera_ids[serial], image_id=image_id)
        reconstruction.add_image_with_trivial_frame(image, pycolmap.Rigid3d(world_2_cam[serial][:3, :4]))
    return reconstruction


def triangulate_known_poses(workspace: Workspace, reconstruction: pycolmap.Reconstruction, threads: int,
                            seed: int, max_error_px: float) -> pycolmap.Reconstruction:
    """Points from fixed poses. ``max_error_px`` is loose on the first pass, when the poses may be off a little."""
    output = workspace.root / "triangulated"
    output.mkdir(exist_ok=True)
    options = _pipeline_options(False, threads, seed, 15)
    options.triangulation.merge_max_reproj_error = max_error_px
    options.triangulation.complete_max_reproj_error = max_error_px
    options.triangulation.create_max_angle_error = max(2.0, max_error_px / 2)
    options.triangulation.continue_max_angle_error = max(2.0, max_error_px / 2)
    options.mapper.filter_max_reproj_error = max_error_px
    return pycolmap.triangulate_points(reconstruction, workspace.db, workspace.images, output,
                                       clear_points=True, options=options, refine_intrinsics=False)


# --- reading a model back -----------------------------------------------------------------------------


def camera_poses(reconstruction: pycolmap.Reconstruction) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """K and world_2_cam of every registered camera (pinhole models only, which is all this stage makes)."""
    intrinsics, world_2_cam = {}, {}
    for image in reconstruction.images.values():
        if not image.has_pose:
            continue
        serial = serial_of(image.name)
        pose = np.eye(4)
        pose[:3, :4] = image.cam_from_world().matrix()
        world_2_cam[serial] = pose
        camera = reconstruction.cameras[image.camera_id]
        intrinsics[serial] = np.asarray(camera.calibration_matrix(), dtype=np.float64)
    return intrinsics, world_2_cam


def camera_statistics(reconstruction: pycolmap.Reconstruction) -> dict[str, dict[str, float | int]]:
    """Per registered camera: observations and the reprojection error of each (mean, median, px)."""
    out = {}
    intrinsics, world_2_cam = camera_poses(reconstruction)
    for image in reconstruction.images.values():
        if not image.has_pose:
            continue
        serial = serial_of(image.name)
        observed = image.get_observation_points2D()
        if not observed:
            out[serial] = {"observations": 0, "reprojection_error_mean_px": None,
                           "reprojection_error_median_px": None}
            continue
        uv = np.array([p.xy for p in observed])
        xyz = np.array([reconstruction.points3D[p.point3D_id].xyz for p in observed])
        pose, K = world_2_cam[serial], intrinsics[serial]
        cam = xyz @ pose[:3, :3].T + pose[:3, 3]
        projected = cam @ K.T
        errors = np.linalg.norm(projected[:, :2] / projected[:, 2:3] - uv, axis=1)
        out[serial] = {"observations": int(len(observed)),
                       "reprojection_error_mean_px": float(errors.mean()),
                       "reprojection_error_median_px": float(np.median(errors))}
    return out


def transform_reconstruction(reconstruction: pycolmap.Reconstruction, similarity: Similarity) -> None:
    """Move a model (poses and points) into another world frame, in place."""
    reconstruction.transform(pycolmap.Sim3d(similarity.matrix()))


def reconstruction_from_calibration(intrinsics: dict[str, np.ndarray], world_2_cam: dict[str, np.ndarray],
                                    size: tuple[int, int]) -> pycolmap.Reconstruction:
    """A point-less COLMAP model of a calibration (PINHOLE), for writing it in COLMAP's text format."""
    reconstruction = pycolmap.Reconstruction()
    for index, serial in enumerate(sorted(world_2_cam), start=1):
        K = intrinsics[serial]
        camera = pycolmap.Camera(model="PINHOLE", width=size[0], height=size[1],
                                 params=[K[0, 0], K[1, 1], K[0, 2], K[1, 2]], camera_id=index)
        reconstruction.add_camera_with_trivial_rig(camera)
        image = pycolmap.Image(name=image_name(serial), camera_id=index, image_id=index)
        reconstruction.add_image_with_trivial_frame(image, pycolmap.Rigid3d(world_2_cam[serial][:3, :4]))
    return reconstruction
