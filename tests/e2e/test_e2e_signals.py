"""Issue 3, test 9: SIGTERM mid-flight stops cleanly without redoing work; SIGHUP reloads."""

from __future__ import annotations

import copy
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from e2e.harness import DaemonProc, Emu, daemon_config, rule

pytestmark = pytest.mark.slow

Daemons = Callable[[Path, dict[str, Any]], DaemonProc]


def recovered(daemon: DaemonProc, run_id: str) -> bool:
    lineage = daemon.lineage_for_run(run_id)
    return (
        lineage is not None
        and lineage.state.value == "healthy"
        and lineage.current_run_id != run_id
    )


def test_sigterm_during_a_handoff_exits_0_and_the_restart_only_confirms(
    emu: Emu, daemons: Daemons, tmp_path: Path
) -> None:
    daemon = daemons(tmp_path, daemon_config(emu, tmp_path, [rule("r", "a")])).start()
    run_id = emu.create_run(user_metadata={"scenario": "a"})
    daemon.wait_polls(1)
    emu.corrupt(run_id)
    daemon.wait_for(
        lambda: daemon.events("attempt_step", step="handing_off"), "the handoff to start"
    )
    daemon.signal(signal.SIGTERM)  # the job handoff is running (it takes about a second)
    assert daemon.wait_exit() == 0, daemon.tail()
    assert daemon.events("daemon_stopped", exit_code=0)
    (attempt,) = daemon.attempts_for_run(run_id)
    assert attempt.step.value in ("handed_off", "confirming", "done"), attempt
    assert len(daemon.handoff_calls()) == 1

    daemon.start()
    daemon.wait_for(lambda: recovered(daemon, run_id), "the restarted daemon to confirm")
    daemon.wait_polls(2)
    (attempt,) = daemon.attempts_for_run(run_id)  # the same attempt, not a second one
    assert attempt.outcome is not None
    assert attempt.outcome.value == "succeeded"
    assert len(daemon.handoff_calls()) == 1
    assert daemon.stop() == 0


def test_sighup_applies_a_new_policy_and_refuses_a_broken_one(
    emu: Emu, daemons: Daemons, tmp_path: Path
) -> None:
    config = daemon_config(emu, tmp_path, [rule("r", "a")], dry_run=True)
    daemon = daemons(tmp_path, config).start()
    first = emu.create_run(user_metadata={"scenario": "a"})
    second = emu.create_run(user_metadata={"scenario": "a"})
    daemon.wait_polls(1)
    emu.corrupt(first)
    daemon.wait_for(
        lambda: daemon.events("lineage_transition", decision="dry_run"), "a dry_run decision"
    )
    assert daemon.handoff_calls() == []

    live = copy.deepcopy(config)
    live["policy"]["dry_run"] = False
    daemon.write_config(live)
    daemon.signal(signal.SIGHUP)
    daemon.wait_for(lambda: daemon.events("config_reloaded"), "config_reloaded")
    daemon.wait_for(lambda: recovered(daemon, first), "recovery once dry_run is off")
    assert daemon.status()["dry_run"] is False

    daemon.config_path.write_text('{"policy": {"dry_run": false, "confirmations": "many"}}\n')
    daemon.signal(signal.SIGHUP)
    failed = daemon.wait_for(lambda: daemon.events("config_reload_failed"), "config_reload_failed")
    assert "confirmations" in failed[0]["error"], failed
    assert daemon.get("/healthz").status_code == 200
    assert daemon.status()["dry_run"] is False
    assert len(daemon.events("config_reloaded")) == 1

    emu.corrupt(second)  # the kept (live) policy still acts
    daemon.wait_for(lambda: recovered(daemon, second), "recovery under the kept policy")
    assert daemon.stop() == 0
