"""Holds keep who set them, when and why, on both store backends (issue 11: holds with reason)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

import pytest

from store.store_helpers import EPOCH, FakeClock, pg_schema
from tinker_recovery.shell.store import open_store
from tinker_recovery.shell.store.base import Hold, Store


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    with ExitStack() as stack:
        if request.param == "postgres":
            url = stack.enter_context(pg_schema())
        else:
            url = f"sqlite:///{tmp_path / 'state.db'}"
        made = open_store(url, clock=FakeClock(), state_directory=None)
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
