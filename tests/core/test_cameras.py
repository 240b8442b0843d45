"""Camera conventions: every converter round-trips and projection agrees with ray generation."""

import json

import numpy as np
import pytest

from stages.core import cameras
from stages.core.errors import CalibrationError


def _random_pose(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    pose = np.eye(4)
    pose[:3, :3] = cameras.quaternion_to_rotation(q)
    pose[:3, 3] = rng.normal(size=3)
    return pose


K = np.array([[800.0, 0.0, 110.0], [0.0, 810.0, 160.0], [0.0, 0.0, 1.0]])


def test_pose_inverse_and_conversions_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(20):
        world_2_cam = _random_pose(rng)
        cam_2_world = cameras.world_2_cam_to_cam_2_world(world_2_cam)
        np.testing.assert_allclose(cam_2_world @ world_2_cam, np.eye(4), atol=1e-12)
        np.testing.assert_allclose(cameras.cam_2_world_to_world_2_cam(cam_2_world), world_2_cam, atol=1e-12)
        np.testing.assert_allclose(cameras.opengl_to_opencv(cameras.opencv_to_opengl(cam_2_world)), cam_2_world)
        qvec, tvec = cameras.world_2_cam_to_colmap(world_2_cam)
        np.testing.assert_allclose(cameras.colmap_to_world_2_cam(qvec, tvec), world_2_cam, atol=1e-12)
        np.testing.assert_allclose(cameras.camera_center(world_2_cam), cam_2_world[:3, 3])


def test_opengl_axes_point_backwards_and_up():
    world_2_cam = cameras.look_at(eye=[0, 0, 1], target=[0, 0, 0], up=[0, 1, 0])
    gl = cameras.opencv_to_opengl(cameras.invert_pose(world_2_cam))
    np.testing.assert_allclose(gl[:3, 2], [0, 0, 1], atol=1e-12)  # OpenGL looks down -z: camera z points away
    np.testing.assert_allclose(gl[:3, 1], [0, 1, 0], atol=1e-12)  # and y up


def test_look_at_sees_target_at_principal_point():
    world_2_cam = cameras.look_at(eye=[0.3, 0.2, 1.0], target=[0.0, 0.05, 0.0])
    uv, z = cameras.project(np.array([0.0, 0.05, 0.0]), K, world_2_cam)
    np.testing.assert_allclose(uv, K[:2, 2], atol=1e-9)
    assert z == pytest.approx(np.linalg.norm([0.3, 0.15, 1.0]))
    # world up appears as image up (negative v)
    uv_up, _ = cameras.project(np.array([0.0, 0.15, 0.0]), K, world_2_cam)
    assert uv_up[1] < K[1, 2]


def test_project_unproject_round_trip_and_rays():
    rng = np.random.default_rng(1)
    world_2_cam = cameras.look_at(eye=[0.2, 0.1, 1.0], target=[0, 0, 0])
    points = rng.uniform(-0.2, 0.2, size=(100, 3))
    uv, z = cameras.project(points, K, world_2_cam)
    np.testing.assert_allclose(cameras.unproject(uv, z, K, world_2_cam), points, atol=1e-10)
    origins, directions, dz = cameras.pixel_rays(K, world_2_cam, uv)
    np.testing.assert_allclose(np.linalg.norm(directions, axis=-1), 1.0)
    along = z / dz  # distance along the ray from z-depth
    np.testing.assert_allclose(origins + directions * along[:, None], points, atol=1e-10)


def test_pixel_centres_and_rescale():
    centres = cameras.pixel_centers(4, 3)
    assert centres.shape == (3, 4, 2)
    np.testing.assert_allclose(centres[0, 0], [0.5, 0.5])
    np.testing.assert_allclose(centres[2, 3], [3.5, 2.5])
    # A point projecting to the centre of pixel (i, j) at full size projects to the centre of the
    # 2x2 block it falls in after an area downscale by 2.
    half = cameras.intrinsics_for_size(K, (220, 320), (110, 160))
    np.testing.assert_allclose(half, np.diag([0.5, 0.5, 1.0]) @ K)
    world_2_cam = cameras.look_at(eye=[0, 0, 1], target=[0, 0, 0])
    point = cameras.unproject(np.array([3.0, 5.0]), 1.0, K, world_2_cam)  # corner between pixels 2,3 / 4,5
    uv_half, _ = cameras.project(point, half, world_2_cam)
    np.testing.assert_allclose(uv_half, [1.5, 2.5], atol=1e-9)  # centre of the merged pixel


def test_read_camera_params_shared_and_per_camera(tmp_path):
    pose = cameras.look_at([0, 0, 1], [0, 0, 0])
    shared = tmp_path / "shared.json"
    shared.write_text(json.dumps({"world_2_cam": {"222200037": pose.tolist(), "220700191": pose.tolist()},
                                  "intrinsics": K.tolist()}))
    params = cameras.read_camera_params(shared)
    assert params.serials == ["222200037", "220700191"]
    assert params.shared_intrinsics
    np.testing.assert_allclose(params.intrinsics["220700191"], K)

    per_camera = tmp_path / "per_camera.json"
    cameras.write_camera_params(per_camera, cameras.CameraParams(
        world_2_cam={"222200037": pose}, intrinsics={"222200037": K * [[1], [1], [1]]}))
    again = cameras.read_camera_params(per_camera)
    assert not again.shared_intrinsics
    np.testing.assert_allclose(again.world_2_cam["222200037"], pose)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"intrinsics": K.tolist()}), "expected keys"),
        (json.dumps({"world_2_cam": {"1": np.eye(3).tolist()}, "intrinsics": K.tolist()}), "camera 1"),
        (json.dumps({"world_2_cam": {"1": (2 * np.eye(4)).tolist()}, "intrinsics": K.tolist()}), "not a rigid"),
        (json.dumps({"world_2_cam": {"1": np.eye(4).tolist(), "2": np.eye(4).tolist()},
                     "intrinsics": {"1": K.tolist()}}), "cameras 2 have world_2_cam but no intrinsics"),
    ],
)
def test_bad_camera_params_name_the_file(tmp_path, content, message):
    path = tmp_path / "camera_params.json"
    path.write_text(content)
    with pytest.raises(CalibrationError, match=message) as error:
        cameras.read_camera_params(path)
    assert str(path) in str(error.value)


def test_missing_camera_params_names_the_file(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        cameras.read_camera_params(tmp_path / "nope.json")


def test_nan_in_world_2_cam_names_the_camera_and_the_nan(tmp_path):
    pose = np.eye(4).tolist()
    pose[1][3] = float("nan")
    path = tmp_path / "camera_params.json"
    path.write_text(json.dumps({"world_2_cam": {"222200037": pose}, "intrinsics": np.eye(3).tolist()}))
    with pytest.raises(CalibrationError, match=r"world_2_cam of camera 222200037 has NaN at row 1, column 3"):
        cameras.read_camera_params(path)
