"""Operator commands (`status`, `history`, `recover`, `pause`, `resume`) against the state store.

They talk to the store, not to a daemon process, so they work whether the daemon runs or not and
from any replica; the leader picks holds and manual requests up on its next cycle.
"""

from __future__ import annotations

import argparse
import getpass
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tinker_recovery.core.model import Attempt, Lineage, LineageState
from tinker_recovery.shell.clock import SystemClock
from tinker_recovery.shell.store import open_store
from tinker_recovery.shell.store.base import Event, Store
from tinker_recovery.shell.store.sqlite import SqliteStore


@dataclass(frozen=True)
class Result:
    text: str
    data: Any
    exit_code: int = 0


async def execute(
    command: str, args: argparse.Namespace, url: str | None, state_directory: str | None
) -> Result:
    clock = SystemClock()
    store = open_store(url, clock=clock, state_directory=state_directory)
    if isinstance(store, SqliteStore) and not store.path.exists():
        # Opening would create an empty store and report "nothing here", which hides a wrong
        # path; the daemon creates the store, the CLI only reads and queues.
        text = f"no state store at {store.path}: pass the daemon's --state URL or --config\n"
        return Result(text, {"error": f"no state store at {store.path}"}, exit_code=1)
    await store.open()
    try:
        who = f"cli:{getpass.getuser()}"
        if command == "status":
            return await _status(store)
        if command == "history":
            return await _history(store, args.target, args.limit)
        if command == "recover":
            request_id = await store.request_recovery(
                args.run_id, args.checkpoint, by=who, at=clock.now()
            )
            text = f"recovery of {args.run_id} queued as request {request_id}\n"
            return Result(text, {"request_id": request_id, "run_id": args.run_id})
        held = command == "pause"
        await store.set_hold(args.lineage, held, by=who, at=clock.now())
        scope = f"lineage {args.lineage}" if args.lineage else "the whole fleet"
        verb = "paused" if held else "resumed"
        return Result(f"{verb} {scope}\n", {"held": held, "lineage": args.lineage})
    finally:
        await store.close()


def lineage_dict(lineage: Lineage) -> dict[str, Any]:
    return {
        "lineage_id": lineage.lineage_id,
        "state": lineage.state.value,
        "reason": lineage.reason,
        "root_run_id": lineage.root_run_id,
        "current_run_id": lineage.current_run_id,
        "attempts_total": lineage.attempts_total,
        "detected_at": _iso(lineage.detected_at),
        "next_attempt_at": _iso(lineage.next_attempt_at),
        "updated_at": _iso(lineage.updated_at),
    }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


async def _status(store: Store) -> Result:
    lineages = [
        lineage
        for lineage in await store.list_lineages()
        if lineage.state is not LineageState.HEALTHY or lineage.attempts_total
    ]
    leader = await store.leader()
    holds = sorted(h or "*" for h in await store.holds())
    rows = [
        (
            lineage.lineage_id,
            lineage.state.value,
            str(lineage.attempts_total),
            lineage.current_run_id,
            lineage.reason,
        )
        for lineage in lineages
    ]
    text = f"leader: {leader.replica_id + ' epoch ' + str(leader.epoch) if leader else 'none'}\n"
    text += f"holds: {', '.join(holds) or 'none'}\n"
    text += _table(("LINEAGE", "STATE", "ATTEMPTS", "CURRENT RUN", "REASON"), rows)
    data = {
        "leader": None if leader is None else {"replica": leader.replica_id, "epoch": leader.epoch},
        "holds": holds,
        "lineages": [lineage_dict(lineage) for lineage in lineages],
    }
    return Result(text, data)


async def _history(store: Store, target: str, limit: int) -> Result:
    lineage = await store.get_lineage(target) or await store.lineage_for_run(target)
    if lineage is None:
        return Result(f"no lineage or run named {target!r} in the store\n", None, exit_code=1)
    events = await store.events(lineage_id=lineage.lineage_id, limit=limit)
    attempts = await store.attempts(lineage.lineage_id)
    rows = [(e.at.isoformat(timespec="seconds"), e.kind, e.run_id or "", e.reason) for e in events]
    text = f"lineage {lineage.lineage_id}: {lineage.state.value} ({lineage.reason})\n"
    text += _table(("AT", "EVENT", "RUN", "REASON"), rows)
    data = {
        "lineage": lineage_dict(lineage),
        "attempts": [_attempt_dict(a) for a in attempts],
        "events": [_event_dict(e) for e in events],
    }
    return Result(text, data)


def _attempt_dict(attempt: Attempt) -> dict[str, Any]:
    return {
        "attempt_id": attempt.attempt_id,
        "number": attempt.number,
        "step": attempt.step.value,
        "outcome": attempt.outcome.value if attempt.outcome else None,
        "corrupted_run_id": attempt.corrupted_run_id,
        "checkpoint_path": attempt.checkpoint_path,
        "handed_off_path": attempt.handed_off_path,
        "successor_run_id": attempt.successor_run_id,
        "started_at": attempt.started_at,
        "finished_at": attempt.finished_at,
        "reason": attempt.reason,
    }


def _event_dict(event: Event) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "at": event.at,
        "kind": event.kind,
        "reason": event.reason,
        "lineage_id": event.lineage_id,
        "attempt_id": event.attempt_id,
        "run_id": event.run_id,
        "data": dict(event.data),
    }


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain aligned columns; values are single-lined so hostile metadata cannot fake rows."""
    clean = [tuple(_one_line(c) for c in row) for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in clean]) for i, h in enumerate(header)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *clean]
    ]
    return "\n".join(lines) + "\n"


def _one_line(value: str, limit: int = 120) -> str:
    flat = value.replace("\r", " ").replace("\n", " ")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
