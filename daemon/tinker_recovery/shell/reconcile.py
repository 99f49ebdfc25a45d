"""Confirmation and start-up reconciliation of attempts past their handoff.

The executor (shell/executor.py) runs an attempt's steps and the ledger (shell/ledger.py) writes
its rows; this module confirms a handed-off attempt against each listing and, at start-up (or on
a takeover), settles what a previous process left unfinished, which never hands off again. Which
run is the successor, and whether it progressed, is judged in core/ranking.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from datetime import datetime

import structlog

from tinker_recovery.core import attempt as attempt_rules
from tinker_recovery.core import ranking
from tinker_recovery.core.model import (
    TAG_IDEMPOTENCY_KEY,
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
    recovered,
)
from tinker_recovery.shell.store.base import BadCheckpoint, Event, Store

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
    """Confirms handed-off attempts and settles what nobody carries out any more."""

    def __init__(self, *, ledger: Ledger, store: Store, clock: Clock) -> None:
        self._ledger = ledger
        self._store = store
        self._clock = clock

    # confirmation ------------------------------------------------------------------------------

    async def observe(self, runs: Sequence[RunView], now: datetime) -> None:
        """Confirm or fail handed-off attempts against one consistent listing."""
        ids = {run.run_id for run in runs}
        # Runs listed now existed before any attempt that starts later: none can be its
        # successor. Runs new since the previous listing may be a successor without tags.
        new_ids = ids - self._ledger.seen_runs if self._ledger.listed else set()
        self._ledger.seen_runs = ids
        self._ledger.listed = True
        self._note_progress(runs)
        if not self._ledger.tracked:
            return
        by_id = {run.run_id: run for run in runs}
        new_runs = [by_id[run_id] for run_id in new_ids]
        for tracked in self._ledger.tracked.values():
            origin = by_id.get(tracked.attempt.corrupted_run_id)
            if origin is not None:
                tracked.origin = origin
            if new_runs and _matching(tracked) and tracked.origin is not None:
                found = ranking.match_untagged(tracked.origin, new_runs, exclude=tracked.exclude)
                tracked.match_candidates.update(run.run_id for run in found)
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
        by_key = {key: run for run in runs if (key := run.user_metadata.get(TAG_IDEMPOTENCY_KEY))}
        for tracked in waiting:
            await self._confirm(tracked, by_id, by_key, now)

    def _note_progress(self, runs: Sequence[RunView]) -> None:
        """Which successors are alive and working: runs carrying one of our keys (or recorded
        as an untagged successor) whose last request moved since the previous listing."""
        before = self._ledger.request_times
        now_times: dict[str, datetime] = {}
        progressing: dict[str, RunView] = {}
        watch = self._ledger.watch_runs
        for run in runs:
            if TAG_IDEMPOTENCY_KEY not in run.user_metadata and run.run_id not in watch:
                continue
            now_times[run.run_id] = run.last_request_time
            seen = before.get(run.run_id)
            if seen is not None and run.last_request_time > seen and not run.corrupted:
                progressing[run.run_id] = run
        self._ledger.request_times = now_times
        self._ledger.progressing = progressing

    async def _confirm(
        self,
        tracked: Tracked,
        by_id: Mapping[str, RunView],
        by_key: Mapping[str, RunView],
        now: datetime,
    ) -> None:
        if tracked.handed_off_at is None:
            tracked.handed_off_at = tracked.attempt.updated_at
        seen_before = tracked.attempt.successor_run_id is not None
        successor = await self._successor(tracked, by_id, by_key, now)
        sighting = attempt_rules.Sighting(present=False, seen_before=seen_before)
        progress: ranking.Progress | None = None
        if successor is not None:
            progress = ranking.judge_progress(
                tracked.attempt,
                successor,
                handed_off_at=tracked.handed_off_at,
                first_seen_request=tracked.first_seen_request,
            )
            if tracked.first_seen_request is None:
                tracked.first_seen_request = successor.last_request_time
            sighting = attempt_rules.Sighting(
                present=True,
                corrupted=successor.corrupted,
                progressed=progress.confirmed,
                checkpointed=progress.checkpointed,
                seen_before=seen_before,
            )
        elif tracked.handoff_failure is not None:
            tracked.listings_since_failure += 1
        deadline = tracked.deadline
        clocks = attempt_rules.Clocks(
            past_deadline=deadline is not None and now >= deadline,
            handoff_failed=tracked.handoff_failure is not None,
            # The listing in flight when the handoff failed may predate the job's run: it takes
            # a second listing, surely made after the failure, as well as the time.
            grace_over=tracked.grace_ends is not None
            and now >= tracked.grace_ends
            and tracked.listings_since_failure >= 2,
        )
        verdict = attempt_rules.confirm(sighting, clocks)
        await self._carry_out(tracked, verdict, successor, progress, now)

    async def _carry_out(
        self,
        tracked: Tracked,
        verdict: attempt_rules.Verdict,
        successor: RunView | None,
        progress: ranking.Progress | None,
        now: datetime,
    ) -> None:
        if verdict is attempt_rules.Verdict.WAIT:
            return
        if verdict is attempt_rules.Verdict.SUCCEED:
            assert successor is not None
            assert progress is not None
            what = "saved a newer checkpoint" if progress.checkpointed else "sent requests"
            await self._ledger.finish(
                tracked,
                AttemptOutcome.SUCCEEDED,
                f"successor {successor.run_id} {what}",
                now=now,
                progressed=progress.checkpointed,
            )
            return
        if tracked.match_candidates and len(self._present(tracked, successor)) > 1:
            await self._fail_ambiguous(tracked, now)
            return
        reason = _failure_reason(tracked, successor, verdict)
        suspect: BadCheckpoint | None = None
        path = tracked.attempt.checkpoint_path
        if verdict is attempt_rules.Verdict.FAIL_SUSPECT and path is not None:
            suspect = BadCheckpoint(
                path, f"suspect: the job resumed from it and {reason.split('; ')[-1]}", now
            )
        elif path is not None and await self._failed_from_before(tracked, path):
            # No successor to judge (the job died before it made a run, or the handoff said
            # it failed): once is not proof, but twice in a row from the same checkpoint is a
            # crash loop. Fall back to an older one next time (with `restore: none` too).
            suspect = BadCheckpoint(
                path, f"suspect: two attempts in a row handed it off and failed ({reason})", now
            )
        await self._ledger.finish(tracked, AttemptOutcome.FAILED, reason, now=now, suspect=suspect)

    async def _failed_from_before(self, tracked: Tracked, path: str) -> bool:
        """Did the lineage's previous attempt hand off the same checkpoint and fail?"""
        earlier = [
            a
            for a in await self._store.attempts(tracked.attempt.lineage_id)
            if a.number < tracked.attempt.number and a.outcome is not None
        ]
        if not earlier:
            return False
        last = max(earlier, key=lambda a: a.number)
        return (
            last.outcome is AttemptOutcome.FAILED
            and last.checkpoint_path == path
            and last.handed_off_path is not None
        )

    def _present(self, tracked: Tracked, successor: RunView | None) -> list[str]:
        present = sorted(tracked.match_candidates & self._ledger.seen_runs)
        return present if successor is None else [successor.run_id]

    async def _successor(
        self,
        tracked: Tracked,
        by_id: Mapping[str, RunView],
        by_key: Mapping[str, RunView],
        now: datetime,
    ) -> RunView | None:
        """The attempt's successor in this listing: the one recorded, a run carrying its key,
        or (without tags) the one new run matching the corrupted run. Records a new one."""
        attempt = tracked.attempt
        if attempt.successor_run_id is not None:
            return by_id.get(attempt.successor_run_id)
        how = "appeared"
        successor = by_key.get(attempt.attempt_id)
        if successor is not None and successor.run_id in tracked.exclude:
            successor = None
        if successor is None and tracked.match_candidates:
            present = self._present(tracked, None)
            if len(present) > 1:
                await self._report_ambiguity(tracked, present, now)
                return None
            if len(present) == 1:
                successor = by_id[present[0]]
                how = "matched without tags (same owner, base model, LoRA rank and labels)"
        if successor is None:
            return None
        late = " although the handoff reported a failure" if tracked.handoff_failure else ""
        await self._ledger.record(
            tracked,
            AttemptStep.CONFIRMING,
            f"successor {successor.run_id} {how}{late}",
            at=now,
            successor_run_id=successor.run_id,
        )
        return successor

    async def _report_ambiguity(self, tracked: Tracked, present: list[str], now: datetime) -> None:
        if tracked.ambiguity_reported:
            return
        tracked.ambiguity_reported = True
        reason = (
            f"{len(present)} new runs match the corrupted run {tracked.attempt.corrupted_run_id}"
            f" and none carries the attempt's key: {', '.join(present[:10])}; not guessing"
        )
        log.warning(
            "successor_ambiguous",
            lineage_id=tracked.attempt.lineage_id,
            attempt_id=tracked.attempt.attempt_id,
            candidates=present[:10],
        )
        await self._store.append_event(
            Event(
                at=now,
                kind="successor_ambiguous",
                reason=reason,
                lineage_id=tracked.attempt.lineage_id,
                attempt_id=tracked.attempt.attempt_id,
                data={"candidates": present[:50]},
            )
        )

    async def _fail_ambiguous(self, tracked: Tracked, now: datetime) -> None:
        """Several runs may be the job: handing off again could start it twice. End the attempt
        and hold the lineage for an operator (`resume --lineage` once it is sorted out)."""
        present = self._present(tracked, None)
        reason = (
            f"successor ambiguous: runs {', '.join(present[:10])} all match and none carries "
            "the attempt's key; the lineage is held for an operator"
        )
        lineage_id = tracked.attempt.lineage_id
        await self._ledger.finish(tracked, AttemptOutcome.FAILED, reason, now=now)
        await self._store.set_hold(lineage_id, True, by="tinker-recovery", at=now)

    # start-up, takeover and the per-cycle sweep -------------------------------------------------

    async def reconcile(self, runs: Sequence[RunView] | None, *, epoch: int | None) -> None:
        """Stop work from another lease epoch, forget what the store may have moved on since,
        then settle everything unfinished under `epoch`. Never hands off."""
        stale = [
            tracked.task
            for tracked in self._ledger.tracked.values()
            if tracked.task is not None
            and attempt_rules.is_stale(tracked.attempt.epoch, epoch)
            and tracked.attempt.step in BEFORE_HANDOFF
        ]
        for task in stale:
            task.cancel()
        if stale:
            log.warning("stale_attempts_cancelled", count=len(stale), epoch=epoch)
            await asyncio.wait(stale)
        # After a lost lease another replica may have moved these on: the store is the truth.
        # A handoff still running from an older term is left to end; the sweep adopts it then.
        for lineage_id, tracked in list(self._ledger.tracked.items()):
            if tracked.task is None:
                del self._ledger.tracked[lineage_id]
        await self.sweep(runs, epoch=epoch)

    async def sweep(self, runs: Sequence[RunView] | None, *, epoch: int | None) -> None:
        """Adopt unfinished attempts nobody tracks, and repair lineages left recovering with
        no attempt in flight (a failed write, a task that died, a lost term)."""
        now = self._clock.now()
        for attempt in await self._store.unfinished_attempts():
            if attempt.lineage_id in self._ledger.tracked:
                continue  # being carried out, or confirmed, by this process
            await self._adopt(attempt, runs, now, epoch)
        await self._repair_lineages(now, epoch)

    async def _adopt(
        self,
        attempt: Attempt,
        runs: Sequence[RunView] | None,
        now: datetime,
        epoch: int | None,
    ) -> None:
        lineage = await self._store.get_lineage(attempt.lineage_id)
        others = await self._store.attempts(attempt.lineage_id)
        adopted = dataclasses.replace(attempt, epoch=epoch)
        tracked = Tracked(
            attempt=adopted,
            rule=self._ledger.rule_for(lineage),
            exclude=ranking.known_runs(lineage, others, attempt),
        )
        self._ledger.tracked[attempt.lineage_id] = tracked
        try:
            if attempt_rules.settle(attempt.step) is attempt_rules.Settle.ABANDON:
                reason = "nobody carries it out any more and it had not handed off"
                await self._ledger.finish(tracked, AttemptOutcome.ABANDONED, reason, now=now)
                return
            await self._resume(tracked, lineage, runs, now)
        except BaseException:
            self._ledger.forget(tracked)  # the next sweep tries again
            raise

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
        listed = runs or ()
        tracked.origin = next((r for r in listed if r.run_id == attempt.corrupted_run_id), None)
        if _matching(tracked) and tracked.origin is not None:
            # Which runs are new since the handoff is unknown after a restart: a run is a
            # candidate only if it also sent a request after the handoff.
            recent = [r for r in listed if r.last_request_time > tracked.handed_off_at]
            found = ranking.match_untagged(tracked.origin, recent, exclude=tracked.exclude)
            tracked.match_candidates.update(r.run_id for r in found)
        successor = ranking.find_successor(attempt, listed, exclude=tracked.exclude)
        found_id: str | None
        if successor is not None:
            reason = f"adopted; successor {successor.run_id} found"
            found_id = successor.run_id
            tracked.first_seen_request = successor.last_request_time
        else:
            reason = "adopted; the handoff may have happened; waiting for its successor"
            found_id = attempt.successor_run_id
        moved = recovered(lineage, reason, now)
        await self._ledger.record(
            tracked,
            AttemptStep.CONFIRMING,
            reason,
            at=now,
            lineage=moved,
            successor_run_id=found_id,
        )

    async def _repair_lineages(self, now: datetime, epoch: int | None) -> None:
        """Lineages left RECOVERING/RECOVERED with no attempt in flight."""
        stuck = [LineageState.RECOVERING, LineageState.RECOVERED]
        for lineage in await self._store.list_lineages(stuck):
            if lineage.lineage_id in self._ledger.tracked:
                continue
            attempts = await self._store.attempts(lineage.lineage_id)
            if any(a.outcome is None for a in attempts):
                continue  # an unfinished attempt the sweep could not adopt just now
            last = max(attempts, key=lambda a: a.number, default=None)
            if last is None or last.number != lineage.attempts_total:
                if lineage.state is not LineageState.RECOVERING:
                    continue
                last = await self._record_unrecorded(lineage, now, epoch)
            log.warning(
                "lineage_repaired", lineage_id=lineage.lineage_id, attempt_id=last.attempt_id
            )
            rule = self._ledger.rule_for(lineage)
            await self._ledger.apply_policy(lineage, last, rule, now, epoch=epoch)

    async def _record_unrecorded(
        self, lineage: Lineage, now: datetime, epoch: int | None
    ) -> Attempt:
        """The lineage was saved but no attempt row was (data from before transitions were
        atomic): record the attempt as abandoned so that budget and history stay truthful."""
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
            epoch=epoch,
        )
        await self._store.save_attempt(
            last, attempt_event(last, "attempt_finished", last.reason, now)
        )
        return last


def _matching(tracked: Tracked) -> bool:
    return tracked.rule.successor_match == "tags_or_match"


def _failure_reason(
    tracked: Tracked, successor: RunView | None, verdict: attempt_rules.Verdict
) -> str:
    if successor is not None and successor.corrupted:
        reason = f"successor {successor.run_id} was corrupted before it made progress"
    elif successor is not None:
        reason = f"successor {successor.run_id} made no progress before the confirm deadline"
    elif tracked.attempt.successor_run_id is not None:
        reason = (
            f"successor {tracked.attempt.successor_run_id} was seen, then stopped being "
            "listed, and made no progress before the confirm deadline"
        )
    elif (
        verdict is attempt_rules.Verdict.FAIL
        and tracked.grace_ends is not None
        and (tracked.handoff_failure is not None)
    ):
        return f"{tracked.handoff_failure}; no successor appeared after it"
    else:
        reason = "successor never appeared before the confirm deadline"
    if tracked.handoff_failure is not None:
        reason = f"{tracked.handoff_failure}; {reason}"
    return reason
