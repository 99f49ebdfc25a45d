"""The attempt ledger: recording steps and finishing attempts.

The executor (shell/executor.py) runs an attempt's steps; this module owns what outlives a step:
the rows and events it writes, and the finish (outcome, lineage via the policy, metrics).
Confirmation of a handed-off attempt and start-up reconciliation, which never hands off again,
live in shell/reconcile.py and write through this ledger.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import structlog

from tinker_recovery.core import attempt as attempt_rules
from tinker_recovery.core import policy, ranking
from tinker_recovery.core.model import (
    Attempt,
    AttemptOutcome,
    AttemptStep,
    CheckpointView,
    Lineage,
    LineageState,
    RunView,
)
from tinker_recovery.obs.metrics import Metrics
from tinker_recovery.settings import Rule
from tinker_recovery.shell import failpoints
from tinker_recovery.shell.clock import Clock
from tinker_recovery.shell.store.base import (
    BadCheckpoint,
    Event,
    Store,
    TakenRequest,
    Transition,
)

log = structlog.get_logger(__name__)

# Steps at which the handoff has certainly not happened (the rules live in core/attempt.py).
BEFORE_HANDOFF = attempt_rules.BEFORE_HANDOFF

_MAX_WATCHED = 10_000  # bound on remembered untagged successors (a few bytes each)

EVENT_STEP = "attempt_step"
# Event data keys written when a handoff failed but may have started the job (Tracked fields).
NOTE_HANDOFF_FAILURE = "handoff_failure"
NOTE_GRACE_ENDS = "grace_ends"


class AttemptFinished(Exception):
    """Raised inside the step sequence to end the attempt with an outcome (not an error)."""

    def __init__(self, outcome: AttemptOutcome, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason


@dataclasses.dataclass
class Tracked:
    """An attempt the executor is running or confirming."""

    attempt: Attempt
    rule: Rule
    exclude: set[str]  # runs that cannot be the successor (they existed before the attempt)
    handed_off_at: datetime | None = None
    task: asyncio.Task[None] | None = None
    # The successor's last request when this process first saw it: later requests are
    # progress whatever the skew between our clock and the service's.
    first_seen_request: datetime | None = None
    # Set when the handoff reported a failure that may still have started the job: without a
    # successor by `grace_ends` (and two listings made after the failure) the attempt fails.
    handoff_failure: str | None = None
    grace_ends: datetime | None = None
    listings_since_failure: int = 0
    # For successors that carry no tags: the corrupted run as last listed, and the new runs
    # (appeared after the attempt started) that match it (core.ranking.match_untagged).
    origin: RunView | None = None
    match_candidates: set[str] = dataclasses.field(default_factory=set)
    ambiguity_reported: bool = False

    @property
    def deadline(self) -> datetime | None:
        if self.handed_off_at is None:
            return None
        return self.handed_off_at + timedelta(seconds=self.rule.confirm_deadline)


def attempt_event(attempt: Attempt, kind: str, reason: str, at: datetime) -> Event:
    """The event stored with an attempt row: its step, outcome and paths."""
    return Event(
        at=at,
        kind=kind,
        reason=reason,
        lineage_id=attempt.lineage_id,
        attempt_id=attempt.attempt_id,
        run_id=attempt.successor_run_id or attempt.corrupted_run_id,
        data={
            "step": attempt.step.value,
            "number": attempt.number,
            "outcome": attempt.outcome.value if attempt.outcome else None,
            "checkpoint_path": attempt.checkpoint_path,
            "handed_off_path": attempt.handed_off_path,
            "successor_run_id": attempt.successor_run_id,
        },
    )


def lineage_event(before: Lineage | None, after: Lineage, attempt: Attempt) -> Event:
    return Event(
        at=after.updated_at,
        kind="lineage_transition",
        reason=after.reason,
        lineage_id=after.lineage_id,
        attempt_id=attempt.attempt_id,
        run_id=after.current_run_id,
        data={"from": before.state.value if before else None, "to": after.state.value},
    )


def suspect_event(attempt: Attempt, mark: BadCheckpoint) -> Event:
    return Event(
        at=mark.at,
        kind="checkpoint_rejected",
        reason=mark.reason,
        lineage_id=attempt.lineage_id,
        attempt_id=attempt.attempt_id,
        run_id=ranking.run_id_of(mark.tinker_path),
        data={"checkpoint_path": mark.tinker_path, "rejection": "suspect"},
    )


def recovered(
    lineage: Lineage | None, reason: str, now: datetime
) -> tuple[Lineage | None, Lineage] | None:
    """The (before, after) move of a lineage whose attempt has reached its successor (or may
    have): RECOVERING -> RECOVERED; None when the lineage is in any other state."""
    if lineage is None or lineage.state is not LineageState.RECOVERING:
        return None
    after = dataclasses.replace(
        lineage, state=LineageState.RECOVERED, reason=reason, updated_at=now
    )
    return lineage, after


def _log_transition(after: Lineage, attempt: Attempt) -> None:
    log.info(
        "lineage_transition",
        lineage_id=after.lineage_id,
        attempt_id=attempt.attempt_id,
        state=after.state.value,
        reason=after.reason,
    )


class Ledger:
    """Attempt bookkeeping shared by the executor's steps, `observe` and `reconcile`."""

    def __init__(
        self,
        *,
        store: Store,
        clock: Clock,
        metrics: Metrics,
        rand: Callable[[], float],
        rules: Sequence[Rule],
    ) -> None:
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._rand = rand
        self.rules = {rule.name: rule for rule in rules}
        self.tracked: dict[str, Tracked] = {}  # by lineage id: one attempt per lineage
        self.seen_runs: set[str] = set()  # run ids of the latest successful listing
        self.listed = False  # whether `seen_runs` holds a listing yet (not just the start-up)
        # Successors of this process's attempts (our key, or recorded) whose last request moved
        # between the two latest listings: alive and working, never to be restarted.
        self.request_times: dict[str, datetime] = {}
        self.progressing: dict[str, RunView] = {}
        self.watch_runs: set[str] = set()  # untagged successors of finished attempts

    def forget(self, tracked: Tracked) -> None:
        """Stop tracking `tracked` (only it: a reconcile may have replaced it since)."""
        if self.tracked.get(tracked.attempt.lineage_id) is tracked:
            del self.tracked[tracked.attempt.lineage_id]

    # recording ---------------------------------------------------------------------------------

    async def record(
        self,
        tracked: Tracked,
        step: AttemptStep,
        reason: str,
        *,
        at: datetime | None = None,
        note: Mapping[str, Any] | None = None,
        lineage: tuple[Lineage | None, Lineage] | None = None,
        extra: Sequence[Event] = (),
        taken_request: TakenRequest | None = None,
        log_lineage: bool = True,
        **changes: Any,
    ) -> None:
        """Write the step (row + event) before the caller takes it, in ONE transaction with
        the lineage change that goes with it (`lineage`: before, after) and any `extra` events.
        `note` adds to the event's data what a restarted daemon needs to carry on (a handoff
        failure and its grace). Fenced on the attempt's epoch."""
        now = at or self._clock.now()
        attempt = dataclasses.replace(tracked.attempt, step=step, updated_at=now, **changes)
        event = attempt_event(attempt, EVENT_STEP, reason, now)
        if note:
            event = dataclasses.replace(event, data={**event.data, **note})
        events = [*extra, event]
        after: Lineage | None = None
        if lineage is not None:
            before, after = lineage
            events.append(lineage_event(before, after, attempt))
        await self._store.commit(
            Transition(
                attempt=attempt, lineage=after, events=tuple(events), taken_request=taken_request
            ),
            epoch=attempt.epoch,
        )
        tracked.attempt = attempt
        failpoints.hit(f"executor.{step.value}")  # crash tests: die right after the row
        log.info(
            "attempt_step",
            lineage_id=attempt.lineage_id,
            attempt_id=attempt.attempt_id,
            step=step.value,
            reason=reason,
        )
        if after is not None and log_lineage:
            _log_transition(after, attempt)

    async def finish(
        self,
        tracked: Tracked,
        outcome: AttemptOutcome,
        reason: str,
        *,
        now: datetime | None = None,
        progressed: bool = False,
        suspect: BadCheckpoint | None = None,
    ) -> None:
        """Store the outcome and the lineage's next state (via the policy) in one transaction,
        then export the figures. `suspect`: the checkpoint a failed successor started from,
        marked in the same transaction so that the next attempt falls back to an older one."""
        now = now or self._clock.now()
        attempt = dataclasses.replace(
            tracked.attempt,
            step=AttemptStep.DONE,
            outcome=outcome,
            reason=reason,
            finished_at=now,
            updated_at=now,
        )
        lineage = await self._store.get_lineage(attempt.lineage_id)
        after = self.next_lineage(lineage, attempt, tracked.rule, now, progressed=progressed)
        events = [attempt_event(attempt, "attempt_finished", reason, now)]
        if suspect is not None:
            events.append(suspect_event(attempt, suspect))
        if after is not None:
            events.append(lineage_event(lineage, after, attempt))
        await self._store.commit(
            Transition(
                attempt=attempt, lineage=after, bad_checkpoint=suspect, events=tuple(events)
            ),
            epoch=attempt.epoch,
        )
        tracked.attempt = attempt
        self.forget(tracked)
        if attempt.successor_run_id is not None and len(self.watch_runs) < _MAX_WATCHED:
            # A successor that carries no key is watched by id, so that a later attempt can
            # tell it is alive before handing off again.
            self.watch_runs.add(attempt.successor_run_id)
        log.info(
            "attempt_finished",
            lineage_id=attempt.lineage_id,
            attempt_id=attempt.attempt_id,
            step=attempt.step.value,
            outcome=outcome.value,
            reason=reason,
        )
        if after is not None:
            _log_transition(after, attempt)
        self._export(attempt, lineage, now)

    def next_lineage(
        self,
        lineage: Lineage | None,
        attempt: Attempt,
        rule: Rule,
        now: datetime,
        *,
        progressed: bool,
    ) -> Lineage | None:
        """The lineage after `attempt` finished, or None when nothing changes."""
        if lineage is None:
            return None
        after = policy.on_attempt_finished(lineage, attempt, now, rule, self._rand(), progressed)
        return None if after == lineage else after

    async def apply_policy(
        self, lineage: Lineage, attempt: Attempt, rule: Rule, now: datetime, *, epoch: int | None
    ) -> None:
        """Move a lineage on from an attempt that finished earlier (a repair)."""
        after = self.next_lineage(lineage, attempt, rule, now, progressed=False)
        if after is None:
            return
        event = lineage_event(lineage, after, attempt)
        await self._store.commit(Transition(lineage=after, events=(event,)), epoch=epoch)
        _log_transition(after, attempt)

    def _export(self, attempt: Attempt, lineage: Lineage | None, now: datetime) -> None:
        assert attempt.outcome is not None
        self._metrics.attempts.labels(outcome=attempt.outcome.value).inc()
        self._metrics.attempt_duration.observe((now - attempt.started_at).total_seconds())
        if attempt.outcome is not AttemptOutcome.SUCCEEDED or lineage is None:
            return
        if lineage.detected_at is not None:
            self._metrics.time_to_recovery.observe((now - lineage.detected_at).total_seconds())
        if lineage.corrupted_since is not None and attempt.checkpoint_time is not None:
            lost_s = (lineage.corrupted_since - attempt.checkpoint_time).total_seconds()
            self._metrics.work_lost.observe(max(lost_s, 0.0))

    async def reject(
        self,
        tracked: Tracked,
        checkpoint: CheckpointView,
        reason: ranking.RejectionReason,
        exc: Exception | None,
    ) -> None:
        """Mark a checkpoint that failed validation bad, so no later attempt tries it again."""
        detail = f"{reason.value}: {exc}" if exc is not None else reason.value
        now = self._clock.now()
        event = Event(
            at=now,
            kind="checkpoint_rejected",
            reason=detail,
            lineage_id=tracked.attempt.lineage_id,
            attempt_id=tracked.attempt.attempt_id,
            run_id=ranking.run_id_of(checkpoint.tinker_path),
            data={"checkpoint_path": checkpoint.tinker_path, "rejection": reason.value},
        )
        mark = BadCheckpoint(checkpoint.tinker_path, detail, now)
        await self._store.commit(
            Transition(bad_checkpoint=mark, events=(event,)), epoch=tracked.attempt.epoch
        )
        self._metrics.checkpoints_rejected.labels(reason=reason.value).inc()
        log.warning(
            "checkpoint_rejected",
            lineage_id=tracked.attempt.lineage_id,
            attempt_id=tracked.attempt.attempt_id,
            step=tracked.attempt.step.value,
            checkpoint_path=checkpoint.tinker_path,
            reason=detail,
        )

    # rules and status --------------------------------------------------------------------------

    def rule_for(self, lineage: Lineage | None) -> Rule:
        """The rule an attempt's lineage was recovered under, or defaults if it is gone."""
        name = lineage.rule if lineage is not None else None
        rule = self.rules.get(name or "")
        if rule is None:
            # The rule was renamed or removed since: defaults still bound the confirmation.
            log.warning("attempt_rule_missing", rule=name)
            rule = Rule(name=name or "unknown")
        return rule

    def snapshot(self) -> list[dict[str, Any]]:
        """In-flight attempts for /status (ids and paths only; nothing secret)."""
        out = []
        for tracked in self.tracked.values():
            a = tracked.attempt
            deadline = tracked.deadline
            out.append(
                {
                    "attempt_id": a.attempt_id,
                    "lineage_id": a.lineage_id,
                    "number": a.number,
                    "step": a.step.value,
                    "rule": tracked.rule.name,
                    "corrupted_run_id": a.corrupted_run_id,
                    "checkpoint_path": a.checkpoint_path,
                    "handed_off_path": a.handed_off_path,
                    "successor_run_id": a.successor_run_id,
                    "started_at": a.started_at.isoformat(),
                    "confirm_deadline": deadline.isoformat() if deadline else None,
                    "running": tracked.task is not None,
                }
            )
        return out
