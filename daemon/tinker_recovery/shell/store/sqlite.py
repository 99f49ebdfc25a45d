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
import sqlite3
import threading
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
from .base import Event, Lease, ManualRequest
from .support import FenceState, load_migrations

log = structlog.get_logger(__name__)

T = TypeVar("T")
_LEASE_ROW = "SELECT holder, epoch, expires_at FROM lease WHERE id = 1"
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
            except sqlite3.OperationalError as exc:  # locked, I/O error, disk full
                raise StoreUnavailable(f"sqlite store {self._path}: {exc}") from exc

    @contextmanager
    def _tx(self, conn: sqlite3.Connection, *, fenced: bool = False) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if fenced:
                self._check_fence(conn)
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _check_fence(self, conn: sqlite3.Connection) -> None:
        if not self._fence.engaged:
            return
        held = self._fence.held()
        row = conn.execute(_LEASE_ROW).fetchone()
        if (
            held is None
            or row is None
            or (row[0], row[1]) != held
            or codec.load_time(row[2]) <= self._clock.now()
        ):
            raise self._fence.refuse()

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
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    log.warning("sqlite_wal_unavailable", journal_mode=mode)
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_s * 1000)}")
                self._migrate(conn)
                self._watch_started_at = self._init_meta(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn

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

    # lineages -------------------------------------------------------------------------------
    async def save_lineage(self, lineage: Lineage, event: Event) -> None:
        def save(conn: sqlite3.Connection) -> None:
            with self._tx(conn, fenced=True):
                conn.execute(
                    "INSERT INTO lineages (lineage_id, root_run_id, current_run_id, state,"
                    " first_seen_at, updated_at, data) VALUES (?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (lineage_id) DO UPDATE SET root_run_id = excluded.root_run_id,"
                    " current_run_id = excluded.current_run_id, state = excluded.state,"
                    " first_seen_at = excluded.first_seen_at, updated_at = excluded.updated_at,"
                    " data = excluded.data",
                    (
                        lineage.lineage_id,
                        lineage.root_run_id,
                        lineage.current_run_id,
                        lineage.state.value,
                        codec.dump_time(lineage.first_seen_at),
                        codec.dump_time(lineage.updated_at),
                        codec.lineage_to_json(lineage),
                    ),
                )
                self._insert_event(conn, event)

        await self._run(save)

    async def get_lineage(self, lineage_id: str) -> Lineage | None:
        rows = await self._select("SELECT data FROM lineages WHERE lineage_id = ?", (lineage_id,))
        return codec.lineage_from_json(rows[0][0]) if rows else None

    async def lineage_for_run(self, run_id: str) -> Lineage | None:
        # A UNION of single-column lookups so each branch uses its own index.
        rows = await self._select(
            "SELECT data FROM lineages WHERE lineage_id IN ("
            " SELECT lineage_id FROM lineages WHERE root_run_id = :r"
            " UNION SELECT lineage_id FROM lineages WHERE current_run_id = :r"
            " UNION SELECT lineage_id FROM attempts WHERE corrupted_run_id = :r"
            " UNION SELECT lineage_id FROM attempts WHERE successor_run_id = :r)"
            " ORDER BY updated_at DESC, lineage_id LIMIT 1",
            {"r": run_id},
        )
        return codec.lineage_from_json(rows[0][0]) if rows else None

    async def list_lineages(self, states: Sequence[LineageState] | None = None) -> list[Lineage]:
        if states is None:
            rows = await self._select(
                "SELECT data FROM lineages ORDER BY first_seen_at, lineage_id", ()
            )
        else:
            marks = ",".join("?" * len(states))
            rows = await self._select(
                f"SELECT data FROM lineages WHERE state IN ({marks})"
                " ORDER BY first_seen_at, lineage_id",
                tuple(s.value for s in states),
            )
        return [codec.lineage_from_json(r[0]) for r in rows]

    # attempts -------------------------------------------------------------------------------
    async def save_attempt(self, attempt: Attempt, event: Event) -> None:
        def save(conn: sqlite3.Connection) -> None:
            with self._tx(conn, fenced=True):
                conn.execute(
                    "INSERT INTO attempts (attempt_id, lineage_id, number, corrupted_run_id,"
                    " successor_run_id, outcome, started_at, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (attempt_id) DO UPDATE SET lineage_id = excluded.lineage_id,"
                    " number = excluded.number, corrupted_run_id = excluded.corrupted_run_id,"
                    " successor_run_id = excluded.successor_run_id, outcome = excluded.outcome,"
                    " started_at = excluded.started_at, data = excluded.data",
                    (
                        attempt.attempt_id,
                        attempt.lineage_id,
                        attempt.number,
                        attempt.corrupted_run_id,
                        attempt.successor_run_id,
                        None if attempt.outcome is None else attempt.outcome.value,
                        codec.dump_time(attempt.started_at),
                        codec.attempt_to_json(attempt),
                    ),
                )
                self._insert_event(conn, event)

        await self._run(save)

    async def get_attempt(self, attempt_id: str) -> Attempt | None:
        rows = await self._select("SELECT data FROM attempts WHERE attempt_id = ?", (attempt_id,))
        return codec.attempt_from_json(rows[0][0]) if rows else None

    async def attempts(self, lineage_id: str) -> list[Attempt]:
        rows = await self._select(
            "SELECT data FROM attempts WHERE lineage_id = ? ORDER BY number, started_at",
            (lineage_id,),
        )
        return [codec.attempt_from_json(r[0]) for r in rows]

    async def unfinished_attempts(self) -> list[Attempt]:
        rows = await self._select(
            "SELECT data FROM attempts WHERE outcome IS NULL ORDER BY started_at, attempt_id", ()
        )
        return [codec.attempt_from_json(r[0]) for r in rows]

    # checkpoints ----------------------------------------------------------------------------
    async def mark_checkpoint_bad(self, tinker_path: str, reason: str, at: datetime) -> None:
        def mark(conn: sqlite3.Connection) -> None:
            with self._tx(conn, fenced=True):
                conn.execute(
                    "INSERT INTO bad_checkpoints (tinker_path, reason, at) VALUES (?, ?, ?)"
                    " ON CONFLICT (tinker_path) DO UPDATE SET reason = excluded.reason,"
                    " at = excluded.at",
                    (tinker_path, reason, codec.dump_time(at)),
                )

        await self._run(mark)

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
        def append(conn: sqlite3.Connection) -> None:
            with self._tx(conn, fenced=True):
                self._insert_event(conn, event)

        await self._run(append)

    @staticmethod
    def _insert_event(conn: sqlite3.Connection, event: Event) -> None:
        conn.execute(
            "INSERT INTO events (at, kind, reason, lineage_id, attempt_id, run_id, data)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                codec.dump_time(event.at),
                event.kind,
                event.reason,
                event.lineage_id,
                event.attempt_id,
                event.run_id,
                codec.event_data_to_json(event),
            ),
        )

    async def events(
        self, *, lineage_id: str | None = None, run_id: str | None = None, limit: int = 100
    ) -> list[Event]:
        rows = await self._select(
            "SELECT seq, at, kind, reason, lineage_id, attempt_id, run_id, data FROM events"
            " WHERE (:l IS NULL OR lineage_id = :l) AND (:r IS NULL OR run_id = :r)"
            " ORDER BY seq DESC LIMIT :n",
            {"l": lineage_id, "r": run_id, "n": max(limit, 0)},
        )
        return [
            Event(
                seq=r[0],
                at=codec.load_time(r[1]),
                kind=r[2],
                reason=r[3],
                lineage_id=r[4],
                attempt_id=r[5],
                run_id=r[6],
                data=codec.event_data_from_json(r[7]),
            )
            for r in reversed(rows)
        ]

    # operator -------------------------------------------------------------------------------
    async def set_hold(self, lineage_id: str | None, held: bool, by: str, at: datetime) -> None:
        scope = lineage_id or ""

        def hold(conn: sqlite3.Connection) -> None:
            with self._tx(conn):
                if held:
                    conn.execute(
                        "INSERT INTO holds (scope, held_by, at) VALUES (?, ?, ?)"
                        " ON CONFLICT (scope) DO UPDATE SET held_by = excluded.held_by,"
                        " at = excluded.at",
                        (scope, by, codec.dump_time(at)),
                    )
                else:
                    conn.execute("DELETE FROM holds WHERE scope = ?", (scope,))

        await self._run(hold)

    async def holds(self) -> set[str | None]:
        rows = await self._select("SELECT scope FROM holds", ())
        return {r[0] or None for r in rows}

    async def request_recovery(
        self, run_id: str, checkpoint_path: str | None, by: str, at: datetime
    ) -> int:
        def insert(conn: sqlite3.Connection) -> int:
            with self._tx(conn):
                cur = conn.execute(
                    "INSERT INTO manual_requests (run_id, checkpoint_path, requested_at,"
                    " requested_by) VALUES (?, ?, ?, ?)",
                    (run_id, checkpoint_path, codec.dump_time(at), by),
                )
            assert cur.lastrowid is not None  # an INSERT into a rowid table always sets it
            return cur.lastrowid

        return await self._run(insert)

    async def take_manual_requests(self) -> list[ManualRequest]:
        def take(conn: sqlite3.Connection) -> list[ManualRequest]:
            with self._tx(conn, fenced=True):
                rows = conn.execute(
                    "UPDATE manual_requests SET taken_at = ?, taken_by = ? WHERE taken_at IS NULL"
                    " RETURNING request_id, run_id, checkpoint_path, requested_at, requested_by",
                    (codec.dump_time(self._clock.now()), self._fence.holder or ""),
                ).fetchall()
            return sorted(
                (
                    ManualRequest(
                        request_id=r[0],
                        run_id=r[1],
                        checkpoint_path=r[2],
                        requested_at=codec.load_time(r[3]),
                        requested_by=r[4],
                    )
                    for r in rows
                ),
                key=lambda m: m.request_id,
            )

        return await self._run(take)

    # helpers --------------------------------------------------------------------------------
    async def _select(self, sql: str, params: Sequence[Any] | dict[str, Any]) -> list[Any]:
        return await self._run(lambda conn: conn.execute(sql, params).fetchall())
