"""Issue 3, tests 3-6: checkpoint fallback, budget exhaustion, skipped corruptions, dry_run."""

from __future__ import annotations

import time
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


def test_fallback_past_an_unloadable_and_an_expired_checkpoint(
    emu: Emu, daemons: Daemons, tmp_path: Path
) -> None:
    rules = [rule("proven", "sdk", restore="sdk"), rule("plain", "plain")]
    daemon = daemons(tmp_path, daemon_config(emu, tmp_path, rules)).start()
    unloadable_run = emu.create_run(user_metadata={"scenario": "sdk"}, checkpoints=3)
    expired_run = emu.create_run(user_metadata={"scenario": "plain"}, checkpoints=3)
    *_, older_u, newest_u = emu.training_checkpoints(unloadable_run)
    *_, older_e, newest_e = emu.training_checkpoints(expired_run)
    emu.unloadable(newest_u)
    emu.expire(newest_e, listed=True)  # still listed, with an expires_at in the past
    daemon.wait_polls(1)
    emu.corrupt(unloadable_run)
    emu.corrupt(expired_run)

    for run_id in (unloadable_run, expired_run):
        daemon.wait_for(lambda r=run_id: recovered(daemon, r), f"{run_id} recovered")  # type: ignore[misc]  # the default binds the loop value
    (attempt_u,) = daemon.attempts_for_run(unloadable_run)
    (attempt_e,) = daemon.attempts_for_run(expired_run)
    assert attempt_u.checkpoint_path == older_u
    assert attempt_e.checkpoint_path == older_e
    handed = {c["TINKER_RECOVERY_CORRUPTED_RUN"]: c for c in daemon.handoff_calls()}
    assert len(daemon.handoff_calls()) == 2
    # restore: sdk proves the older checkpoint and hands off the fresh copy it saved;
    # restore: none hands off the older checkpoint itself.
    assert handed[unloadable_run]["TINKER_RECOVERY_CHECKPOINT"] == attempt_u.handed_off_path
    assert str(attempt_u.handed_off_path).endswith("-recovery-1")
    assert handed[expired_run]["TINKER_RECOVERY_CHECKPOINT"] == older_e
    rejected = [row["checkpoint_path"] for row in daemon.events("checkpoint_rejected")]
    assert rejected == [newest_u]  # the expired one is never even a candidate
    assert daemon.stop() == 0


def test_a_handoff_that_always_fails_exhausts_the_budget_and_stops(
    emu: Emu, daemons: Daemons, tmp_path: Path
) -> None:
    rules = [rule("doomed", "doomed", handoff="fail", max_attempts=2)]
    daemon = daemons(tmp_path, daemon_config(emu, tmp_path, rules)).start()
    run_id = emu.create_run(user_metadata={"scenario": "doomed"})
    daemon.wait_polls(1)
    emu.corrupt(run_id)

    daemon.wait_for(lambda: daemon.lineage_state(run_id) == "exhausted", "the lineage exhausted")
    daemon.wait_polls(4)  # several more cycles, well past the 200-500 ms backoff cap
    attempts = daemon.attempts_for_run(run_id)
    assert [a.outcome.value if a.outcome else None for a in attempts] == ["failed", "failed"]
    assert all("exited 1" in a.reason for a in attempts), [a.reason for a in attempts]
    assert len(daemon.handoff_calls()) == 2
    assert daemon.lineage_state(run_id) == "exhausted"
    lineage = daemon.lineage_for_run(run_id)
    assert lineage is not None
    assert "max_attempts 2" in lineage.reason
    assert daemon.stop() == 0


def test_a_handoff_that_crashes_after_starting_the_job_is_not_repeated(
    emu: Emu, daemons: Daemons, tmp_path: Path
) -> None:
    rules = [rule("crashy", "crashy", handoff="crash", handoff_grace="10s")]
    daemon = daemons(tmp_path, daemon_config(emu, tmp_path, rules)).start()
    run_id = emu.create_run(user_metadata={"scenario": "crashy"})
    daemon.wait_polls(1)
    emu.corrupt(run_id)

    daemon.wait_for(lambda: recovered(daemon, run_id), f"{run_id} recovered")
    (attempt,) = daemon.attempts_for_run(run_id)
    (call,) = daemon.handoff_calls()  # the job was started once, and only once
    assert attempt.outcome is not None
    assert attempt.outcome.value == "succeeded"
    assert attempt.successor_run_id == call["successor"]
    (failed,) = daemon.events("handoff_failed")
    assert "was killed by SIGABRT" in failed["reason"]
    daemon.wait_polls(3)  # nothing more happens: no second attempt, no second handoff
    assert len(daemon.handoff_calls()) == 1
    assert len(daemon.attempts_for_run(run_id)) == 1
    assert daemon.stop() == 0


def test_preexisting_and_idle_corruptions_are_skipped_unless_the_rule_allows(
    emu: Emu, daemons: Daemons, tmp_path: Path
) -> None:
    rules = [
        rule("pre-default", "pre-default"),
        rule("pre-allowed", "pre-allowed", recover_preexisting=True),
        rule("idle-strict", "idle-strict", max_idle="1s"),
        rule("idle-lenient", "idle-lenient", max_idle=None),
    ]
    pre_default = emu.create_run(user_metadata={"scenario": "pre-default"}, corrupted=True)
    pre_allowed = emu.create_run(user_metadata={"scenario": "pre-allowed"}, corrupted=True)
    daemon = daemons(tmp_path, daemon_config(emu, tmp_path, rules)).start()
    idle_strict = emu.create_run(kind="idle", user_metadata={"scenario": "idle-strict"})
    idle_lenient = emu.create_run(kind="idle", user_metadata={"scenario": "idle-lenient"})
    time.sleep(1.5)  # let the idle runs go quiet for longer than max_idle (1s)
    emu.corrupt(idle_strict)
    emu.corrupt(idle_lenient)

    daemon.wait_for(lambda: recovered(daemon, pre_allowed), "the allowed pre-existing run")
    daemon.wait_for(lambda: recovered(daemon, idle_lenient), "the lenient idle run")
    daemon.wait_polls(2)
    for run_id, why in ((pre_default, "recover_preexisting is off"), (idle_strict, "idle")):
        lineage = daemon.lineage_for_run(run_id)
        assert lineage is not None
        assert lineage.state.value == "ignored", lineage
        assert why in lineage.reason
        assert daemon.attempts_for_run(run_id) == []
    handed = {c["TINKER_RECOVERY_CORRUPTED_RUN"] for c in daemon.handoff_calls()}
    assert handed == {pre_allowed, idle_lenient}
    assert daemon.stop() == 0


def test_dry_run_records_decisions_and_touches_nothing(
    emu: Emu, daemons: Daemons, tmp_path: Path
) -> None:
    rules = [rule("would-recover", "a", restore="sdk")]
    config = daemon_config(emu, tmp_path, rules, dry_run=True)
    daemon = daemons(tmp_path, config).start()
    run_id = emu.create_run(user_metadata={"scenario": "a"})
    daemon.wait_polls(1)
    emu.corrupt(run_id)

    daemon.wait_for(
        lambda: daemon.events("lineage_transition", decision="dry_run"), "a dry_run decision"
    )
    daemon.wait_polls(4)
    assert daemon.handoff_calls() == []
    for endpoint in ("load_weights", "set_checkpoint_ttl", "save_weights", "create_session"):
        assert emu.count(endpoint) == 0, f"dry_run called {endpoint}"
    assert emu.successors(run_id) == []
    kinds = [e.data.get("decision") for e in daemon.store_events(run_id) if e.kind == "decision"]
    assert "dry_run" in kinds, kinds
    assert all(
        a.outcome is None or a.outcome.value == "dry_run" for a in daemon.attempts_for_run(run_id)
    )
    assert daemon.status()["dry_run"] is True
    assert daemon.stop() == 0
