"""The executor: carries out one recovery attempt step by step, and hands off exactly once.

Every step is written to the store (attempt row + event) BEFORE it is taken, so a daemon killed
at any instant leaves a row that says how far it got. Rows at HANDING_OFF or later may have
handed off already: after a restart they are never handed off again, only confirmed (see
`reconcile`). Confirmation runs in `observe`, fed by the poller after each successful listing.
The executor never decides whether to recover: the policy did; it only carries the attempt out.
Choosing and proving the checkpoint is shell/checkpoints.py; the rows it writes are the ledger's
(shell/ledger.py), and confirmation and start-up reconcile live in shell/reconcile.py.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import structlog

from tinker_recovery.core import attempt as attempt_rules
from tinker_recovery.core import ranking
from tinker_recovery.core.model import (
    TAG_ATTEMPT,
    TAG_IDEMPOTENCY_KEY,
    TAG_LINEAGE,
    TAG_RECOVERED_FROM,
    Attempt,
    AttemptOutcome,
    AttemptStep,
    Lineage,
    RunView,
)
from tinker_recovery.errors import ActionFailed
from tinker_recovery.obs.metrics import Metrics
from tinker_recovery.settings import Rule
from tinker_recovery.shell import checkpoints, failpoints
from tinker_recovery.shell import ledger as led
from tinker_recovery.shell import reconcile as rec
from tinker_recovery.shell.clock import Clock
from tinker_recovery.shell.handoff import HandoffAction, HandoffRequest
from tinker_recovery.shell.store.base import Event, Store, TakenRequest

log = structlog.get_logger(__name__)

_OUR_TAGS = (TAG_LINEAGE, TAG_RECOVERED_FROM, TAG_ATTEMPT, TAG_IDEMPOTENCY_KEY)


class Executor:
    def __init__(
        self,
        *,
        store: Store,
        gateway: checkpoints.Gateway,
        restorer: checkpoints.Restorer | None,
        handoffs: Mapping[str, HandoffAction],
        clock: Clock,
        metrics: Metrics,
        rand: Callable[[], float],
        max_concurrent: int,
        rules: Sequence[Rule] = (),
        dry_run: bool = False,
        may_act: Callable[[int | None], bool] = lambda epoch: True,
    ) -> None:
        self._store = store
        self._handoffs = dict(handoffs)
        self._clock = clock
        self._metrics = metrics
        self._semaphore = asyncio.Semaphore(max_concurrent)
        self._dry_run = dry_run
        # Asked, with the attempt's epoch, right before the one side effect no store write can
        # fence (the handoff): only while we lead in that very epoch (core.attempt.may_hand_off).
        self._may_act = may_act
        self._ledger = led.Ledger(store=store, clock=clock, metrics=metrics, rand=rand, rules=rules)
        self._reconciler = rec.Reconciler(ledger=self._ledger, store=store, clock=clock)
        self._checkpoints = checkpoints.Checkpoints(
            store=store, gateway=gateway, restorer=restorer, ledger=self._ledger, clock=clock
        )

    def configure(
        self,
        *,
        rules: Sequence[Rule],
        dry_run: bool,
        handoffs: Mapping[str, HandoffAction] | None = None,
    ) -> None:
        """Apply a reloaded configuration. Attempts already started keep their rule; a handoff
        the reload added or changed is used from the next attempt on."""
        self._ledger.rules = {rule.name: rule for rule in rules}
        self._dry_run = dry_run
        if handoffs is not None:
            self._handoffs = dict(handoffs)

    def handoff_names(self) -> list[str]:
        """The handoffs attempts can use now (for /status and tests)."""
        return sorted(self._handoffs)

    def on_leadership(self, leading: bool) -> None:
        """Leadership lost: stop every attempt that has not reached its handoff, at once. Their
        rows are settled by whoever leads next (core.attempt.settle); a handoff already under way
        is left to finish, and its later writes are refused by the fence."""
        if leading:
            return
        for tracked in self._ledger.tracked.values():
            if tracked.task is not None and tracked.attempt.step in attempt_rules.BEFORE_HANDOFF:
                tracked.task.cancel()

    # public surface ----------------------------------------------------------------------------

    def busy(self, lineage_id: str) -> bool:
        return lineage_id in self._ledger.tracked

    def in_flight(self) -> int:
        """Attempts not finished yet: running their steps or waiting for confirmation."""
        return len(self._ledger.tracked)

    def snapshot(self) -> list[dict[str, Any]]:
        """In-flight attempts for /status."""
        return self._ledger.snapshot()

    async def observe(self, runs: Sequence[RunView], now: datetime) -> None:
        """Confirm or fail handed-off attempts; call after each CONSISTENT listing only."""
        await self._reconciler.observe(runs, now)

    async def reconcile(self, runs: Sequence[RunView] | None, *, epoch: int | None = None) -> None:
        """At start-up (and on each takeover), before anything new: stop work left from an
        older epoch and settle what is unfinished in the store under `epoch`. Attempts at
        HANDING_OFF or later are only ever confirmed."""
        await self._reconciler.reconcile(runs, epoch=epoch)

    async def sweep(self, runs: Sequence[RunView], *, epoch: int | None = None) -> None:
        """Each cycle: adopt any unfinished attempt and repair any lineage the executor should
        own but does not track (a write that failed, a task that died, a lost term). Cheap: two
        indexed reads (unfinished attempts, lineages recovering)."""
        await self._reconciler.sweep(runs, epoch=epoch)

    async def drain(self, grace_s: float) -> None:
        """Shutdown: let running steps finish within `grace_s`, then cancel the rest.

        A step cancelled before the handoff is recorded ABANDONED; one cancelled during the
        handoff keeps its HANDING_OFF row for the next start's reconcile.
        """
        tasks = [t.task for t in self._ledger.tracked.values() if t.task is not None]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("attempts_cancelled", count=len(pending), grace_s=grace_s)
            await asyncio.wait(pending)

    async def start(
        self,
        lineage: Lineage,
        run: RunView,
        rule: Rule,
        *,
        tg: asyncio.TaskGroup,
        checkpoint: str | None = None,
        epoch: int | None = None,
        before: Lineage | None = None,
        decision: Event | None = None,
        taken_request: TakenRequest | None = None,
    ) -> Attempt | None:
        """Record attempt `lineage.attempts_total` and run its steps in a named task of `tg`.

        The attempt's CREATED row, the lineage as decided (`lineage`, changed from `before`),
        the decision's event and the operator request it settles are ONE transaction, fenced on
        `epoch`: either the lineage is recovering with an attempt row, or nothing changed and the
        next cycle decides again. Returns None, writing nothing, when this process may not act
        (dry run, or the lineage is busy), which a reload between decision and start can cause.

        `checkpoint` (an operator's `recover --checkpoint`) replaces the ranking: that one path is
        validated and used, or the attempt fails; no fallback to a checkpoint nobody chose.
        """
        if self._dry_run or lineage.lineage_id in self._ledger.tracked:
            log.warning(
                "attempt_not_started",
                lineage_id=lineage.lineage_id,
                reason="dry run" if self._dry_run else "an attempt is already in flight",
            )
            return None
        # Remember the rule so a later reconcile in this process can find it by name.
        self._ledger.rules.setdefault(rule.name, rule)
        number = lineage.attempts_total
        now = self._clock.now()
        attempt = Attempt(
            attempt_id=f"{lineage.lineage_id}#{number}-{uuid.uuid4().hex[:12]}",
            lineage_id=lineage.lineage_id,
            number=number,
            corrupted_run_id=run.run_id,
            step=AttemptStep.CREATED,
            started_at=now,
            updated_at=now,
            epoch=epoch,
        )
        earlier = await self._store.attempts(lineage.lineage_id)
        exclude = ranking.known_runs(lineage, earlier, attempt) | self._ledger.seen_runs
        tracked = led.Tracked(attempt=attempt, rule=rule, exclude=exclude, origin=run)
        self._ledger.tracked[lineage.lineage_id] = tracked
        try:
            await self._ledger.record(
                tracked,
                AttemptStep.CREATED,
                f"attempt {number} by rule {rule.name}",
                lineage=(before, lineage),
                extra=() if decision is None else (decision,),
                taken_request=taken_request,
                log_lineage=decision is None,  # the decider logs its own decision
            )
        except BaseException:
            del self._ledger.tracked[lineage.lineage_id]
            raise
        tracked.task = tg.create_task(
            self._run(tracked, lineage, run, earlier, checkpoint),
            name=f"attempt:{attempt.attempt_id}",
        )
        return tracked.attempt

    # the step sequence -------------------------------------------------------------------------

    async def _run(
        self,
        tracked: led.Tracked,
        lineage: Lineage,
        run: RunView,
        earlier: Sequence[Attempt],
        checkpoint: str | None,
    ) -> None:
        try:
            try:
                async with self._semaphore:
                    await self._steps(tracked, lineage, run, earlier, checkpoint)
            except led.AttemptFinished as done:
                await self._ledger.finish(tracked, done.outcome, done.reason)
        except asyncio.CancelledError:
            await self._on_cancel(tracked)
            raise
        except Exception as exc:
            log.exception(
                "attempt_crashed",
                lineage_id=tracked.attempt.lineage_id,
                attempt_id=tracked.attempt.attempt_id,
                step=tracked.attempt.step.value,
                reason=repr(exc),
            )
            await self._after_crash(tracked, exc)
        finally:
            tracked.task = None

    async def _on_cancel(self, tracked: led.Tracked) -> None:
        """Shutdown or lost leadership. Before the handoff nothing happened outside: record it
        as abandoned (refused by the fence if another term owns it now: it settles it then).
        At HANDING_OFF or later the row stays as it is, for whoever confirms it next."""
        cause = attempt_rules.Interruption.CANCELLED
        outcome = attempt_rules.after_interruption(tracked.attempt.step, cause)
        if outcome is None:
            self._ledger.forget(tracked)
            return
        await self._finish_or_forget(tracked, outcome, "stopped before handoff")

    async def _after_crash(self, tracked: led.Tracked, exc: Exception) -> None:
        cause = attempt_rules.Interruption.CRASHED
        outcome = attempt_rules.after_interruption(tracked.attempt.step, cause)
        if outcome is None:
            return  # the handoff may have happened: keep confirming, never hand off again
        await self._finish_or_forget(tracked, outcome, f"internal error: {exc!r}")

    async def _finish_or_forget(
        self, tracked: led.Tracked, outcome: AttemptOutcome, reason: str
    ) -> None:
        try:
            await self._ledger.finish(tracked, outcome, reason)
        except Exception as exc:  # noqa: BLE001 - the store is failing too (or we are fenced out): the row stays unfinished and the next sweep settles it
            log.error(
                "attempt_finish_failed",
                lineage_id=tracked.attempt.lineage_id,
                attempt_id=tracked.attempt.attempt_id,
                step=tracked.attempt.step.value,
                reason=repr(exc),
            )
            self._ledger.forget(tracked)

    async def _steps(
        self,
        tracked: led.Tracked,
        lineage: Lineage,
        run: RunView,
        earlier: Sequence[Attempt],
        override: str | None,
    ) -> None:
        rule = tracked.rule
        live = self._live_successor(tracked, earlier)
        if live is not None:
            await self._adopt_live(tracked, live, earlier)
            return
        tags = self._tags(tracked.attempt, run)
        chosen, hand_off_path, restored_run = await self._checkpoints.prepare(
            tracked, lineage, run, earlier, override, tags
        )
        found: dict[str, Any] = {
            "checkpoint_path": chosen.tinker_path,
            "checkpoint_time": chosen.time,
        }
        if rule.handoff is None:
            if restored_run is None:
                raise led.AttemptFinished(AttemptOutcome.FAILED, "no handoff configured")
            # Restore-only: the run the SDK restore created is the successor, and its one
            # save_state is the proof that it loads and works. Nothing of ours drives it
            # further, so waiting for more progress would fail every time: it succeeds here.
            await self._handed_off(
                tracked, "restored run is the successor", hand_off_path, restored_run, **found
            )
            await self._ledger.finish(
                tracked,
                AttemptOutcome.SUCCEEDED,
                f"restored into {restored_run} and saved {hand_off_path}; no handoff "
                "configured, so the job must resume from it",
            )
            return
        action = self._handoffs.get(rule.handoff)
        if action is None:
            raise led.AttemptFinished(
                AttemptOutcome.FAILED, f"handoff {rule.handoff!r} not configured"
            )
        if restored_run is not None:
            tracked.exclude.add(restored_run)
        await self._ledger.record(
            tracked,
            AttemptStep.HANDING_OFF,
            f"handing off via {rule.handoff}",
            handed_off_path=hand_off_path,
            **found,
        )
        tracked.handed_off_at = tracked.attempt.updated_at
        if not self._may_act(tracked.attempt.epoch):
            log.warning(
                "handoff_withheld",
                lineage_id=tracked.attempt.lineage_id,
                attempt_id=tracked.attempt.attempt_id,
                step=tracked.attempt.step.value,
                reason="this replica no longer leads in the attempt's lease epoch",
            )
            # Nothing left the daemon: say so, so the lineage is not left recovering. If the
            # fence refuses (another term owns the row), that term settles it.
            outcome = attempt_rules.after_interruption(
                tracked.attempt.step, attempt_rules.Interruption.WITHHELD
            )
            assert outcome is not None
            await self._finish_or_forget(
                tracked, outcome, "handoff withheld: the leader lease was lost just before it"
            )
            return
        failure = await self._hand_off(tracked, action, hand_off_path, tags)
        failpoints.hit("executor.handoff_returned")
        if failure is not None:
            await self._watch_for_late_successor(tracked, failure)
            return
        await self._handed_off(tracked, f"handed off via {rule.handoff}", hand_off_path, None)

    def _live_successor(self, tracked: led.Tracked, earlier: Sequence[Attempt]) -> RunView | None:
        """A run an earlier attempt of this lineage started that is alive and working now (it
        carries that attempt's key, or was recorded as its successor, and its last request moved
        between the two latest listings). Handing off again would start the job twice."""
        keys = {a.attempt_id for a in earlier if a.attempt_id != tracked.attempt.attempt_id}
        recorded = {a.successor_run_id for a in earlier if a.successor_run_id is not None}
        for run in self._ledger.progressing.values():
            if run.run_id == tracked.attempt.corrupted_run_id or run.corrupted:
                continue
            if run.run_id in recorded or run.user_metadata.get(TAG_IDEMPOTENCY_KEY) in keys:
                return run
        return None

    async def _adopt_live(
        self, tracked: led.Tracked, live: RunView, earlier: Sequence[Attempt]
    ) -> None:
        key = live.user_metadata.get(TAG_IDEMPOTENCY_KEY)
        owner = next(
            (a for a in earlier if a.attempt_id == key or a.successor_run_id == live.run_id), None
        )
        number = owner.number if owner is not None else "an earlier attempt"
        reason = (
            f"run {live.run_id}, started by attempt {number}, is alive and working: adopted as "
            "the successor instead of handing off again"
        )
        log.warning(
            "live_successor_adopted",
            lineage_id=tracked.attempt.lineage_id,
            attempt_id=tracked.attempt.attempt_id,
            run_id=live.run_id,
        )
        lineage = await self._store.get_lineage(tracked.attempt.lineage_id)
        now = self._clock.now()
        moved = led.recovered(lineage, reason, now)
        tracked.exclude.discard(live.run_id)
        await self._ledger.record(
            tracked,
            AttemptStep.CONFIRMING,
            reason,
            at=now,
            lineage=moved,
            successor_run_id=live.run_id,
        )
        tracked.handed_off_at = now
        tracked.first_seen_request = live.last_request_time

    @staticmethod
    def _tags(attempt: Attempt, run: RunView) -> dict[str, str]:
        """user_metadata for the successor: the run's own labels (so the same rule still
        matches it) plus the lineage tags, which always win."""
        tags = {k: v for k, v in run.user_metadata.items() if k not in _OUR_TAGS}
        tags[TAG_LINEAGE] = attempt.lineage_id
        tags[TAG_RECOVERED_FROM] = attempt.corrupted_run_id
        tags[TAG_ATTEMPT] = str(attempt.number)
        tags[TAG_IDEMPOTENCY_KEY] = attempt.attempt_id
        return tags

    async def _hand_off(
        self,
        tracked: led.Tracked,
        action: HandoffAction,
        tinker_path: str,
        tags: Mapping[str, str],
    ) -> ActionFailed | None:
        """Run the handoff. A failure that may still have started the job is returned for
        `_watch_for_late_successor`; one that certainly did nothing ends the attempt."""
        attempt = tracked.attempt
        request = HandoffRequest(
            source_checkpoint_path=attempt.checkpoint_path,
            lineage_id=attempt.lineage_id,
            corrupted_run_id=attempt.corrupted_run_id,
            checkpoint_path=tinker_path,
            attempt=attempt.number,
            idempotency_key=attempt.attempt_id,
            restore_optimizer=tracked.rule.checkpoint.restore_optimizer,
            user_metadata=tags,
        )
        try:
            await action.hand_off(request)
        except ActionFailed as exc:
            self._metrics.handoffs.labels(type=action.kind, outcome="failed").inc()
            log.warning(
                "handoff_failed",
                lineage_id=attempt.lineage_id,
                attempt_id=attempt.attempt_id,
                step=attempt.step.value,
                handoff=action.kind,
                exit_code=exc.exit_code,
                reason=str(exc),
            )
            if not exc.may_have_acted or tracked.rule.handoff_grace <= 0:
                raise led.AttemptFinished(AttemptOutcome.FAILED, f"handoff failed: {exc}") from exc
            return exc
        self._metrics.handoffs.labels(type=action.kind, outcome="succeeded").inc()
        return None

    async def _watch_for_late_successor(self, tracked: led.Tracked, exc: ActionFailed) -> None:
        """The handoff reported a failure, but it may have started the job first: a command that
        crashed on its way out, a webhook whose answer was lost. Handing off again at once could
        run the job twice, so the attempt waits `handoff_grace` for a successor carrying its key
        (the ledger's `observe` decides) and fails only if none appears."""
        grace_s = tracked.rule.handoff_grace
        tracked.handoff_failure = f"handoff failed: {exc}"
        tracked.grace_ends = self._clock.now() + timedelta(seconds=grace_s)
        await self._ledger.record(
            tracked,
            AttemptStep.CONFIRMING,
            f"{tracked.handoff_failure}; watching {grace_s:g}s for a successor it may have started",
            note={
                led.NOTE_HANDOFF_FAILURE: tracked.handoff_failure,
                led.NOTE_GRACE_ENDS: tracked.grace_ends.isoformat(),
            },
        )
        if tracked.handed_off_at is None:
            tracked.handed_off_at = tracked.attempt.updated_at

    async def _handed_off(
        self,
        tracked: led.Tracked,
        reason: str,
        tinker_path: str,
        successor: str | None,
        **changes: Any,
    ) -> None:
        now = self._clock.now()
        lineage = await self._store.get_lineage(tracked.attempt.lineage_id)
        moved = led.recovered(lineage, f"{reason}; waiting for the successor to progress", now)
        await self._ledger.record(
            tracked,
            AttemptStep.HANDED_OFF,
            reason,
            at=now,
            lineage=moved,
            handed_off_path=tinker_path,
            successor_run_id=successor,
            **changes,
        )
        if tracked.handed_off_at is None:
            tracked.handed_off_at = tracked.attempt.updated_at
        await self._ledger.record(tracked, AttemptStep.CONFIRMING, "waiting for the successor")
