"""Issue 3, test 7: the fleet incident breaker staggers a mass incident, or holds until resume."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from e2e.harness import DaemonProc, Emu, cli, daemon_config, rule

pytestmark = pytest.mark.slow

Daemons = Callable[[Path, dict[str, Any]], DaemonProc]

RATE = 2
INTERVAL_S = 1.0


def test_stagger_starts_at_most_rate_attempts_per_interval(
    emu: Emu, daemons: Daemons, tmp_path: Path
) -> None:
    # The `log` handoff never produces a successor: attempts stay in flight, so what limits the
    # starts is the breaker alone (the concurrency cap is set well above the incident).
    # Threshold 1: however the 12 corruptions spread over cycles on a busy machine, no batch of
    # more than one can start before the breaker is open (a larger threshold let the first
    # cycle's confirmations, read before the rest, all start at once: issue 9, defect 13).
    rules = [rule("fleet", "fleet", handoff="log", confirm_deadline="60s")]
    breaker = {
        "threshold": 1,
        "window": "1m",
        "mode": "stagger",
        "stagger_rate": RATE,
        "stagger_interval": f"{INTERVAL_S}s",
        "cool_down": "1m",
    }
    config = daemon_config(emu, tmp_path, rules, max_concurrent=50)
    config["policy"]["breaker"] = breaker
    daemon = daemons(tmp_path, config).start()
    victims = [emu.create_run(user_metadata={"scenario": "fleet"}) for _ in range(12)]
    daemon.wait_polls(1)
    for run_id in victims:
        emu.corrupt(run_id)

    daemon.wait_for(lambda: len(daemon.handoff_calls()) == 12, "12 handoffs", 60)
    # The times the daemon decided each start (the cycle's own clock reading, which is what the
    # stagger counts), not when the rows landed: no wall-clock tolerance needed.
    starts = sorted(
        event.at.timestamp()
        for run_id in victims
        for event in daemon.store_events(run_id)
        if event.kind == "decision" and event.data.get("decision") == "recover"
    )
    assert len(starts) == 12
    spans = [later - first for first, later in zip(starts, starts[RATE:], strict=False)]
    assert min(spans) >= INTERVAL_S, spans
    assert daemon.events("incident_breaker", open=True)
    assert daemon.stop() == 0


def test_hold_mode_holds_everything_until_resume(
    emu: Emu, daemons: Daemons, tmp_path: Path
) -> None:
    rules = [rule("fleet", "fleet", handoff="log", confirm_deadline="60s")]
    config = daemon_config(emu, tmp_path, rules)
    config["policy"]["breaker"] = {"threshold": 2, "window": "1m", "mode": "hold"}
    daemon = daemons(tmp_path, config).start()
    victims = [emu.create_run(user_metadata={"scenario": "fleet"}) for _ in range(4)]
    daemon.wait_polls(1)
    for run_id in victims:
        emu.corrupt(run_id)

    daemon.wait_for(
        lambda: all(daemon.lineage_state(r) == "held" for r in victims), "every victim held"
    )
    daemon.wait_polls(4)
    assert daemon.handoff_calls() == []
    assert all(daemon.lineage_state(r) == "held" for r in victims)
    assert daemon.status()["holds"] == ["*"]
    assert daemon.status()["incident_breaker_open"] is True

    answer = cli("resume", "--config", str(daemon.config_path))
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.startswith("resumed the whole fleet")
    daemon.wait_for(lambda: len(daemon.handoff_calls()) == 4, "4 handoffs after resume")
    assert {c["TINKER_RECOVERY_CORRUPTED_RUN"] for c in daemon.handoff_calls()} == set(victims)
    assert daemon.stop() == 0
