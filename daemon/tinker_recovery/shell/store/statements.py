"""SQL text and parameter building shared by both backends, so they cannot drift apart.

Statements use `:name` placeholders (SQLite's named style); `for_postgres()` rewrites them to
psycopg's `%(name)s`. Times differ per backend (SQLite stores fixed-width UTC text, PostgreSQL
`timestamptz`), so parameter builders take the backend's `ts` function and row readers its
`load_ts`. Both backends need SQLite >= 3.35 / any supported PostgreSQL for `RETURNING`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from tinker_recovery.core.model import Attempt, Lineage, LineageState
from tinker_recovery.errors import StaleAttempt

from . import codec
from .base import BadCheckpoint, Event, ManualRequest, TakenRequest

ToDb = Callable[[datetime], Any]
FromDb = Callable[[Any], datetime]

_NAMED = re.compile(r"(?<![:\w]):([a-z_]+)\b")


def for_postgres(statement: str) -> str:
    return _NAMED.sub(r"%(\1)s", statement)


UPSERT_LINEAGE = """
INSERT INTO lineages (lineage_id, root_run_id, current_run_id, state, first_seen_at,
                      updated_at, active, data)
VALUES (:lineage_id, :root_run_id, :current_run_id, :state, :first_seen_at, :updated_at,
        :active, :data)
ON CONFLICT (lineage_id) DO UPDATE SET
    root_run_id = excluded.root_run_id, current_run_id = excluded.current_run_id,
    state = excluded.state, first_seen_at = excluded.first_seen_at,
    updated_at = excluded.updated_at, active = excluded.active, data = excluded.data
"""

ACTIVE_LINEAGES = "SELECT data FROM lineages WHERE active = 1"
LINEAGE_COUNTS = "SELECT state, COUNT(*) FROM lineages GROUP BY state"

# Retention: never an event of a lineage that is still open (active, or with an attempt in
# flight), nor one without a lineage newer than the cut.
_OPEN = """
    lineage_id IS NOT NULL AND (
        lineage_id IN (SELECT lineage_id FROM lineages WHERE active = 1)
        OR lineage_id IN (SELECT lineage_id FROM attempts WHERE outcome IS NULL))
"""
DELETE_OLD_EVENTS = f"DELETE FROM events WHERE at < :before AND NOT ({_OPEN})"
DELETE_EXCESS_EVENTS = f"""
DELETE FROM events WHERE seq <= (SELECT seq FROM events ORDER BY seq DESC LIMIT 1 OFFSET :keep)
AND NOT ({_OPEN})
"""

GET_LINEAGE = "SELECT data FROM lineages WHERE lineage_id = :lineage_id"

# A UNION of single-column lookups, so that each branch uses its own index.
LINEAGE_FOR_RUN = """
SELECT data FROM lineages WHERE lineage_id IN (
    SELECT lineage_id FROM lineages WHERE root_run_id = :run_id
    UNION SELECT lineage_id FROM lineages WHERE current_run_id = :run_id
    UNION SELECT lineage_id FROM attempts WHERE corrupted_run_id = :run_id
    UNION SELECT lineage_id FROM attempts WHERE successor_run_id = :run_id
)
ORDER BY updated_at DESC, lineage_id
LIMIT 1
"""

ALL_LINEAGES = "SELECT data FROM lineages ORDER BY first_seen_at, lineage_id"

UPSERT_ATTEMPT = """
INSERT INTO attempts (attempt_id, lineage_id, number, corrupted_run_id, successor_run_id,
                      outcome, started_at, data)
VALUES (:attempt_id, :lineage_id, :number, :corrupted_run_id, :successor_run_id, :outcome,
        :started_at, :data)
ON CONFLICT (attempt_id) DO UPDATE SET
    lineage_id = excluded.lineage_id, number = excluded.number,
    corrupted_run_id = excluded.corrupted_run_id, successor_run_id = excluded.successor_run_id,
    outcome = excluded.outcome, started_at = excluded.started_at, data = excluded.data
WHERE attempts.outcome IS NULL
RETURNING attempt_id
"""

GET_ATTEMPT = "SELECT data FROM attempts WHERE attempt_id = :attempt_id"
ATTEMPTS_OF_LINEAGE = (
    "SELECT data FROM attempts WHERE lineage_id = :lineage_id ORDER BY number, started_at"
)
UNFINISHED_ATTEMPTS = (
    "SELECT data FROM attempts WHERE outcome IS NULL ORDER BY started_at, attempt_id"
)

UPSERT_BAD_CHECKPOINT = """
INSERT INTO bad_checkpoints (tinker_path, reason, at) VALUES (:tinker_path, :reason, :at)
ON CONFLICT (tinker_path) DO UPDATE SET reason = excluded.reason, at = excluded.at
"""

INSERT_EVENT = """
INSERT INTO events (at, kind, reason, lineage_id, attempt_id, run_id, data)
VALUES (:at, :kind, :reason, :lineage_id, :attempt_id, :run_id, :data)
"""

UPSERT_HOLD = """
INSERT INTO holds (scope, held_by, at, reason) VALUES (:scope, :held_by, :at, :reason)
ON CONFLICT (scope) DO UPDATE SET held_by = excluded.held_by, at = excluded.at,
    reason = excluded.reason
"""
DELETE_HOLD = "DELETE FROM holds WHERE scope = :scope"
ALL_HOLDS = "SELECT scope FROM holds"
HOLD_DETAILS = "SELECT scope, held_by, at, reason FROM holds ORDER BY scope"

INSERT_MANUAL_REQUEST = """
INSERT INTO manual_requests (run_id, checkpoint_path, requested_at, requested_by)
VALUES (:run_id, :checkpoint_path, :requested_at, :requested_by)
RETURNING request_id
"""

PENDING_MANUAL_REQUESTS = """
SELECT request_id, run_id, checkpoint_path, requested_at, requested_by FROM manual_requests
WHERE taken_at IS NULL ORDER BY request_id
"""

# Settles one request; no row back means another writer settled it first (the transition fails).
TAKE_MANUAL_REQUEST = """
UPDATE manual_requests SET taken_at = :taken_at, taken_by = :taken_by, outcome = :outcome,
    outcome_reason = :reason
WHERE request_id = :request_id AND taken_at IS NULL
RETURNING request_id
"""

MANUAL_REQUEST_OUTCOME = """
SELECT outcome, outcome_reason, taken_at FROM manual_requests WHERE request_id = :request_id
"""

_EVENT_COLUMNS = "seq, at, kind, reason, lineage_id, attempt_id, run_id, data"


def select_events(*, lineage_id: str | None, run_id: str | None) -> str:
    """Filters are added per call rather than `(:x IS NULL OR col = :x)`, so indexes apply."""
    filters = [
        f"{column} = :{column}"
        for column, value in (("lineage_id", lineage_id), ("run_id", run_id))
        if value is not None
    ]
    where = f" WHERE {' AND '.join(filters)}" if filters else ""
    return f"SELECT {_EVENT_COLUMNS} FROM events{where} ORDER BY seq DESC LIMIT :limit"


def is_active(lineage: Lineage) -> bool:
    """Needs the poller's attention every cycle even while its run reads healthy."""
    return lineage.state is not LineageState.HEALTHY or bool(lineage.attempt_starts)


def lineage_params(lineage: Lineage, ts: ToDb) -> dict[str, Any]:
    return {
        "lineage_id": lineage.lineage_id,
        "root_run_id": lineage.root_run_id,
        "current_run_id": lineage.current_run_id,
        "state": lineage.state.value,
        "first_seen_at": ts(lineage.first_seen_at),
        "updated_at": ts(lineage.updated_at),
        "active": 1 if is_active(lineage) else 0,
        "data": codec.lineage_to_json(lineage),
    }


def attempt_params(attempt: Attempt, ts: ToDb) -> dict[str, Any]:
    return {
        "attempt_id": attempt.attempt_id,
        "lineage_id": attempt.lineage_id,
        "number": attempt.number,
        "corrupted_run_id": attempt.corrupted_run_id,
        "successor_run_id": attempt.successor_run_id,
        "outcome": None if attempt.outcome is None else attempt.outcome.value,
        "started_at": ts(attempt.started_at),
        "data": codec.attempt_to_json(attempt),
    }


def bad_checkpoint_params(mark: BadCheckpoint, ts: ToDb) -> dict[str, Any]:
    return {"tinker_path": mark.tinker_path, "reason": mark.reason, "at": ts(mark.at)}


def taken_params(taken: TakenRequest, ts: ToDb) -> dict[str, Any]:
    return {
        "request_id": taken.request_id,
        "taken_at": ts(taken.at),
        "taken_by": taken.by,
        "outcome": taken.outcome,
        "reason": taken.reason,
    }


def request_taken_twice(taken: TakenRequest) -> StaleAttempt:
    return StaleAttempt(f"operator request {taken.request_id} was already settled elsewhere")


def stale_attempt(attempt: Attempt) -> StaleAttempt:
    return StaleAttempt(
        f"attempt {attempt.attempt_id} is already finished in the store; this copy"
        f" (step {attempt.step.value}) is out of date and was not written"
    )


def event_params(event: Event, ts: ToDb) -> dict[str, Any]:
    return {
        "at": ts(event.at),
        "kind": event.kind,
        "reason": event.reason,
        "lineage_id": event.lineage_id,
        "attempt_id": event.attempt_id,
        "run_id": event.run_id,
        "data": codec.event_data_to_json(event),
    }


def events_from_rows(rows: Sequence[Sequence[Any]], load_ts: FromDb) -> list[Event]:
    """Rows come newest first (for LIMIT); events are returned newest last."""
    return [
        Event(
            seq=int(r[0]),
            at=load_ts(r[1]),
            kind=r[2],
            reason=r[3],
            lineage_id=r[4],
            attempt_id=r[5],
            run_id=r[6],
            data=codec.event_data_from_json(r[7]),
        )
        for r in reversed(rows)
    ]


def manual_requests_from_rows(
    rows: Sequence[Sequence[Any]], load_ts: FromDb
) -> list[ManualRequest]:
    requests = [
        ManualRequest(
            request_id=int(r[0]),
            run_id=r[1],
            checkpoint_path=r[2],
            requested_at=load_ts(r[3]),
            requested_by=r[4],
        )
        for r in rows
    ]
    return sorted(requests, key=lambda m: m.request_id)
