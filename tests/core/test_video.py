"""Video I/O over the bundled ffmpeg: streaming decode, exact frame counts, H.264 encode, clear errors."""

import numpy as np
import pytest

from stages.core.errors import VideoError
from stages.core.video import VideoWriter, count_frames, encode_video, iter_frames, probe_video


def _frames(n: int, width: int = 64, height: int = 48) -> list[np.ndarray]:
    """Smooth, distinct frames (H.264 keeps these close): a gradient that shifts with the frame index."""
    y, x = np.mgrid[0:height, 0:width]
    return [np.stack([20 + x * 2 + i * 4, 10 + y * 3 + i * 3, np.full_like(x, 40 + i * 7)], -1).astype(np.uint8)
            for i in range(n)]


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "cam_1.mp4"
    frames = _frames(12)
    assert encode_video(path, frames, fps=73.0, crf=12) == 12
    return path, frames


def test_encode_decode_round_trip(video):
    path, frames = video
    info = probe_video(path)
    assert (info.width, info.height, info.codec) == (64, 48, "h264")
    assert info.fps == pytest.approx(73.0)
    decoded = list(iter_frames(path))
    assert len(decoded) == 12 == count_frames(path)
    for original, got in zip(frames, decoded):
        assert got.shape == (48, 64, 3) and got.dtype == np.uint8
        assert np.abs(original.astype(int) - got).mean() < 3.0


def test_selection_happens_in_the_decoder(video):
    path, _ = video
    everything = list(iter_frames(path))
    picked = list(iter_frames(path, start=2, stride=3, count=3))
    assert len(picked) == 3
    for got, index in zip(picked, (2, 5, 8)):
        np.testing.assert_array_equal(got, everything[index])
    assert len(list(iter_frames(path, start=11, stride=5))) == 1


def test_decode_streams_and_stops_early(video):
    path, _ = video
    frames = iter_frames(path)
    first = next(frames)
    frames.close()  # the decoder is killed, nothing else is read
    assert first.shape == (48, 64, 3)


def test_area_resize_in_decoder(video):
    path, frames = video
    small = next(iter_frames(path, size=(32, 24)))
    assert small.shape == (24, 32, 3)
    expected = frames[0].reshape(24, 2, 32, 2, 3).mean(axis=(1, 3))
    assert np.abs(expected - small).mean() < 3.0


def test_odd_sizes_are_padded_to_even(tmp_path):
    path = tmp_path / "odd.mp4"
    frame = _frames(1, width=33, height=21)[0]
    with VideoWriter(path, width=33, height=21, fps=10) as writer:
        writer.write(frame)
    decoded = next(iter_frames(path))
    assert decoded.shape == (22, 34, 3)
    assert np.abs(decoded[:21, :33].astype(int) - frame).mean() < 3.0


def test_truncated_file_raises_naming_the_file(video, tmp_path):
    path, _ = video
    data = path.read_bytes()
    truncated = tmp_path / "cam_truncated.mp4"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(VideoError, match="truncated or corrupt") as error:
        list(iter_frames(truncated))
    assert str(truncated) in str(error.value)
    with pytest.raises(VideoError, match=str(truncated)):
        count_frames(truncated)


def test_unreadable_and_missing_files(tmp_path):
    junk = tmp_path / "cam_junk.mp4"
    junk.write_bytes(b"not a video" * 50)
    with pytest.raises(VideoError, match="cannot read video") as error:
        probe_video(junk)
    assert str(junk) in str(error.value)
    with pytest.raises(VideoError, match="not found"):
        list(iter_frames(tmp_path / "missing.mp4"))


def test_wrong_frame_shape_is_rejected(tmp_path):
    with VideoWriter(tmp_path / "x.mp4", width=16, height=16, fps=10) as writer:
        writer.write(np.zeros((16, 16, 3), np.uint8))
        with pytest.raises(ValueError, match="expected"):
            writer.write(np.zeros((8, 16, 3), np.uint8))
