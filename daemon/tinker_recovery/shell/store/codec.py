"""Turning store records into plain JSON-able values and back, shared by every backend.

Backends keep the columns they query on (ids, run ids, state, outcome, times) and store the
whole record as a JSON blob besides. Reading goes through the blob only, so a row written by a
newer version with extra keys still loads here: unknown keys are ignored and missing keys take
the dataclass defaults. Datetimes are stored as ISO 8601 text in UTC with microseconds always
present, so that text order is time order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any

from tinker_recovery.core.model import (
    Attempt,
    AttemptOutcome,
    AttemptStep,
    Lineage,
    LineageState,
)

from .base import Event

_ISO_FORMAT = "%Y-%m-%dT%H:%M:%S.%f+00:00"


def dump_time(value: datetime) -> str:
    """Aware datetime -> fixed-width UTC text. Naive datetimes are refused: they hide bugs."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("naive datetime given to the store; use aware UTC datetimes")
    return value.astimezone(UTC).strftime(_ISO_FORMAT)


def load_time(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def _opt_time(value: Any) -> datetime | None:
    return None if value is None else load_time(str(value))


def _known(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """Keep only the keys this version of the dataclass knows."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def lineage_to_json(lineage: Lineage) -> str:
    return json.dumps(
        {
            "lineage_id": lineage.lineage_id,
            "root_run_id": lineage.root_run_id,
            "current_run_id": lineage.current_run_id,
            "state": lineage.state.value,
            "reason": lineage.reason,
            "first_seen_at": dump_time(lineage.first_seen_at),
            "updated_at": dump_time(lineage.updated_at),
            "corrupted_reads": lineage.corrupted_reads,
            "corrupted_since": _dump_opt(lineage.corrupted_since),
            "detected_at": _dump_opt(lineage.detected_at),
            "preexisting": lineage.preexisting,
            "attempt_starts": [dump_time(t) for t in lineage.attempt_starts],
            "attempts_total": lineage.attempts_total,
            "next_attempt_at": _dump_opt(lineage.next_attempt_at),
            "rule": lineage.rule,
            "held_by_operator": lineage.held_by_operator,
            "last_checkpoint_time": _dump_opt(lineage.last_checkpoint_time),
        },
        sort_keys=True,
    )


def lineage_from_json(blob: str | Mapping[str, Any]) -> Lineage:
    data = _known(Lineage, _as_mapping(blob))
    data["state"] = LineageState(data["state"])
    for key in ("first_seen_at", "updated_at"):
        data[key] = load_time(data[key])
    for key in ("corrupted_since", "detected_at", "next_attempt_at", "last_checkpoint_time"):
        if key in data:
            data[key] = _opt_time(data[key])
    data["attempt_starts"] = tuple(load_time(t) for t in data.get("attempt_starts", ()))
    return Lineage(**data)


def attempt_to_json(attempt: Attempt) -> str:
    return json.dumps(
        {
            "attempt_id": attempt.attempt_id,
            "lineage_id": attempt.lineage_id,
            "number": attempt.number,
            "corrupted_run_id": attempt.corrupted_run_id,
            "step": attempt.step.value,
            "started_at": dump_time(attempt.started_at),
            "updated_at": dump_time(attempt.updated_at),
            "checkpoint_path": attempt.checkpoint_path,
            "checkpoint_time": _dump_opt(attempt.checkpoint_time),
            "handed_off_path": attempt.handed_off_path,
            "successor_run_id": attempt.successor_run_id,
            "outcome": None if attempt.outcome is None else attempt.outcome.value,
            "reason": attempt.reason,
            "finished_at": _dump_opt(attempt.finished_at),
            "epoch": attempt.epoch,
        },
        sort_keys=True,
    )


def attempt_from_json(blob: str | Mapping[str, Any]) -> Attempt:
    data = _known(Attempt, _as_mapping(blob))
    data["step"] = AttemptStep(data["step"])
    if data.get("outcome") is not None:
        data["outcome"] = AttemptOutcome(data["outcome"])
    for key in ("started_at", "updated_at"):
        data[key] = load_time(data[key])
    for key in ("checkpoint_time", "finished_at"):
        if key in data:
            data[key] = _opt_time(data[key])
    return Attempt(**data)


def event_data_to_json(event: Event) -> str:
    """Event payloads are raw run data; anything JSON cannot hold is stringified, not refused,
    because losing a decision's record over a stray datetime would be worse."""
    return json.dumps(dict(event.data), sort_keys=True, default=_json_fallback)


def event_data_from_json(blob: str | Mapping[str, Any] | None) -> dict[str, Any]:
    return {} if blob is None else dict(_as_mapping(blob))


def _json_fallback(value: object) -> str:
    if isinstance(value, datetime):
        return dump_time(value) if value.tzinfo is not None else value.isoformat()
    return str(value)


def _dump_opt(value: datetime | None) -> str | None:
    return None if value is None else dump_time(value)


def _as_mapping(blob: str | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(blob, str):
        loaded = json.loads(blob)
        if not isinstance(loaded, dict):
            raise ValueError("stored record is not a JSON object")
        return loaded
    return blob
