"""Flow runs whose machine died end Crashed: heartbeats from the runs our workers start, and the automation.

A GPU machine that loses power, or a worker SIGKILLed with its flow runs, leaves nobody to report the runs'
end: the server would show them Running forever, and a re-run would have to be started by someone who noticed.
Prefect's answer for self-hosted servers (its "detect zombie flows" guide) has two halves, both here:

- each flow run sends a ``prefect.flow-run.heartbeat`` event every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``
  seconds. ``flows.worker`` (``make worker``) puts :data:`DEFAULT_HEARTBEAT_S` into its worker's environment,
  which a process worker hands to every flow run it starts, unless that variable is set already;
- one automation on the server, with a proactive trigger: after a run's heartbeat, expect another heartbeat
  (or the run's end) within :func:`window_s` seconds, else change the run's state to Crashed. The launcher
  and ``make deploy`` create it when missing (:func:`ensure_heartbeat_automation`); an existing one is left as
  an operator may have tuned it.

The window must be longer than the heartbeat period of every flow run that sends heartbeats to the server,
ours and any other: Prefect itself sends one every 180 s by default. It also bounds the server outages a live
run survives: a run whose heartbeats could not be delivered for longer than the window is taken for dead.

``python -m flows.heartbeats`` (what ``make deploy`` runs) creates the automation and says whether it did.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from datetime import timedelta

HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
LEGACY_HEARTBEAT_ENV = "PREFECT_RUNNER_HEARTBEAT_FREQUENCY"  # Prefect's older name for the same setting
DEFAULT_HEARTBEAT_S = 60  # Prefect's validation refuses less than 30; 60 is one small event a minute per run
WINDOW_ENV = "NERSEMBLE_HEARTBEAT_WINDOW_S"
# Five of our heartbeats, and more than Prefect's own default period (180 s) so runs started elsewhere with
# Prefect's defaults are not taken for dead.
DEFAULT_WINDOW_S = 300
AUTOMATION_NAME = "nersemble: crash flow runs whose heartbeats stopped"
ENDS = ("Completed", "Failed", "Cancelled", "Crashed")  # a run that ended sends no more heartbeats, rightly


def with_heartbeats(environ: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Set the flow-run heartbeat period in ``environ`` (a worker's, inherited by its runs) unless one is set."""
    if not environ.get(HEARTBEAT_ENV) and not environ.get(LEGACY_HEARTBEAT_ENV):
        environ[HEARTBEAT_ENV] = str(DEFAULT_HEARTBEAT_S)
    return environ


def window_s() -> float:
    """Seconds without a heartbeat after which a run is taken for dead: ``$NERSEMBLE_HEARTBEAT_WINDOW_S`` or 300."""
    return float(os.environ.get(WINDOW_ENV) or DEFAULT_WINDOW_S)


def heartbeat_automation(window: float | None = None):  # noqa: ANN201 - an AutomationCore
    """The automation: for each flow run, after a heartbeat expect a heartbeat or its end, else mark it Crashed."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    seconds = window_s() if window is None else window
    return AutomationCore(
        name=AUTOMATION_NAME,
        description=(f"A flow run that sent a heartbeat and then nothing for {seconds:g} s lost its machine "
                     f"or process: mark it Crashed, so it does not stay Running and a re-run resumes it."),
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{end}" for end in ENDS)},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=seconds),
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"No heartbeat for {seconds:g} s: the flow run's process or machine is gone "
                    f"(automation {AUTOMATION_NAME!r}). Run it again to resume.",
        )],
    )


def ensure_heartbeat_automation(window: float | None = None) -> bool:
    """Create the automation on the configured API unless one of that name exists; True if created.

    Several workers may start at once and each create one; afterwards each keeps the one with the smallest id
    (the same choice everywhere) and deletes the rest, so the server ends with exactly one.
    """
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        if client.read_automations_by_name(AUTOMATION_NAME):
            return False
        client.create_automation(heartbeat_automation(window))
        found = sorted(client.read_automations_by_name(AUTOMATION_NAME), key=lambda a: str(a.id))
        for extra in found[1:]:
            client.delete_automation(extra.id)
        return True


def main() -> int:
    """Create the automation if missing and say so in one line."""
    try:
        created = ensure_heartbeat_automation()
    except Exception as error:  # noqa: BLE001 - one clear line, not a traceback
        print(f"could not create the automation {AUTOMATION_NAME!r}: {error}", file=sys.stderr)
        return 1
    state = f"created (window {window_s():g} s)" if created else "already there"
    print(f"automation {AUTOMATION_NAME!r}: {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
