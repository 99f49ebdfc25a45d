"""Operator-requested recoveries: taken by the next poll, or refused with a recorded reason."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tinker_recovery.core.model import Attempt, AttemptStep, Lineage, LineageState, RunView
from tinker_recovery.errors import StoreUnavailable
from tinker_recovery.settings import PolicySettings, Rule
from tinker_recovery.shell import manual
from tinker_recovery.shell.clock import SystemClock
from tinker_recovery.shell.store.base import Event, TakenRequest, Transition
from tinker_recovery.shell.store.sqlite import SqliteStore

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
RUN = "sess-1:train:0"


def a_run(run_id: str = RUN, **labels: str) -> RunView:
    return RunView(
        run_id=run_id,
        base_model="Qwen/Qwen3-8B",
        owner="alice",
        is_lora=True,
        lora_rank=32,
        corrupted=False,
        last_request_time=NOW,
        user_metadata=labels,
    )


class RecordingStarter:
    """Like the executor: the lineage, the decision's event and the settled request are one
    transaction with the attempt's first row."""

    def __init__(self, store: SqliteStore | None = None) -> None:
        self.store = store
        self.started: list[dict[str, Any]] = []
        self.busy_ids: set[str] = set()
        self.fail_for: set[str] = set()  # run ids whose start hits a store error

    def busy(self, lineage_id: str) -> bool:
        return lineage_id in self.busy_ids

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
        if run.run_id in self.fail_for:
            raise StoreUnavailable("disk I/O error")
        if self.store is not None:
            events = () if decision is None else (decision,)
            await self.store.commit(
                Transition(lineage=lineage, events=events, taken_request=taken_request),
                epoch=epoch,
            )
        self.started.append(
            {"lineage": lineage, "run": run.run_id, "rule": rule.name, "checkpoint": checkpoint}
        )
        return Attempt(
            attempt_id="a",
            lineage_id=lineage.lineage_id,
            number=lineage.attempts_total,
            corrupted_run_id=run.run_id,
            step=AttemptStep.CREATED,
            started_at=NOW,
            updated_at=NOW,
        )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = SqliteStore(tmp_path / "state.db", clock=SystemClock())
    await opened.open()
    assert await opened.acquire_or_renew("test", 60.0) is not None
    yield opened
    await opened.close()


def policy(**fields: Any) -> PolicySettings:
    rules = [
        Rule(name="jobs", match={"labels": {"job": "*"}}, handoff=None, restore="sdk"),
        Rule(name="bare", handoff=None),
    ]
    return PolicySettings(rules=rules, **fields)


async def take(
    store: SqliteStore, starter: RecordingStarter, runs: list[RunView], **cfg: Any
) -> int:
    async with asyncio.TaskGroup() as tg:
        return await manual.take(
            store=store,
            executor=starter,
            policy=policy(**cfg),
            runs=runs,
            now=NOW,
            tg=tg,
            on_start=lambda: None,
        )


async def test_request_starts_an_attempt_with_the_operators_checkpoint(store: SqliteStore) -> None:
    starter = RecordingStarter(store)
    path = f"tinker://{RUN}/weights/000010"
    await store.request_recovery(RUN, path, by="cli:alice", at=NOW)

    assert await take(store, starter, [a_run(job="a")]) == 1

    (started,) = starter.started
    assert (started["run"], started["rule"], started["checkpoint"]) == (RUN, "jobs", path)
    lineage = await store.lineage_for_run(RUN)
    assert lineage is not None
    assert lineage.state is LineageState.RECOVERING
    assert lineage.attempts_total == 1
    assert "manual recovery requested by cli:alice" in lineage.reason
    assert await store.pending_manual_requests() == []  # taken exactly once
    outcome = await store.manual_request_outcome(1)
    assert outcome is not None
    assert outcome[0] == "started"


async def test_one_failing_request_does_not_drop_the_others(store: SqliteStore) -> None:
    """Issue 9, defect 10: all queued requests were marked taken before any was handled, so
    one failure dropped the rest silently. Each is now settled by the write that acts on it."""
    starter = RecordingStarter(store)
    other = "sess-2:train:0"
    starter.fail_for.add(RUN)
    await store.request_recovery(RUN, None, by="cli:alice", at=NOW)
    await store.request_recovery(other, None, by="cli:bob", at=NOW)

    assert await take(store, starter, [a_run(job="a"), a_run(other, job="b")]) == 1

    assert [s["run"] for s in starter.started] == [other]
    # The failed one is still queued, for the next cycle.
    assert [r.run_id for r in await store.pending_manual_requests()] == [RUN]
    starter.fail_for.clear()
    assert await take(store, starter, [a_run(job="a"), a_run(other, job="b")]) == 1
    assert await store.pending_manual_requests() == []


@pytest.mark.parametrize(
    ("runs", "cfg", "busy", "reason"),
    [
        pytest.param([], {}, False, "not in the latest listing", id="run-missing"),
        pytest.param(
            [a_run()], {}, False, "no handoff and no SDK restore", id="no-way-to-hand-off"
        ),
        pytest.param([a_run(job="a")], {"dry_run": True}, False, "dry run", id="dry-run"),
        pytest.param([a_run(job="a")], {}, True, "already has an attempt", id="busy"),
    ],
)
async def test_request_is_refused_with_a_recorded_reason(
    store: SqliteStore, runs: list[RunView], cfg: dict[str, Any], busy: bool, reason: str
) -> None:
    starter = RecordingStarter(store)
    if busy:
        starter.busy_ids.add(RUN)
    await store.request_recovery(RUN, None, by="cli:bob", at=NOW)

    assert await take(store, starter, runs, **cfg) == 0

    assert starter.started == []
    events = await store.events(run_id=RUN)
    (refused,) = [e for e in events if e.kind == "manual_recovery_refused"]
    assert reason in refused.reason
    assert await store.lineage_for_run(RUN) is None
