"""Operator commands (`status`, `history`, `recover`, `pause`, `resume`) against the state store.

They talk to the store, not to a daemon process, so they work whether the daemon runs or not and
from any replica; the leader picks holds and manual requests up on its next cycle. `status`
also reads the running daemon's `/status` when it answers, for what only the process knows
(breaker, last poll, dry run in force).

What can be checked here is checked at once, without the Tinker key, and a refusal is recorded
as a `manual_recovery_refused` event so `history` shows it like the leader's own refusals:
- the checkpoint must be a `tinker://RUN/...` path, and not one marked bad by an earlier attempt;
- a run the store knows must be its lineage's current run with no attempt in flight;
- a run the store has never seen is queued only while a leader holds the lease (the leader then
  checks it against Tinker's listing); with no leader nothing would ever take the request.
Everything else (is the run in the listing, does a rule match it) only the leader can tell:
`--wait` follows the request to the leader's verdict.

Times are shown in one format everywhere (tables and JSON): ISO 8601 UTC, `2026-11-29T12:00:05Z`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tinker_recovery.core import lineage as core_lineage
from tinker_recovery.core.model import Attempt, AttemptOutcome, Lineage, LineageState
from tinker_recovery.errors import RecoveryError
from tinker_recovery.shell.clock import Clock
from tinker_recovery.shell.store import open_store
from tinker_recovery.shell.store.base import Event, Hold, Store
from tinker_recovery.shell.store.sqlite import SqliteStore

CHECKPOINT_SCHEME = "tinker://"
MAX_CHECKPOINT_PATH_CHARS = 1024
WAIT_POLL_S = 0.5


class OperatorRefused(RecoveryError):
    """The command would do nothing or cannot be done; exit 1 with this reason."""


@dataclass(frozen=True)
class Result:
    """What a command did: `data` for `-o json`, `rows`/`lines` for people, and the exit code."""

    data: Any
    lines: list[str] = field(default_factory=list)
    exit_code: int = 0


def iso(value: datetime | None) -> str | None:
    """The one time format: ISO 8601, UTC, whole seconds, `Z`."""
    if value is None:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def open_existing(url: str | None, clock: Clock, state_directory: str | None) -> Store:
    """The store the daemon writes; a SQLite path with no file is an error, never created."""
    store = open_store(url, clock=clock, state_directory=state_directory)
    if isinstance(store, SqliteStore) and not store.path.exists():
        raise RecoveryError(
            f"no state store at {store.path}: pass the daemon's --state URL or --config"
        )
    await store.open()
    return store


# -- display --------------------------------------------------------------------------------


def display_state(lineage: Lineage, attempts: Sequence[Attempt]) -> str:
    """The state as an operator should read it: a handed-off lineage is only "recovered" once
    its successor was confirmed; until then it is "awaiting confirmation"."""
    last = max(attempts, key=lambda a: a.number) if attempts else None
    if lineage.state is LineageState.RECOVERED:
        if last is None or last.outcome is None:
            return "awaiting confirmation"
        return "recovered" if last.outcome is AttemptOutcome.SUCCEEDED else lineage.state.value
    if (
        lineage.state is LineageState.HEALTHY
        and last is not None
        and last.outcome is AttemptOutcome.SUCCEEDED
    ):
        return "recovered"
    return lineage.state.value


def lineage_dict(lineage: Lineage) -> dict[str, Any]:
    return {
        "lineage_id": lineage.lineage_id,
        "state": lineage.state.value,
        "reason": lineage.reason,
        "root_run_id": lineage.root_run_id,
        "current_run_id": lineage.current_run_id,
        "attempts_total": lineage.attempts_total,
        "rule": lineage.rule,
        "detected_at": iso(lineage.detected_at),
        "next_attempt_at": iso(lineage.next_attempt_at),
        "updated_at": iso(lineage.updated_at),
    }


def hold_dict(hold: Hold) -> dict[str, Any]:
    return {
        "scope": hold.lineage_id or "*",
        "lineage_id": hold.lineage_id,
        "by": hold.held_by,
        "at": iso(hold.at),
        "reason": hold.reason,
    }


def attempt_dict(attempt: Attempt) -> dict[str, Any]:
    return {
        "attempt_id": attempt.attempt_id,
        "number": attempt.number,
        "step": attempt.step.value,
        "outcome": attempt.outcome.value if attempt.outcome else None,
        "corrupted_run_id": attempt.corrupted_run_id,
        "checkpoint_path": attempt.checkpoint_path,
        "handed_off_path": attempt.handed_off_path,
        "successor_run_id": attempt.successor_run_id,
        "started_at": iso(attempt.started_at),
        "finished_at": iso(attempt.finished_at),
        "reason": attempt.reason,
    }


def event_dict(event: Event, run_id: str | None = None) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "at": iso(event.at),
        "kind": event.kind,
        "reason": event.reason,
        "lineage_id": event.lineage_id,
        "attempt_id": event.attempt_id,
        "run_id": run_id if run_id is not None else event.run_id,
        "data": dict(event.data),
    }


def _run_of_checkpoint(path: object) -> str | None:
    if not isinstance(path, str) or not path.startswith(CHECKPOINT_SCHEME):
        return None
    return path.removeprefix(CHECKPOINT_SCHEME).split("/", 1)[0] or None


def event_run(event: Event, attempts: Mapping[str, Attempt]) -> str | None:
    """The run an event is about: its own, else its checkpoint's run, else its attempt's."""
    if event.run_id:
        return event.run_id
    if found := _run_of_checkpoint(event.data.get("checkpoint_path")):
        return found
    attempt = attempts.get(event.attempt_id or "")
    return attempt.corrupted_run_id if attempt is not None else None


# -- status ---------------------------------------------------------------------------------


async def status_data(store: Store) -> dict[str, Any]:
    """What the store knows: leader, holds, and every lineage that needs or needed attention."""
    lineages = [
        lineage
        for lineage in await store.list_lineages()
        if lineage.state is not LineageState.HEALTHY or lineage.attempts_total
    ]
    leader = await store.leader()
    details = await store.hold_details()
    rows = []
    for lineage in lineages:
        attempts = await store.attempts(lineage.lineage_id) if lineage.attempts_total else []
        rows.append({**lineage_dict(lineage), "display_state": display_state(lineage, attempts)})
    return {
        "leader": None
        if leader is None
        else {
            "replica": leader.replica_id,
            "epoch": leader.epoch,
            "expires_at": iso(leader.expires_at),
        },
        "holds": [hold.lineage_id or "*" for hold in details],
        "hold_details": [hold_dict(hold) for hold in details],
        "lineages": rows,
    }


# -- history --------------------------------------------------------------------------------


async def history_data(store: Store, target: str, limit: int) -> dict[str, Any]:
    lineage = await store.get_lineage(target) or await store.lineage_for_run(target)
    if lineage is None:
        # A run no lineage holds may still have refusals recorded against it.
        events = await store.events(run_id=target, limit=limit)
        if not events:
            raise OperatorRefused(f"no lineage or run named {target!r} in the store")
        return {"lineage": None, "attempts": [], "events": [event_dict(e) for e in events]}
    events = await store.events(lineage_id=lineage.lineage_id, limit=limit)
    attempts = await store.attempts(lineage.lineage_id)
    by_id = {a.attempt_id: a for a in attempts}
    return {
        "lineage": {**lineage_dict(lineage), "display_state": display_state(lineage, attempts)},
        "attempts": [attempt_dict(a) for a in attempts],
        "events": [event_dict(e, event_run(e, by_id)) for e in events],
    }


# -- recover --------------------------------------------------------------------------------


def checkpoint_problem(path: str) -> str | None:
    """Why `path` cannot be a checkpoint to restore from, or None."""
    run = _run_of_checkpoint(path)
    if run is None or not core_lineage.is_valid_lineage_id(run):
        return f"checkpoint {path!r} is not a tinker://RUN/... path"
    if len(path) > MAX_CHECKPOINT_PATH_CHARS:
        return f"checkpoint path is longer than {MAX_CHECKPOINT_PATH_CHARS} characters"
    if not path.isprintable() or any(ch.isspace() for ch in path):
        return "checkpoint path must be printable, without whitespace"
    return None


async def _recover_refusal(
    store: Store, run_id: str, checkpoint: str | None, known: Lineage | None
) -> str | None:
    if checkpoint is not None:
        if problem := checkpoint_problem(checkpoint):
            return problem
        if await store.bad_checkpoints([checkpoint]):
            return f"checkpoint {checkpoint} failed validation in an earlier attempt"
    if known is None:
        if await store.leader() is None:
            return (
                f"run {run_id} is not in the store (no daemon has listed it) and no daemon "
                "holds the lease, so nothing would take the request"
            )
        return None
    if known.current_run_id != run_id:
        return (
            f"lineage {known.lineage_id} has moved on to run {known.current_run_id}: "
            "recover that run instead"
        )
    if known.state in (LineageState.RECOVERING, LineageState.RECOVERED):
        return f"lineage {known.lineage_id} already has an attempt in flight ({known.reason})"
    return None


async def recover(
    store: Store, run_id: str, checkpoint: str | None, *, by: str, now: datetime
) -> Result:
    """Queue a recovery, or refuse it at once (recorded as an event) when it could not start."""
    known = await store.lineage_for_run(run_id)
    refusal = await _recover_refusal(store, run_id, checkpoint, known)
    data: dict[str, Any] = {"run_id": run_id, "checkpoint": checkpoint, "by": by}
    if refusal is not None:
        await store.append_event(
            Event(
                at=now,
                kind="manual_recovery_refused",
                reason=refusal,
                lineage_id=known.lineage_id if known is not None else None,
                run_id=run_id,
                data={"requested_by": by, "checkpoint_path": checkpoint, "refused_by": "cli"},
            )
        )
        return Result(
            {**data, "request_id": None, "outcome": "refused", "reason": refusal},
            [f"refused: recovery of {run_id}: {refusal}"],
            exit_code=1,
        )
    request_id = await store.request_recovery(run_id, checkpoint, by=by, at=now)
    lines = [f"recovery of {run_id} queued as request {request_id}"]
    if await store.leader() is None:
        lines.append("note: no daemon holds the lease now; the request waits until one does")
    return Result({**data, "request_id": request_id, "outcome": "queued", "reason": ""}, lines)


async def wait_outcome(
    store: Store,
    clock: Clock,
    request_id: int,
    run_id: str,
    *,
    timeout_s: float,
    until_finished: bool,
) -> Result:
    """Follow request `request_id` until the leader settles it (and, if asked, until the
    attempt it started finishes). Exit 0 started/succeeded, 1 refused/failed/timed out."""
    deadline = clock.monotonic() + timeout_s
    settled = await store.manual_request_outcome(request_id)
    while settled is None:
        if clock.monotonic() >= deadline:
            return _timed_out(request_id, "still queued: is a daemon running and leading?")
        await clock.sleep(WAIT_POLL_S)
        settled = await store.manual_request_outcome(request_id)
    outcome, reason = settled
    data: dict[str, Any] = {"request_id": request_id, "outcome": outcome, "reason": reason}
    if outcome != "started":
        return Result(data, [f"request {request_id} refused: {reason}"], exit_code=1)
    lines = [f"request {request_id} started: {reason}"]
    if not until_finished:
        return Result(data, lines)
    while True:
        attempt = await _latest_attempt(store, run_id)
        if attempt is not None and attempt.outcome is not None:
            break
        if clock.monotonic() >= deadline:
            return _timed_out(request_id, "started, attempt not finished yet", lines, data)
        await clock.sleep(WAIT_POLL_S)
    done = attempt.outcome is AttemptOutcome.SUCCEEDED
    successor = f", successor run {attempt.successor_run_id}" if attempt.successor_run_id else ""
    lines.append(
        f"attempt {attempt.number} of lineage {attempt.lineage_id} {attempt.outcome.value}"
        f"{successor}: {attempt.reason}"
    )
    data["attempt"] = attempt_dict(attempt)
    return Result(data, lines, exit_code=0 if done else 1)


def _timed_out(
    request_id: int,
    what: str,
    lines: list[str] | None = None,
    data: dict[str, Any] | None = None,
) -> Result:
    body = {"request_id": request_id, "outcome": "timeout", "reason": what, **(data or {})}
    body["outcome"] = "timeout"
    return Result(
        body, [*(lines or []), f"request {request_id}: gave up waiting: {what}"], exit_code=1
    )


async def _latest_attempt(store: Store, run_id: str) -> Attempt | None:
    lineage = await store.lineage_for_run(run_id)
    if lineage is None:
        return None
    attempts = await store.attempts(lineage.lineage_id)
    return max(attempts, key=lambda a: a.number) if attempts else None


# -- holds ----------------------------------------------------------------------------------


async def pause(
    store: Store, lineage_id: str | None, *, reason: str, by: str, now: datetime
) -> Result:
    scope = f"lineage {lineage_id}" if lineage_id else "the whole fleet"
    if lineage_id is not None and await store.get_lineage(lineage_id) is None:
        hint = ""
        if (owner := await store.lineage_for_run(lineage_id)) is not None:
            hint = f" ({lineage_id} is a run of lineage {owner.lineage_id})"
        raise OperatorRefused(f"no lineage {lineage_id!r} in the store{hint}")
    for hold in await store.hold_details():
        if hold.lineage_id == lineage_id:
            raise OperatorRefused(
                f"{scope} is already paused by {hold.held_by} since {iso(hold.at)}"
                f" ({hold.reason or 'no reason given'}); nothing changed"
            )
    await store.set_hold(lineage_id, True, by=by, at=now, reason=reason)
    await store.append_event(
        Event(
            at=now,
            kind="operator_pause",
            reason=reason,
            lineage_id=lineage_id,
            data={"by": by, "scope": lineage_id or "*"},
        )
    )
    data = {"held": True, "lineage": lineage_id, "by": by, "reason": reason, "at": iso(now)}
    return Result(data, [f"paused {scope} (by {by}: {reason})"])


async def resume(store: Store, lineage_id: str | None, *, by: str, now: datetime) -> Result:
    scope = f"lineage {lineage_id}" if lineage_id else "the whole fleet"
    holds = await store.hold_details()
    match = [hold for hold in holds if hold.lineage_id == lineage_id]
    if not match:
        others = sorted(h.lineage_id or "*" for h in holds)
        held = f"; held now: {', '.join(others)}" if others else "; nothing is held"
        raise OperatorRefused(f"{scope} is not paused, nothing to resume{held}")
    await store.set_hold(lineage_id, False, by=by, at=now)
    await store.append_event(
        Event(
            at=now,
            kind="operator_resume",
            reason=f"resumed by {by}",
            lineage_id=lineage_id,
            data={"by": by, "scope": lineage_id or "*", "held_by": match[0].held_by},
        )
    )
    data = {"held": False, "lineage": lineage_id, "by": by, "at": iso(now)}
    return Result(data, [f"resumed {scope} (held by {match[0].held_by} since {iso(match[0].at)})"])
