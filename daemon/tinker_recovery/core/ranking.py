"""Ranking and judging for an attempt: which checkpoint to restore (and why not), which listed
run is the attempt's successor, and whether that successor has progressed.

Pure functions only. "now" is an argument; nothing here reads a clock or talks to the API.
The executor gathers candidates and asks `weights_info`; this module only judges them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from tinker_recovery.core.model import (
    TAG_IDEMPOTENCY_KEY,
    TAG_PREFIX,
    Attempt,
    CheckpointKind,
    CheckpointView,
    Lineage,
    RunView,
    WeightsInfo,
)
from tinker_recovery.settings import CheckpointSettings


class RejectionReason(StrEnum):
    """Why a checkpoint cannot restore its run: the `reason` label of checkpoints_rejected."""

    BASE_MODEL_MISMATCH = "base_model_mismatch"
    LORA_MISMATCH = "lora_mismatch"  # LoRA vs full fine-tune
    LORA_RANK_MISMATCH = "lora_rank_mismatch"
    OPTIMIZER_STATE_MISSING = "optimizer_state_missing"
    UNLOADABLE = "unloadable"  # weights_info refused the path (gone, corrupt, forbidden)


def is_usable(
    checkpoint: CheckpointView, *, now: datetime, cfg: CheckpointSettings, bad: Collection[str]
) -> bool:
    """True when the checkpoint may be tried: training kind, alive long enough, young enough."""
    if checkpoint.kind is not CheckpointKind.TRAINING:
        # Sampler weights carry no optimizer state; external ones are not ours to resume from.
        return False
    if checkpoint.tinker_path in bad:
        return False
    # A checkpoint expiring within min_ttl could vanish between selection and the job's load.
    if checkpoint.expires_at is not None and checkpoint.expires_at <= now + timedelta(
        seconds=cfg.min_ttl
    ):
        return False
    return cfg.max_age is None or now - checkpoint.time <= timedelta(seconds=cfg.max_age)


def rank_checkpoints(
    checkpoints: Sequence[CheckpointView],
    *,
    now: datetime,
    cfg: CheckpointSettings,
    bad: Collection[str],
) -> list[CheckpointView]:
    """Usable candidates, newest first, each tinker path once.

    Ties on time are broken by path (descending) so the order never depends on listing order.
    """
    unique: dict[str, CheckpointView] = {}
    for checkpoint in checkpoints:
        if is_usable(checkpoint, now=now, cfg=cfg, bad=bad):
            unique.setdefault(checkpoint.tinker_path, checkpoint)
    return sorted(unique.values(), key=lambda c: (c.time, c.tinker_path), reverse=True)


def rejection_reason(
    run: RunView, info: WeightsInfo, *, restore_optimizer: bool
) -> RejectionReason | None:
    """Why `info` (a checkpoint's weights_info) cannot resume `run`, or None if it can.

    A RejectionReason is a `str`, so callers may use it as a label value or a message.
    """
    if info.base_model != run.base_model:
        return RejectionReason.BASE_MODEL_MISMATCH
    if info.is_lora != run.is_lora:
        return RejectionReason.LORA_MISMATCH
    # Only compare ranks when both sides report one: the listing may omit the run's rank.
    if (
        info.is_lora
        and info.lora_rank is not None
        and run.lora_rank is not None
        and info.lora_rank != run.lora_rank
    ):
        return RejectionReason.LORA_RANK_MISMATCH
    if restore_optimizer and not info.has_optimizer_state:
        return RejectionReason.OPTIMIZER_STATE_MISSING
    return None


# successors -----------------------------------------------------------------------------------


def run_id_of(tinker_path: str | None) -> str | None:
    """`tinker://<run>/weights/000020` -> `<run>`; None for anything else."""
    if tinker_path is None or not tinker_path.startswith("tinker://"):
        return None
    run_id = tinker_path.removeprefix("tinker://").split("/", 1)[0]
    return run_id or None


def known_runs(lineage: Lineage | None, attempts: Iterable[Attempt], current: Attempt) -> set[str]:
    """Runs of the lineage that existed before `current` and so cannot be its successor."""
    known = {current.corrupted_run_id}
    if lineage is not None:
        known |= {lineage.root_run_id, lineage.current_run_id}
    for other in attempts:
        if other.attempt_id == current.attempt_id:
            continue
        known.add(other.corrupted_run_id)
        if other.successor_run_id is not None:
            known.add(other.successor_run_id)
    # With `restore: sdk` plus a handoff, the daemon's own restored run carries the attempt's
    # tags too, but it only holds the fresh checkpoint: the job's run is the successor.
    restored = run_id_of(current.handed_off_path)
    if (
        current.successor_run_id is None
        and restored is not None
        and restored != run_id_of(current.checkpoint_path)
    ):
        known.add(restored)
    return known


def find_successor(
    attempt: Attempt, runs: Sequence[RunView], *, exclude: Iterable[str]
) -> RunView | None:
    """The run that continues `attempt`'s lineage, if the listing shows one: the run recorded
    as its successor, else a run carrying the attempt's idempotency key (ties: the busiest).

    A lineage tag alone proves nothing (anyone can write it): a run must carry this attempt's
    key. Jobs that pass no tags are found by `match_untagged`.
    """
    if attempt.successor_run_id is not None:
        return next((r for r in runs if r.run_id == attempt.successor_run_id), None)
    excluded = set(exclude)
    by_key = [
        r
        for r in runs
        if r.user_metadata.get(TAG_IDEMPOTENCY_KEY) == attempt.attempt_id
        and r.run_id not in excluded
    ]
    if not by_key:
        return None
    return max(by_key, key=lambda r: (r.last_request_time, r.run_id))


def carried_labels(run: RunView) -> dict[str, str]:
    """The labels a job carries over to the run it resumes into (ours left out)."""
    return {k: v for k, v in run.user_metadata.items() if not k.startswith(TAG_PREFIX)}


def matches_origin(candidate: RunView, origin: RunView) -> bool:
    """Could `candidate` be the job of `origin` resumed without our tags? Same owner, base
    model, LoRA kind and rank, the same carried labels, and no tags of some other attempt."""
    if candidate.run_id == origin.run_id or candidate.corrupted:
        return False
    if TAG_IDEMPOTENCY_KEY in candidate.user_metadata:
        return False  # it belongs to the attempt whose key it carries
    return (
        candidate.owner == origin.owner
        and candidate.base_model == origin.base_model
        and candidate.is_lora == origin.is_lora
        and candidate.lora_rank == origin.lora_rank
        and carried_labels(candidate) == carried_labels(origin)
    )


def match_untagged(
    origin: RunView, candidates: Iterable[RunView], *, exclude: Collection[str]
) -> list[RunView]:
    """New runs that match `origin` (see `matches_origin`). Exactly one is a successor; more
    than one is ambiguous and must be reported, never guessed between."""
    return sorted(
        (r for r in candidates if r.run_id not in exclude and matches_origin(r, origin)),
        key=lambda r: r.run_id,
    )


@dataclass(frozen=True, slots=True)
class Progress:
    requested: bool  # the successor sent requests after the handoff
    checkpointed: bool  # the successor saved a training checkpoint newer than the restored one

    @property
    def confirmed(self) -> bool:
        return self.requested or self.checkpointed


def judge_progress(
    attempt: Attempt,
    successor: RunView,
    *,
    handed_off_at: datetime,
    first_seen_request: datetime | None = None,
) -> Progress:
    """Has the successor moved since it appeared?

    A run's creation sets its last request time, so a successor that merely exists would look
    busy by comparing with the handoff time: requests count only when later than the one seen
    on an earlier listing (`first_seen_request`, the service's own clock on both sides, so
    clock skew cannot fake or hide it). A training checkpoint newer than the one handed off is
    progress at once.
    """
    requested = first_seen_request is not None and successor.last_request_time > (
        first_seen_request
    )
    checkpoint = successor.last_checkpoint
    # With `restore: sdk` the handed-off checkpoint was saved just before the handoff, so "newer"
    # means newer than the handoff; otherwise newer than the checkpoint the job resumed from.
    if attempt.handed_off_path == attempt.checkpoint_path and attempt.checkpoint_time is not None:
        threshold = attempt.checkpoint_time
    else:
        threshold = handed_off_at
    checkpointed = (
        checkpoint is not None
        and checkpoint.kind is CheckpointKind.TRAINING
        and checkpoint.tinker_path not in (attempt.handed_off_path, attempt.checkpoint_path)
        and checkpoint.time > threshold
    )
    return Progress(requested=requested, checkpointed=checkpointed)
