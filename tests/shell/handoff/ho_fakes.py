"""Shared helpers for the handoff tests: a sample request and a clock that records sleeps."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from tinker_recovery.shell.handoff import HandoffRequest


def request(**overrides: Any) -> HandoffRequest:
    fields: dict[str, Any] = {
        "lineage_id": "lin-1",
        "corrupted_run_id": "sess-1:train:0",
        "checkpoint_path": "tinker://sess-1:train:0/weights/000020",
        "attempt": 2,
        "idempotency_key": "att-123",
        "restore_optimizer": True,
        "user_metadata": {"tinker_recovery.lineage": "lin-1"},
    }
    fields.update(overrides)
    return HandoffRequest(**fields)


class RecordingClock:
    """Fixed wall time; sleeps return at once and are recorded."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def now(self) -> datetime:
        return datetime(2026, 11, 29, 12, 0, tzinfo=UTC)

    def monotonic(self) -> float:
        return sum(self.sleeps)

    async def sleep(self, delay_s: float, *, wakeup: asyncio.Event | None = None) -> None:
        self.sleeps.append(delay_s)
        await asyncio.sleep(0)
