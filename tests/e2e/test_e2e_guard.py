"""Issue 13 end to end: the real daemon keeps a driven run's expiring checkpoint alive, and
reports a stalled run, against the emulator."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from e2e.harness import POLL_S, DaemonProc, Emu, daemon_config, rule

pytestmark = pytest.mark.slow

Daemons = Callable[[Path, dict[str, Any]], DaemonProc]


def newest_training(emu: Emu, run_id: str) -> dict[str, Any]:
    listed = emu._json("GET", f"/api/v1/training_runs/{run_id}/checkpoints")
    training = [c for c in listed["checkpoints"] if c["checkpoint_type"] == "training"]
    return dict(training[-1])


def test_an_expiring_checkpoint_is_extended_and_still_restores_after_its_old_expiry(
    emu: Emu, daemons: Daemons, tmp_path: Path
) -> None:
    guard = {"min_remaining": "1h", "extend_to": "1d"}
    rules = [rule("guarded", "guard", guard=guard)]
    daemon = daemons(tmp_path, daemon_config(emu, tmp_path, rules)).start()
    # The newest of three checkpoints was saved a second ago with a 6 s TTL: left alone, it
    # (and with it every checkpoint of the run) would be gone in about 5 s.
    run_id = emu.create_run(user_metadata={"scenario": "guard"}, checkpoints=3, periodic_ttl_s=6.0)
    newest = newest_training(emu, run_id)
    original_expiry = datetime.fromisoformat(newest["expires_at"]).timestamp()

    daemon.wait_for(
        lambda: daemon.events("checkpoint_guarded", run_id=run_id), "the guard's extension"
    )
    assert emu.count("set_checkpoint_ttl") == 1
    # Past the original expiry (on the emulator's own clock), the checkpoint is still there.
    daemon.wait_for(lambda: emu.server.emulator.now() > original_expiry + 1, "the old expiry")
    still = newest_training(emu, run_id)
    assert still["tinker_path"] == newest["tinker_path"]
    assert datetime.fromisoformat(still["expires_at"]).timestamp() > original_expiry + 3600

    emu.corrupt(run_id)
    daemon.wait_for(lambda: daemon.handoff_calls(), "the handoff")
    (call,) = daemon.handoff_calls()
    assert call["TINKER_RECOVERY_CHECKPOINT"] == newest["tinker_path"]
    metrics = daemon.get("/metrics").text
    assert 'tinker_recovery_checkpoint_guard_total{outcome="extended"} 1.0' in metrics
    assert emu.count("set_checkpoint_ttl") <= 2  # ours, plus the executor's protect step


def test_a_stalled_run_is_reported_within_stall_after_plus_one_interval(
    emu: Emu, daemons: Daemons, tmp_path: Path
) -> None:
    rules = [rule("watched", "stall", stall_after="2s")]
    daemon = daemons(tmp_path, daemon_config(emu, tmp_path, rules)).start()
    run_id = emu.create_run(user_metadata={"scenario": "stall"}, kind="idle")  # just stopped
    (line,) = daemon.wait_for(
        lambda: daemon.events("lineage_stalled", run_id=run_id), "the stall report"
    )
    # Reported by the first cycle after stall_after, not before it.
    assert 2.0 <= line["idle_s"] <= 2.0 + POLL_S + 2.0  # slack: a cycle on a busy machine
    stalled = daemon.status()["guard"]["stalled"]
    assert [s["run_id"] for s in stalled] == [run_id]
    assert "tinker_recovery_lineages_stalled 1.0" in daemon.get("/metrics").text
    daemon.wait_polls(2)
    assert len(daemon.events("lineage_stalled", run_id=run_id)) == 1  # once, not per cycle
