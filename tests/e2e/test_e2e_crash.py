"""Issue 3, test 8: SIGKILL right after each executor step, then a restart, hands off once.

A real daemon process with `TINKER_RECOVERY_FAILPOINT=executor.<step>` dies by SIGKILL the
moment that step's row is in the store. Restarted without the failpoint, it must reconcile the
unfinished attempt, never hand the same attempt off twice, leave exactly one job-made successor
behind, and still recover the run.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from e2e.harness import DaemonProc, Emu, daemon_config, rule

pytestmark = pytest.mark.slow

Daemons = Callable[[Path, dict[str, Any]], DaemonProc]

FAILPOINTS = [
    "executor.created",
    "executor.selecting",
    "executor.protecting",
    "executor.restoring",
    "executor.handing_off",
    "executor.handoff_returned",
    "executor.handed_off",
    "executor.confirming",
]


@pytest.mark.parametrize("failpoint", FAILPOINTS)
def test_sigkill_after_a_step_then_restart_hands_off_exactly_once(
    emu: Emu, daemons: Daemons, tmp_path: Path, failpoint: str
) -> None:
    # restore: sdk so that every step exists; a short confirm deadline so that an attempt whose
    # handoff never ran (killed at handing_off) fails over to the next one quickly.
    rules = [rule("crashy", "a", restore="sdk", confirm_deadline="4s")]
    daemon = daemons(tmp_path, daemon_config(emu, tmp_path, rules)).start(failpoint=failpoint)
    run_id = emu.create_run(user_metadata={"scenario": "a"})
    daemon.wait_polls(1)
    emu.corrupt(run_id)
    assert daemon.proc is not None
    code = daemon.wait_exit(timeout_s=20)
    assert code == -signal.SIGKILL, f"{failpoint}: exit {code}\n{daemon.tail()}"

    daemon.start()  # same store, no failpoint

    def recovered() -> bool:
        lineage = daemon.lineage_for_run(run_id)
        return (
            lineage is not None
            and lineage.state.value == "healthy"
            and lineage.current_run_id != run_id
        )

    daemon.wait_for(recovered, f"recovery after a kill at {failpoint}", 30)
    daemon.wait_polls(1)  # one more cycle: a second handoff would have started by now

    calls = daemon.handoff_calls()
    per_key = Counter(c["TINKER_RECOVERY_IDEMPOTENCY_KEY"] for c in calls)
    assert calls, "never handed off"
    assert max(per_key.values()) == 1, f"an attempt was handed off twice: {per_key}"
    assert len(calls) == 1, f"one handoff in all: {calls}"
    # Runs tagged as recovered from the corrupted one: the daemon's own SDK restores (loaded
    # from the corrupted run's checkpoints) and the job's resumed run (loaded from the copy).
    tagged = [r for r in emu.all_runs() if r.get("recovered_from") == run_id]
    made_by_job = [
        r for r in tagged if not str(r.get("loaded_from")).startswith(f"tinker://{run_id}/")
    ]
    assert [r["run_id"] for r in made_by_job] == [calls[0]["successor"]]
    attempts = daemon.attempts_for_run(run_id)
    assert len(tagged) - len(made_by_job) <= len(attempts)  # at most one restore per attempt
    lineage = daemon.lineage_for_run(run_id)
    assert lineage is not None
    assert lineage.current_run_id == calls[0]["successor"]
    assert attempts[-1].outcome is not None
    assert attempts[-1].outcome.value == "succeeded"
    assert all(a.outcome is not None for a in attempts), attempts  # nothing left half-done
    assert daemon.stop() == 0
