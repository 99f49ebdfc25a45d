"""SQLite backend: one file, WAL, the embedded default.

Owns one `sqlite3` connection. Every call runs in a worker thread (`asyncio.to_thread`) under a
`threading.Lock`, so a cancelled caller can never let two statements share the connection.
Each write is one `BEGIN IMMEDIATE` transaction that also appends its event, so a SIGKILL at
any instant leaves either both or neither; `synchronous=FULL` keeps committed attempt rows
through a power cut too, which the exactly-once handoff relies on.

The leader lease is a row here as well, timed by the injected clock (all daemons sharing one
file share a host clock), so two daemons pointed at the same file cannot both act.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import structlog

from tinker_recovery.core.model import Attempt, Lineage, LineageState
from tinker_recovery.errors import StoreUnavailable
from tinker_recovery.shell.clock import Clock

from . import codec
from . import statements as q
from .base import Event, Hold, Lease, ManualRequest, Transition
from .support import FenceState, load_migrations

log = structlog.get_logger(__name__)

T = TypeVar("T")
_LEASE_ROW = "SELECT holder, epoch, expires_at FROM lease WHERE id = 1"
# Errors that mean a bug in our SQL or data, not a storage problem: never disguised.
_OUR_BUGS = (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.DataError)
_IN_CHUNK = 500  # stay far below SQLite's bound-parameter limit


class SqliteStore:
    def __init__(self, path: Path, *, clock: Clock, busy_timeout_s: float = 10.0) -> None:
        self._path = path
        self._clock = clock
        self._busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._fence = FenceState()
        self._watch_started_at: datetime | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the opened file

    @property
    def path(self) -> Path:
        return self._path

    # plumbing -------------------------------------------------------------------------------
    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            if self._conn is None:
                raise RuntimeError("SqliteStore used before open() or after close()")
            try:
                return fn(self._conn)
            except _OUR_BUGS:
                raise
            except sqlite3.DatabaseError as exc:  # locked, I/O error, disk full, corrupt file
                raise StoreUnavailable(f"sqlite store {self._path}: {exc}") from exc

    @contextmanager
    def _tx(
        self, conn: sqlite3.Connection, *, fenced: bool = False, epoch: int | None = None
    ) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if fenced:
                self._check_fence(conn, epoch)
            yield
            conn.execute("COMMIT")
        except BaseException:
            # SQLite may already have rolled back (I/O error, disk full); a failed COMMIT
            # leaves the transaction open. Either way the connection must end up idle.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _check_fence(self, conn: sqlite3.Connection, epoch: int | None) -> None:
        if not self._fence.engaged:
            return
        held = self._fence.held(epoch)
        row = conn.execute(_LEASE_ROW).fetchone()
        if (
            held is None
            or row is None
            or (row[0], row[1]) != held
            or codec.load_time(row[2]) <= self._clock.now()
        ):
            raise self._fence.refuse(epoch)

    # lifecycle ------------------------------------------------------------------------------
    async def open(self) -> None:
        try:
            await asyncio.to_thread(self._open_sync)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open sqlite store {self._path}: {exc}") from exc
        except OSError as exc:  # the state directory cannot be created
            raise StoreUnavailable(f"cannot open sqlite store {self._path}: {exc}") from exc

    def _open_sync(self) -> None:
        with self._lock:
            if self._conn is not None:
                return
            self._path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self._path,
                timeout=self._busy_timeout_s,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,  # used from worker threads, one at a time (the lock)
            )
            try:
                mode = self._enable_wal(conn)
                if str(mode).lower() != "wal":
                    log.warning("sqlite_wal_unavailable", journal_mode=mode)
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_s * 1000)}")
                self._migrate(conn)
                self._watch_started_at = self._init_meta(conn)
                stat = os.stat(self._path)
            except BaseException:
                conn.close()
                raise
            self._identity = (stat.st_dev, stat.st_ino)
            self._conn = conn

    def _enable_wal(self, conn: sqlite3.Connection) -> object:
        # Switching to WAL needs an exclusive lock and SQLite does not run the busy handler
        # for it, so daemons opening a fresh file together would fail at random: retry here.
        # Real time on purpose: this is a worker thread's wait, not a decision.
        deadline = time.monotonic() + self._busy_timeout_s
        while True:
            try:
                return conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(0.01)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        migrations = load_migrations("sqlite")
        with self._tx(conn):
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
            applied = {v for (v,) in conn.execute("SELECT version FROM schema_version")}
            for migration in migrations:
                if migration.version in applied:
                    continue
                for statement in migration.statements:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, codec.dump_time(self._clock.now())),
                )
                log.info("store_migrated", backend="sqlite", version=migration.version)
        newest = max((m.version for m in migrations), default=0)
        if applied and max(applied) > newest:
            log.warning("store_schema_newer", backend="sqlite", schema=max(applied), known=newest)

    def _init_meta(self, conn: sqlite3.Connection) -> datetime:
        with self._tx(conn):
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('watch_started_at', ?)",
                (codec.dump_time(self._clock.now()),),
            )
            row = conn.execute("SELECT value FROM meta WHERE key = 'watch_started_at'").fetchone()
        return codec.load_time(row[0])

    async def close(self) -> None:
        await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    async def check(self) -> None:
        """SQLite keeps writing into a file that was unlinked or replaced under it, and every
        write then "succeeds" into nothing anyone will read again: notice it."""
        await asyncio.to_thread(self._check_sync)

    def _check_sync(self) -> None:
        try:
            stat = os.stat(self._path)
        except FileNotFoundError:
            raise StoreUnavailable(
                f"sqlite store {self._path} was deleted while open; restart the daemon "
                "(it rebuilds lineages from the service's run metadata)"
            ) from None
        except OSError as exc:
            raise StoreUnavailable(f"sqlite store {self._path}: {exc}") from exc
        if self._identity is not None and (stat.st_dev, stat.st_ino) != self._identity:
            raise StoreUnavailable(f"sqlite store {self._path} was replaced while open")

    async def watch_started_at(self) -> datetime:
        if self._watch_started_at is None:
            raise RuntimeError("SqliteStore.watch_started_at() before open()")
        return self._watch_started_at

    # leadership -----------------------------------------------------------------------------
    async def acquire_or_renew(self, replica_id: str, ttl_s: float) -> Lease | None:
        return await self._run(lambda conn: self._acquire_sync(conn, replica_id, ttl_s))

    def _acquire_sync(
        self, conn: sqlite3.Connection, replica_id: str, ttl_s: float
    ) -> Lease | None:
        self._fence.engaged = True
        now = self._clock.now()
        expires = codec.dump_time(now + timedelta(seconds=ttl_s))
        with self._tx(conn):
            row = conn.execute(_LEASE_ROW).fetchone()
            if row is None:
                epoch = 1
                conn.execute(
                    "INSERT INTO lease (id, holder, epoch, expires_at, acquired_at, renewed_at)"
                    " VALUES (1, ?, 1, ?, ?, ?)",
                    (replica_id, expires, codec.dump_time(now), codec.dump_time(now)),
                )
            else:
                live = codec.load_time(row[2]) > now
                if live and (row[0], row[1]) == (replica_id, self._fence.epoch):
                    epoch = row[1]
                    conn.execute(
                        "UPDATE lease SET expires_at = ?, renewed_at = ? WHERE id = 1",
                        (expires, codec.dump_time(now)),
                    )
                elif live:
                    return None  # someone else leads (or an older instance of us)
                else:
                    epoch = row[1] + 1
                    conn.execute(
                        "UPDATE lease SET holder = ?, epoch = ?, expires_at = ?,"
                        " acquired_at = ?, renewed_at = ? WHERE id = 1",
                        (replica_id, epoch, expires, codec.dump_time(now), codec.dump_time(now)),
                    )
        self._fence.holder, self._fence.epoch = replica_id, epoch
        return Lease(replica_id=replica_id, epoch=epoch, expires_at=codec.load_time(expires))

    async def release(self, lease: Lease) -> None:
        def release(conn: sqlite3.Connection) -> None:
            with self._tx(conn):
                conn.execute(
                    "UPDATE lease SET expires_at = ? WHERE id = 1 AND holder = ? AND epoch = ?",
                    (codec.dump_time(self._clock.now()), lease.replica_id, lease.epoch),
                )

        await self._run(release)

    async def leader(self) -> Lease | None:
        def read(conn: sqlite3.Connection) -> Lease | None:
            row = conn.execute(_LEASE_ROW).fetchone()
            if row is None or row[0] is None:
                return None
            expires_at = codec.load_time(row[2])
            if expires_at <= self._clock.now():
                return None
            return Lease(replica_id=row[0], epoch=row[1], expires_at=expires_at)

        return await self._run(read)

    # transitions ----------------------------------------------------------------------------
    async def commit(self, transition: Transition, *, epoch: int | None = None) -> None:
        def write(conn: sqlite3.Connection) -> None:
            with self._tx(conn, fenced=True, epoch=epoch):
                if transition.attempt is not None:
                    params = q.attempt_params(transition.attempt, codec.dump_time)
                    if not conn.execute(q.UPSERT_ATTEMPT, params).fetchall():
                        raise q.stale_attempt(transition.attempt)
                if transition.lineage is not None:
                    params = q.lineage_params(transition.lineage, codec.dump_time)
                    conn.execute(q.UPSERT_LINEAGE, params)
                if transition.bad_checkpoint is not None:
                    conn.execute(
                        q.UPSERT_BAD_CHECKPOINT,
                        q.bad_checkpoint_params(transition.bad_checkpoint, codec.dump_time),
                    )
                if transition.taken_request is not None:
                    taken = q.taken_params(transition.taken_request, codec.dump_time)
                    if not conn.execute(q.TAKE_MANUAL_REQUEST, taken).fetchall():
                        raise q.request_taken_twice(transition.taken_request)
                for event in transition.events:
                    conn.execute(q.INSERT_EVENT, q.event_params(event, codec.dump_time))

        await self._run(write)

    # lineages -------------------------------------------------------------------------------
    async def save_lineage(
        self, lineage: Lineage, event: Event, *, epoch: int | None = None
    ) -> None:
        await self.commit(Transition(lineage=lineage, events=(event,)), epoch=epoch)

    async def get_lineage(self, lineage_id: str) -> Lineage | None:
        rows = await self._select(q.GET_LINEAGE, {"lineage_id": lineage_id})
        return codec.lineage_from_json(rows[0][0]) if rows else None

    async def lineage_for_run(self, run_id: str) -> Lineage | None:
        rows = await self._select(q.LINEAGE_FOR_RUN, {"run_id": run_id})
        return codec.lineage_from_json(rows[0][0]) if rows else None

    async def list_lineages(self, states: Sequence[LineageState] | None = None) -> list[Lineage]:
        if states is None:
            rows = await self._select(q.ALL_LINEAGES, {})
        else:
            marks = ",".join("?" * len(states))
            rows = await self._select(
                f"SELECT data FROM lineages WHERE state IN ({marks})"
                " ORDER BY first_seen_at, lineage_id",
                tuple(s.value for s in states),
            )
        return [codec.lineage_from_json(r[0]) for r in rows]

    async def cycle_lineages(self, run_ids: Sequence[str]) -> list[Lineage]:
        ids = list(dict.fromkeys(run_ids))

        def read(conn: sqlite3.Connection) -> list[Lineage]:
            blobs: dict[str, str] = {}
            rows = conn.execute("SELECT lineage_id, data FROM lineages WHERE active = 1")
            blobs.update((r[0], r[1]) for r in rows)
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start : start + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))
                sql = (
                    f"SELECT lineage_id, data FROM lineages WHERE current_run_id IN ({marks})"
                    f" UNION SELECT lineage_id, data FROM lineages WHERE root_run_id IN ({marks})"
                )
                blobs.update((r[0], r[1]) for r in conn.execute(sql, [*chunk, *chunk]))
            return [codec.lineage_from_json(blob) for blob in blobs.values()]

        return await self._run(read)

    async def lineage_counts(self) -> dict[LineageState, int]:
        rows = await self._select(q.LINEAGE_COUNTS, {})
        return {LineageState(r[0]): int(r[1]) for r in rows}

    # attempts -------------------------------------------------------------------------------
    async def save_attempt(self, attempt: Attempt, event: Event) -> None:
        await self.commit(Transition(attempt=attempt, events=(event,)), epoch=attempt.epoch)

    async def get_attempt(self, attempt_id: str) -> Attempt | None:
        rows = await self._select(q.GET_ATTEMPT, {"attempt_id": attempt_id})
        return codec.attempt_from_json(rows[0][0]) if rows else None

    async def attempts(self, lineage_id: str) -> list[Attempt]:
        rows = await self._select(q.ATTEMPTS_OF_LINEAGE, {"lineage_id": lineage_id})
        return [codec.attempt_from_json(r[0]) for r in rows]

    async def unfinished_attempts(self) -> list[Attempt]:
        rows = await self._select(q.UNFINISHED_ATTEMPTS, {})
        return [codec.attempt_from_json(r[0]) for r in rows]

    # checkpoints ----------------------------------------------------------------------------
    async def mark_checkpoint_bad(self, tinker_path: str, reason: str, at: datetime) -> None:
        params = {"tinker_path": tinker_path, "reason": reason, "at": codec.dump_time(at)}
        await self._write(q.UPSERT_BAD_CHECKPOINT, params)

    async def bad_checkpoints(self, tinker_paths: Sequence[str]) -> set[str]:
        paths = list(dict.fromkeys(tinker_paths))

        def read(conn: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            for start in range(0, len(paths), _IN_CHUNK):
                chunk = paths[start : start + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT tinker_path FROM bad_checkpoints WHERE tinker_path IN ({marks})"
                found.update(r[0] for r in conn.execute(sql, chunk))
            return found

        return await self._run(read)

    # events ---------------------------------------------------------------------------------
    async def append_event(self, event: Event) -> None:
        await self._write(None, {}, event=event)

    async def compact(self, *, before: datetime, keep: int, epoch: int | None = None) -> int:
        def write(conn: sqlite3.Connection) -> int:
            with self._tx(conn, fenced=True, epoch=epoch):
                old = conn.execute(q.DELETE_OLD_EVENTS, {"before": codec.dump_time(before)})
                excess = conn.execute(q.DELETE_EXCESS_EVENTS, {"keep": max(keep, 0)})
                deleted = old.rowcount + excess.rowcount
            if deleted:
                # Hand the freed pages back from the WAL; the file itself reuses them.
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return int(deleted)

        return await self._run(write)

    async def events(
        self, *, lineage_id: str | None = None, run_id: str | None = None, limit: int = 100
    ) -> list[Event]:
        sql = q.select_events(lineage_id=lineage_id, run_id=run_id)
        params = {"lineage_id": lineage_id, "run_id": run_id, "limit": max(limit, 0)}
        return q.events_from_rows(await self._select(sql, params), codec.load_time)

    # operator -------------------------------------------------------------------------------
    async def set_hold(
        self,
        lineage_id: str | None,
        held: bool,
        by: str,
        at: datetime,
        reason: str | None = None,
    ) -> None:
        at_text = codec.dump_time(at)
        params = {"scope": lineage_id or "", "held_by": by, "at": at_text, "reason": reason}
        await self._write(q.UPSERT_HOLD if held else q.DELETE_HOLD, params, fenced=False)

    async def holds(self) -> set[str | None]:
        rows = await self._select(q.ALL_HOLDS, {})
        return {r[0] or None for r in rows}

    async def hold_details(self) -> list[Hold]:
        rows = await self._select(q.HOLD_DETAILS, {})
        return [Hold(r[0] or None, r[1], codec.load_time(r[2]), r[3]) for r in rows]

    async def request_recovery(
        self, run_id: str, checkpoint_path: str | None, by: str, at: datetime
    ) -> int:
        params = {
            "run_id": run_id,
            "checkpoint_path": checkpoint_path,
            "requested_at": codec.dump_time(at),
            "requested_by": by,
        }
        rows = await self._write(q.INSERT_MANUAL_REQUEST, params, fenced=False)
        return int(rows[0][0])

    async def pending_manual_requests(self) -> list[ManualRequest]:
        rows = await self._select(q.PENDING_MANUAL_REQUESTS, {})
        return q.manual_requests_from_rows(rows, codec.load_time)

    async def manual_request_outcome(self, request_id: int) -> tuple[str, str] | None:
        rows = await self._select(q.MANUAL_REQUEST_OUTCOME, {"request_id": request_id})
        if not rows or rows[0][2] is None:
            return None
        return str(rows[0][0] or "taken"), str(rows[0][1] or "")

    # helpers --------------------------------------------------------------------------------
    async def _write(
        self,
        sql: str | None,
        params: dict[str, Any] | Callable[[], dict[str, Any]],
        *,
        event: Event | None = None,
        fenced: bool = True,
    ) -> list[Any]:
        """One transaction: the fence check (if asked), the statement, then the event."""

        def write(conn: sqlite3.Connection) -> list[Any]:
            rows: list[Any] = []
            with self._tx(conn, fenced=fenced):
                if sql is not None:
                    values = params() if callable(params) else params
                    rows = conn.execute(sql, values).fetchall()
                if event is not None:
                    conn.execute(q.INSERT_EVENT, q.event_params(event, codec.dump_time))
            return rows

        return await self._run(write)

    async def _select(self, sql: str, params: Sequence[Any] | dict[str, Any]) -> list[Any]:
        return await self._run(lambda conn: conn.execute(sql, params).fetchall())
