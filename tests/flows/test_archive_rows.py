"""The archive summary row of a failed sequence keeps the whole error (camera and file) on one line."""

from flows.archive import _one_line
from stages.ingest.stage import IngestError


def test_a_multi_line_error_keeps_every_line_in_one_row():
    error = IngestError("ingest failed (camera 222200037: /a/cam_222200037.mp4: truncated); the store is not "
                        "marked complete\n  camera 220700191: /a/cam_220700191.mp4: truncated")
    row = _one_line(f"{type(error).__name__}: {error}")
    assert "\n" not in row and "cam_222200037.mp4" in row and "cam_220700191.mp4" in row
