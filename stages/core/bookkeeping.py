"""What every stage does around its work: check what ran before, skip what is done, record what it did.

A stage writes its outputs first and its record last, so a record always describes finished outputs.
Downstream stages fold their upstream records into their input digest: re-running ingest or calibration
invalidates everything after it without anyone having to remember to.
"""

from __future__ import annotations

from datetime import datetime, timezone

from stages.core.errors import StageOrderError
from stages.table import STAGE_TABLE
from storage import CaptureStore, SequenceWorkDir, StageRecord, digest_of

# The command that produces each stage's outputs, for "run X first" messages.
PRODUCED_BY = {row.name: row.command for row in STAGE_TABLE}


def open_store_for(work: SequenceWorkDir, stage: str, mode: str = "r+") -> CaptureStore:
    """The sequence's store, or a clear error that says to ingest first."""
    if not CaptureStore.exists(work.capture_uri):
        raise StageOrderError(f"{work.uri}: no capture store; the {stage} stage needs `{PRODUCED_BY['ingest']}` first")
    store = CaptureStore.open(work.capture_uri, mode=mode)
    require_stage(store, "ingest", stage)
    return store


def require_stage(store: CaptureStore, upstream: str, stage: str) -> StageRecord:
    """The upstream stage's record, or a clear error naming the command to run first."""
    record = store.stage_record(upstream)
    if record is None:
        raise StageOrderError(
            f"{store.uri}: the {stage} stage needs the {upstream} stage first: run `{PRODUCED_BY[upstream]}`"
        )
    return record


def upstream_digest(store: CaptureStore, *upstream: str, extra: object = None) -> str:
    """Digest of the upstream records this stage's outputs depend on (absent ones count as absent)."""
    parts = []
    for name in upstream:
        record = store.stage_record(name)
        parts.append((name, record.config_hash, record.input_digest, record.finished_at) if record else (name, None))
    return digest_of(*parts, extra)


def finish_stage(store: CaptureStore, work: SequenceWorkDir, stage: str, version: str, config_hash: str,
                 input_digest: str, report: dict) -> dict:
    """Write the report, then the record: the record is the last thing a stage writes."""
    work.write_report(stage, report)
    store.write_stage_record(StageRecord(stage=stage, version=version, config_hash=config_hash,
                                         input_digest=input_digest,
                                         finished_at=datetime.now(timezone.utc).isoformat(), report=report))
    return report
