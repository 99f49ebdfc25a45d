"""Confirmation and start-up reconciliation of attempts past their handoff.

The executor (shell/executor.py) runs an attempt's steps and the ledger (shell/ledger.py) writes
its rows; this module confirms a handed-off attempt against each listing and, at start-up (or on
a takeover), settles what a previous process left unfinished, which never hands off again. Which
run is the successor, and whether it progressed, is judged in core/ranking.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime

import structlog

from tinker_recovery.core import ranking
from tinker_recovery.core.model import (
    TAG_IDEMPOTENCY_KEY,
    TAG_LINEAGE,
    Attempt,
    AttemptOutcome,
    AttemptStep,
    Lineage,
    LineageState,
    RunView,
)
from tinker_recovery.shell.clock import Clock
from tinker_recovery.shell.ledger import (
    BEFORE_HANDOFF,
    EVENT_STEP,
    NOTE_GRACE_ENDS,
    NOTE_HANDOFF_FAILURE,
    Ledger,
    Tracked,
    attempt_event,
)
from tinker_recovery.shell.store.base import Event, Store

log = structlog.get_logger(__name__)


def _carry_on_grace(tracked: Tracked, events: Sequence[Event]) -> None:
    """If the attempt's handoff had failed before the restart, watch out the rest of its grace
    (and two listings from now) instead of the whole confirm deadline."""
    for event in events:
        if event.attempt_id == tracked.attempt.attempt_id and NOTE_GRACE_ENDS in event.data:
            tracked.handoff_failure = str(event.data[NOTE_HANDOFF_FAILURE])
            tracked.grace_ends = datetime.fromisoformat(str(event.data[NOTE_GRACE_ENDS]))


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


class Reconciler:
    """Confirms handed-off attempts and settles what an earlier process left unfinished."""

    def __init__(self, *, ledger: Ledger, store: Store, clock: Clock) -> None:
        self._ledger = ledger
        self._store = store
        self._clock = clock

    # confirmation ------------------------------------------------------------------------------

    async def observe(self, runs: Sequence[RunView], now: datetime) -> None:
        """Confirm or fail handed-off attempts against one successful listing."""
        # Runs listed now existed before any attempt that starts later: none can be its
        # successor. The latest listing is enough (a run gone from it does not come back).
        self._ledger.seen_runs = {run.run_id for run in runs}
        waiting = [
            tracked
            for tracked in self._ledger.tracked.values()
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
            await self._ledger.record(
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
                await self._ledger.finish(
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
            await self._ledger.finish(tracked, AttemptOutcome.FAILED, reason, now=now)

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
        await self._ledger.finish(tracked, AttemptOutcome.FAILED, reason, now=now)
        return True

    # start-up ----------------------------------------------------------------------------------

    async def reconcile(self, runs: Sequence[RunView] | None) -> None:
        """Settle attempts a previous process left unfinished. Never hands off."""
        now = self._clock.now()
        # After a lost lease another replica may have moved these on: the store is the truth.
        # Running steps stay (a fenced-out one fails on its next write and cleans up itself).
        for lineage_id, stale in list(self._ledger.tracked.items()):
            if stale.task is None:
                del self._ledger.tracked[lineage_id]
        for attempt in await self._store.unfinished_attempts():
            if attempt.lineage_id in self._ledger.tracked:
                continue  # a step of ours is still running it
            lineage = await self._store.get_lineage(attempt.lineage_id)
            others = await self._store.attempts(attempt.lineage_id)
            tracked = Tracked(
                attempt=attempt,
                rule=self._ledger.rule_for(lineage),
                exclude=ranking.known_runs(lineage, others, attempt),
            )
            self._ledger.tracked[attempt.lineage_id] = tracked
            if attempt.step in BEFORE_HANDOFF:
                reason = "daemon stopped before the handoff"
                await self._ledger.finish(tracked, AttemptOutcome.ABANDONED, reason, now=now)
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
        _carry_on_grace(tracked, events)
        successor = ranking.find_successor(attempt, runs or (), exclude=tracked.exclude)
        found: str | None
        if successor is not None:
            reason = f"resumed after restart; successor {successor.run_id} found"
            found = successor.run_id
        else:
            reason = "resumed after restart; the handoff may have happened; waiting for it"
            found = attempt.successor_run_id
        await self._ledger.record(
            tracked, AttemptStep.CONFIRMING, reason, at=now, successor_run_id=found
        )
        if lineage is not None and lineage.state is LineageState.RECOVERING:
            after = dataclasses.replace(
                lineage, state=LineageState.RECOVERED, reason=reason, updated_at=now
            )
            await self._ledger.save_lineage(lineage, after, tracked.attempt)

    async def _repair_lineages(self, now: datetime) -> None:
        """Lineages left RECOVERING/RECOVERED with no attempt in flight (killed between writes)."""
        stuck = [LineageState.RECOVERING, LineageState.RECOVERED]
        for lineage in await self._store.list_lineages(stuck):
            if lineage.lineage_id in self._ledger.tracked:
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
                    last, attempt_event(last, "attempt_finished", last.reason, now)
                )
            log.warning(
                "lineage_repaired", lineage_id=lineage.lineage_id, attempt_id=last.attempt_id
            )
            rule = self._ledger.rule_for(lineage)
            await self._ledger.apply_policy(lineage, last, rule, now, progressed=False)
