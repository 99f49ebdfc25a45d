"""One behaviour suite for every Store backend: SQLite (always) and PostgreSQL (marked)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import ExitStack, closing
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from store_helpers import (
    EPOCH,
    FakeClock,
    full_attempt,
    full_lineage,
    make_attempt,
    make_event,
    make_lineage,
    pg_schema,
)

from tinker_recovery.core.model import AttemptOutcome, AttemptStep, LineageState
from tinker_recovery.errors import FencedOut, StaleAttempt
from tinker_recovery.shell.store import PostgresStore, SqliteStore
from tinker_recovery.shell.store import statements as q
from tinker_recovery.shell.store.base import Store, TakenRequest, Transition
from tinker_recovery.shell.store.support import load_migrations

SHORT_TTL_S = 0.3  # PostgreSQL leases run on the server clock: the expiry tests really wait this
LONG_TTL_S = 60.0


@dataclass
class Rig:
    """Builds store instances that share one database, and knows how to age its lease."""

    backend: str
    clock: FakeClock
    path: Path
    url: str
    opened: list[Store] = field(default_factory=list)

    async def make(self) -> Store:
        store: Store
        if self.backend == "sqlite":
            store = SqliteStore(self.path, clock=self.clock)
        else:
            store = PostgresStore(self.url, clock=self.clock)
        await store.open()
        self.opened.append(store)
        return store

    async def expire(self, ttl_s: float) -> None:
        if self.backend == "sqlite":
            self.clock.advance(ttl_s + 0.001)  # SQLite leases follow the injected clock
        else:
            await asyncio.sleep(ttl_s + 0.05)  # the database clock: a real, short wait

    def execute(self, statement: str) -> None:
        if self.backend == "sqlite":
            with closing(sqlite3.connect(self.path)) as lite, lite:
                lite.execute(statement)
        else:
            with psycopg.connect(self.url) as pg:
                pg.execute(statement)

    def schema_versions(self) -> list[int]:
        if self.backend == "sqlite":
            with closing(sqlite3.connect(self.path)) as conn:
                rows = conn.execute("SELECT version FROM schema_version ORDER BY 1").fetchall()
        else:
            with psycopg.connect(self.url) as conn:
                rows = conn.execute("SELECT version FROM schema_version ORDER BY 1").fetchall()
        return [r[0] for r in rows]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Rig]:
    with ExitStack() as stack:
        url = stack.enter_context(pg_schema()) if request.param == "postgres" else ""
        made = Rig(request.param, FakeClock(), tmp_path / "state.db", url)
        try:
            yield made
        finally:
            for store in made.opened:
                await store.close()


@pytest.fixture
async def store(rig: Rig) -> Store:
    return await rig.make()


# records ------------------------------------------------------------------------------------
async def test_lineage_round_trips_exactly(store: Store) -> None:
    lineage = full_lineage()
    await store.save_lineage(lineage, make_event(lineage_id=lineage.lineage_id))
    assert await store.get_lineage("lin-full") == lineage
    assert await store.get_lineage("missing") is None


async def test_attempt_round_trips_exactly(store: Store) -> None:
    attempt = full_attempt()
    await store.save_attempt(attempt, make_event("attempt_step", attempt_id=attempt.attempt_id))
    assert await store.get_attempt("att-full") == attempt
    assert await store.get_attempt("missing") is None


async def test_save_lineage_replaces_the_previous_version(store: Store) -> None:
    await store.save_lineage(make_lineage(), make_event())
    changed = make_lineage(state=LineageState.SUSPECT, corrupted_reads=1, reason="read once")
    await store.save_lineage(changed, make_event())
    assert await store.get_lineage("lin-1") == changed
    assert await store.list_lineages() == [changed]


async def test_lineage_for_run_finds_root_current_and_attempt_runs(store: Store) -> None:
    lineage = make_lineage("lin-a", root_run_id="r0", current_run_id="r2")
    await store.save_lineage(lineage, make_event())
    await store.save_lineage(make_lineage("lin-other"), make_event())
    await store.save_attempt(
        make_attempt("a1", "lin-a", corrupted_run_id="r1", successor_run_id="r1b"), make_event()
    )
    for run_id in ("r0", "r2", "r1", "r1b"):
        found = await store.lineage_for_run(run_id)
        assert found is not None, run_id
        assert found.lineage_id == "lin-a"
    assert await store.lineage_for_run("nobody") is None


async def test_list_lineages_filters_by_state(store: Store) -> None:
    waiting = make_lineage("w", state=LineageState.WAITING, first_seen_at=EPOCH)
    healthy = make_lineage("h", first_seen_at=EPOCH + timedelta(seconds=1))
    held = make_lineage("x", state=LineageState.HELD, first_seen_at=EPOCH + timedelta(seconds=2))
    for lineage in (held, healthy, waiting):
        await store.save_lineage(lineage, make_event())
    assert await store.list_lineages() == [waiting, healthy, held]
    assert await store.list_lineages([LineageState.HELD, LineageState.WAITING]) == [waiting, held]
    assert await store.list_lineages([]) == []


async def test_attempts_listed_by_number_and_unfinished_oldest_first(store: Store) -> None:
    second = make_attempt("b", number=2, started_at=EPOCH + timedelta(minutes=2))
    first = make_attempt("a", number=1, started_at=EPOCH + timedelta(minutes=1))
    done = make_attempt(
        "c", number=3, started_at=EPOCH, outcome=AttemptOutcome.FAILED, step=AttemptStep.DONE
    )
    other = make_attempt("z", "lin-2", started_at=EPOCH + timedelta(seconds=30))
    for attempt in (second, first, done, other):
        await store.save_attempt(attempt, make_event())
    assert await store.attempts("lin-1") == [first, second, done]
    assert await store.unfinished_attempts() == [other, first, second]
    finished = replace(second, outcome=AttemptOutcome.SUCCEEDED, finished_at=EPOCH)
    await store.save_attempt(finished, make_event())
    assert await store.unfinished_attempts() == [other, first]


async def test_events_come_newest_last_with_limit_and_filters(store: Store) -> None:
    payload = {"run": {"corrupted": True, "tags": ["a", "b"], "n": 3, "x": None}}
    await store.save_lineage(make_lineage(), make_event(lineage_id="lin-1", data=payload))
    for i in range(5):
        await store.append_event(
            make_event("poll", reason=f"r{i}", lineage_id="lin-1" if i % 2 else None, run_id="r")
        )
    everything = await store.events()
    assert [e.reason for e in everything] == ["test", "r0", "r1", "r2", "r3", "r4"]
    seqs = [e.seq for e in everything if e.seq is not None]
    assert len(seqs) == len(everything)
    assert seqs == sorted(set(seqs))  # assigned by the store, strictly increasing
    assert everything[0].data == payload
    assert everything[0].at == EPOCH
    assert [e.reason for e in await store.events(limit=2)] == ["r3", "r4"]
    assert [e.reason for e in await store.events(lineage_id="lin-1")] == ["test", "r1", "r3"]
    assert [e.reason for e in await store.events(lineage_id="lin-1", run_id="r")] == ["r1", "r3"]
    assert [e.reason for e in await store.events(run_id="r", limit=1)] == ["r4"]


async def test_holds_cover_one_lineage_or_the_fleet(store: Store) -> None:
    assert await store.holds() == set()
    await store.set_hold("lin-1", True, by="alice", at=EPOCH)
    await store.set_hold(None, True, by="bob", at=EPOCH)
    await store.set_hold("lin-1", True, by="again", at=EPOCH)  # idempotent
    assert await store.holds() == {"lin-1", None}
    await store.set_hold(None, False, by="bob", at=EPOCH)
    assert await store.holds() == {"lin-1"}
    await store.set_hold("lin-1", False, by="alice", at=EPOCH)
    await store.set_hold("never-held", False, by="alice", at=EPOCH)
    assert await store.holds() == set()


def settled(request_id: int, outcome: str = "refused") -> Transition:
    taken = TakenRequest(request_id, outcome, f"{outcome} for the test", EPOCH, "leader")
    return Transition(taken_request=taken, events=(make_event(reason=outcome),))


async def test_manual_requests_are_settled_once_each_in_order(store: Store) -> None:
    first = await store.request_recovery("run-1", None, by="alice", at=EPOCH)
    second = await store.request_recovery("run-2", "tinker://run-2/weights/1", by="bob", at=EPOCH)
    assert second > first
    pending = await store.pending_manual_requests()
    assert [(m.request_id, m.run_id, m.checkpoint_path, m.requested_by) for m in pending] == [
        (first, "run-1", None, "alice"),
        (second, "run-2", "tinker://run-2/weights/1", "bob"),
    ]
    assert pending[0].requested_at == EPOCH
    assert await store.manual_request_outcome(first) is None
    await store.commit(settled(first, "started"))
    # One settled: the other is still queued, and the first cannot be settled twice.
    assert [m.request_id for m in await store.pending_manual_requests()] == [second]
    assert await store.manual_request_outcome(first) == ("started", "started for the test")
    with pytest.raises(StaleAttempt):
        await store.commit(settled(first))
    assert [e.reason for e in await store.events()] == ["started"]  # the refused write left none


async def test_bad_checkpoints_are_remembered(store: Store) -> None:
    await store.mark_checkpoint_bad("tinker://r/weights/1", "no optimizer state", EPOCH)
    await store.mark_checkpoint_bad("tinker://r/weights/1", "base model differs", EPOCH)
    await store.mark_checkpoint_bad("tinker://r/weights/3", "unloadable", EPOCH)
    paths = [f"tinker://r/weights/{i}" for i in range(1200)]  # more than one SQL IN chunk
    assert await store.bad_checkpoints(paths) == {"tinker://r/weights/1", "tinker://r/weights/3"}
    assert await store.bad_checkpoints([]) == set()


async def test_naive_datetimes_are_refused(store: Store) -> None:
    naive = datetime(2026, 1, 1)  # noqa: DTZ001 - the point of the test
    with pytest.raises(ValueError, match="naive"):
        await store.save_lineage(make_lineage(first_seen_at=naive), make_event())
    assert await store.list_lineages() == []
    assert await store.events() == []


# lifecycle ----------------------------------------------------------------------------------
async def test_reopen_keeps_data_and_applies_each_migration_once(rig: Rig) -> None:
    first = await rig.make()
    started = await first.watch_started_at()
    await first.save_lineage(make_lineage(), make_event())
    await first.close()
    rig.clock.advance(3600)
    again = await rig.make()
    assert await again.get_lineage("lin-1") == make_lineage()
    assert await again.watch_started_at() == started == EPOCH
    expected = [
        m.version for m in load_migrations("sqlite" if rig.backend == "sqlite" else "postgres")
    ]
    assert rig.schema_versions() == expected


async def test_a_schema_from_a_newer_version_still_opens(rig: Rig) -> None:
    first = await rig.make()
    await first.save_lineage(make_lineage(), make_event())
    await first.close()
    # A newer release migrated this database (rolling upgrade, or a rollback afterwards).
    rig.execute(
        "INSERT INTO schema_version (version, name, applied_at) VALUES (999, 'future', "
        "'2030-01-01T00:00:00.000000+00:00')"
    )
    rig.execute("ALTER TABLE lineages ADD COLUMN future_column TEXT")
    older = await rig.make()
    assert await older.get_lineage("lin-1") == make_lineage()
    await older.save_lineage(make_lineage(reason="still writable"), make_event())
    assert 999 in rig.schema_versions()


async def test_concurrent_first_opens_migrate_once(rig: Rig) -> None:
    stores = await asyncio.gather(rig.make(), rig.make(), rig.make())
    assert len(stores) == 3
    assert rig.schema_versions() == [m.version for m in load_migrations("sqlite")]


# leadership and fencing ---------------------------------------------------------------------
async def test_renewal_keeps_the_epoch_and_leader_reports_it(rig: Rig) -> None:
    a = await rig.make()
    assert await a.leader() is None
    first = await a.acquire_or_renew("a", LONG_TTL_S)
    assert first is not None
    assert first.epoch == 1
    renewed = await a.acquire_or_renew("a", LONG_TTL_S)
    assert renewed is not None
    assert renewed.epoch == 1
    assert renewed.expires_at >= first.expires_at
    assert await a.leader() == renewed
    b = await rig.make()
    assert await b.acquire_or_renew("b", LONG_TTL_S) is None
    assert await b.leader() == renewed


async def test_takeover_bumps_epoch_and_fences_the_old_leader(rig: Rig) -> None:
    a, b = await rig.make(), await rig.make()
    lease_a = await a.acquire_or_renew("a", SHORT_TTL_S)
    assert lease_a is not None
    await a.save_lineage(make_lineage(), make_event(reason="by a"))
    await a.request_recovery("run-9", None, by="cli", at=EPOCH)
    await rig.expire(SHORT_TTL_S)
    lease_b = await b.acquire_or_renew("b", LONG_TTL_S)
    assert lease_b is not None
    assert lease_b.epoch == lease_a.epoch + 1

    stale = make_lineage(state=LineageState.RECOVERING, reason="stale write")
    with pytest.raises(FencedOut):
        await a.save_lineage(stale, make_event(reason="stale"))
    with pytest.raises(FencedOut):
        await a.save_attempt(make_attempt(), make_event(reason="stale"))
    with pytest.raises(FencedOut):
        await a.append_event(make_event(reason="stale"))
    with pytest.raises(FencedOut):
        await a.mark_checkpoint_bad("tinker://x/weights/1", "stale", EPOCH)
    with pytest.raises(FencedOut):
        await a.commit(settled(1))
    assert await a.acquire_or_renew("a", LONG_TTL_S) is None

    assert await b.get_lineage("lin-1") == make_lineage()
    assert await b.get_attempt("att-1") is None
    assert [e.reason for e in await b.events()] == ["by a"]
    assert await b.bad_checkpoints(["tinker://x/weights/1"]) == set()
    assert [m.run_id for m in await b.pending_manual_requests()] == ["run-9"]
    await b.save_lineage(stale, make_event(reason="by b"))
    assert await b.get_lineage("lin-1") == stale


async def test_expired_lease_refuses_writes_until_renewed_with_a_new_epoch(rig: Rig) -> None:
    a = await rig.make()
    lease = await a.acquire_or_renew("a", SHORT_TTL_S)
    assert lease is not None
    await rig.expire(SHORT_TTL_S)
    assert await a.leader() is None
    with pytest.raises(FencedOut):
        await a.append_event(make_event())
    again = await a.acquire_or_renew("a", LONG_TTL_S)
    assert again is not None
    assert again.epoch == lease.epoch + 1  # a lapse starts a new term
    await a.append_event(make_event(reason="after renewal"))
    assert [e.reason for e in await a.events()] == ["after renewal"]


async def test_release_hands_over_at_once(rig: Rig) -> None:
    a, b = await rig.make(), await rig.make()
    lease = await a.acquire_or_renew("a", LONG_TTL_S)
    assert lease is not None
    await a.release(lease)
    with pytest.raises(FencedOut):
        await a.append_event(make_event())
    taken = await b.acquire_or_renew("b", LONG_TTL_S)
    assert taken is not None
    assert taken.epoch == lease.epoch + 1


async def test_standby_cannot_write_but_operators_and_tools_can(rig: Rig) -> None:
    leader, standby, tool = await rig.make(), await rig.make(), await rig.make()
    assert await leader.acquire_or_renew("a", LONG_TTL_S) is not None
    assert await standby.acquire_or_renew("b", LONG_TTL_S) is None
    with pytest.raises(FencedOut):
        await standby.save_lineage(make_lineage(), make_event())
    with pytest.raises(FencedOut):
        await standby.commit(settled(1))
    # Not fenced: operator actions from any replica, and stores that never asked for the lease.
    await standby.set_hold(None, True, by="op", at=EPOCH)
    await standby.request_recovery("run-1", None, by="op", at=EPOCH)
    await tool.append_event(make_event(reason="from the CLI"))
    assert await leader.holds() == {None}
    assert [e.reason for e in await leader.events()] == ["from the CLI"]


async def test_fresh_instance_with_a_leaders_name_waits_for_expiry(rig: Rig) -> None:
    old, restarted = await rig.make(), await rig.make()
    lease = await old.acquire_or_renew("replica-0", SHORT_TTL_S)
    assert lease is not None
    assert await restarted.acquire_or_renew("replica-0", SHORT_TTL_S) is None
    await rig.expire(SHORT_TTL_S)
    taken = await restarted.acquire_or_renew("replica-0", LONG_TTL_S)
    assert taken is not None
    assert taken.epoch == lease.epoch + 1
    with pytest.raises(FencedOut):
        await old.append_event(make_event())


@pytest.mark.parametrize("contenders", [2, 5])
async def test_concurrent_acquire_elects_exactly_one(rig: Rig, contenders: int) -> None:
    stores = [await rig.make() for _ in range(contenders)]
    for _ in range(3):
        leases = await asyncio.gather(
            *(s.acquire_or_renew(f"r{i}", LONG_TTL_S) for i, s in enumerate(stores))
        )
        winners = [lease for lease in leases if lease is not None]
        assert len(winners) == 1
        assert winners[0].epoch == 1


async def test_concurrent_takeover_after_expiry_elects_exactly_one(rig: Rig) -> None:
    stores = [await rig.make() for _ in range(4)]
    first = await stores[0].acquire_or_renew("r0", SHORT_TTL_S)
    assert first is not None
    await rig.expire(SHORT_TTL_S)
    leases = await asyncio.gather(
        *(s.acquire_or_renew(f"r{i}", LONG_TTL_S) for i, s in enumerate(stores[1:], start=1))
    )
    winners = [lease for lease in leases if lease is not None]
    assert len(winners) == 1


async def test_lineage_for_run_is_answered_from_indexes(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db", clock=FakeClock())
    await store.open()
    await store.close()
    with closing(sqlite3.connect(tmp_path / "state.db")) as conn:
        plan = [
            row[3]
            for row in conn.execute(f"EXPLAIN QUERY PLAN {q.LINEAGE_FOR_RUN}", {"run_id": "r"})
        ]
    lookups = [step for step in plan if step.startswith(("SEARCH", "SCAN"))]
    assert len(lookups) == 5  # the four run-id branches and the final fetch by lineage id
    assert all(step.startswith("SEARCH") and "USING INDEX" in step for step in lookups), plan


# per-attempt fencing and atomic transitions -------------------------------------------------
async def test_work_from_an_old_term_is_fenced_even_after_the_replica_leads_again(
    rig: Rig,
) -> None:
    """Issue 9, defect 1: A leads (epoch 1) with attempt X; its lease lapses, B takes over
    (epoch 2), settles X and dies; A wins again (epoch 3). X's next write must be refused:
    it belongs to epoch 1, and the store remembering only A's latest epoch let it through."""
    a, b = await rig.make(), await rig.make()
    first = await a.acquire_or_renew("a", SHORT_TTL_S)
    assert first is not None
    x = make_attempt(step=AttemptStep.RESTORING, epoch=first.epoch)
    await a.save_attempt(x, make_event(reason="x restoring"))
    await rig.expire(SHORT_TTL_S)
    second = await b.acquire_or_renew("b", SHORT_TTL_S)
    assert second is not None
    abandoned = replace(
        x, step=AttemptStep.DONE, outcome=AttemptOutcome.ABANDONED, epoch=second.epoch
    )
    await b.save_attempt(abandoned, make_event(reason="abandoned by b"))
    await rig.expire(SHORT_TTL_S)
    third = await a.acquire_or_renew("a", LONG_TTL_S)
    assert third is not None
    assert third.epoch == first.epoch + 2

    with pytest.raises(FencedOut):
        await a.save_attempt(replace(x, step=AttemptStep.HANDING_OFF), make_event(reason="x"))
    with pytest.raises(FencedOut):
        await a.save_lineage(make_lineage(reason="old cycle"), make_event(), epoch=first.epoch)
    assert await a.get_attempt("att-1") == abandoned
    assert await a.get_lineage("lin-1") is None
    # The same replica's work under its current epoch goes through.
    await a.save_lineage(make_lineage(reason="new term"), make_event(), epoch=third.epoch)


async def test_a_finished_attempt_is_never_reopened(store: Store) -> None:
    """Issue 9, defect 1: an old writer's upsert turned a finished row back into unfinished."""
    done = make_attempt(step=AttemptStep.DONE, outcome=AttemptOutcome.SUCCEEDED)
    await store.save_attempt(done, make_event(reason="done"))
    with pytest.raises(StaleAttempt):
        await store.save_attempt(
            make_attempt(step=AttemptStep.HANDING_OFF), make_event(reason="late")
        )
    assert await store.get_attempt("att-1") == done
    assert await store.unfinished_attempts() == []
    assert [e.reason for e in await store.events()] == ["done"]


async def test_a_transition_writes_all_of_it_or_nothing(store: Store) -> None:
    """Issue 9, defect 4: lineage, attempt and event in one transaction. A refused attempt
    write takes the lineage and the events down with it."""
    await store.save_attempt(
        make_attempt(step=AttemptStep.DONE, outcome=AttemptOutcome.FAILED), make_event()
    )
    refused = Transition(
        attempt=make_attempt(step=AttemptStep.CONFIRMING),
        lineage=make_lineage(state=LineageState.RECOVERED),
        events=(make_event(reason="a"), make_event(reason="b")),
    )
    with pytest.raises(StaleAttempt):
        await store.commit(refused)
    assert await store.get_lineage("lin-1") is None
    assert len(await store.events()) == 1
    together = Transition(
        attempt=make_attempt("att-2", step=AttemptStep.CREATED),
        lineage=make_lineage(state=LineageState.RECOVERING),
        events=(make_event(reason="decided"), make_event(reason="created")),
    )
    await store.commit(together)
    lineage = await store.get_lineage("lin-1")
    assert lineage is not None
    assert lineage.state is LineageState.RECOVERING
    assert [a.attempt_id for a in await store.unfinished_attempts()] == ["att-2"]
    assert [e.reason for e in await store.events()][-2:] == ["decided", "created"]


async def test_retention_deletes_old_and_excess_events_but_keeps_open_lineages(
    store: Store,
) -> None:
    """Issue 12: history is bounded in age and rows; an open lineage's events stay."""
    old_at, new_at = EPOCH, EPOCH + timedelta(days=200)
    closed = make_lineage("closed", state=LineageState.HEALTHY)
    open_ = make_lineage("open", state=LineageState.WAITING)
    await store.save_lineage(closed, make_event(lineage_id="closed", at=old_at, reason="c-old"))
    await store.save_lineage(open_, make_event(lineage_id="open", at=old_at, reason="o-old"))
    for i in range(5):
        await store.append_event(make_event(lineage_id="closed", at=new_at, reason=f"c-new-{i}"))

    deleted = await store.compact(before=new_at - timedelta(days=1), keep=3)

    reasons = [e.reason for e in await store.events(limit=100)]
    assert "c-old" not in reasons  # too old, and its lineage is closed
    assert "o-old" in reasons  # too old, but the lineage is open
    # The newest 3 rows stay; older ones of closed lineages go (the open one's stays anyway).
    assert [r for r in reasons if r.startswith("c-new")] == ["c-new-2", "c-new-3", "c-new-4"]
    assert deleted == 3
    assert await store.compact(before=new_at - timedelta(days=1), keep=3) == 0
