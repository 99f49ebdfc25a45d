"""Helpers for the store tests: a virtual clock, sample records, and throwaway PostgreSQL schemas.

PostgreSQL tests use the server at 127.0.0.1:5432 (database `test`, trust auth), or the URL in
TINKER_RECOVERY_TEST_PG_URL. Each test gets its own schema `t_<random>` selected through the
URL's `options=-csearch_path=...`, dropped afterwards, so tests can run side by side and leave
the database clean. Without a reachable server those tests are skipped, unless
TINKER_RECOVERY_REQUIRE_POSTGRES=1 (CI) turns that into a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import psycopg
import pytest

from tinker_recovery.core.model import (
    Attempt,
    AttemptOutcome,
    AttemptStep,
    Lineage,
    LineageState,
)
from tinker_recovery.shell.store.base import Event

EPOCH = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
WAKEUP_GRACE_S = 0.05  # real time a virtual sleep gives its wakeup event before moving on
PG_URL = os.environ.get("TINKER_RECOVERY_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


class FakeClock:
    """Virtual time: `now()` and `monotonic()` move only when a test advances them or sleeps."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.sleeps: list[float] = []

    def now(self) -> datetime:
        return EPOCH + timedelta(seconds=self.t - 1000.0)

    def monotonic(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds

    async def sleep(self, delay_s: float, *, wakeup: asyncio.Event | None = None) -> None:
        self.sleeps.append(delay_s)
        if wakeup is not None:
            # What wakes the sleeper promptly in real time (a store call finishing in a worker
            # thread, a stop already requested) wakes it at once in virtual time; otherwise
            # the whole virtual delay passes.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WAKEUP_GRACE_S):
                    await wakeup.wait()
                return
        self.t += max(delay_s, 0.0)
        await asyncio.sleep(0)  # let other tasks run, as a real sleep would


@contextmanager
def pg_schema() -> Iterator[str]:
    """A fresh schema; yields a URL whose connections use it. Dropped on exit."""
    name = f"t_{secrets.token_hex(6)}"
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        if os.environ.get("TINKER_RECOVERY_REQUIRE_POSTGRES"):
            raise
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    with admin:
        admin.execute(f'CREATE SCHEMA "{name}"')
        try:
            sep = "&" if "?" in PG_URL else "?"
            yield f"{PG_URL}{sep}options={quote(f'-csearch_path={name}')}"
        finally:
            admin.execute(f'DROP SCHEMA "{name}" CASCADE')


def make_lineage(lineage_id: str = "lin-1", **changes: object) -> Lineage:
    base = Lineage(
        lineage_id=lineage_id,
        root_run_id=f"{lineage_id}-root",
        current_run_id=f"{lineage_id}-root",
        state=LineageState.HEALTHY,
        reason="first seen",
        first_seen_at=EPOCH,
        updated_at=EPOCH,
    )
    return replace(base, **changes)  # type: ignore[arg-type]  # test-only field overrides


def make_attempt(
    attempt_id: str = "att-1", lineage_id: str = "lin-1", **changes: object
) -> Attempt:
    base = Attempt(
        attempt_id=attempt_id,
        lineage_id=lineage_id,
        number=1,
        corrupted_run_id=f"{lineage_id}-root",
        step=AttemptStep.CREATED,
        started_at=EPOCH,
        updated_at=EPOCH,
    )
    return replace(base, **changes)  # type: ignore[arg-type]  # test-only field overrides


def make_event(kind: str = "lineage_transition", **changes: object) -> Event:
    base = Event(at=EPOCH, kind=kind, reason="test")
    return replace(base, **changes)  # type: ignore[arg-type]  # test-only field overrides


def full_lineage() -> Lineage:
    """Every optional field set, so a round trip checks each one."""
    t = EPOCH
    return make_lineage(
        "lin-full",
        current_run_id="run-2",
        state=LineageState.WAITING,
        reason="backoff after failed attempt",
        updated_at=t + timedelta(minutes=5),
        corrupted_reads=2,
        corrupted_since=t + timedelta(seconds=1, microseconds=7),
        detected_at=t + timedelta(seconds=31),
        preexisting=True,
        attempt_starts=(t + timedelta(seconds=40), t + timedelta(seconds=90)),
        attempts_total=4,
        next_attempt_at=t + timedelta(minutes=10),
        rule="default",
        held_by_operator=True,
        last_checkpoint_time=t - timedelta(hours=1),
    )


def full_attempt() -> Attempt:
    t = EPOCH
    return make_attempt(
        "att-full",
        "lin-full",
        number=3,
        corrupted_run_id="run-1",
        step=AttemptStep.DONE,
        started_at=t,
        updated_at=t + timedelta(seconds=9),
        checkpoint_path="tinker://run-1/weights/000020",
        checkpoint_time=t - timedelta(minutes=20),
        handed_off_path="tinker://run-1b/weights/restored",
        successor_run_id="run-2",
        outcome=AttemptOutcome.SUCCEEDED,
        reason="successor saved a newer checkpoint",
        finished_at=t + timedelta(minutes=3),
    )
