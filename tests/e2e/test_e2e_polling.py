"""Issue 3, tests 1-2: a failed or partial poll is never evidence; exactly the Nth read acts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from e2e.harness import DaemonProc, Emu, daemon_config, rule

pytestmark = pytest.mark.slow

Daemons = Callable[[Path, dict[str, Any]], DaemonProc]

# (fault spec, the poll_failed reason it must produce)
FAULTS: list[tuple[dict[str, Any], str]] = [
    ({"kind": "error", "status": 503}, "http_5xx"),
    ({"kind": "rate_limit", "retry_after_s": 1}, "rate_limited"),
    ({"kind": "hang", "hang_s": 3}, "timeout"),
    ({"kind": "malformed"}, "malformed"),
    ({"kind": "truncate", "keep_fraction": 0.5}, "malformed"),
]


def test_failed_and_partial_polls_never_start_a_recovery(
    emu: Emu, daemons: Daemons, tmp_path: Path
) -> None:
    daemon = daemons(tmp_path, daemon_config(emu, tmp_path, [rule("watched", "a")])).start()
    # Enough runs that a truncated page really drops some of them.
    for _ in range(6):
        emu.create_run(user_metadata={"scenario": "other"})
    victims: list[str] = []
    for spec, reason in FAULTS:
        run_id = emu.create_run(user_metadata={"scenario": "a"})
        victims.append(run_id)
        fault = emu.add_fault(endpoints=["list_training_runs"], **spec)
        before = len(daemon.events("poll_failed", reason=reason))
        emu.corrupt(run_id)
        daemon.wait_for(
            lambda r=reason, b=before: len(daemon.events("poll_failed", reason=r)) >= b + 2,  # type: ignore[misc]  # defaults bind loop values
            f"two polls failing with {reason} under {spec}",
        )
        assert daemon.lineage_for_run(run_id) is None, f"{spec}: a failed poll was evidence"
        # Earlier victims may be read (and recovered) in the gaps between two faults: only
        # this victim, corrupted while every poll failed, must not have been acted on.
        mine = [
            call
            for call in daemon.handoff_calls()
            if call.get("TINKER_RECOVERY_CORRUPTED_RUN") == run_id
        ]
        assert mine == [], f"{spec}: handed off on a failed poll"
        emu.http.delete(f"/_emulator/faults/{fault}").raise_for_status()

    # The same runs, read for real, are recovered: the faults were all that held them back.
    def all_recovered() -> bool:
        lineages = [daemon.lineage_for_run(r) for r in victims]
        return all(lin is not None and lin.current_run_id != lin.root_run_id for lin in lineages)

    daemon.wait_for(all_recovered, "every victim recovered once the faults are gone", 40)
    keys = [call["TINKER_RECOVERY_IDEMPOTENCY_KEY"] for call in daemon.handoff_calls()]
    assert len(keys) == len(set(keys)) == len(victims)
    assert daemon.stop() == 0


def test_one_corrupted_read_then_a_healthy_one_does_nothing_and_two_confirm(
    emu: Emu, daemons: Daemons, tmp_path: Path
) -> None:
    config = daemon_config(emu, tmp_path, [rule("watched", "a")], confirmations=2)
    config["poll"]["interval"] = "1s"  # room to heal the run between two reads
    daemon = daemons(tmp_path, config).start()
    run_id = emu.create_run(user_metadata={"scenario": "a"})
    daemon.wait_polls(1)

    emu.corrupt(run_id)
    daemon.wait_for(lambda: daemon.events("lineage_transition", decision="suspect"), "a suspect")
    emu.heal(run_id)
    daemon.wait_polls(3)
    assert daemon.attempts_for_run(run_id) == []
    assert daemon.handoff_calls() == []
    lineage = daemon.lineage_for_run(run_id)
    assert lineage is not None
    assert lineage.state.value == "healthy", lineage

    emu.corrupt(run_id)
    daemon.wait_for(lambda: daemon.attempts_for_run(run_id), "an attempt after two reads")
    # Per read, in order: suspect, healthy again, suspect, then the second read confirms and acts.
    steps = [
        (e.data["decision"], e.data["to"])
        for e in daemon.store_events(run_id)
        if e.kind == "decision"
    ]
    assert steps == [
        ("suspect", "suspect"),
        ("watch", "healthy"),
        ("suspect", "suspect"),
        ("recover", "recovering"),
    ], steps
    recover_events = daemon.events("lineage_transition", decision="recover")
    assert "2/2 corrupted reads" in recover_events[0]["reason"]
    assert daemon.stop() == 0
