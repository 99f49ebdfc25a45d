"""The watch loop: no evidence from failed polls, no work for healthy runs, persistent holds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from tinker_recovery.core.model import (
    TAG_IDEMPOTENCY_KEY,
    TAG_LINEAGE,
    TAG_RECOVERED_FROM,
    Attempt,
    AttemptStep,
    Lineage,
    LineageState,
    RunView,
)
from tinker_recovery.errors import RemoteRejected, RemoteUnavailable, StoreUnavailable
from tinker_recovery.obs.metrics import POLL_ERROR_REASONS, Metrics
from tinker_recovery.settings import BreakerSettings, PolicySettings, PollSettings, Rule
from tinker_recovery.shell.poller import Poller
from tinker_recovery.shell.store.base import Event, TakenRequest, Transition
from tinker_recovery.shell.store.sqlite import SqliteStore

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self._now = T0

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return (self._now - T0).total_seconds()

    async def sleep(self, delay_s: float, *, wakeup: asyncio.Event | None = None) -> None:
        self._now += timedelta(seconds=delay_s)
        await asyncio.sleep(0)


class Source:
    """Answers each poll with the next scripted result: a fleet, or an error to raise."""

    def __init__(self, script: Sequence[list[RunView] | Exception]) -> None:
        self.script = list(script)

    async def list_runs(self) -> list[RunView]:
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


@dataclass
class Executor:
    """Records starts; like the real executor, it writes the decided lineage with the start."""

    store: SqliteStore | None = None
    started: list[tuple[str, str]] = field(default_factory=list)
    observed: int = 0
    reconciled: int = 0
    swept: int = 0

    async def start(
        self,
        lineage: Lineage,
        run: RunView,
        rule: Rule,
        *,
        tg: asyncio.TaskGroup,
        checkpoint: str | None = None,
        epoch: int | None = None,
        before: Lineage | None = None,
        decision: Event | None = None,
        taken_request: TakenRequest | None = None,
    ) -> Attempt | None:
        if self.store is not None and decision is not None:
            await self.store.save_lineage(lineage, decision, epoch=epoch)
        self.started.append((lineage.lineage_id, run.run_id))
        return Attempt(
            attempt_id=f"{lineage.lineage_id}#1",
            lineage_id=lineage.lineage_id,
            number=1,
            corrupted_run_id=run.run_id,
            step=AttemptStep.CREATED,
            started_at=T0,
            updated_at=T0,
        )

    async def observe(self, runs: Sequence[RunView], now: datetime) -> None:
        self.observed += 1

    async def reconcile(self, runs: Sequence[RunView] | None, *, epoch: int | None = None) -> None:
        self.reconciled += 1

    async def sweep(self, runs: Sequence[RunView], *, epoch: int | None = None) -> None:
        self.swept += 1

    def in_flight(self) -> int:
        return len(self.started)

    def busy(self, lineage_id: str) -> bool:
        return False


class Health:
    def __init__(self) -> None:
        self.successes = 0

    def mark_poll_success(self, monotonic_s: float) -> None:
        self.successes += 1

    def mark_poll_cycle(self, monotonic_s: float) -> None:
        pass

    store_ok: bool | None = None

    def mark_store(self, ok: bool) -> None:
        self.store_ok = ok

    def store_state(self) -> bool | None:
        """Read through a call, so that each assertion reads the value anew."""
        return self.store_ok


def run(run_id: str, *, corrupted: bool = False) -> RunView:
    return RunView(
        run_id=run_id,
        base_model="Qwen/Qwen3-8B",
        owner="alice",
        is_lora=True,
        lora_rank=32,
        corrupted=corrupted,
        last_request_time=T0,
    )


@dataclass
class Rig:
    poller: Poller
    store: SqliteStore
    executor: Executor
    metrics: Metrics
    clock: Clock
    health: Health

    async def cycles(self, count: int) -> None:
        async with asyncio.TaskGroup() as tg:
            for _ in range(count):
                await self.poller.cycle(tg)
                await self.clock.sleep(1.0)

    async def guarded_cycles(self, count: int) -> None:
        """Cycles as the loop runs them: a failing cycle is counted, not raised."""
        async with asyncio.TaskGroup() as tg:
            for _ in range(count):
                await self.poller.poll_once(tg)
                await self.clock.sleep(1.0)

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(f"tinker_recovery_{name}", labels) or 0.0


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = SqliteStore(tmp_path / "state.db", clock=Clock())
    await opened.open()
    assert await opened.acquire_or_renew("test", 3600.0) is not None
    yield opened
    await opened.close()


def rig(
    store: SqliteStore,
    script: Sequence[list[RunView] | Exception],
    *,
    leader: bool = True,
    **policy: Any,
) -> Rig:
    metrics = Metrics(CollectorRegistry())
    executor, clock, health = Executor(store), Clock(), Health()
    rules = [Rule(name="all", max_idle=None, recover_preexisting=True)]
    poller = Poller(
        source=Source(script),
        store=store,
        executor=executor,
        policy=PolicySettings(rules=rules, **policy),
        poll=PollSettings(interval=1.0),
        clock=clock,
        metrics=metrics,
        health=health,
        is_leader=lambda: leader,
    )
    return Rig(poller, store, executor, metrics, clock, health)


FLEET = [run(f"healthy-{i}") for i in range(50)]


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(RemoteUnavailable("503 from list_training_runs"), id="unavailable"),
        pytest.param(RemoteRejected("page 3 was truncated"), id="malformed-page"),
    ],
)
async def test_a_failed_poll_between_corrupted_reads_is_not_evidence(
    store: SqliteStore, failure: Exception
) -> None:
    bad = run("bad", corrupted=True)
    healthy_again = run("bad")
    r = rig(store, [[*FLEET, bad], failure, failure, [*FLEET, healthy_again]])

    await r.cycles(4)

    assert r.executor.started == []
    lineage = await store.get_lineage("bad")
    assert lineage is not None
    assert lineage.state is LineageState.HEALTHY  # the one corrupted read was a false alarm
    assert r.health.successes == 2
    errors = sum(r.sample("poll_errors_total", reason=why) for why in POLL_ERROR_REASONS)
    assert errors == 2


async def test_second_successful_corrupted_read_starts_one_attempt(store: SqliteStore) -> None:
    bad = run("bad", corrupted=True)
    r = rig(store, [[*FLEET, bad], RemoteUnavailable("timeout"), [*FLEET, bad], [*FLEET, bad]])

    await r.cycles(4)

    assert r.executor.started == [("bad", "bad")]
    assert r.sample("corruptions_detected_total") == 1
    assert r.executor.reconciled == 1  # once, before anything new, on the first good poll


async def test_healthy_runs_cost_no_store_writes(store: SqliteStore) -> None:
    r = rig(store, [FLEET, FLEET, FLEET])

    await r.cycles(3)

    assert await store.list_lineages() == []
    assert await store.events(limit=10) == []
    assert r.sample("runs_watched") == len(FLEET)
    assert r.sample("decisions_total", decision="watch") == 0


async def test_a_recovered_root_run_is_not_a_new_corruption(store: SqliteStore) -> None:
    old = run("root", corrupted=True)  # the backend keeps the flag on the old run forever
    successor = run("root-successor")
    recovered = Lineage(
        lineage_id="root",
        root_run_id="root",
        current_run_id="root-successor",
        state=LineageState.HEALTHY,
        reason="recovered",
        first_seen_at=T0,
        updated_at=T0,
        attempts_total=1,
    )
    await store.save_lineage(recovered, Event(at=T0, kind="test", reason="seed"))
    r = rig(store, [[old, successor]] * 3)

    await r.cycles(3)

    assert r.executor.started == []
    assert [lin.lineage_id for lin in await store.list_lineages()] == ["root"]


async def test_hold_mode_breaker_persists_a_fleet_hold_until_resume(store: SqliteStore) -> None:
    corrupted = [run(f"bad-{i}", corrupted=True) for i in range(4)]
    breaker = BreakerSettings(threshold=2, mode="hold")
    r = rig(store, [[*FLEET, *corrupted]] * 3 + [[*FLEET, *corrupted]] * 2, breaker=breaker)

    await r.cycles(3)

    assert r.executor.started == []
    assert None in await store.holds()  # survives a restart; only `resume` lifts it
    assert r.sample("incident_breaker_open") == 1
    held = await store.list_lineages()
    assert {lin.state for lin in held} == {LineageState.HELD}

    await store.set_hold(None, False, by="test", at=r.clock.now())
    await r.cycles(2)

    assert sorted(r.executor.started) == [(f"bad-{i}", f"bad-{i}") for i in range(4)]
    assert r.sample("incident_breaker_open") == 0


async def test_a_standby_neither_polls_nor_acts(store: SqliteStore) -> None:
    r = rig(store, [], leader=False)  # any poll would pop from an empty script and fail
    stop = asyncio.Event()

    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(r.poller.run(stop, tg))
        for _ in range(3):
            await asyncio.sleep(0)
        stop.set()
        r.poller.wake.set()
        await task

    assert r.health.successes == 0
    assert r.executor.reconciled == 0


# adversity (issue 9) ---------------------------------------------------------------------------
async def test_regaining_the_lease_does_not_count_the_same_corruption_again(
    store: SqliteStore,
) -> None:
    """Defect 5: every gain appended the store's detections to the breaker's memory again, so
    one corrupted run tripped a threshold of 4 (hold mode pauses the whole fleet)."""
    bad = run("bad", corrupted=True)
    breaker = BreakerSettings(threshold=3, mode="hold")
    r = rig(store, [[*FLEET, bad]] * 8, breaker=breaker)
    await r.cycles(2)  # suspect, then confirmed and started
    assert r.executor.started == [("bad", "bad")]
    for _ in range(6):  # the lease flaps: each gain rebuilds the breaker's memory
        r.poller.on_leadership(False)
        r.poller.on_leadership(True)
        await r.cycles(1)

    assert None not in await store.holds()
    assert r.sample("incident_breaker_open") == 0
    assert r.sample("corruptions_detected_total") == 1


async def test_a_hostile_lineage_tag_cannot_take_over_another_lineage(store: SqliteStore) -> None:
    """Defect 8: corrupted decoys tagged with a victim's lineage id made the victim 'retired'
    and never recovered (and the decoys were not recovered either). An untrusted tag is
    ignored: each run is its own lineage and each is recovered."""
    victim = run("victim", corrupted=True)
    decoys = [
        replace(run(f"decoy-{i}", corrupted=True), user_metadata={TAG_LINEAGE: "victim"})
        for i in range(4)
    ]
    r = rig(store, [[*decoys, victim, *FLEET]] * 3, max_concurrent=10)
    with capture_logs() as logs:
        await r.cycles(3)

    assert sorted(r.executor.started) == sorted(
        [(f"decoy-{i}", f"decoy-{i}") for i in range(4)] + [("victim", "victim")]
    )
    assert any(e["event"] == "untrusted_lineage_tag" for e in logs)


async def test_a_run_already_recovered_per_the_service_is_not_recovered_again(
    store: SqliteStore,
) -> None:
    """Defect 11: after the local store was lost, runs the daemon had already recovered were
    recovered again, although their successors (carrying our key and `recovered_from`) were
    in the same listing. The lineage is rebuilt from the listing instead."""
    origin = run("lost-1", corrupted=True)
    successor = replace(
        run("lost-1-successor"),
        user_metadata={
            TAG_LINEAGE: "lost-1",
            TAG_RECOVERED_FROM: "lost-1",
            TAG_IDEMPOTENCY_KEY: "lost-1#1-0123456789ab",
        },
    )
    r = rig(store, [[origin, successor, *FLEET]] * 3)

    await r.cycles(3)

    assert r.executor.started == []
    rebuilt = await store.get_lineage("lost-1")
    assert rebuilt is not None
    assert (rebuilt.current_run_id, rebuilt.state) == ("lost-1-successor", LineageState.HEALTHY)
    events = await store.events(lineage_id="lost-1")
    assert [e.kind for e in events] == ["lineage_rebuilt"]  # once, not every cycle


async def test_a_strangers_successor_tag_does_not_stop_a_recovery(store: SqliteStore) -> None:
    origin = run("mine", corrupted=True)
    stranger = replace(
        run("theirs"),
        owner="mallory",
        user_metadata={TAG_RECOVERED_FROM: "mine", TAG_IDEMPOTENCY_KEY: "mine#1-0123456789ab"},
    )
    r = rig(store, [[origin, stranger]] * 3)
    await r.cycles(3)
    assert r.executor.started == [("mine", "mine")]


class FailingStore(SqliteStore):
    """The real store, with writes that fail like a full disk or an immutable file."""

    failing = False

    async def commit(self, transition: Transition, *, epoch: int | None = None) -> None:
        if self.failing:
            raise StoreUnavailable(f"sqlite store {self.path}: database or disk is full")
        await super().commit(transition, epoch=epoch)


async def test_a_failing_store_fails_readiness_and_is_counted_as_store(tmp_path: Path) -> None:
    """Defect 12: with every write failing, /readyz said 200 and the errors were 'other'."""
    store = FailingStore(tmp_path / "state.db", clock=Clock())
    await store.open()
    assert await store.acquire_or_renew("test", 3600.0) is not None
    bad = run("bad", corrupted=True)
    r = rig(store, [[*FLEET, bad]] * 4)
    store.failing = True
    await r.guarded_cycles(2)
    assert r.health.store_state() is False
    assert r.sample("poll_errors_total", reason="store") == 2
    assert r.sample("poll_errors_total", reason="other") == 0
    assert r.executor.started == []
    store.failing = False
    await r.guarded_cycles(2)
    assert r.health.store_state() is True
    assert r.executor.started == [("bad", "bad")]
    await store.close()


async def test_a_deleted_state_file_is_noticed(tmp_path: Path) -> None:
    """Defect 11: deleting the SQLite file under a running daemon went unnoticed (writes
    landed in the unlinked file and /readyz stayed 200)."""
    path = tmp_path / "state.db"
    store = SqliteStore(path, clock=Clock())
    await store.open()
    assert await store.acquire_or_renew("test", 3600.0) is not None
    r = rig(store, [FLEET] * 2)
    await r.guarded_cycles(1)
    assert r.health.store_state() is True
    path.unlink()
    await r.guarded_cycles(1)
    assert r.health.store_state() is False
    assert r.sample("poll_errors_total", reason="store") == 1
    await store.close()


class StallingGuard:
    """Stands in for the checkpoint guard: reports one stalled run whose rule says recover."""

    def __init__(self) -> None:
        self.stalled: list[tuple[str, str]] = []

    async def run_cycle(self, runs: Sequence[RunView], now: datetime, policy: object) -> None:
        pass

    def recover_requests(self) -> list[tuple[str, str]]:
        return list(self.stalled)


async def test_a_stall_with_on_stall_recover_is_requested_once(store: SqliteStore) -> None:
    """Issue 13: `on_stall: recover` goes through the operator path (its checks), once per
    stall, however many cycles the run stays stalled."""
    stuck = run("stuck")
    r = rig(store, [[*FLEET, stuck]] * 4)
    guard = StallingGuard()
    r.poller._guard = cast(Any, guard)  # the real guard needs a live emulator: see e2e
    guard.stalled = [("stuck", "no request for 10m")]
    await r.cycles(3)
    # One request, settled by the operator path's checks (this rig's rule has no handoff, so
    # it is refused there with the reason, in history).
    events = [e for e in await store.events(run_id="stuck") if e.kind.startswith("manual")]
    assert [e.kind for e in events] == ["manual_recovery_refused"]
    assert "no handoff" in events[0].reason
    assert await store.manual_request_outcome(1) is not None
    assert await store.manual_request_outcome(2) is None  # never asked twice
    guard.stalled = []
    await r.cycles(1)
    assert await store.pending_manual_requests() == []


async def test_a_cycle_that_spans_a_lease_lapse_writes_nothing_from_the_old_term(
    tmp_path: Path,
) -> None:
    """Defect 1's poller half: a cycle that began under epoch 1 must not write decisions once
    the lease is in a newer epoch, even the same replica's."""
    clock = Clock()
    store = SqliteStore(tmp_path / "state.db", clock=clock)
    await store.open()
    first = await store.acquire_or_renew("test", 5.0)
    assert first is not None
    bad = run("bad", corrupted=True)
    r = rig(store, [[*FLEET, bad]] * 2)
    r.poller._lease_epoch = lambda: first.epoch  # the epoch the cycle read when it began
    await clock.sleep(6.0)  # the lease lapses...
    again = await store.acquire_or_renew("test", 3600.0)  # ...and this replica takes a new term
    assert again is not None
    assert again.epoch == first.epoch + 1

    await r.guarded_cycles(1)

    assert r.sample("poll_errors_total", reason="fenced") == 1
    assert await store.get_lineage("bad") is None  # the old term's decision was not written
    await store.close()
