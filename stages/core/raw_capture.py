"""Discovery of raw captures in the NeRSemble v2 layout (ARCHITECTURE.md, reference/nersemble-data.md).

```
<archive>/<PID>/calibration/camera_params.json        optional
<archive>/<PID>/calibration/color_calibration.json    optional
<archive>/<PID>/sequences/<SEQ>/images/cam_<SERIAL>.mp4
<archive>/<PID>/sequences/BACKGROUND/image_<SERIAL>.jpg   optional
<archive>/<PID>/sequences/<SEQ>/ground_truth.zarr     synthetic captures only
```
Serials and names are kept as strings, verbatim (sequence names contain ``+`` and ``_``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stages.core.errors import CaptureLayoutError

BACKGROUND_SEQUENCE = "BACKGROUND"
VIDEO_PREFIX, VIDEO_SUFFIX = "cam_", ".mp4"
PLATE_PREFIX, PLATE_SUFFIX = "image_", ".jpg"


@dataclass(frozen=True)
class RawSequence:
    """Everything one recorded sequence has on disk."""

    participant: str
    sequence: str
    sequence_dir: Path
    videos: dict[str, Path]  # serial -> cam_<serial>.mp4, sorted by serial
    calibration: Path | None = None
    color_calibration: Path | None = None
    backgrounds: dict[str, Path] = field(default_factory=dict)
    ground_truth: Path | None = None

    @property
    def serials(self) -> list[str]:
        return list(self.videos)

    def summary(self) -> dict:
        """What the sequence has, for listings and reports."""
        return {
            "participant": self.participant,
            "sequence": self.sequence,
            "path": str(self.sequence_dir),
            "cameras": len(self.videos),
            "calibration": self.calibration is not None,
            "color_calibration": self.color_calibration is not None,
            "background_plates": len(self.backgrounds),
            "ground_truth": self.ground_truth is not None,
        }


def _serials_by_file(folder: Path, prefix: str, suffix: str) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        if path.is_file() and path.name.startswith(prefix) and path.name.endswith(suffix):
            serial = path.name[len(prefix) : -len(suffix)]
            if serial:
                found[serial] = path
    return dict(sorted(found.items()))


def _existing(path: Path) -> Path | None:
    return path if path.exists() else None


def discover_sequence(sequence_dir: str | Path) -> RawSequence:
    """Read one ``<archive>/<PID>/sequences/<SEQ>`` folder; participant and sequence come from the path."""
    sequence_dir = Path(sequence_dir).resolve()
    if not sequence_dir.is_dir():
        raise CaptureLayoutError(f"{sequence_dir}: sequence folder not found")
    if sequence_dir.parent.name != "sequences":
        raise CaptureLayoutError(
            f"{sequence_dir}: expected a folder <archive>/<PID>/sequences/<SEQ> (its parent is not 'sequences')"
        )
    if sequence_dir.name == BACKGROUND_SEQUENCE:
        raise CaptureLayoutError(f"{sequence_dir}: BACKGROUND holds the background plates, not a sequence to process")
    participant_dir = sequence_dir.parent.parent
    videos = _serials_by_file(sequence_dir / "images", VIDEO_PREFIX, VIDEO_SUFFIX)
    if not videos:
        raise CaptureLayoutError(f"{sequence_dir / 'images'}: no camera videos (expected cam_<SERIAL>.mp4 files)")
    return RawSequence(
        participant=participant_dir.name,
        sequence=sequence_dir.name,
        sequence_dir=sequence_dir,
        videos=videos,
        calibration=_existing(participant_dir / "calibration" / "camera_params.json"),
        color_calibration=_existing(participant_dir / "calibration" / "color_calibration.json"),
        backgrounds=_serials_by_file(sequence_dir.parent / BACKGROUND_SEQUENCE, PLATE_PREFIX, PLATE_SUFFIX),
        ground_truth=_existing(sequence_dir / "ground_truth.zarr"),
    )


def list_archive(
    archive_root: str | Path,
    participants: list[str] | None = None,
    sequences: list[str] | None = None,
) -> tuple[list[RawSequence], list[str]]:
    """Every (participant, sequence) under an archive root, optionally filtered.

    Returns the sequences found and one line per folder that looked like a sequence but could not be read,
    so that one broken capture never hides the others.
    """
    archive_root = Path(archive_root)
    if not archive_root.is_dir():
        raise CaptureLayoutError(f"{archive_root}: archive folder not found")
    found, problems = [], []
    for participant_dir in sorted(p for p in archive_root.iterdir() if (p / "sequences").is_dir()):
        if participants and participant_dir.name not in participants:
            continue
        for sequence_dir in sorted(p for p in (participant_dir / "sequences").iterdir() if p.is_dir()):
            if sequence_dir.name == BACKGROUND_SEQUENCE or (sequences and sequence_dir.name not in sequences):
                continue
            try:
                found.append(discover_sequence(sequence_dir))
            except CaptureLayoutError as error:
                problems.append(str(error))
    return found, problems
