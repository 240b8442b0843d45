"""Training progress in the Prefect UI: a progress bar and a short table of recent steps, both updated in place.

The trainer calls back every few steps; talking to the API that often would slow training, so updates are
throttled by wall time. Each artifact is created once and then updated (a keyed artifact created again would
be a new version: a new card on the run's Artifacts tab each time). ``finish`` always publishes the final
state, also when a time budget stopped training before its last step. A failure to publish is logged and
otherwise ignored: the UI is a view on training, never a reason to stop it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

from flows.artifacts import artifact_key, run_logger, update_markdown_artifact
from stages.core.status import Status

def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def _psnr(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f} dB"


class TrainingProgressArtifacts:
    """A callable for ``optimize_sequence(progress=...)`` that mirrors ``TrainingProgress`` into artifacts.

    * ``training-progress-<pid>-<seq>``: a progress artifact (percent of steps) whose description says
      step, PSNR and ETA, updated in place at most every ``every_s`` seconds;
    * ``training-status-<pid>-<seq>``: a markdown table of the last few updates (step, PSNR, loss, rays/s,
      elapsed, ETA), updated in place at most every ``table_every_s`` seconds and once more at the end.
    """

    def __init__(self, participant: str, sequence: str, every_s: float = 3.0, table_every_s: float = 30.0,
                 rows: int = 12, clock: Callable[[], float] = time.monotonic):
        self.progress_key = artifact_key("training-progress", participant, sequence)
        self.status_key = artifact_key("training-status", participant, sequence)
        self.label = f"{participant}/{sequence}"
        self.every_s, self.table_every_s, self.rows = every_s, table_every_s, rows
        self._clock = clock
        self._artifact_id: UUID | None = None
        self._status_id: UUID | None = None
        self._last_progress = self._last_table = -math.inf
        self.history: list[dict[str, Any]] = []
        self.updates = 0

    def __call__(self, progress: Any) -> None:
        now = self._clock()
        final = progress.step >= progress.total_steps
        if final or now - self._last_progress >= self.every_s:
            self._last_progress = now
            self._remember(progress)
            self._publish(self._update_bar, progress)
        if final or now - self._last_table >= self.table_every_s:
            self._last_table = now
            if not self.history or self.history[-1]["step"] != progress.step:
                self._remember(progress)
            self._publish(self._update_table, progress)

    def finish(self, report: dict) -> None:
        """After training: the bar at 100 % (training ended, by its steps or by a time budget) and the table
        headed by the final state."""
        done = Status.of(report.get("status")) in (Status.COMPLETED, Status.SKIPPED)  # of(): old reports say "done"
        description = self.final_description(report)

        def bar(_: Any) -> None:
            if self._artifact_id is None:
                self._artifact_id = create_progress_artifact(100.0 if done else 0.0, key=self.progress_key,
                                                             description=description)
            else:
                update_progress_artifact(self._artifact_id, 100.0, description=description)

        self._publish(bar, None)
        self._publish(lambda _: self._write_table(description), None)

    def final_description(self, report: dict) -> str:
        """``<pid>/<seq>: completed (time budget) at step 2225/3000, train PSNR 24.10 dB, in 5m00s``."""
        last = self.history[-1] if self.history else None
        description = f"{self.label}: {report.get('status', 'finished')}"
        if report.get("stopped_by"):
            description += f" ({report['stopped_by']})"
        step = report.get("steps", last["step"] if last else None)
        if step is not None:
            planned = report.get("steps_planned")
            description += f" at step {step}" + (f"/{planned}" if planned else "")
        psnr = report.get("psnr_train", last["psnr"] if last else None)
        if psnr is not None:
            description += f", train PSNR {_psnr(psnr)}"
        if report.get("train_seconds") is not None:
            description += f", in {format_duration(report['train_seconds'])}"
        return description

    def _remember(self, progress: Any) -> None:
        losses = getattr(progress, "losses", None) or {}
        self.history.append({
            "step": int(progress.step),
            "psnr": progress.psnr,
            "loss": losses.get("total", sum(losses.values()) if losses else None),
            "rays_per_s": getattr(progress, "rays_per_s", None),
            "elapsed_s": getattr(progress, "elapsed_s", None),
            "eta_s": getattr(progress, "eta_s", None),
        })
        del self.history[:-self.rows]

    def description(self, progress: Any) -> str:
        return (f"{self.label}: step {progress.step}/{progress.total_steps}, PSNR {_psnr(progress.psnr)}, "
                f"ETA {format_duration(getattr(progress, 'eta_s', None))}")

    def _update_bar(self, progress: Any) -> None:
        percent = 100.0 * min(1.0, progress.step / max(1, progress.total_steps))
        if self._artifact_id is None:
            self._artifact_id = create_progress_artifact(percent, key=self.progress_key,
                                                         description=self.description(progress))
        else:
            update_progress_artifact(self._artifact_id, percent, description=self.description(progress))

    def _update_table(self, progress: Any) -> None:
        self._write_table(self.description(progress))

    def _write_table(self, headline: str) -> None:
        lines = [f"### training {self.label}", "", headline, "",
                 "| step | PSNR | loss | rays/s | elapsed | ETA |", "| --- | --- | --- | --- | --- | --- |"]
        for row in self.history:
            loss = "?" if row["loss"] is None else f"{row['loss']:.4g}"
            rays = "?" if row["rays_per_s"] is None else f"{row['rays_per_s']:.0f}"
            lines.append(f"| {row['step']} | {_psnr(row['psnr'])} | {loss} | {rays} | "
                         f"{format_duration(row['elapsed_s'])} | {format_duration(row['eta_s'])} |")
        markdown = "\n".join(lines)
        if self._status_id is None:
            self._status_id = create_markdown_artifact(key=self.status_key, markdown=markdown,
                                                       description=f"training status of {self.label}")
        else:
            update_markdown_artifact(self._status_id, markdown)

    def _publish(self, action: Callable[[Any], None], progress: Any) -> None:
        try:
            action(progress)
            self.updates += 1
        except Exception as error:  # noqa: BLE001 - the UI must never stop training
            run_logger().warning("could not publish training progress of %s: %s", self.label, error)
