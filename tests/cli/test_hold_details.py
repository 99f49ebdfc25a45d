"""Holds keep who set them, when and why, on both store backends (issue 11: holds with reason)."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest

from tinker_recovery.shell.clock import SystemClock
from tinker_recovery.shell.store import open_store
from tinker_recovery.shell.store.base import Hold, Store

EPOCH = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
PG_URL = os.environ.get("TINKER_RECOVERY_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


@contextmanager
def pg_schema() -> Iterator[str]:
    """A throwaway schema on the test server (skipped without one, unless CI requires it)."""
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


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    with ExitStack() as stack:
        if request.param == "postgres":
            url = stack.enter_context(pg_schema())
        else:
            url = f"sqlite:///{tmp_path / 'state.db'}"
        made = open_store(url, clock=SystemClock(), state_directory=None)
        await made.open()
        try:
            yield made
        finally:
            await made.close()


async def test_a_hold_keeps_its_author_time_and_reason(store: Store) -> None:
    later = EPOCH + timedelta(minutes=5)
    await store.set_hold("lin-a", True, by="ana@host", at=EPOCH, reason="bad data in shard 7")
    await store.set_hold(None, True, by="incident_breaker", at=later)

    assert await store.hold_details() == [
        Hold(None, "incident_breaker", later, None),
        Hold("lin-a", "ana@host", EPOCH, "bad data in shard 7"),
    ]
    assert await store.holds() == {None, "lin-a"}


async def test_pausing_again_replaces_the_reason_and_resume_removes_the_hold(
    store: Store,
) -> None:
    await store.set_hold("lin-a", True, by="ana@host", at=EPOCH, reason="first")
    await store.set_hold("lin-a", True, by="bo@host", at=EPOCH, reason="second")
    assert await store.hold_details() == [Hold("lin-a", "bo@host", EPOCH, "second")]

    await store.set_hold("lin-a", False, by="bo@host", at=EPOCH)
    assert await store.hold_details() == []
