"""Make a tinker-cookbook job resume from the daemon's checkpoint through its own resume path.

A cookbook recipe resumes from the last record of `<log_path>/checkpoints.jsonl` that has a
`state_path` (`checkpoint_utils.get_last_checkpoint`) and continues from that record's loop state
(batch, epoch, token counters...). To make it resume from the checkpoint the daemon chose, we
append one record: a copy of the record that saved that checkpoint (so its loop state comes with
it), whose `state_path` is what the daemon handed off (the original, or its `restore: sdk` copy).

Rules: the user's history is never rewritten, only appended to (one line, fsync'd); a
checkpoint that is not in the file is refused, never guessed; applying the same attempt twice
appends nothing the second time. Stdlib only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinker_recovery.jobside.attempt import Handoff

CHECKPOINTS_FILE = "checkpoints.jsonl"
MARK = "tinker_recovery"  # our note on a record we appended: which attempt, from what


class ResumeRefused(Exception):
    """The handed-off checkpoint cannot be resumed through this log directory."""


@dataclass(frozen=True, slots=True)
class ResumeOutcome:
    appended: dict[str, Any] | None  # the record written, or None when nothing was needed
    detail: str


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of a checkpoints.jsonl; refuses a file the cookbook could not read either."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ResumeRefused(
            f"{path} does not exist: is --log-path the job's log_path? (the job has never saved "
            "a checkpoint there)"
        ) from None
    records: list[dict[str, Any]] = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            raise ResumeRefused(f"{path}:{number}: empty line (the cookbook cannot read it)")
        try:
            record = json.loads(line)
        except ValueError:
            raise ResumeRefused(
                f"{path}:{number}: not JSON (a torn write?); fix the file by hand, it is the "
                "job's own history and is never rewritten by tinker-recovery"
            ) from None
        if not isinstance(record, dict):
            raise ResumeRefused(f"{path}:{number}: not a JSON object")
        records.append(record)
    if raw and not raw.endswith("\n"):
        raise ResumeRefused(f"{path}: the last line is incomplete (a torn write?); fix it by hand")
    return records


def plan(records: list[dict[str, Any]], handoff: Handoff, *, where: str) -> ResumeOutcome:
    """The record to append (pure), or why none is needed. Raises ResumeRefused."""
    for record in records:
        note = record.get(MARK)
        if isinstance(note, dict) and note.get("idempotency_key") == handoff.idempotency_key:
            return ResumeOutcome(None, f"attempt {handoff.attempt} was already applied to {where}")
    source = handoff.original_checkpoint_path
    saved_it = [r for r in records if r.get("state_path") == source]
    if not saved_it:
        raise ResumeRefused(
            f"checkpoint {source} is not in {where}, so its loop state (batch, epoch) is "
            "unknown; refusing to guess. Is --log-path the log_path of the job that saved it?"
        )
    base = saved_it[-1]
    with_state = [r for r in records if r.get("state_path")]
    if handoff.checkpoint_path == source and with_state[-1] is base:
        return ResumeOutcome(None, f"{source} is already the last checkpoint in {where}")
    record = {k: v for k, v in base.items() if k != MARK}
    record["state_path"] = handoff.checkpoint_path
    record[MARK] = {
        "lineage": handoff.lineage_id,
        "attempt": handoff.attempt,
        "idempotency_key": handoff.idempotency_key,
        "resumed_from": source,
    }
    return ResumeOutcome(record, f"resume from {handoff.checkpoint_path} at {_loop_state(base)}")


def apply(log_path: Path, handoff: Handoff) -> ResumeOutcome:
    """Append the resume record for `handoff` to `log_path/checkpoints.jsonl` if one is needed."""
    path = log_path / CHECKPOINTS_FILE
    outcome = plan(read_records(path), handoff, where=str(path))
    if outcome.appended is not None:
        line = json.dumps(outcome.appended) + "\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            os.write(fd, line.encode("utf-8"))  # one write: readers see all of it or none
            os.fsync(fd)
        finally:
            os.close(fd)
    return outcome


def _loop_state(record: dict[str, Any]) -> str:
    shown = {k: record[k] for k in ("batch", "epoch", "step") if k in record}
    return ", ".join(f"{k} {v}" for k, v in shown.items()) or f"record {record.get('name')!r}"
