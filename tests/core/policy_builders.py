"""Small builders for the core policy tests: one fixed "now", runs, lineages, settings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from tinker_recovery.core import policy
from tinker_recovery.core.model import (
    CheckpointKind,
    CheckpointView,
    Decision,
    Lineage,
    LineageState,
    RunView,
)
from tinker_recovery.settings import PolicySettings, Rule

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
RUN_ID = "sess-1:train:0"


def at(seconds: float) -> datetime:
    """NOW shifted by `seconds` (negative: the past)."""
    return NOW + timedelta(seconds=seconds)


def run(
    run_id: str = RUN_ID,
    *,
    corrupted: bool = False,
    idle_s: float = 60.0,
    base_model: str = "Qwen/Qwen3-8B",
    owner: str = "team-a",
    is_lora: bool = True,
    metadata: Mapping[str, str] | None = None,
    checkpoint_at: datetime | None = None,
    checkpoint_kind: CheckpointKind = CheckpointKind.TRAINING,
) -> RunView:
    """A run whose last request was `idle_s` before NOW."""
    ckpt = None
    if checkpoint_at is not None:
        ckpt = CheckpointView(
            checkpoint_id="weights/000010",
            kind=checkpoint_kind,
            tinker_path=f"tinker://{run_id}/weights/000010",
            time=checkpoint_at,
        )
    return RunView(
        run_id=run_id,
        base_model=base_model,
        owner=owner,
        is_lora=is_lora,
        lora_rank=8 if is_lora else None,
        corrupted=corrupted,
        last_request_time=at(-idle_s),
        last_checkpoint=ckpt,
        user_metadata=dict(metadata or {}),
    )


def lineage(state: LineageState = LineageState.HEALTHY, **changes: Any) -> Lineage:
    """A lineage of RUN_ID last written an hour ago. Confirmed states get detection facts."""
    base = Lineage(
        lineage_id=RUN_ID,
        root_run_id=RUN_ID,
        current_run_id=RUN_ID,
        state=state,
        reason="test fixture",
        first_seen_at=at(-86400),
        updated_at=at(-3600),
        rule="default",
    )
    if state not in (LineageState.HEALTHY, LineageState.SUSPECT):
        base = replace(base, corrupted_reads=2, corrupted_since=at(-120), detected_at=at(-60))
    elif state is LineageState.SUSPECT:
        base = replace(base, corrupted_reads=1, corrupted_since=at(-30))
    return replace(base, **changes)


def rule(name: str = "default", **fields: Any) -> Rule:
    return Rule(name=name, **fields)


def settings(*, rules: Sequence[Rule] | None = None, **fields: Any) -> PolicySettings:
    return PolicySettings(rules=list(rules) if rules is not None else [rule()], **fields)


def fleet(**fields: Any) -> policy.FleetView:
    values: dict[str, Any] = {
        "in_flight": 0,
        "recent_detections": (),
        "recent_starts": (),
        "breaker_opened_at": None,
    }
    values.update(fields)
    return policy.FleetView(**values)


def plan(
    observations: Sequence[policy.Observation],
    *,
    fleet_view: policy.FleetView | None = None,
    cfg: PolicySettings | None = None,
    now: datetime = NOW,
) -> policy.CyclePlan:
    return policy.plan_cycle(
        observations, fleet_view or fleet(), now, cfg or settings(), rand=lambda: 0.5
    )


def decide(
    observed: RunView | None,
    known: Lineage | None,
    *,
    fleet_view: policy.FleetView | None = None,
    cfg: PolicySettings | None = None,
    now: datetime = NOW,
) -> Decision:
    """The decision for a single observation."""
    result = plan([policy.Observation(observed, known)], fleet_view=fleet_view, cfg=cfg, now=now)
    assert len(result.decisions) == 1
    return result.decisions[0]
