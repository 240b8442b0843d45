"""One stage run, the same way for every stage: lock, check upstream, decide, skip or clear, run, record.

A stage entry point hands :func:`run_stage` two functions: ``decide`` (plan from the store and the config, and
say what the outputs depend on) and ``run`` (do the work, end with :meth:`StageRun.finish`). Everything around
them -- the sequence lock, the upstream records the stage table asks for, the config hash and input digest,
the skip decision, clearing the stale record -- lives here once, so every stage skips and resumes alike.

Damaged outputs: a record over missing chunks does not count (``CaptureStore.damaged_outputs``), so the stage
runs again and its report says why. Stores written before every chunk was stored lack their all-zero alpha and
depth chunks and meet this once. A stage that must run refuses, before it reads anything, inputs whose writer's
outputs are damaged, naming the command that rewrites them, rather than failing on a missing chunk half-way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from stages.core.bookkeeping import PRODUCED_BY, finish_stage, open_store_for, require_stage, upstream_digest
from stages.core.errors import StageOrderError
from stages.core.status import Status
from stages.table import stage as table_row
from storage import CaptureStore, SequenceWorkDir, config_hash, sequence_lock

PlanT = TypeVar("PlanT")
ReadyT = TypeVar("ReadyT")


@dataclass(frozen=True)
class Decision(Generic[PlanT]):
    """What a stage decided before writing anything, and what its outputs depend on.

    ``config``: the fields hashed into the record's config hash (the config's result fields and whatever was
    resolved from them, such as ``auto`` turned into a method). ``inputs``: the upstream stages whose records go
    into the input digest; None takes the stage table's ``inputs``. ``extra``: anything else the outputs depend
    on (a model file, user plates), folded into the input digest. ``record_choice``: a choice the decision made
    for the whole sequence that later stages read from the store (the hold-out set), written past the skip
    check whether the stage skips or runs, so a refused run writes nothing and a skipped one still leaves the
    store saying what its outputs were made with.
    """

    plan: PlanT
    config: Mapping[str, Any]
    inputs: tuple[str, ...] | None = None
    extra: object = None
    record_choice: Callable[[CaptureStore], None] | None = None


@dataclass(frozen=True)
class StageRun:
    """A run past the skip check: where it writes, and the two values its record will carry."""

    stage: str
    version: str
    store: CaptureStore
    work: SequenceWorkDir
    config_hash: str
    input_digest: str
    notes: tuple[str, ...] = ()  # why a stage whose record matched ran again; added to the report's warnings

    def finish(self, report: dict) -> dict:
        """Write the report, then the record: the record is the last thing a stage writes."""
        if self.notes:
            report = {**report, "warnings": [*self.notes, *report.get("warnings", [])]}
        return finish_stage(self.store, self.work, self.stage, self.version, self.config_hash, self.input_digest,
                            report)


def skipped_report(store: CaptureStore, stage: str, config_hash: str, input_digest: str) -> dict | None:
    """The stored report marked skipped when the stage's record matches; None when the stage must run."""
    if not store.is_complete(stage, config_hash, input_digest):
        return None
    return {**store.stage_record(stage).report, "status": Status.SKIPPED}


def _listed(problems: list[str], limit: int = 3) -> str:
    more = f", and {len(problems) - limit} more" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def rerun_note(store: CaptureStore, stage: str, config_hash: str, input_digest: str) -> str | None:
    """Why a stage whose record matches runs anyway (its outputs have missing chunks); None when it does not."""
    record = store.stage_record(stage)
    if record is None or not record.matches(config_hash, input_digest):
        return None
    damaged = store.damaged_outputs(stage)
    if not damaged:
        return None
    return (f"{stage} ran again: its record matched, but {len(damaged)} chunk(s) of its outputs were missing "
            f"({_listed(damaged)}); stores written before every chunk was stored lack their all-zero mattes and "
            f"depth maps, otherwise the store lost data. This run rewrote them")


def require_whole_inputs(store: CaptureStore, stage: str, inputs: tuple[str, ...]) -> None:
    """Refuse to run on inputs whose writer's outputs have missing chunks, naming the command that rewrites them."""
    for upstream in inputs:
        if store.stage_record(upstream) is None:
            continue  # an optional input that did not run (depth for optimize)
        damaged = store.damaged_outputs(upstream)
        if damaged:
            raise StageOrderError(
                f"{store.uri}: the {stage} stage reads the {upstream} stage's outputs, and {len(damaged)} chunk(s) "
                f"of them are missing ({_listed(damaged)}): run `{PRODUCED_BY[upstream]}` (it rewrites them), then "
                f"{stage} again")


def run_stage(work: SequenceWorkDir, stage: str, version: str, lock_timeout: float,
              decide: Callable[[CaptureStore], Decision[PlanT]], run: Callable[[StageRun, ReadyT], dict], *,
              prepare: Callable[[CaptureStore, PlanT], ReadyT] | None = None,
              clear_outputs: Callable[[SequenceWorkDir], None] | None = None) -> dict:
    """Run ``stage`` on one sequence unless its record says its outputs are current; returns its report.

    In order: the store and the ingest record are checked before the lock (a missing store must not leave an
    empty work folder behind) and again under it with every record the table ``requires``; ``decide(store)``
    plans the run; a record matching the plan's config hash and input digest returns the stored report marked
    skipped (after the decision's ``record_choice``). Otherwise inputs with missing chunks are refused
    (:func:`require_whole_inputs`), ``prepare(store, plan)`` loads what only a real
    run needs (it may still refuse, leaving the old record), the old record is cleared so a crash mid-run reruns
    the stage, the decision's ``record_choice`` is written, ``clear_outputs(work)`` removes outputs a new run
    would not overwrite, and ``run`` does the work, ending with ``StageRun.finish``.
    """
    row = table_row(stage)
    open_store_for(work, stage, mode="r")
    with sequence_lock(work.uri, timeout=lock_timeout):
        store = open_store_for(work, stage)
        for upstream in row.requires:
            if upstream != "ingest":  # opening the store checked it
                require_stage(store, upstream, stage)
        decision = decide(store)
        inputs = row.inputs if decision.inputs is None else decision.inputs
        chash, digest = config_hash(decision.config), upstream_digest(store, *inputs, extra=decision.extra)
        skipped = skipped_report(store, stage, chash, digest)
        if skipped is not None:
            if decision.record_choice is not None:
                decision.record_choice(store)
            return skipped
        require_whole_inputs(store, stage, inputs)
        note = rerun_note(store, stage, chash, digest)
        ready = decision.plan if prepare is None else prepare(store, decision.plan)
        store.clear_stage_record(stage)
        if decision.record_choice is not None:
            decision.record_choice(store)
        if clear_outputs is not None:
            clear_outputs(work)
        return run(StageRun(stage, version, store, work, chash, digest, (note,) if note else ()), ready)
