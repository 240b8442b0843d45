"""What the archive flow knows about a sequence without running it: ``reports/sequence.json``.

``process-sequence`` writes it when every stage it was asked for has finished. It names the stages, a digest of
their configs, and the finish time of each stage record in the capture store. A later archive run skips the
sequence only when all three still match: another stage list or config, or a stage re-run by hand since,
and the sequence runs again (where its stages then skip what is still valid).
"""

from __future__ import annotations

from datetime import datetime, timezone
from numbers import Real
from typing import Any

from stages.config import PipelineConfig
from stages.core.status import Status
from storage import CaptureStore, SequenceWorkDir, digest_of

SEQUENCE_REPORT = "sequence"


def parameters_digest(stages: list[str], config: PipelineConfig) -> str:
    """Digest of the stage list and the output-deciding fields (``result_fields``) of those stages' configs.

    Only the stages run count, each by the fields its own config hash covers, so a knob or another stage's
    setting never makes a finished sequence run again.
    """
    return digest_of(list(stages), {stage: config.stage(stage).result_fields() for stage in stages})


def store_records(work: SequenceWorkDir) -> dict[str, str]:
    """Stage name -> finish time of its record in the capture store ({} without a store)."""
    if not CaptureStore.exists(work.capture_uri):
        return {}
    store = CaptureStore.open(work.capture_uri)
    return {name: record.finished_at for name, record in store.stage_records().items()}


def headline_metrics(reports: dict[str, dict]) -> dict[str, float | None]:
    """Hold-out PSNR/SSIM from evaluate and the training PSNR from optimize, where those stages ran."""
    evaluate, optimize = reports.get("evaluate") or {}, reports.get("optimize") or {}

    def number(value: Any) -> float | None:
        return round(float(value), 3) if isinstance(value, Real) and not isinstance(value, bool) else None

    return {"psnr": number(evaluate.get("psnr")), "ssim": number(evaluate.get("ssim")),
            "psnr_train": number(optimize.get("psnr_train"))}


def record_finished_sequence(work: SequenceWorkDir, stages: list[str], config: PipelineConfig,
                             reports: dict[str, dict], seconds: float) -> dict:
    """Write ``reports/sequence.json`` after a run in which every wanted stage finished."""
    records = store_records(work)
    summary = {
        "status": Status.COMPLETED,
        "participant": work.participant,
        "sequence": work.sequence,
        "stages": {stage: reports[stage].get("status") for stage in stages},
        "parameters_digest": parameters_digest(stages, config),
        "records": {stage: records[stage] for stage in stages if stage in records},
        "seconds": round(seconds, 1),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        **headline_metrics(reports),
    }
    work.write_report(SEQUENCE_REPORT, summary)
    return summary


def finished_sequence(work: SequenceWorkDir, stages: list[str], config: PipelineConfig) -> dict | None:
    """The sequence's summary if a run with these stages and configs finished and nothing changed since."""
    try:
        summary = work.read_report(SEQUENCE_REPORT)
    except ValueError:  # not a JSON object: treat as never finished
        return None
    if not summary or summary.get("status") != Status.COMPLETED:
        return None
    if summary.get("parameters_digest") != parameters_digest(stages, config):
        return None
    recorded = summary.get("records") or {}
    current = store_records(work)
    if any(current.get(stage) != finished_at for stage, finished_at in recorded.items()):
        return None
    return summary
