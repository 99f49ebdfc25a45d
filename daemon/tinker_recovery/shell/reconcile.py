"""The attempt ledger: recording steps, confirming successors, reconciling after a restart.

The executor (shell/executor.py) runs an attempt's steps; this module owns what outlives a step:
the rows and events it writes, the confirmation of a handed-off attempt against each listing, the
finish (outcome, lineage via the policy, metrics), and start-up reconciliation, which never hands
off again. Which run is the successor, and whether it progressed, is judged in core/ranking.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import structlog

from tinker_recovery.core import policy, ranking
from tinker_recovery.core.model import (
    TAG_IDEMPOTENCY_KEY,
    TAG_LINEAGE,
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
from tinker_recovery.shell.store.base import Event, Store

log = structlog.get_logger(__name__)

# Steps at which the handoff has certainly not happened: a restart may abandon these safely.
BEFORE_HANDOFF = frozenset(
    {
        AttemptStep.CREATED,
        AttemptStep.SELECTING,
        AttemptStep.PROTECTING,
        AttemptStep.RESTORING,
    }
)

EVENT_STEP = "attempt_step"


def handed_off_at(attempt: Attempt, events: Sequence[Event]) -> datetime:
    """When the handoff began, from the event log; the row's last update if the log is trimmed.

    The confirm deadline counts from here, so a daemon restart does not extend it.
    """
    marks = [
        event.at
        for event in events
        if event.attempt_id == attempt.attempt_id
        and event.kind == EVENT_STEP
        and event.data.get("step") in (AttemptStep.HANDING_OFF, AttemptStep.HANDED_OFF)
    ]
    if marks:
        return min(marks)
    return attempt.updated_at


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

    @property
    def deadline(self) -> datetime | None:
        if self.handed_off_at is None:
            return None
        return self.handed_off_at + timedelta(seconds=self.rule.confirm_deadline)


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
        **changes: Any,
    ) -> None:
        """Write the step (row + event) before the caller takes it."""
        now = at or self._clock.now()
        attempt = dataclasses.replace(tracked.attempt, step=step, updated_at=now, **changes)
        await self._store.save_attempt(attempt, self._event(attempt, EVENT_STEP, reason, now))
        tracked.attempt = attempt
        failpoints.hit(f"executor.{step.value}")  # crash tests: die right after the row
        log.info(
            "attempt_step",
            lineage_id=attempt.lineage_id,
            attempt_id=attempt.attempt_id,
            step=step.value,
            reason=reason,
        )

    @staticmethod
    def _event(attempt: Attempt, kind: str, reason: str, at: datetime) -> Event:
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

    async def save_lineage(self, before: Lineage, after: Lineage, attempt: Attempt) -> None:
        event = Event(
            at=after.updated_at,
            kind="lineage_transition",
            reason=after.reason,
            lineage_id=after.lineage_id,
            attempt_id=attempt.attempt_id,
            run_id=after.current_run_id,
            data={"from": before.state.value, "to": after.state.value},
        )
        await self._store.save_lineage(after, event)
        log.info(
            "lineage_transition",
            lineage_id=after.lineage_id,
            attempt_id=attempt.attempt_id,
            state=after.state.value,
            reason=after.reason,
        )

    async def finish(
        self,
        tracked: Tracked,
        outcome: AttemptOutcome,
        reason: str,
        *,
        now: datetime | None = None,
        progressed: bool = False,
    ) -> None:
        """Store the outcome, move the lineage on via the policy, and export the figures."""
        now = now or self._clock.now()
        attempt = dataclasses.replace(
            tracked.attempt,
            step=AttemptStep.DONE,
            outcome=outcome,
            reason=reason,
            finished_at=now,
            updated_at=now,
        )
        await self._store.save_attempt(
            attempt, self._event(attempt, "attempt_finished", reason, now)
        )
        tracked.attempt = attempt
        self.forget(tracked)
        log.info(
            "attempt_finished",
            lineage_id=attempt.lineage_id,
            attempt_id=attempt.attempt_id,
            step=attempt.step.value,
            outcome=outcome.value,
            reason=reason,
        )
        lineage = await self._store.get_lineage(attempt.lineage_id)
        self._export(attempt, lineage, now)
        if lineage is not None:
            await self._apply_policy(lineage, attempt, tracked.rule, now, progressed=progressed)

    async def _apply_policy(
        self, lineage: Lineage, attempt: Attempt, rule: Rule, now: datetime, *, progressed: bool
    ) -> None:
        after = policy.on_attempt_finished(lineage, attempt, now, rule, self._rand(), progressed)
        if after != lineage:
            await self.save_lineage(lineage, after, attempt)

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
        await self._store.mark_checkpoint_bad(checkpoint.tinker_path, detail, now)
        await self._store.append_event(
            Event(
                at=now,
                kind="checkpoint_rejected",
                reason=detail,
                lineage_id=tracked.attempt.lineage_id,
                attempt_id=tracked.attempt.attempt_id,
                data={"checkpoint_path": checkpoint.tinker_path, "rejection": reason.value},
            )
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

    # confirmation ------------------------------------------------------------------------------

    async def observe(self, runs: Sequence[RunView], now: datetime) -> None:
        """Confirm or fail handed-off attempts against one successful listing."""
        # Runs listed now existed before any attempt that starts later: none can be its
        # successor. The latest listing is enough (a run gone from it does not come back).
        self.seen_runs = {run.run_id for run in runs}
        waiting = [
            tracked
            for tracked in self.tracked.values()
            # Not running and past the handoff point: confirm. (HANDING_OFF/HANDED_OFF here
            # means a step crashed on a store error after the handoff may have happened.)
            if tracked.task is None
            and tracked.attempt.step not in BEFORE_HANDOFF
            and tracked.attempt.step is not AttemptStep.DONE
        ]
        if not waiting:
            return
        # Successors carry our tags: scan the fleet once per cycle, not once per attempt.
        tagged = [
            run
            for run in runs
            if TAG_LINEAGE in run.user_metadata or TAG_IDEMPOTENCY_KEY in run.user_metadata
        ]
        by_id = {run.run_id: run for run in runs}
        for tracked in waiting:
            recorded = tracked.attempt.successor_run_id
            candidates = tagged
            if recorded is not None:
                found = by_id.get(recorded)
                candidates = [found] if found is not None else []
            await self._confirm(tracked, candidates, now)

    async def _confirm(self, tracked: Tracked, runs: Sequence[RunView], now: datetime) -> None:
        if tracked.handed_off_at is None:
            tracked.handed_off_at = tracked.attempt.updated_at
        successor = ranking.find_successor(tracked.attempt, runs, exclude=tracked.exclude)
        if successor is not None and tracked.attempt.successor_run_id is None:
            late = " although the handoff reported a failure" if tracked.handoff_failure else ""
            await self.record(
                tracked,
                AttemptStep.CONFIRMING,
                f"successor {successor.run_id} appeared{late}",
                at=now,
                successor_run_id=successor.run_id,
            )
        if successor is not None:
            progress = ranking.judge_progress(
                tracked.attempt,
                successor,
                handed_off_at=tracked.handed_off_at,
                first_seen_request=tracked.first_seen_request,
            )
            if tracked.first_seen_request is None:
                tracked.first_seen_request = successor.last_request_time
            if progress.confirmed:
                what = "saved a newer checkpoint" if progress.checkpointed else "sent requests"
                await self.finish(
                    tracked,
                    AttemptOutcome.SUCCEEDED,
                    f"successor {successor.run_id} {what}",
                    now=now,
                    progressed=progress.checkpointed,
                )
                return
        if successor is None and await self._grace_over(tracked, now):
            return
        deadline = tracked.deadline
        if deadline is not None and now >= deadline:
            why = "made no progress" if successor is not None else "never appeared"
            reason = f"successor {why} before the confirm deadline"
            if tracked.handoff_failure is not None:
                reason = f"{tracked.handoff_failure}; {reason}"
            await self.finish(tracked, AttemptOutcome.FAILED, reason, now=now)

    async def _grace_over(self, tracked: Tracked, now: datetime) -> bool:
        """After a failed handoff with no successor in sight: fail the attempt once the grace
        has passed. The listing in flight when the handoff failed may predate the job's run, so
        it takes a second listing, surely made after the failure, as well as the time."""
        if tracked.handoff_failure is None or tracked.grace_ends is None:
            return False
        tracked.listings_since_failure += 1
        if tracked.listings_since_failure < 2 or now < tracked.grace_ends:
            return False
        reason = f"{tracked.handoff_failure}; no successor appeared after it"
        await self.finish(tracked, AttemptOutcome.FAILED, reason, now=now)
        return True

    # start-up ----------------------------------------------------------------------------------

    def rule_for(self, lineage: Lineage | None) -> Rule:
        name = lineage.rule if lineage is not None else None
        rule = self.rules.get(name or "")
        if rule is None:
            # The rule was renamed or removed since: defaults still bound the confirmation.
            log.warning("attempt_rule_missing", rule=name)
            rule = Rule(name=name or "unknown")
        return rule

    async def reconcile(self, runs: Sequence[RunView] | None) -> None:
        """Settle attempts a previous process left unfinished. Never hands off."""
        now = self._clock.now()
        # After a lost lease another replica may have moved these on: the store is the truth.
        # Running steps stay (a fenced-out one fails on its next write and cleans up itself).
        for lineage_id, stale in list(self.tracked.items()):
            if stale.task is None:
                del self.tracked[lineage_id]
        for attempt in await self._store.unfinished_attempts():
            if attempt.lineage_id in self.tracked:
                continue  # a step of ours is still running it
            lineage = await self._store.get_lineage(attempt.lineage_id)
            others = await self._store.attempts(attempt.lineage_id)
            tracked = Tracked(
                attempt=attempt,
                rule=self.rule_for(lineage),
                exclude=ranking.known_runs(lineage, others, attempt),
            )
            self.tracked[attempt.lineage_id] = tracked
            if attempt.step in BEFORE_HANDOFF:
                reason = "daemon stopped before the handoff"
                await self.finish(tracked, AttemptOutcome.ABANDONED, reason, now=now)
                continue
            await self._resume(tracked, lineage, runs, now)
        await self._repair_lineages(now)

    async def _resume(
        self,
        tracked: Tracked,
        lineage: Lineage | None,
        runs: Sequence[RunView] | None,
        now: datetime,
    ) -> None:
        attempt = tracked.attempt
        events = await self._store.events(lineage_id=attempt.lineage_id, limit=1000)
        tracked.handed_off_at = handed_off_at(attempt, events)
        successor = ranking.find_successor(attempt, runs or (), exclude=tracked.exclude)
        found: str | None
        if successor is not None:
            reason = f"resumed after restart; successor {successor.run_id} found"
            found = successor.run_id
        else:
            reason = "resumed after restart; the handoff may have happened; waiting for it"
            found = attempt.successor_run_id
        await self.record(tracked, AttemptStep.CONFIRMING, reason, at=now, successor_run_id=found)
        if lineage is not None and lineage.state is LineageState.RECOVERING:
            after = dataclasses.replace(
                lineage, state=LineageState.RECOVERED, reason=reason, updated_at=now
            )
            await self.save_lineage(lineage, after, tracked.attempt)

    async def _repair_lineages(self, now: datetime) -> None:
        """Lineages left RECOVERING/RECOVERED with no attempt in flight (killed between writes)."""
        stuck = [LineageState.RECOVERING, LineageState.RECOVERED]
        for lineage in await self._store.list_lineages(stuck):
            if lineage.lineage_id in self.tracked:
                continue
            attempts = await self._store.attempts(lineage.lineage_id)
            last = max(attempts, key=lambda a: a.number, default=None)
            if last is None or last.number != lineage.attempts_total:
                if lineage.state is not LineageState.RECOVERING:
                    continue
                # The lineage was saved but the process died before the attempt row: record
                # the attempt as abandoned so the budget and history stay truthful.
                last = Attempt(
                    attempt_id=f"{lineage.lineage_id}#{lineage.attempts_total}-unrecorded",
                    lineage_id=lineage.lineage_id,
                    number=lineage.attempts_total,
                    corrupted_run_id=lineage.current_run_id,
                    step=AttemptStep.DONE,
                    started_at=lineage.updated_at,
                    updated_at=now,
                    outcome=AttemptOutcome.ABANDONED,
                    reason="daemon stopped before the attempt was recorded",
                    finished_at=now,
                )
                await self._store.save_attempt(
                    last, self._event(last, "attempt_finished", last.reason, now)
                )
            log.warning(
                "lineage_repaired", lineage_id=lineage.lineage_id, attempt_id=last.attempt_id
            )
            rule = self.rule_for(lineage)
            await self._apply_policy(lineage, last, rule, now, progressed=False)

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
