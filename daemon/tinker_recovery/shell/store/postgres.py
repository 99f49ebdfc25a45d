"""PostgreSQL backend (psycopg 3, async pool) for several replicas sharing one state.

Leadership is a lease row timed by the database clock (`now()`), never by a replica's clock:
`acquire_or_renew` renews our own unexpired lease or takes over an expired one with
epoch + 1. Every fenced write first takes `FOR SHARE` on the lease row, in the same transaction,
requiring our holder and epoch and an unexpired lease; a takeover must wait for that lock, so a
deposed leader's write either commits before the takeover or raises `FencedOut` and writes
nothing. Session advisory locks are not used (see ops notes: poolers break them and the loser
learns too late); `pg_advisory_xact_lock` only serialises concurrent migrations.

Connections: libpq keepalives and `tcp_user_timeout` (unless the URL sets them) so a dead peer
is noticed in seconds, a statement timeout, an idle-in-transaction timeout (so a partitioned
leader cannot hold the lease row's lock for long), no server-side prepared statements (safe behind
PgBouncer in transaction mode), and a pool check on checkout so a restarted server costs one
failed call, not a broken store. Driver errors become `errors.StoreUnavailable`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
import structlog
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from tinker_recovery.core.model import Attempt, Lineage, LineageState
from tinker_recovery.errors import StoreUnavailable
from tinker_recovery.shell.clock import Clock

from . import codec
from . import statements as q
from .base import Event, Hold, Lease, ManualRequest, Transition
from .support import FenceState, load_migrations

log = structlog.get_logger(__name__)

Conn = psycopg.AsyncConnection[tuple[Any, ...]]

_MIGRATION_LOCK_CLASS = 0x7472  # first key of pg_advisory_xact_lock; the schema name is the second
_CONNECTION_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 3,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,  # ms: unacknowledged writes to a vanished server fail fast
    "application_name": "tinker-recovery",
}

# Storage trouble rather than a bug of ours: down, restarting, timed out, or failed over to a
# read-only server.
_UNAVAILABLE = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    psycopg.errors.ReadOnlySqlTransaction,
    psycopg.errors.IdleInTransactionSessionTimeout,  # we stalled mid-write; the server moved on
)

_ACQUIRE = """
INSERT INTO lease AS l (id, holder, epoch, expires_at, acquired_at, renewed_at)
VALUES (1, %(me)s, 1, now() + make_interval(secs => %(ttl)s), now(), now())
ON CONFLICT (id) DO UPDATE SET
    epoch = CASE WHEN l.holder = %(me)s AND l.epoch = %(epoch)s AND l.expires_at > now()
                 THEN l.epoch ELSE l.epoch + 1 END,
    acquired_at = CASE WHEN l.holder = %(me)s AND l.epoch = %(epoch)s AND l.expires_at > now()
                       THEN l.acquired_at ELSE now() END,
    holder = EXCLUDED.holder,
    expires_at = EXCLUDED.expires_at,
    renewed_at = now()
WHERE (l.holder = %(me)s AND l.epoch = %(epoch)s) OR l.expires_at <= now()
RETURNING epoch, expires_at
"""

_FENCE = """
SELECT 1 FROM lease
WHERE id = 1 AND holder = %s AND epoch = %s AND expires_at > now()
FOR SHARE
"""


_UPSERT_LINEAGE = q.for_postgres(q.UPSERT_LINEAGE)
_GET_LINEAGE = q.for_postgres(q.GET_LINEAGE)
_LINEAGE_FOR_RUN = q.for_postgres(q.LINEAGE_FOR_RUN)
_UPSERT_ATTEMPT = q.for_postgres(q.UPSERT_ATTEMPT)
_GET_ATTEMPT = q.for_postgres(q.GET_ATTEMPT)
_ATTEMPTS_OF_LINEAGE = q.for_postgres(q.ATTEMPTS_OF_LINEAGE)
_UPSERT_BAD_CHECKPOINT = q.for_postgres(q.UPSERT_BAD_CHECKPOINT)
_INSERT_EVENT = q.for_postgres(q.INSERT_EVENT)
_UPSERT_HOLD = q.for_postgres(q.UPSERT_HOLD)
_DELETE_HOLD = q.for_postgres(q.DELETE_HOLD)
_INSERT_MANUAL_REQUEST = q.for_postgres(q.INSERT_MANUAL_REQUEST)
_TAKE_MANUAL_REQUEST = q.for_postgres(q.TAKE_MANUAL_REQUEST)
_PENDING_MANUAL_REQUESTS = q.for_postgres(q.PENDING_MANUAL_REQUESTS)
_MANUAL_REQUEST_OUTCOME = q.for_postgres(q.MANUAL_REQUEST_OUTCOME)


def connection_kwargs(url: str) -> dict[str, Any]:
    """Our connection defaults for whatever the URL does not set itself."""
    given = conninfo_to_dict(url)
    return {k: v for k, v in _CONNECTION_DEFAULTS.items() if k not in given}


class PostgresStore:
    def __init__(
        self,
        url: str,
        *,
        clock: Clock,
        pool_max_size: int = 4,
        acquire_timeout_s: float = 10.0,
        statement_timeout_s: float = 10.0,
        idle_in_transaction_timeout_s: float = 2.0,
    ) -> None:
        self._url = url
        self._clock = clock
        self._pool_max_size = pool_max_size
        self._acquire_timeout_s = acquire_timeout_s
        self._statement_timeout_ms = int(statement_timeout_s * 1000)
        self._idle_in_transaction_ms = int(idle_in_transaction_timeout_s * 1000)
        self._pool: AsyncConnectionPool[Conn] | None = None
        self._fence = FenceState()
        self._watch_started_at: datetime | None = None

    # plumbing -------------------------------------------------------------------------------
    async def _configure(self, conn: Conn) -> None:
        await conn.execute("SET TIME ZONE 'UTC'")
        await conn.execute(f"SET statement_timeout = {self._statement_timeout_ms}")
        # A leader cut off in the middle of a fenced write leaves its transaction open on the
        # server, holding the share lock on the lease row that a takeover must wait for. Our
        # transactions never sit idle, so the server may end such a session quickly.
        await conn.execute(
            f"SET idle_in_transaction_session_timeout = {self._idle_in_transaction_ms}"
        )

    @asynccontextmanager
    async def _tx(self, *, fenced: bool = False, epoch: int | None = None) -> AsyncIterator[Conn]:
        if self._pool is None:
            raise RuntimeError("PostgresStore used before open() or after close()")
        try:
            async with (
                self._pool.connection(timeout=self._acquire_timeout_s) as conn,
                conn.transaction(),
            ):
                if fenced:
                    await self._check_fence(conn, epoch)
                yield conn
        except PoolTimeout as exc:
            raise StoreUnavailable("no PostgreSQL connection available in time") from exc
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"PostgreSQL store: {exc}") from exc

    async def _check_fence(self, conn: Conn, epoch: int | None) -> None:
        if not self._fence.engaged:
            return
        held = self._fence.held(epoch)
        if held is None:
            raise self._fence.refuse(epoch)
        cur = await conn.execute(_FENCE, held)
        if await cur.fetchone() is None:
            raise self._fence.refuse(epoch)

    async def _fetch(self, query: str | sql.Composed, params: Any = None) -> list[tuple[Any, ...]]:
        async with self._tx() as conn:
            cur = await conn.execute(query, params)
            return await cur.fetchall()

    # lifecycle ------------------------------------------------------------------------------
    async def open(self) -> None:
        if self._pool is not None:
            return
        kwargs: dict[str, Any] = {
            **connection_kwargs(self._url),
            "autocommit": True,  # transactions are explicit: conn.transaction()
            "prepare_threshold": None,  # no server-side prepared statements: pooler-safe
        }
        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            self._url,
            kwargs=kwargs,
            min_size=1,
            max_size=self._pool_max_size,
            open=False,
            configure=self._configure,
            check=AsyncConnectionPool.check_connection,
            name="tinker-recovery-store",
        )
        try:
            await pool.open(wait=True, timeout=self._acquire_timeout_s)
            self._pool = pool
            await self._migrate()
            self._watch_started_at = await self._init_meta()
        except BaseException as exc:
            self._pool = None
            await pool.close()
            if isinstance(exc, PoolTimeout):
                raise StoreUnavailable("cannot connect to the PostgreSQL store") from exc
            if isinstance(exc, psycopg.Error):
                raise StoreUnavailable(f"cannot open the PostgreSQL store: {exc}") from exc
            raise

    async def _migrate(self) -> None:
        migrations = load_migrations("postgres")
        async with self._tx() as conn:
            await conn.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(coalesce(current_schema(), '')))",
                (_MIGRATION_LOCK_CLASS,),
            )
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY,"
                " name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            cur = await conn.execute("SELECT version FROM schema_version")
            applied = {row[0] for row in await cur.fetchall()}
            for migration in migrations:
                if migration.version in applied:
                    continue
                for statement in migration.statements:
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_version (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
                log.info("store_migrated", backend="postgres", version=migration.version)
        newest = max((m.version for m in migrations), default=0)
        if applied and max(applied) > newest:
            log.warning("store_schema_newer", backend="postgres", schema=max(applied), known=newest)

    async def _init_meta(self) -> datetime:
        async with self._tx() as conn:
            await conn.execute(
                "INSERT INTO meta (key, value) VALUES ('watch_started_at', %s)"
                " ON CONFLICT (key) DO NOTHING",
                (codec.dump_time(self._clock.now()),),
            )
            cur = await conn.execute("SELECT value FROM meta WHERE key = 'watch_started_at'")
            row = await cur.fetchone()
        assert row is not None  # inserted just above unless it already existed
        return codec.load_time(row[0])

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def watch_started_at(self) -> datetime:
        if self._watch_started_at is None:
            raise RuntimeError("PostgresStore.watch_started_at() before open()")
        return self._watch_started_at

    # leadership -----------------------------------------------------------------------------
    async def acquire_or_renew(self, replica_id: str, ttl_s: float) -> Lease | None:
        self._fence.engaged = True
        known_epoch = self._fence.epoch if self._fence.holder == replica_id else None
        params = {"me": replica_id, "ttl": float(ttl_s), "epoch": known_epoch or -1}
        async with self._tx() as conn:
            cur = await conn.execute(_ACQUIRE, params)
            row = await cur.fetchone()
        if row is None:
            return None
        self._fence.holder, self._fence.epoch = replica_id, int(row[0])
        return Lease(replica_id=replica_id, epoch=int(row[0]), expires_at=_utc(row[1]))

    async def release(self, lease: Lease) -> None:
        async with self._tx() as conn:
            await conn.execute(
                "UPDATE lease SET expires_at = now()"
                " WHERE id = 1 AND holder = %s AND epoch = %s AND expires_at > now()",
                (lease.replica_id, lease.epoch),
            )

    async def leader(self) -> Lease | None:
        rows = await self._fetch(
            "SELECT holder, epoch, expires_at FROM lease"
            " WHERE id = 1 AND holder IS NOT NULL AND expires_at > now()"
        )
        if not rows:
            return None
        holder, epoch, expires_at = rows[0]
        return Lease(replica_id=holder, epoch=int(epoch), expires_at=_utc(expires_at))

    async def check(self) -> None:
        await self._fetch("SELECT 1")

    # transitions ----------------------------------------------------------------------------
    async def commit(self, transition: Transition, *, epoch: int | None = None) -> None:
        async with self._tx(fenced=True, epoch=epoch) as conn:
            if transition.attempt is not None:
                cur = await conn.execute(_UPSERT_ATTEMPT, q.attempt_params(transition.attempt, _ts))
                if await cur.fetchone() is None:
                    raise q.stale_attempt(transition.attempt)
            if transition.lineage is not None:
                await conn.execute(_UPSERT_LINEAGE, q.lineage_params(transition.lineage, _ts))
            if transition.bad_checkpoint is not None:
                await conn.execute(
                    _UPSERT_BAD_CHECKPOINT, q.bad_checkpoint_params(transition.bad_checkpoint, _ts)
                )
            if transition.taken_request is not None:
                cur = await conn.execute(
                    _TAKE_MANUAL_REQUEST, q.taken_params(transition.taken_request, _ts)
                )
                if await cur.fetchone() is None:
                    raise q.request_taken_twice(transition.taken_request)
            for event in transition.events:
                await conn.execute(_INSERT_EVENT, q.event_params(event, _ts))

    # lineages -------------------------------------------------------------------------------
    async def save_lineage(
        self, lineage: Lineage, event: Event, *, epoch: int | None = None
    ) -> None:
        await self.commit(Transition(lineage=lineage, events=(event,)), epoch=epoch)

    async def get_lineage(self, lineage_id: str) -> Lineage | None:
        rows = await self._fetch(_GET_LINEAGE, {"lineage_id": lineage_id})
        return codec.lineage_from_json(rows[0][0]) if rows else None

    async def lineage_for_run(self, run_id: str) -> Lineage | None:
        rows = await self._fetch(_LINEAGE_FOR_RUN, {"run_id": run_id})
        return codec.lineage_from_json(rows[0][0]) if rows else None

    async def list_lineages(self, states: Sequence[LineageState] | None = None) -> list[Lineage]:
        if states is None:
            rows = await self._fetch(q.ALL_LINEAGES)
        else:
            rows = await self._fetch(
                "SELECT data FROM lineages WHERE state = ANY(%s)"
                " ORDER BY first_seen_at, lineage_id",
                ([s.value for s in states],),
            )
        return [codec.lineage_from_json(r[0]) for r in rows]

    async def cycle_lineages(self, run_ids: Sequence[str]) -> list[Lineage]:
        ids = list(dict.fromkeys(run_ids))
        rows = await self._fetch(
            "SELECT data FROM lineages WHERE active = 1"
            " UNION SELECT data FROM lineages WHERE current_run_id = ANY(%(ids)s)"
            " UNION SELECT data FROM lineages WHERE root_run_id = ANY(%(ids)s)",
            {"ids": ids},
        )
        return [codec.lineage_from_json(r[0]) for r in rows]

    async def lineage_counts(self) -> dict[LineageState, int]:
        rows = await self._fetch(q.LINEAGE_COUNTS)
        return {LineageState(r[0]): int(r[1]) for r in rows}

    # attempts -------------------------------------------------------------------------------
    async def save_attempt(self, attempt: Attempt, event: Event) -> None:
        await self.commit(Transition(attempt=attempt, events=(event,)), epoch=attempt.epoch)

    async def get_attempt(self, attempt_id: str) -> Attempt | None:
        rows = await self._fetch(_GET_ATTEMPT, {"attempt_id": attempt_id})
        return codec.attempt_from_json(rows[0][0]) if rows else None

    async def attempts(self, lineage_id: str) -> list[Attempt]:
        rows = await self._fetch(_ATTEMPTS_OF_LINEAGE, {"lineage_id": lineage_id})
        return [codec.attempt_from_json(r[0]) for r in rows]

    async def unfinished_attempts(self) -> list[Attempt]:
        rows = await self._fetch(q.UNFINISHED_ATTEMPTS)
        return [codec.attempt_from_json(r[0]) for r in rows]

    # checkpoints ----------------------------------------------------------------------------
    async def mark_checkpoint_bad(self, tinker_path: str, reason: str, at: datetime) -> None:
        params = {"tinker_path": tinker_path, "reason": reason, "at": _ts(at)}
        await self._write(_UPSERT_BAD_CHECKPOINT, params)

    async def bad_checkpoints(self, tinker_paths: Sequence[str]) -> set[str]:
        if not tinker_paths:
            return set()
        rows = await self._fetch(
            "SELECT tinker_path FROM bad_checkpoints WHERE tinker_path = ANY(%s)",
            (list(tinker_paths),),
        )
        return {r[0] for r in rows}

    # events ---------------------------------------------------------------------------------
    async def append_event(self, event: Event) -> None:
        await self._write(None, {}, event=event)

    async def compact(self, *, before: datetime, keep: int, epoch: int | None = None) -> int:
        async with self._tx(fenced=True, epoch=epoch) as conn:
            old = await conn.execute(q.for_postgres(q.DELETE_OLD_EVENTS), {"before": _ts(before)})
            excess = await conn.execute(
                q.for_postgres(q.DELETE_EXCESS_EVENTS), {"keep": max(keep, 0)}
            )
            return max(old.rowcount, 0) + max(excess.rowcount, 0)

    async def events(
        self, *, lineage_id: str | None = None, run_id: str | None = None, limit: int = 100
    ) -> list[Event]:
        query = q.for_postgres(q.select_events(lineage_id=lineage_id, run_id=run_id))
        params = {"lineage_id": lineage_id, "run_id": run_id, "limit": max(limit, 0)}
        return q.events_from_rows(await self._fetch(query, params), _utc)

    # operator -------------------------------------------------------------------------------
    async def set_hold(
        self,
        lineage_id: str | None,
        held: bool,
        by: str,
        at: datetime,
        reason: str | None = None,
    ) -> None:
        params = {"scope": lineage_id or "", "held_by": by, "at": _ts(at), "reason": reason}
        await self._write(_UPSERT_HOLD if held else _DELETE_HOLD, params, fenced=False)

    async def holds(self) -> set[str | None]:
        rows = await self._fetch(q.ALL_HOLDS)
        return {r[0] or None for r in rows}

    async def hold_details(self) -> list[Hold]:
        rows = await self._fetch(q.HOLD_DETAILS)
        return [Hold(r[0] or None, r[1], _utc(r[2]), r[3]) for r in rows]

    async def request_recovery(
        self, run_id: str, checkpoint_path: str | None, by: str, at: datetime
    ) -> int:
        params = {
            "run_id": run_id,
            "checkpoint_path": checkpoint_path,
            "requested_at": _ts(at),
            "requested_by": by,
        }
        rows = await self._write(_INSERT_MANUAL_REQUEST, params, fenced=False)
        return int(rows[0][0])

    async def pending_manual_requests(self) -> list[ManualRequest]:
        rows = await self._fetch(_PENDING_MANUAL_REQUESTS)
        return q.manual_requests_from_rows(rows, _utc)

    async def manual_request_outcome(self, request_id: int) -> tuple[str, str] | None:
        rows = await self._fetch(_MANUAL_REQUEST_OUTCOME, {"request_id": request_id})
        if not rows or rows[0][2] is None:
            return None
        return str(rows[0][0] or "taken"), str(rows[0][1] or "")

    # helpers --------------------------------------------------------------------------------
    async def _write(
        self,
        query: str | None,
        params: dict[str, Any],
        *,
        event: Event | None = None,
        fenced: bool = True,
    ) -> list[tuple[Any, ...]]:
        """One transaction: the fence check (if asked), the statement, then the event."""
        rows: list[tuple[Any, ...]] = []
        async with self._tx(fenced=fenced) as conn:
            if query is not None:
                cur = await conn.execute(query, params)
                if cur.description is not None:
                    rows = await cur.fetchall()
            if event is not None:
                await conn.execute(_INSERT_EVENT, q.event_params(event, _ts))
        return rows


def _ts(value: datetime) -> datetime:
    """Refuse naive datetimes, as the SQLite backend does: the server would guess their zone."""
    codec.dump_time(value)
    return value


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)
