"""Where a sequence's checkpoints lie in its work folder, and the newest one that verifies.

The optimize stage writes ``nersemble/checkpoints/step-NNNNNNN.pt``; export, evaluate and the viewer read the
newest. The layout lives here, in the shared room below the stages, so that readers find a trained model without
importing the optimize stage (which imports them back, for the same layout). The file format itself is
``stages.nersemble.checkpoint``'s.
"""

from __future__ import annotations

import re

import torch

from stages.core.bookkeeping import PRODUCED_BY
from stages.core.errors import PipelineError
from stages.nersemble.checkpoint import CheckpointError, load_checkpoint
from storage import SequenceWorkDir

CHECKPOINTS = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"^step-(\d+)\.pt$")


def checkpoint_steps(work: SequenceWorkDir) -> list[int]:
    """Steps of the checkpoints on disk, oldest first."""
    found = [_CHECKPOINT_NAME.match(name) for name in work.listdir("nersemble", CHECKPOINTS)]
    return sorted(int(m.group(1)) for m in found if m)


def checkpoint_path(step: int) -> str:
    """The work-folder path of the checkpoint written after ``step`` steps (zero-padded, so names sort by step)."""
    return f"nersemble/{CHECKPOINTS}/step-{step:07d}.pt"


def latest_checkpoint(work: SequenceWorkDir, map_location: str | torch.device = "cpu",
                      skipped: list[str] | None = None, warnings: list[str] | None = None) -> dict | None:
    """The newest checkpoint, verified; None if there is none.

    With ``skipped`` (a resume), a damaged checkpoint is passed over for the next older one and its problem
    appended there; without it (export, evaluate) a damaged newest checkpoint is a PipelineError naming it.
    A checkpoint from before content hashes loads unverified, with a line in ``warnings`` saying so.
    """
    for step in reversed(checkpoint_steps(work)):
        data = work.read_bytes(checkpoint_path(step))
        if data is None:
            continue
        try:
            return load_checkpoint(data, map_location, name=work.path(checkpoint_path(step)), warnings=warnings)
        except CheckpointError as error:
            if skipped is None:
                raise PipelineError(f"{error}; run `{PRODUCED_BY['optimize']}` again (it resumes from the "
                                    f"previous checkpoint) or delete the file") from None
            skipped.append(f"{error}; skipped")
    return None
