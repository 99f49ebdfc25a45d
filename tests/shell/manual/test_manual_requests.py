"""Operator-requested recoveries: taken by the next poll, or refused with a recorded reason."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tinker_recovery.core.model import Attempt, AttemptStep, Lineage, LineageState, RunView
from tinker_recovery.settings import PolicySettings, Rule
from tinker_recovery.shell import manual
from tinker_recovery.shell.clock import SystemClock
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
    def __init__(self) -> None:
        self.started: list[dict[str, Any]] = []
        self.busy_ids: set[str] = set()

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
    ) -> Attempt:
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
    starter = RecordingStarter()
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
    assert await store.take_manual_requests() == []  # taken exactly once


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
    starter = RecordingStarter()
    if busy:
        starter.busy_ids.add(RUN)
    await store.request_recovery(RUN, None, by="cli:bob", at=NOW)

    assert await take(store, starter, runs, **cfg) == 0

    assert starter.started == []
    events = await store.events(run_id=RUN)
    (refused,) = [e for e in events if e.kind == "manual_recovery_refused"]
    assert reason in refused.reason
    assert await store.lineage_for_run(RUN) is None
