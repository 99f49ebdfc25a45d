"""Fakes and builders for the executor tests: a scripted fleet, gateway, restorer and handoff.

The real SQLite store and the real policy are used; only the outside world is faked. A
`KillSwitch` shared by the fakes raises `Killed` (a BaseException, like a SIGKILL that skips
every `except Exception`) at the k-th side effect, to simulate a daemon dying at that instant.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry

from tinker_recovery.core.model import (
    TAG_LINEAGE,
    Attempt,
    CheckpointKind,
    CheckpointView,
    Lineage,
    LineageState,
    RunView,
    WeightsInfo,
)
from tinker_recovery.errors import ActionFailed, RemoteRejected
from tinker_recovery.obs.metrics import Metrics
from tinker_recovery.settings import CheckpointSettings, Rule
from tinker_recovery.shell import executor as ex
from tinker_recovery.shell.handoff import HandoffAction, HandoffRequest
from tinker_recovery.shell.restore import RestoreResult
from tinker_recovery.shell.store.base import Event, Transition
from tinker_recovery.shell.store.sqlite import SqliteStore

T = TypeVar("T")
T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
LINEAGE_ID = "lin-a"
RUN_ID = "run-a"
BASE_MODEL = "Qwen/Qwen3-8B"


class Killed(BaseException):
    """The process died here: no cleanup code runs."""


class KillSwitch:
    """Counts side effects; raises Killed at number `at` (never when `at` is None)."""

    def __init__(self, at: int | None = None) -> None:
        self.at = at
        self.count = 0
        self.fired: str | None = None  # label of the side effect the kill interrupted
        self.labels: list[str] = []  # every kill point passed, in order

    def tick(self, label: str) -> None:
        self.count += 1
        self.labels.append(label)
        if self.at is not None and self.count == self.at:
            self.fired = label
            raise Killed(label)


class FakeClock:
    def __init__(self, now: datetime = T0) -> None:
        self._now = now

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return (self._now - T0).total_seconds()

    async def sleep(self, delay_s: float, *, wakeup: asyncio.Event | None = None) -> None:
        self.advance(delay_s)
        await asyncio.sleep(0)

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)


def ckpt(
    name: str,
    *,
    age_s: float,
    run: str = RUN_ID,
    expires_in_s: float | None = None,
    kind: CheckpointKind = CheckpointKind.TRAINING,
    now: datetime = T0,
) -> CheckpointView:
    return CheckpointView(
        checkpoint_id=f"weights/{name}",
        kind=kind,
        tinker_path=f"tinker://{run}/weights/{name}",
        time=now - timedelta(seconds=age_s),
        expires_at=None if expires_in_s is None else now + timedelta(seconds=expires_in_s),
    )


GOOD_INFO = WeightsInfo(base_model=BASE_MODEL, is_lora=True, lora_rank=32, has_optimizer_state=True)


def corrupted_run(
    last: CheckpointView | None = None, labels: Mapping[str, str] | None = None
) -> RunView:
    return RunView(
        run_id=RUN_ID,
        base_model=BASE_MODEL,
        owner="team",
        is_lora=True,
        lora_rank=32,
        corrupted=True,
        last_request_time=T0 - timedelta(hours=1),
        last_checkpoint=last,
        user_metadata=dict(labels or {}),
    )


def lineage(**changes: Any) -> Lineage:
    base = Lineage(
        lineage_id=LINEAGE_ID,
        root_run_id=RUN_ID,
        current_run_id=RUN_ID,
        state=LineageState.RECOVERING,
        reason="recovering",
        first_seen_at=T0 - timedelta(days=1),
        updated_at=T0,
        corrupted_reads=2,
        corrupted_since=T0 - timedelta(minutes=30),
        detected_at=T0 - timedelta(minutes=29),
        attempt_starts=(T0,),
        attempts_total=1,
        rule="default",
    )
    return replace(base, **changes)


def rule(**changes: Any) -> Rule:
    fields: dict[str, Any] = {
        "name": "default",
        "handoff": "job",
        "checkpoint": CheckpointSettings(min_ttl=600.0, protect_ttl=86400.0),
        "confirm_deadline": 900.0,
    }
    fields.update(changes)
    return Rule(**fields)


@dataclass
class Fleet:
    """The runs the Tinker API would list; fakes add successors to it."""

    clock: FakeClock
    runs: dict[str, RunView] = field(default_factory=dict)

    def listing(self) -> list[RunView]:
        return list(self.runs.values())

    def add_run(self, run_id: str, metadata: Mapping[str, str], *, active: bool = True) -> None:
        when = self.clock.now() + timedelta(seconds=1 if active else -3600)
        self.runs[run_id] = RunView(
            run_id=run_id,
            base_model=BASE_MODEL,
            owner="team",
            is_lora=True,
            lora_rank=32,
            corrupted=False,
            last_request_time=when,
            user_metadata=dict(metadata),
        )

    def touch(self, run_id: str, *, checkpoint: CheckpointView | None = None) -> None:
        run = self.runs[run_id]
        self.runs[run_id] = replace(
            run,
            last_request_time=self.clock.now(),
            last_checkpoint=checkpoint or run.last_checkpoint,
        )


class FakeGateway:
    def __init__(self, switch: KillSwitch) -> None:
        self.switch = switch
        self.checkpoints: dict[str, list[CheckpointView] | Exception] = {}
        self.infos: dict[str, WeightsInfo | Exception] = {}
        self.ttl_calls: list[tuple[str, int | None]] = []
        self.ttl_error: Exception | None = None
        self.info_calls: list[str] = []

    async def list_checkpoints(self, run_id: str) -> list[CheckpointView]:
        self.switch.tick(f"list_checkpoints:{run_id}")
        found = self.checkpoints.get(run_id, RemoteRejected("no such run", status_code=404))
        if isinstance(found, Exception):
            raise found
        return list(found)

    async def weights_info(self, tinker_path: str) -> WeightsInfo:
        self.switch.tick(f"weights_info:{tinker_path}")
        self.info_calls.append(tinker_path)
        info = self.infos.get(tinker_path, GOOD_INFO)
        if isinstance(info, Exception):
            raise info
        return info

    async def set_checkpoint_ttl(self, tinker_path: str, ttl_s: int | None) -> None:
        self.switch.tick(f"set_ttl:{tinker_path}")
        self.ttl_calls.append((tinker_path, ttl_s))
        if self.ttl_error is not None:
            raise self.ttl_error


class FakeRestorer:
    def __init__(self, switch: KillSwitch, fleet: Fleet) -> None:
        self.switch = switch
        self.fleet = fleet
        self.calls: list[dict[str, Any]] = []
        self.error: ActionFailed | None = None
        self.refused: set[str] = set()  # checkpoints the service fails to load (user error)

    async def restore(
        self,
        checkpoint_path: str,
        *,
        with_optimizer: bool,
        user_metadata: Mapping[str, str],
        save_name: str,
    ) -> RestoreResult:
        self.switch.tick("restore")
        self.calls.append(
            {
                "checkpoint_path": checkpoint_path,
                "with_optimizer": with_optimizer,
                "user_metadata": dict(user_metadata),
                "save_name": save_name,
            }
        )
        if self.error is not None:
            raise self.error
        if checkpoint_path in self.refused:
            raise ActionFailed(
                f"restore from {checkpoint_path} failed: RequestFailedError: cannot load",
                action="restore",
                checkpoint_at_fault=True,
            )
        run_id = f"restored-{len(self.calls)}"
        # The daemon's own training client: it saved once and then went quiet.
        self.fleet.add_run(run_id, user_metadata, active=False)
        self.switch.tick("restore_returned")
        return RestoreResult(new_run_id=run_id, saved_path=f"tinker://{run_id}/weights/{save_name}")


class FakeHandoff:
    """The user's job: on hand_off it starts a run that carries the given user_metadata."""

    kind = "command"

    def __init__(self, switch: KillSwitch, fleet: Fleet, *, starts_job: bool = True) -> None:
        self.switch = switch
        self.fleet = fleet
        self.starts_job = starts_job
        self.requests: list[HandoffRequest] = []
        self.error: Exception | None = None  # ActionFailed, or whatever a broken action raises
        self.error_after_start = False  # raise `error` only after starting the job (a late crash)
        self.block: asyncio.Event | None = None  # set: hand_off waits on it (for drain tests)
        self.entered = asyncio.Event()  # hand_off has begun

    async def hand_off(self, request: HandoffRequest) -> str:
        self.switch.tick("handoff")
        self.entered.set()
        if self.block is not None:
            await self.block.wait()
        self.requests.append(request)
        if self.error is not None and not self.error_after_start:
            raise self.error
        if self.starts_job:
            self.fleet.add_run(f"succ-{len(self.requests)}", request.user_metadata)
        if self.error is not None:
            raise self.error
        self.switch.tick("handoff_returned")
        return "started"

    def keys(self) -> list[str]:
        return [r.idempotency_key for r in self.requests]


class KillableStore(SqliteStore):
    """The real SQLite store; every write is a kill point just before and just after it."""

    def __init__(self, path: Path, *, clock: FakeClock, switch: KillSwitch) -> None:
        super().__init__(path, clock=clock)
        self.switch = switch

    async def commit(self, transition: Transition, *, epoch: int | None = None) -> None:
        label = describe(transition)
        self.switch.tick(f"before {label}")
        await super().commit(transition, epoch=epoch)
        self.switch.tick(f"after {label}")

    async def append_event(self, event: Event) -> None:
        self.switch.tick(f"append_event:{event.kind}")
        await super().append_event(event)


def describe(transition: Transition) -> str:
    """A kill point's label: what the transition writes."""
    parts = []
    if transition.attempt is not None:
        parts.append(f"attempt:{transition.attempt.step}")
    if transition.lineage is not None:
        parts.append(f"lineage:{transition.lineage.state}")
    if transition.bad_checkpoint is not None:
        parts.append("bad_checkpoint")
    parts.extend(f"event:{event.kind}" for event in transition.events)
    return "commit " + ",".join(parts)


@dataclass
class World:
    """One daemon's dependencies; `rebuild()` is a restarted process on the same state."""

    path: Path
    clock: FakeClock
    switch: KillSwitch
    fleet: Fleet
    store: KillableStore
    gateway: FakeGateway
    restorer: FakeRestorer
    handoff: FakeHandoff
    metrics: Metrics
    executor: ex.Executor
    rules: Sequence[Rule]

    def handoffs(self) -> dict[str, HandoffAction]:
        return {"job": self.handoff}

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(f"tinker_recovery_{name}", labels)
        return 0.0 if value is None else value


async def build_world(
    path: Path, *, rules: Sequence[Rule] = (), kill_at: int | None = None, dry_run: bool = False
) -> World:
    clock = FakeClock()
    switch = KillSwitch(kill_at)
    fleet = Fleet(clock)
    store = KillableStore(path, clock=clock, switch=KillSwitch())
    await store.open()
    store.switch = switch
    gateway = FakeGateway(switch)
    restorer = FakeRestorer(switch, fleet)
    handoff = FakeHandoff(switch, fleet)
    metrics = Metrics(CollectorRegistry())
    world = World(
        path=path,
        clock=clock,
        switch=switch,
        fleet=fleet,
        store=store,
        gateway=gateway,
        restorer=restorer,
        handoff=handoff,
        metrics=metrics,
        executor=None,  # type: ignore[arg-type]  # set just below, once the world exists
        rules=rules or (rule(),),
    )
    world.executor = new_executor(world, dry_run=dry_run)
    return world


def new_executor(
    world: World,
    *,
    dry_run: bool = False,
    may_act: Callable[[int | None], bool] = lambda epoch: True,
) -> ex.Executor:
    return ex.Executor(
        store=world.store,
        gateway=world.gateway,
        restorer=world.restorer,
        handoffs=world.handoffs(),
        clock=world.clock,
        metrics=world.metrics,
        rand=lambda: 0.5,
        max_concurrent=2,
        rules=world.rules,
        dry_run=dry_run,
        may_act=may_act,
    )


async def seed(world: World, state: Lineage | None = None) -> Lineage:
    """Store the lineage as the poller would have, just before starting the attempt."""
    current = state or lineage()
    await world.store.save_lineage(
        current, Event(at=T0, kind="decision", reason="recover", lineage_id=current.lineage_id)
    )
    return current


async def stored(world: World, attempt: Attempt) -> Attempt:
    """The attempt as the store holds it now."""
    found = await world.store.get_attempt(attempt.attempt_id)
    assert found is not None
    return found


async def run_attempt(world: World, current: Lineage, run: RunView, the_rule: Rule) -> Attempt:
    """Start an attempt and wait for its steps to end (handed off, or finished)."""
    async with asyncio.TaskGroup() as tg:
        attempt = await world.executor.start(current, run, the_rule, tg=tg)
    assert attempt is not None
    return attempt


async def observe_progress(world: World, run_id: str, *, after_s: float = 10.0) -> None:
    """Two listings with the successor busier in the second: what confirmation needs (a run's
    creation alone is not progress)."""
    await world.executor.observe(world.fleet.listing(), world.clock.now())
    world.clock.advance(after_s)
    if run_id in world.fleet.runs:
        world.fleet.touch(run_id)
    await world.executor.observe(world.fleet.listing(), world.clock.now())


def only(items: Iterable[T]) -> T:
    found = list(items)
    assert len(found) == 1, found
    return found[0]


def lineage_tagged(run_id: str) -> dict[str, str]:
    return {TAG_LINEAGE: LINEAGE_ID, "origin": run_id}
