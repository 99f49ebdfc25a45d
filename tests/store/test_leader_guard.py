"""LeaderGuard on a real SQLite store and virtual time: local deadline, signalling, hand-over."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from store_helpers import FakeClock

from tinker_recovery.errors import ConfigError, StoreUnavailable
from tinker_recovery.shell.store.base import Lease
from tinker_recovery.shell.store.lease import LeaderGuard
from tinker_recovery.shell.store.sqlite import SqliteStore

TTL_S = 15.0
RENEW_S = 5.0
MARGIN_S = 3.0  # the default: ttl / 5


class ScriptedStore(SqliteStore):
    """A real store whose lease calls can be made to fail, and which counts them."""

    def __init__(self, path: Path, *, clock: FakeClock) -> None:
        super().__init__(path, clock=clock)
        self.failing = False
        self.calls = 0
        self.call_times: list[float] = []
        self.stop_after: tuple[int, asyncio.Event] | None = None
        self.hold: asyncio.Event | None = None  # while set, calls wait for it (a hung link)

    async def acquire_or_renew(self, replica_id: str, ttl_s: float) -> Lease | None:
        self.calls += 1
        self.call_times.append(self._clock.monotonic())
        if self.stop_after is not None and self.calls >= self.stop_after[0]:
            self.stop_after[1].set()
        if self.failing:
            raise StoreUnavailable("database unreachable (scripted)")
        if self.hold is not None:
            await self.hold.wait()
        return await super().acquire_or_renew(replica_id, ttl_s)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def stores(tmp_path: Path, clock: FakeClock) -> AsyncIterator[list[ScriptedStore]]:
    made = [ScriptedStore(tmp_path / "state.db", clock=clock) for _ in range(2)]
    for store in made:
        await store.open()
    yield made
    for store in made:
        await store.close()


def leads(guard: LeaderGuard) -> bool:
    """Read `is_leader` through a call, so mypy does not carry narrowing across clock moves."""
    return guard.is_leader


def make_guard(store: ScriptedStore, name: str, clock: FakeClock) -> LeaderGuard:
    return LeaderGuard(store, name, TTL_S, RENEW_S, clock)


async def test_leader_stops_at_local_deadline_before_the_lease_expires(
    stores: list[ScriptedStore], clock: FakeClock
) -> None:
    guard = make_guard(stores[0], "a", clock)
    changes: list[bool] = []
    guard.add_listener(changes.append)
    assert await guard.renew_once() is True
    assert guard.is_leader
    assert guard.epoch == 1
    assert guard.leading.is_set()
    assert not guard.standing_by.is_set()
    assert changes == [True]

    clock.advance(TTL_S - MARGIN_S - 0.01)
    assert leads(guard)
    clock.advance(0.02)
    assert not leads(guard)  # the local deadline passed...
    assert guard.lease is None
    assert await stores[0].leader() is not None  # ...while the database lease is still valid
    guard.check_deadline()
    assert changes == [True, False]
    assert guard.standing_by.is_set()
    assert not guard.leading.is_set()


async def test_failed_renewals_keep_leading_only_until_the_deadline(
    stores: list[ScriptedStore], clock: FakeClock
) -> None:
    store = stores[0]
    guard = make_guard(store, "a", clock)
    changes: list[bool] = []
    guard.add_listener(changes.append)
    assert await guard.renew_once() is True
    store.failing = True
    clock.advance(RENEW_S)
    assert await guard.renew_once() is True  # one miss: still inside ttl - margin
    clock.advance(RENEW_S)
    assert await guard.renew_once() is True
    clock.advance(RENEW_S)
    assert await guard.renew_once() is False
    assert changes == [True, False]
    store.failing = False
    assert await guard.renew_once() is True  # the lapse means a new term
    assert guard.epoch == 2
    assert changes == [True, False, True]


async def test_a_hung_renewal_does_not_delay_the_loss_and_is_not_duplicated(
    stores: list[ScriptedStore], clock: FakeClock
) -> None:
    # Virtual time: waiting on a call that does not answer uses up the wait's full length.
    store = stores[0]
    guard = make_guard(store, "a", clock)
    changes: list[bool] = []
    guard.add_listener(changes.append)
    assert await guard.renew_once() is True  # t=0: deadline at ttl - margin = 12
    store.hold = asyncio.Event()
    clock.advance(RENEW_S)
    assert await guard.renew_once() is True  # sent at t=5, waited 5 s: pending, still leads
    assert changes == [True]
    # Waits no longer than the deadline (t=12), then announces the loss without an answer.
    assert await guard.renew_once() is False
    assert clock.monotonic() == 1000.0 + TTL_S - MARGIN_S
    assert changes == [True, False]
    assert store.calls == 2  # the hung call was waited on again, not sent twice
    store.hold.set()
    store.hold = None
    # The late answer counts from when the call was sent (t=5), so it is good until t=17.
    assert await guard.renew_once() is True
    assert guard.epoch == 1
    assert changes == [True, False, True]
    assert store.calls == 2


async def test_a_renewal_hung_for_a_whole_ttl_is_abandoned(
    stores: list[ScriptedStore], clock: FakeClock
) -> None:
    store = stores[0]
    guard = make_guard(store, "a", clock)
    store.hold = asyncio.Event()
    assert await guard.renew_once() is False
    clock.advance(TTL_S)
    assert await guard.renew_once() is False  # abandoned (cancelled) now
    store.hold = None
    assert await guard.renew_once() is True  # a fresh call goes out
    assert store.calls == 2


async def test_a_renewal_in_a_new_term_is_announced_as_loss_then_gain(
    stores: list[ScriptedStore], clock: FakeClock
) -> None:
    guard = make_guard(stores[0], "a", clock)
    changes: list[bool] = []
    guard.add_listener(changes.append)
    assert await guard.renew_once() is True
    # The lease lapses (say the loop was stalled, so nothing announced the deadline) and the
    # next renewal opens a new term.
    clock.advance(TTL_S + 1)
    assert await guard.renew_once() is True
    assert guard.epoch == 2
    assert changes == [True, False, True]


async def test_standby_takes_over_when_the_leader_releases(
    stores: list[ScriptedStore], clock: FakeClock
) -> None:
    leader, standby = make_guard(stores[0], "a", clock), make_guard(stores[1], "b", clock)
    standby_changes: list[bool] = []
    standby.add_listener(standby_changes.append)
    assert await leader.renew_once() is True
    assert await standby.renew_once() is False
    assert standby_changes == []  # never led: nothing to announce
    assert standby.standing_by.is_set()
    await leader.release()
    assert not leader.is_leader
    assert await standby.renew_once() is True
    assert standby.epoch == 2
    assert standby_changes == [True]


async def test_standby_takes_over_after_the_leader_vanishes(
    stores: list[ScriptedStore], clock: FakeClock
) -> None:
    leader, standby = make_guard(stores[0], "a", clock), make_guard(stores[1], "b", clock)
    assert await leader.renew_once() is True
    clock.advance(TTL_S - 0.01)
    assert await standby.renew_once() is False  # lease still valid on the store's clock
    clock.advance(0.02)
    assert await standby.renew_once() is True
    assert standby.epoch == 2


async def test_run_renews_each_interval_and_releases_on_stop(
    stores: list[ScriptedStore], clock: FakeClock
) -> None:
    stop = asyncio.Event()
    stores[0].stop_after = (4, stop)
    guard = make_guard(stores[0], "a", clock)
    await guard.run(stop)
    assert stores[0].calls == 4
    assert stores[0].call_times == [1000.0 + RENEW_S * i for i in range(4)]
    assert not guard.is_leader
    taken = await stores[1].acquire_or_renew("b", TTL_S)
    assert taken is not None  # released: no wait for the TTL
    assert taken.epoch == 2


async def test_run_retries_sooner_after_a_failure(
    stores: list[ScriptedStore], clock: FakeClock
) -> None:
    stop = asyncio.Event()
    stores[0].failing = True
    stores[0].stop_after = (2, stop)
    guard = make_guard(stores[0], "a", clock)
    await guard.run(stop)
    assert stores[0].call_times == [1000.0, 1000.0 + RENEW_S / 2]
    assert not guard.is_leader


@pytest.mark.parametrize(
    ("ttl_s", "renew_s"),
    [
        pytest.param(15.0, 12.0, id="renew-past-deadline"),
        pytest.param(15.0, 0.0, id="renew-zero"),
        pytest.param(5.0, 5.0, id="renew-equals-ttl"),
    ],
)
def test_intervals_that_cannot_keep_the_lease_are_refused(
    tmp_path: Path, clock: FakeClock, ttl_s: float, renew_s: float
) -> None:
    store = SqliteStore(tmp_path / "x.db", clock=clock)
    with pytest.raises(ConfigError, match="renew interval"):
        LeaderGuard(store, "a", ttl_s, renew_s, clock)
