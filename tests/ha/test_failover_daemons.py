"""Issue 6: whole-daemon failover with several replicas on one PostgreSQL schema.

Each scenario runs real `tinker-recovery run` processes against the emulator, breaks the leader
in the middle of an attempt, and then checks the two independent records: every corrupted run
was handed off exactly once (idempotency keys in the handoff log, successor runs in the
emulator), every run recovered, and a standby took over (role in /status, leader gauge).
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from e2e.harness import Emu, wait_until
from ha.cluster import LEASE_TTL_S, BlackHole, Cluster, cluster, via_proxy

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(150)]


@pytest.fixture
def ha(emu: Emu, tmp_path: Path) -> Iterator[Cluster]:
    with cluster(emu, tmp_path, handoff_delay_s=1.0) as made:
        yield made


def _standby_took_over(ha: Cluster, old: str) -> str:
    new = ha.wait_leader(not_=old)
    assert ha.replicas[new].status()["role"] == "leader"
    assert ha.leader_gauge(new) == 1.0
    for name in ha.alive():
        if name != new:
            assert ha.leader_gauge(name) == 0.0, f"{name} still reports itself leader"
    return new


@pytest.mark.parametrize("failpoint", ["executor.handing_off", "executor.handoff_returned"])
def test_leader_sigkilled_mid_attempt_standby_finishes_it_once(
    emu: Emu, tmp_path: Path, failpoint: str
) -> None:
    # Killed at handing_off, the job was never launched: the new leader waits out the confirm
    # deadline, then a second attempt hands off (once). A short deadline keeps that quick.
    with cluster(emu, tmp_path, handoff_delay_s=1.0, confirm_deadline="6s") as ha:
        _kill_mid_attempt(ha, failpoint)


def _kill_mid_attempt(ha: Cluster, failpoint: str) -> None:
    leader = ha.start("r0", failpoint=failpoint)
    ha.wait_leader()
    ha.start("r1")
    ha.start("r2")
    assert sorted(ha.roles().values()) == ["leader", "standby", "standby"]
    runs = [ha.corrupt_new_run() for _ in range(2)]
    leader.wait_polls(1)
    for run_id in runs:
        ha.corrupt(run_id)

    assert leader.wait_exit(timeout_s=30) == -signal.SIGKILL, leader.tail()
    _standby_took_over(ha, "r0")
    ha.wait_recovered()
    ha.replicas[ha.wait_leader()].wait_polls(2)  # a duplicate would have started by now
    ha.exactly_once()


def test_leader_cut_off_from_the_database_stops_and_standby_takes_over(ha: Cluster) -> None:
    hole = BlackHole(ha.url)
    try:
        cut = ha.start("cut", url=via_proxy(ha.url, hole.port))
        ha.wait_leader()
        ha.start("standby")
        run_id = ha.corrupt_new_run()
        cut.wait_polls(1)
        ha.corrupt(run_id)
        # The job has been launched: the leader is between its handing_off row and the next.
        wait_until(ha.begun, "the leader to begin a handoff", 20, ha.tails())
        hole.flowing.clear()
        cut_at = time.time()

        new = _standby_took_over(ha, "cut")
        assert new == "standby"
        lost = [e for e in cut.events("leadership_lost") if _at(e) >= cut_at]
        gained = ha.replicas[new].events("leadership_gained")
        assert lost, f"the cut-off leader never stepped down\n{cut.tail()}"
        assert _at(lost[0]) < _at(gained[-1]), "the standby began before the leader stopped"
        ha.wait_recovered()

        hole.flowing.set()  # heal: the old leader's stuck writes reach the server, fenced
        ha.replicas[new].wait_polls(2)
        assert ha.leaders() == [new]
        ha.exactly_once()
    finally:
        hole.close()


def _cluster_name() -> str:
    listed = subprocess.run(
        ["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=True
    ).stdout.split()
    return f"{listed[0]} {listed[1]}"  # version and name of the first (only) cluster


def _pg_ctl(action: str) -> None:
    version, name = _cluster_name().split()
    subprocess.run(["pg_ctlcluster", version, name, action], check=True, timeout=60)


def _ensure_pg_up() -> None:
    if (
        "online"
        not in subprocess.run(
            ["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=True
        ).stdout
    ):
        _pg_ctl("start")


def test_database_restart_nobody_acts_while_down_and_exactly_once_after(ha: Cluster) -> None:
    ha.start("r0")
    ha.wait_leader()
    ha.start("r1")
    before, during = ha.corrupt_new_run(), ha.corrupt_new_run()
    ha.replicas["r0"].wait_polls(1)
    ha.corrupt(before)
    wait_until(ha.begun, "a handoff in flight", 20, ha.tails())
    try:
        _pg_ctl("stop")
        down_at = time.time()
        ha.corrupt(during)  # detected only once the database is back: nothing may act on it
        time.sleep(LEASE_TTL_S * 1.5)  # longer than the lease: it has expired meanwhile
        up_at = time.time()
    finally:
        _ensure_pg_up()
    acted = [
        (name, e["event"])
        for name, replica in ha.replicas.items()
        for e in replica.logs()
        if e.get("event") in ("attempt_step", "lineage_transition")
        and down_at + 0.5 < _at(e) < up_at
    ]
    assert acted == [], f"replicas acted with the database down: {acted}"
    assert not [r for r in ha.begun() if down_at + 0.5 < r["begin"] < up_at]

    ha.wait_recovered(60)
    ha.replicas[ha.wait_leader()].wait_polls(2)
    assert len(ha.leaders()) == 1
    ha.exactly_once()


def _at(event: dict[str, object]) -> float:
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


def test_fresh_deployment_standby_recovers_a_run_corrupted_during_the_failover(
    emu: Emu, tmp_path: Path
) -> None:
    # Both replicas start with a brand-new store, as a fresh two-replica install does.
    with cluster(emu, tmp_path, watched_for_s=None) as fresh:
        fresh.start("r0")
        fresh.wait_leader()
        fresh.start("r1")
        run_id = fresh.corrupt_new_run()
        fresh.replicas["r0"].wait_polls(2)  # the leader has seen it healthy
        fresh.kill("r0")
        fresh.corrupt(run_id)  # between the leader's death and the takeover
        _standby_took_over(fresh, "r0")

        def settled() -> str | None:
            lineage = fresh.lineage(run_id)
            state = None if lineage is None else lineage.state.value
            return None if state in (None, "healthy", "suspect") else state

        state = wait_until(settled, "the new leader to decide on the run", 20, fresh.tails())
        assert state != "ignored", "a run corrupted during the failover was ignored"
        fresh.wait_recovered(20)
        fresh.exactly_once()
