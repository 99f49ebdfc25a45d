"""Operator-requested recoveries (`recover RUN [--checkpoint PATH]`, `POST /recover`).

Requests wait in the store until the leader's next successful poll takes them. The operator's
word replaces confirmation, the budget and the backoff (they asked), but not safety: the run
must be in the latest listing and be its lineage's current run, no attempt may be in flight for
the lineage, a rule must match it and say how to hand it off, and `dry_run` still acts on nothing.
Every request ends as an event in the store, taken or refused, with the reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Protocol

import structlog

from tinker_recovery.core import lineage as core_lineage
from tinker_recovery.core import rules as core_rules
from tinker_recovery.core.model import Attempt, Lineage, LineageState, RunView
from tinker_recovery.errors import RecoveryError
from tinker_recovery.settings import PolicySettings, Rule
from tinker_recovery.shell.store.base import (
    Event,
    ManualRequest,
    Store,
    TakenRequest,
    Transition,
)

log = structlog.get_logger(__name__)


class Starter(Protocol):
    def busy(self, lineage_id: str) -> bool: ...

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
    ) -> Attempt | None: ...


async def take(
    *,
    store: Store,
    executor: Starter,
    policy: PolicySettings,
    runs: Sequence[RunView],
    now: datetime,
    tg: asyncio.TaskGroup,
    on_start: Callable[[], None],
    epoch: int | None = None,
    taken_by: str = "leader",
) -> int:
    """Handle every queued request, each settled in the transaction that acts on it (the
    attempt's first row, or the refusal's event): one that fails stays queued for the next
    cycle and does not take the others down with it. Returns how many attempts started."""
    requests = await store.pending_manual_requests()
    if not requests:
        return 0
    by_id: Mapping[str, RunView] = {run.run_id: run for run in runs}
    started = 0
    for request in requests:
        try:
            refusal = await _try(
                request, by_id.get(request.run_id), store, executor, policy, now, tg, epoch
            )
            if refusal is None:
                started += 1
                on_start()
                continue
            await _refuse(store, request, refusal, now, epoch, taken_by)
        except RecoveryError as exc:
            log.warning(
                "manual_recovery_deferred",
                request_id=request.request_id,
                run_id=request.run_id,
                reason=str(exc),
            )
    return started


async def _refuse(
    store: Store,
    request: ManualRequest,
    refusal: str,
    now: datetime,
    epoch: int | None,
    taken_by: str,
) -> None:
    known = await store.lineage_for_run(request.run_id)
    lineage_id = known.lineage_id if known is not None else None
    log.warning(
        "manual_recovery_refused",
        request_id=request.request_id,
        lineage_id=lineage_id,
        run_id=request.run_id,
        reason=refusal,
    )
    event = Event(
        at=now,
        kind="manual_recovery_refused",
        reason=refusal,
        lineage_id=lineage_id,
        run_id=request.run_id,
        data={"request_id": request.request_id, "requested_by": request.requested_by},
    )
    taken = TakenRequest(request.request_id, "refused", refusal, now, taken_by)
    await store.commit(Transition(taken_request=taken, events=(event,)), epoch=epoch)


async def _try(
    request: ManualRequest,
    run: RunView | None,
    store: Store,
    executor: Starter,
    policy: PolicySettings,
    now: datetime,
    tg: asyncio.TaskGroup,
    epoch: int | None,
) -> str | None:
    """None when the attempt started, else why not."""
    if run is None:
        return f"run {request.run_id} is not in the latest listing"
    rule = core_rules.match_rule(run, policy.rules)
    if rule is None:
        return "no policy rule matches this run, so there is no handoff for it"
    if rule.handoff is None and rule.restore != "sdk":
        return f"rule {rule.name} has no handoff and no SDK restore"
    known = await store.lineage_for_run(run.run_id)
    lineage = known or core_lineage.new_lineage(run, now, preexisting=False)
    if lineage.current_run_id != run.run_id:
        return f"lineage {lineage.lineage_id} has moved on to run {lineage.current_run_id}"
    if executor.busy(lineage.lineage_id) or lineage.state in (
        LineageState.RECOVERING,
        LineageState.RECOVERED,
    ):
        return f"lineage {lineage.lineage_id} already has an attempt in flight"
    if policy.dry_run:
        return "dry run: would recover on request"
    number = lineage.attempts_total + 1
    recovering = replace(
        lineage,
        state=LineageState.RECOVERING,
        reason=f"attempt {number}: manual recovery requested by {request.requested_by}",
        attempts_total=number,
        attempt_starts=(*lineage.attempt_starts, now),
        detected_at=lineage.detected_at or now,
        corrupted_since=lineage.corrupted_since or now,
        next_attempt_at=None,
        rule=rule.name,
        updated_at=now,
    )
    event = Event(
        at=now,
        kind="manual_recovery",
        reason=recovering.reason,
        lineage_id=lineage.lineage_id,
        run_id=run.run_id,
        data={
            "request_id": request.request_id,
            "checkpoint_path": request.checkpoint_path,
            "from": lineage.state.value,
        },
    )
    taken = TakenRequest(
        request.request_id,
        "started",
        f"attempt {number} of lineage {lineage.lineage_id}",
        now,
        "leader",
    )
    attempt = await executor.start(
        recovering,
        run,
        rule,
        tg=tg,
        checkpoint=request.checkpoint_path,
        epoch=epoch,
        before=known,
        decision=event,
        taken_request=taken,
    )
    if attempt is None:
        return "this replica may not act right now (dry run, or an attempt in flight)"
    log.info(
        "manual_recovery_started",
        request_id=request.request_id,
        lineage_id=lineage.lineage_id,
        run_id=run.run_id,
        checkpoint_path=request.checkpoint_path,
    )
    return None
