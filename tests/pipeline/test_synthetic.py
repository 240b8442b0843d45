"""The synthetic rig: layout on disk, determinism, and that cameras and ground truth describe one scene."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import zarr

from pipeline import synthetic as syn
from pipeline import synthetic_scene as scene_lib
from stages.core.cameras import camera_center, pixel_centers, project, read_camera_params, unproject
from stages.core.video import count_frames, iter_frames, probe_video

SMALL = dict(cameras=4, frames=3, width=64, height=96)


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> syn.SyntheticCapture:
    return syn.synthesize_capture(tmp_path_factory.mktemp("synthetic"), **SMALL)


def _truth(capture: syn.SyntheticCapture) -> tuple[np.ndarray, np.ndarray, list[str]]:
    group = zarr.open_group(capture.ground_truth_uri, mode="r")
    return group["alpha"][:], group["depth"][:], list(group.attrs["cameras"])


def _plate(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1]


# --- the rig ------------------------------------------------------------------------------------------------


def test_serials_are_the_real_rigs_in_doc_order():
    assert len(syn.SERIALS) == 16 == len(set(syn.SERIALS))
    assert syn.SERIALS[:2] == ["222200042", "222200044"] and syn.SERIALS[-1] == "221501007"
    assert sorted(syn.UPPER_ROW + syn.LOWER_ROW) == sorted(syn.SERIALS)
    assert all(isinstance(s, str) and len(s) == 9 for s in syn.SERIALS)


def test_rig_is_two_rows_on_an_arc_looking_at_the_head():
    rig = syn.rig_cameras(220, 320)
    assert rig.serials == syn.SERIALS
    for serial in syn.SERIALS:
        centre = camera_center(rig.world_2_cam[serial])
        row, _ = syn.camera_slot(serial)
        assert 0.95 < np.linalg.norm(centre[[0, 2]]) < 1.05 and centre[2] > 0.5
        assert (centre[1] > 0.05) if row == "upper" else (centre[1] < -0.15)
        uv, z = project(np.zeros(3), rig.intrinsics[serial], rig.world_2_cam[serial])
        assert 0.9 < z < 1.1 and 0 < uv[0] < 220 and 0 < uv[1] < 320  # the head's centre is in view
    # columns run from -x to +x, both rows alike
    xs = [camera_center(rig.world_2_cam[s])[0] for s in syn.UPPER_ROW]
    assert np.all(np.diff(xs) > 0)
    focals = [rig.intrinsics[s][0, 0] for s in syn.SERIALS]
    assert len(set(np.round(focals, 6))) == 16  # slightly different focal lengths
    assert max(focals) / min(focals) < 1.1


def test_unknown_serial_is_rejected():
    with pytest.raises(Exception, match="123"):
        syn.rig_cameras(64, 96, ["123"])


# --- the capture on disk ----------------------------------------------------------------------------------------


def test_capture_layout(capture: syn.SyntheticCapture):
    pid = capture.participant_dir
    assert pid == capture.root / "001" and capture.sequence_dir == pid / "sequences" / "EXP-1-head"
    assert capture.calibration_path == pid / "calibration" / "camera_params.json"
    serials = capture.cameras
    assert serials == sorted(serials) and len(serials) == 4 and all(isinstance(s, str) for s in serials)
    for serial in serials:
        video = capture.sequence_dir / "images" / f"cam_{serial}.mp4"
        plate = pid / "sequences" / "BACKGROUND" / f"image_{serial}.jpg"
        assert capture.video_paths[serial] == video and video.is_file()
        assert capture.background_paths[serial] == plate and plate.is_file()
        info = probe_video(video)
        assert (info.width, info.height, info.codec) == (64, 96, "h264") and abs(info.fps - 73.0) < 0.01
        assert count_frames(video) == 3
        assert _plate(plate).shape == (96, 64, 3)

    data = json.loads(capture.calibration_path.read_text())
    assert set(data) == {"world_2_cam", "intrinsics"}
    assert set(data["world_2_cam"]) == set(data["intrinsics"]) == set(serials)
    assert all(np.asarray(m).shape == (4, 4) for m in data["world_2_cam"].values())
    assert all(np.asarray(m).shape == (3, 3) for m in data["intrinsics"].values())
    read_camera_params(capture.calibration_path)  # valid for the pipeline's own reader

    group = zarr.open_group(capture.ground_truth_uri, mode="r")
    assert group.metadata.zarr_format == 3
    assert group.attrs["cameras"] == serials
    assert group["alpha"].shape == group["depth"].shape == (4, 3, 96, 64)
    assert group["alpha"].dtype == np.uint8 and group["depth"].dtype == np.float32
    assert group["alpha"].chunks == group["depth"].chunks == (1, 1, 96, 64)
    assert len(group.attrs["frame_times"]) == 3


def test_ground_truth_is_sane(capture: syn.SyntheticCapture):
    alpha, depth, _ = _truth(capture)
    assert set(np.unique(alpha)) == {0, 255}
    assert np.all((depth > 0) == (alpha == 255))
    assert 0.7 < depth[alpha == 255].min() and depth.max() < 1.4  # a head about 1 m away
    coverage = (alpha == 255).mean(axis=(2, 3))
    assert np.all((coverage > 0.15) & (coverage < 0.75))  # subject and backdrop both in every view


def test_same_seed_same_capture_other_seed_differs(tmp_path: Path, capture: syn.SyntheticCapture):
    again = syn.synthesize_capture(tmp_path / "again", **SMALL)
    other = syn.synthesize_capture(tmp_path / "other", seed=1, **SMALL)
    assert again.calibration_path.read_bytes() == capture.calibration_path.read_bytes()
    assert other.calibration_path.read_bytes() != capture.calibration_path.read_bytes()
    first, repeat, changed = _truth(capture), _truth(again), _truth(other)
    assert np.array_equal(first[0], repeat[0]) and np.array_equal(first[1], repeat[1])
    assert not np.array_equal(first[1], changed[1])
    for serial in capture.cameras:
        assert np.array_equal(_plate(capture.background_paths[serial]), _plate(again.background_paths[serial]))


def test_cameras_can_be_given_as_serials(tmp_path: Path):
    chosen = ["222200037", "220700191"]
    result = syn.synthesize_capture(tmp_path, cameras=chosen, frames=1, width=32, height=48)
    assert result.cameras == sorted(chosen)
    assert set(read_camera_params(result.calibration_path).serials) == set(chosen)


# --- one scene: cameras, ground truth and the analytic surface agree ---------------------------------------------


def _grazing(K: np.ndarray, world_2_cam: np.ndarray, uv: np.ndarray, t: float, step: float = 0.005) -> np.ndarray:
    """Rays at a silhouette or depth edge: a quarter-pixel shift changes the surface depth by more than ``step``.

    There, the float32 rounding of a ground-truth depth can move a point just off a tangent surface.
    """
    _, centre = syn.subject_surface_points(K, world_2_cam, uv, t)
    grazing = np.zeros(len(uv), dtype=bool)
    for shift in ([0.25, 0.0], [-0.25, 0.0], [0.0, 0.25], [0.0, -0.25]):
        _, shifted = syn.subject_surface_points(K, world_2_cam, uv + np.array(shift), t)
        grazing |= np.abs(shifted - centre) > step
    return grazing


def test_ground_truth_depth_agrees_across_cameras(capture: syn.SyntheticCapture):
    """Unproject camera A's ground truth, project into B: where B sees the same point, the depths agree."""
    rig = read_camera_params(capture.calibration_path)
    alpha, depth, serials = _truth(capture)
    checked = 0
    for frame, t in enumerate(capture.frame_times):
        for a, b in [(0, 1), (1, 2), (2, 3), (3, 0)]:
            sa, sb = serials[a], serials[b]
            fg = alpha[a, frame] == 255
            points = unproject(pixel_centers(64, 96)[fg], depth[a, frame][fg], rig.intrinsics[sa], rig.world_2_cam[sa])
            uv, z = project(points, rig.intrinsics[sb], rig.world_2_cam[sb])
            _, exact = syn.subject_surface_points(rig.intrinsics[sb], rig.world_2_cam[sb], uv, t)
            col, row = np.floor(uv).astype(int).T
            inside = (col >= 0) & (col < 64) & (row >= 0) & (row < 96)
            col, row = np.clip(col, 0, 63), np.clip(row, 0, 95)
            # B's ground truth is foreground at about z (not occluded), and the ray does not graze an edge
            visible = inside & (alpha[b, frame][row, col] == 255) & (np.abs(depth[b, frame][row, col] - z) < 0.01)
            visible &= ~_grazing(rig.intrinsics[sb], rig.world_2_cam[sb], uv, t)
            assert visible.sum() > 20
            agree = np.abs(exact - z) < 1e-4 * z
            occluded = (exact > 0) & (exact < z)  # something nearer lies on the exact ray (sub-pixel occlusion)
            assert np.all((agree | occluded)[visible])  # never a miss, never a hit behind the point
            assert agree[visible].mean() > 0.9
            checked += visible.sum()
    assert checked > 500


def test_surface_point_projects_to_a_pixel_with_its_depth(capture: syn.SyntheticCapture):
    rig = read_camera_params(capture.calibration_path)
    alpha, depth, serials = _truth(capture)
    for index, serial in enumerate(serials):
        K, pose = rig.intrinsics[serial], rig.world_2_cam[serial]
        centres = pixel_centers(64, 96)
        points, _ = syn.subject_surface_points(K, pose, centres, capture.frame_times[1])
        on_subject = ~np.isnan(points[..., 0])
        assert np.array_equal(on_subject, alpha[index, 1] == 255)
        uv, z = project(points[on_subject], K, pose)
        assert np.allclose(uv, centres[on_subject], atol=1e-6)
        assert np.allclose(depth[index, 1][on_subject], z, rtol=1e-6, atol=0)


def test_subject_moves_rigidly_and_non_rigidly(capture: syn.SyntheticCapture):
    alpha, _, _ = _truth(capture)
    for camera in range(alpha.shape[0]):
        for frame in range(alpha.shape[1] - 1):
            assert np.mean(alpha[camera, frame] != alpha[camera, frame + 1]) > 0.005
    motion = scene_lib.scene_for_seed(0).motion
    start, middle = scene_lib.pose_parts(motion, 0.0), scene_lib.pose_parts(motion, 0.5)
    cranium, jaw, cheek = (scene_lib.PART_INDEX[n] for n in ("cranium", "jaw", "cheek_left"))
    assert not np.allclose(start.rotations[cranium], middle.rotations[cranium], atol=1e-3)  # the head turns
    relative = [p.rotations[cranium].T @ p.rotations[jaw] for p in (start, middle)]
    assert not np.allclose(*relative, atol=1e-3)  # the jaw moves relative to the skull
    assert middle.radii[cheek].max() > 1.1 * start.radii[cheek].max()  # the cheeks puff


# --- the backdrop and its plates -------------------------------------------------------------------------------


def test_backdrop_is_visible_textured_and_partly_subject_coloured():
    rig = syn.rig_cameras(64, 96)
    rng = np.random.default_rng(0)
    lookalike_shares = []
    for serial in syn.SERIALS:
        K, pose = rig.intrinsics[serial], rig.world_2_cam[serial]
        frame = syn.render_subject(K, pose, 64, 96, 0.25)
        backdrop = frame.alpha == 0
        assert backdrop.mean() > 0.2  # visible in every camera
        assert np.array_equal(frame.rgb[backdrop], frame.background[backdrop])
        colours = frame.rgb[backdrop].astype(float)
        assert colours.std(axis=0).min() > 10  # not uniform
        subject = frame.rgb[~backdrop].astype(float)
        subject = subject[rng.choice(len(subject), 300, replace=False)]
        nearest = np.sqrt(((colours[:, None, :] - subject[None]) ** 2).sum(-1)).min(axis=1)
        lookalike_shares.append(np.mean(nearest < 12))
    # matting by colour alone must not be trivial, but most of the backdrop differs from the subject
    assert 0.02 < np.mean(lookalike_shares) < 0.6, lookalike_shares


def test_plate_matches_the_videos_background(capture: syn.SyntheticCapture):
    alpha, _, serials = _truth(capture)
    kernel = np.ones((5, 5), np.uint8)
    for index, serial in enumerate(serials):
        plate = _plate(capture.background_paths[serial]).astype(float)
        for frame, image in enumerate(iter_frames(capture.video_paths[serial])):
            background = cv2.erode((alpha[index, frame] == 0).astype(np.uint8), kernel) > 0  # away from edges
            assert background.mean() > 0.1
            assert np.abs(image.astype(float) - plate)[background].mean() < 6.0


def test_looped_frames_go_back_and_forth_over_the_distinct_poses():
    assert syn.looped_frames(9, 3).tolist() == [0, 1, 2, 1, 0, 1, 2, 1, 0]
    assert syn.looped_frames(4, 4).tolist() == [0, 1, 2, 3]  # as many poses as frames: no loop
    assert syn.looped_frames(1, 6).tolist() == [0]


def test_a_looped_capture_repeats_its_poses_in_video_and_ground_truth(tmp_path: Path):
    capture = syn.synthesize_capture(tmp_path, cameras=2, frames=5, width=48, height=64, distinct_frames=3)
    alpha, depth, _ = _truth(capture)
    assert capture.frame_times == [0.0, 0.5, 1.0, 0.5, 0.0]
    np.testing.assert_array_equal(depth[:, 1], depth[:, 3])
    np.testing.assert_array_equal(alpha[:, 0], alpha[:, 4])
    assert not np.array_equal(depth[:, 0], depth[:, 2])
    video = next(iter(capture.video_paths.values()))
    assert count_frames(video) == 5
