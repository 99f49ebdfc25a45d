"""Frozen data shared by every layer: views of runs and checkpoints, lineages, attempts, decisions.

This module owns the vocabulary. It must not import anything from shell/ or do any I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

# user_metadata keys the daemon writes on every run it creates or asks to be created.
TAG_PREFIX = "tinker_recovery."
TAG_LINEAGE = "tinker_recovery.lineage"
TAG_RECOVERED_FROM = "tinker_recovery.recovered_from"
TAG_ATTEMPT = "tinker_recovery.attempt"
TAG_IDEMPOTENCY_KEY = "tinker_recovery.idempotency_key"


class CheckpointKind(StrEnum):
    TRAINING = "training"
    SAMPLER = "sampler"
    EXTERNAL = "external"


@dataclass(frozen=True, slots=True)
class CheckpointView:
    checkpoint_id: str  # "<segment>/<name>", e.g. "weights/000020"
    kind: CheckpointKind
    tinker_path: str  # "tinker://<run>/weights/000020"
    time: datetime  # aware UTC
    expires_at: datetime | None = None  # None: never expires
    size_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class RunView:
    """One training run as a poll saw it. Built from the SDK's `TrainingRun` model."""

    run_id: str
    base_model: str
    owner: str
    is_lora: bool
    lora_rank: int | None
    corrupted: bool
    last_request_time: datetime  # aware UTC
    last_checkpoint: CheckpointView | None = None
    user_metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def lineage_tag(self) -> str | None:
        return self.user_metadata.get(TAG_LINEAGE)

    @property
    def idempotency_key(self) -> str | None:
        return self.user_metadata.get(TAG_IDEMPOTENCY_KEY)


@dataclass(frozen=True, slots=True)
class WeightsInfo:
    """What `weights_info` says about a checkpoint, used to validate it against its run."""

    base_model: str
    is_lora: bool
    lora_rank: int | None
    has_optimizer_state: bool


class LineageState(StrEnum):
    HEALTHY = "healthy"
    SUSPECT = "suspect"  # corrupted read at least once, not yet confirmed
    CORRUPTED = "corrupted"  # confirmed; an attempt may start
    WAITING = "waiting"  # backing off before the next attempt
    RECOVERING = "recovering"  # an attempt is in flight
    RECOVERED = "recovered"  # handed off; watching for the successor to progress
    EXHAUSTED = "exhausted"  # budget spent: an operator is needed
    HELD = "held"  # operator pause or incident breaker in hold mode
    IGNORED = "ignored"  # policy says leave it alone (or alert only)


# States in which the lineage is not handled any further without an operator.
TERMINAL_STATES = frozenset({LineageState.EXHAUSTED, LineageState.IGNORED})


@dataclass(frozen=True, slots=True)
class Lineage:
    """One logical training job across the run ids that restores create.

    Budgets, backoff and history belong here, not to a single run id.
    """

    lineage_id: str
    root_run_id: str
    current_run_id: str  # the run being watched now (root or latest successor)
    state: LineageState
    reason: str  # why it is in this state; always set
    first_seen_at: datetime
    updated_at: datetime
    corrupted_reads: int = 0  # consecutive successful polls that read corrupted=true
    corrupted_since: datetime | None = None  # first corrupted read of the current episode
    detected_at: datetime | None = None  # when the corruption was confirmed
    preexisting: bool = False  # already corrupted when the daemon first saw it
    attempt_starts: tuple[datetime, ...] = ()  # attempts charged to the budget since progress
    attempts_total: int = 0  # every attempt ever started for this lineage
    next_attempt_at: datetime | None = None  # end of the current backoff
    rule: str | None = None  # name of the policy rule that matched
    held_by_operator: bool = False  # paused by an operator; only `resume` clears it
    last_checkpoint_time: datetime | None = None  # newest training checkpoint seen on any run


class AttemptStep(StrEnum):
    """Executor steps. Each is written to the store before it is taken."""

    CREATED = "created"
    SELECTING = "selecting"
    PROTECTING = "protecting"
    RESTORING = "restoring"
    HANDING_OFF = "handing_off"  # row written with the idempotency key; handoff may have happened
    HANDED_OFF = "handed_off"
    CONFIRMING = "confirming"
    DONE = "done"


class AttemptOutcome(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABANDONED = "abandoned"  # stopped by shutdown or an operator before the handoff
    DRY_RUN = "dry_run"


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try at recovering a lineage. `attempt_id` is also the idempotency key."""

    attempt_id: str
    lineage_id: str
    number: int  # 1-based, per lineage
    corrupted_run_id: str
    step: AttemptStep
    started_at: datetime
    updated_at: datetime
    checkpoint_path: str | None = None  # chosen (and validated) checkpoint
    checkpoint_time: datetime | None = None
    handed_off_path: str | None = None  # what the job was told to resume from
    successor_run_id: str | None = None
    outcome: AttemptOutcome | None = None  # None while in flight
    reason: str = ""
    finished_at: datetime | None = None
    # The leader-lease epoch this attempt is carried out under: every write of it and the
    # handoff itself require the lease to still carry it. A takeover adopts the attempt under
    # the new epoch, so a task left from an older term can never act again. None: unfenced.
    epoch: int | None = None


class DecisionKind(StrEnum):
    """Closed set: the `decision` label of `tinker_recovery_decisions_total`."""

    WATCH = "watch"  # healthy, nothing to do
    UNKNOWN = "unknown"  # run missing from a poll: no evidence either way
    SUSPECT = "suspect"
    CONFIRM = "confirm"
    WAIT = "wait"
    RECOVER = "recover"
    ALERT = "alert"
    IGNORE = "ignore"
    EXHAUST = "exhaust"
    HOLD = "hold"
    DRY_RUN = "dry_run"


@dataclass(frozen=True, slots=True)
class Decision:
    """What the policy concluded for one lineage in one cycle.

    `lineage` is the next state of the lineage (the shell persists it when it differs);
    `start_attempt` tells the shell to start attempt number `lineage.attempts_total`.
    """

    kind: DecisionKind
    reason: str
    lineage: Lineage
    start_attempt: bool = False
