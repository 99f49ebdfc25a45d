"""What the stores do when their storage goes away: clear errors, and recovery without restart."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from pathlib import Path

import psycopg
import pytest
from store_helpers import FakeClock, make_event, make_lineage, pg_schema

from tinker_recovery.errors import StoreUnavailable
from tinker_recovery.shell.store.base import Lease
from tinker_recovery.shell.store.postgres import PostgresStore
from tinker_recovery.shell.store.sqlite import SqliteStore


async def test_sqlite_open_fails_cleanly_when_the_directory_cannot_exist(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    store = SqliteStore(blocker / "state.db", clock=FakeClock())
    with pytest.raises(StoreUnavailable, match="cannot open sqlite store"):
        await store.open()


async def test_sqlite_use_before_open_is_a_programming_error(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db", clock=FakeClock())
    with pytest.raises(RuntimeError, match="before open"):
        await store.get_lineage("x")


@pytest.mark.postgres
async def test_postgres_open_fails_within_its_deadline_when_nobody_listens() -> None:
    # Port 1 on loopback refuses at once; the pool keeps retrying until its deadline.
    store = PostgresStore(
        "postgresql://postgres:secret-pw@127.0.0.1:1/test", clock=FakeClock(), acquire_timeout_s=0.5
    )
    with pytest.raises(StoreUnavailable) as caught:
        await store.open()
    assert "secret-pw" not in str(caught.value)


@pytest.mark.postgres
async def test_postgres_store_survives_its_connections_being_killed() -> None:
    with pg_schema() as url:
        app_name = url.rsplit("search_path%3D", 1)[1]  # the schema name: unique to this test
        store = PostgresStore(f"{url}&application_name={app_name}", clock=FakeClock())
        await store.open()
        try:
            assert await store.acquire_or_renew("a", 60.0) is not None
            await store.save_lineage(make_lineage(), make_event())
            with psycopg.connect(url, autocommit=True) as admin:
                killed = admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = %s",
                    (app_name,),
                ).fetchone()
            assert killed is not None
            assert killed[0] >= 1
            # The pool checks connections on checkout: the next calls reconnect transparently.
            assert await store.get_lineage("lin-1") == make_lineage()
            renewed = await store.acquire_or_renew("a", 60.0)
            assert renewed is not None
            assert renewed.epoch == 1
            await store.append_event(make_event(reason="after reconnect"))
            assert [e.reason for e in await store.events()][-1] == "after reconnect"
        finally:
            await store.close()


async def test_sqlite_locked_by_another_writer_is_unavailable_then_recovers(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    store = SqliteStore(path, clock=FakeClock(), busy_timeout_s=0.05)
    await store.open()
    try:
        with closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")  # another process holding the write lock
            with pytest.raises(StoreUnavailable, match="locked"):
                await store.save_lineage(make_lineage(), make_event())
            other.execute("ROLLBACK")
        await store.save_lineage(make_lineage(), make_event())  # no transaction left dangling
        assert await store.get_lineage("lin-1") == make_lineage()
    finally:
        await store.close()


@pytest.mark.postgres
async def test_postgres_read_only_server_is_unavailable_not_a_crash() -> None:
    # What a replica sees after its database failed over to a read-only standby.
    with pg_schema() as url:
        writable = PostgresStore(url, clock=FakeClock())
        await writable.open()
        await writable.close()
        read_only = PostgresStore(
            url.replace("options=", "options=-cdefault_transaction_read_only%3Don%20"),
            clock=FakeClock(),
        )
        with pytest.raises(StoreUnavailable, match="read-only"):
            await read_only.open()


@pytest.mark.postgres
async def test_a_leader_stuck_mid_write_cannot_block_the_takeover() -> None:
    # A partitioned leader can leave a fenced write's transaction open on the server, holding
    # the share lock on the lease row. The server ends such idle sessions, so a standby waits
    # about that long, not until TCP notices (hours), before it can take over.
    with pg_schema() as url:
        a = PostgresStore(url, clock=FakeClock(), idle_in_transaction_timeout_s=0.3)
        b = PostgresStore(url, clock=FakeClock())
        await a.open()
        await b.open()
        try:
            assert await a.acquire_or_renew("a", 0.2) is not None
            taken: list[Lease | None] = []

            async def write_held_open_during_takeover() -> None:
                async with a._tx(fenced=True):  # a fenced write, stalled as a cut would leave it
                    await asyncio.sleep(0.25)  # the lease expires on the database clock
                    async with asyncio.timeout(5):
                        taken.append(await b.acquire_or_renew("b", 60.0))

            with pytest.raises(StoreUnavailable, match="idle-in-transaction"):
                await write_held_open_during_takeover()
            assert taken[0] is not None
            assert taken[0].epoch == 2
        finally:
            await a.close()
            await b.close()
