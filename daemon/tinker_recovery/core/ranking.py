"""Checkpoint ranking and validation: which checkpoint an attempt should restore, and why not.

Pure functions only. "now" is an argument; nothing here reads a clock or talks to the API.
The executor gathers candidates and asks `weights_info`; this module only judges them.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime, timedelta
from enum import StrEnum

from tinker_recovery.core.model import CheckpointKind, CheckpointView, RunView, WeightsInfo
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
