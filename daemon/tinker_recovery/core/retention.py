"""Checkpoint retention: which of a lineage's checkpoints `tinker-recovery prune` may delete.

Pure. The caller gathers a lineage's checkpoints (every run of it: root, current, the corrupted
and successor runs of its attempts), its attempts, whether it is held, and "now"; this module
says, for each checkpoint, delete or keep, and why. Nothing here talks to the API or the store.

Kept, in this order of precedence (the first that applies is the reason shown):
- everything of a lineage that is held (operator or breaker) or has an attempt in flight: an
  open attempt may be selecting, validating or restoring any of them;
- sampler and external checkpoints: not ours (sampler weights hold no optimizer state, so they
  never count toward recovery, and a user may be sampling from them);
- anything an attempt used (`checkpoint_path`, `handed_off_path`), finished or not, and any
  checkpoint an operator's pending `recover --checkpoint` names;
- the newest training checkpoint of the lineage's current run: the one the checkpoint guard
  keeps alive while the run is driven;
- the newest `keep` usable training checkpoints (`ranking.is_usable`: not bad, not expired nor
  expiring within `min_ttl`, not older than `max_age`).
Everything else (older usable ones, expired, bad or too old training checkpoints) is deleted.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from tinker_recovery.core import ranking
from tinker_recovery.core.model import Attempt, CheckpointKind, CheckpointView, Lineage
from tinker_recovery.settings import CheckpointSettings


class KeepReason(StrEnum):
    HELD = "lineage_held"
    IN_FLIGHT = "attempt_in_flight"
    NOT_TRAINING = "not_training"
    USED_BY_ATTEMPT = "used_by_attempt"
    REQUESTED = "requested_by_operator"
    GUARDED = "newest_of_current_run"
    NEWEST = "newest_usable"


class DeleteReason(StrEnum):
    BEYOND_KEEP = "beyond_keep"  # usable, but older than the newest `keep`
    EXPIRED = "expired"  # listed with a past expiry (or expiring within min_ttl)
    UNUSABLE = "unusable"  # marked bad, or older than max_age


@dataclass(frozen=True, slots=True)
class Verdict:
    checkpoint: CheckpointView
    reason: KeepReason | DeleteReason

    @property
    def is_delete(self) -> bool:
        return isinstance(self.reason, DeleteReason)


@dataclass(frozen=True, slots=True)
class Plan:
    """One lineage's verdicts, newest checkpoint first."""

    lineage_id: str
    run_ids: tuple[str, ...]
    verdicts: tuple[Verdict, ...]

    @property
    def to_delete(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.is_delete]

    @property
    def frees_bytes(self) -> int:
        """The storage deleting `to_delete` frees, counting only checkpoints with a size."""
        return sum(v.checkpoint.size_bytes or 0 for v in self.to_delete)

    @property
    def unknown_sizes(self) -> int:
        """How many of `to_delete` the service gave no size for."""
        return sum(1 for v in self.to_delete if v.checkpoint.size_bytes is None)


def lineage_runs(lineage: Lineage, attempts: Iterable[Attempt]) -> tuple[str, ...]:
    """Every run of the lineage, root first, each once: root, current, and each attempt's
    corrupted, successor and restored (`restore: sdk`) runs."""
    runs: list[str | None] = [lineage.root_run_id, lineage.current_run_id]
    for attempt in attempts:
        runs += [attempt.corrupted_run_id, attempt.successor_run_id]
        runs += [ranking.run_id_of(attempt.checkpoint_path)]
        runs += [ranking.run_id_of(attempt.handed_off_path)]
    return tuple(dict.fromkeys(r for r in runs if r is not None))


def plan(
    lineage: Lineage,
    checkpoints: Sequence[CheckpointView],
    attempts: Sequence[Attempt],
    *,
    is_held: bool,
    keep: int,
    now: datetime,
    cfg: CheckpointSettings,
    bad: Collection[str] = frozenset(),
    requested: Collection[str] = frozenset(),
) -> Plan:
    """The verdict on each of `checkpoints` (the lineage's, any order, duplicates dropped)."""
    if keep < 1:
        raise ValueError("keep must be at least 1: the newest usable checkpoint always stays")
    unique = {c.tinker_path: c for c in checkpoints}
    ordered = sorted(unique.values(), key=lambda c: (c.time, c.tinker_path), reverse=True)
    ranked = ranking.rank_checkpoints(ordered, now=now, cfg=cfg, bad=bad)
    facts = _Facts(
        now=now,
        min_ttl=timedelta(seconds=cfg.min_ttl),
        bad=frozenset(bad),
        usable=frozenset(c.tinker_path for c in ranked),
        newest=frozenset(c.tinker_path for c in ranked[:keep]),
        used=frozenset(
            p for a in attempts for p in (a.checkpoint_path, a.handed_off_path) if p is not None
        ),
        requested=frozenset(requested),
        guarded=_newest_training_of(ordered, lineage.current_run_id, now),
    )
    everything: KeepReason | None = None
    if is_held:
        everything = KeepReason.HELD
    elif any(a.outcome is None for a in attempts):
        everything = KeepReason.IN_FLIGHT
    return Plan(
        lineage_id=lineage.lineage_id,
        run_ids=lineage_runs(lineage, attempts),
        verdicts=tuple(
            Verdict(c, everything or _keep_reason(c, facts) or _delete_reason(c, facts))
            for c in ordered
        ),
    )


@dataclass(frozen=True, slots=True)
class _Facts:
    now: datetime
    min_ttl: timedelta
    bad: frozenset[str]
    usable: frozenset[str]
    newest: frozenset[str]
    used: frozenset[str]
    requested: frozenset[str]
    guarded: str | None


def _keep_reason(c: CheckpointView, facts: _Facts) -> KeepReason | None:
    if c.kind is not CheckpointKind.TRAINING:
        return KeepReason.NOT_TRAINING
    if c.tinker_path in facts.used:
        return KeepReason.USED_BY_ATTEMPT
    if c.tinker_path in facts.requested:
        return KeepReason.REQUESTED
    if c.tinker_path == facts.guarded:
        return KeepReason.GUARDED
    if c.tinker_path in facts.newest:
        return KeepReason.NEWEST
    return None


def _delete_reason(c: CheckpointView, facts: _Facts) -> DeleteReason:
    if c.tinker_path in facts.usable:
        return DeleteReason.BEYOND_KEEP
    if c.tinker_path in facts.bad:
        return DeleteReason.UNUSABLE
    # Neither usable nor bad: expired or expiring within min_ttl, else older than max_age.
    expiring = c.expires_at is not None and c.expires_at <= facts.now + facts.min_ttl
    return DeleteReason.EXPIRED if expiring else DeleteReason.UNUSABLE


def _newest_training_of(
    ordered: Sequence[CheckpointView], run_id: str, now: datetime
) -> str | None:
    """The newest live training checkpoint of `run_id` (the guard cannot revive an expired one)."""
    for c in ordered:
        if c.kind is not CheckpointKind.TRAINING or ranking.run_id_of(c.tinker_path) != run_id:
            continue
        if c.expires_at is None or c.expires_at > now:
            return c.tinker_path
    return None
