"""The policy engine: one poll cycle's observations in, one decision per lineage out.

`plan_cycle` runs in two passes. First, each observation moves its own lineage (confirmation
counting, healthy-again resets, operator pauses, the rule screen). Then the lineages that want an
attempt are gated fleet-wide, highest rule priority and oldest detection first: the incident
breaker (hold or stagger), the global concurrency cap, and dry run. `on_attempt_finished` applies
an attempt's outcome (budget reset on progress, jittered backoff, exhaustion).

Pure: no asyncio, no I/O, no clock reads; "now" and randomness are arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import assert_never

from tinker_recovery.core import backoff, breaker, humanize, rules
from tinker_recovery.core import lineage as machine  # the per-lineage state machine
from tinker_recovery.core.model import (
    Attempt,
    AttemptOutcome,
    Decision,
    DecisionKind,
    Lineage,
    LineageState,
    RunView,
)
from tinker_recovery.settings import PolicySettings, Rule

OPERATOR_HOLD_REASON = "paused by an operator"
FLEET_HOLD_REASON = "fleet paused by an operator"
BREAKER_HOLD_REASON = "incident breaker: held until an operator resumes"
DRY_RUN_REASON = "dry run: would recover"
_MAX_REASON_CHARS = 200  # attempt reasons can quote command output; keep decisions readable


@dataclass(frozen=True, slots=True)
class FleetView:
    in_flight: int  # attempts running now
    recent_detections: tuple[datetime, ...]  # confirmation times; reach back max(window, cool_down)
    recent_starts: tuple[datetime, ...]  # attempt start times; reach back stagger_interval
    breaker_opened_at: datetime | None  # breaker state carried between cycles
    fleet_held: bool = False  # operator paused everything
    held_lineages: frozenset[str] = frozenset()  # operator-paused lineages
    # When this deployment started watching (the store's birth). A run first seen corrupted
    # whose last request is older than that broke before anyone watched: "preexisting".
    watch_started_at: datetime | None = None
    # When an operator last resumed after a breaker hold: confirmations up to then no longer
    # count, so the same incident does not trip the breaker again right after the resume.
    breaker_resumed_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Observation:
    run: RunView | None  # None: the lineage's current run was absent from a *successful* poll
    lineage: Lineage | None  # None: a run the store has no lineage for


@dataclass(frozen=True, slots=True)
class CyclePlan:
    decisions: list[Decision]  # one per observation, same order
    breaker_opened_at: datetime | None  # carry into the next FleetView
    breaker_open: bool
    breaker_reason: str = ""  # the breaker's numbers, for logs and /status


@dataclass(frozen=True, slots=True)
class _Candidate:
    """A lineage whose corruption is confirmed and screened: it wants an attempt now."""

    index: int
    before: Lineage | None
    lineage: Lineage
    rule: Rule
    note: str = ""  # set when this cycle's read confirmed the corruption


def plan_cycle(
    observations: Sequence[Observation],
    fleet: FleetView,
    now: datetime,
    policy: PolicySettings,
    rand: Callable[[], float],
) -> CyclePlan:
    """Decide every observed lineage for this cycle.

    `rand` is accepted for the contract's stability; no step of the plan needs randomness today
    (backoff jitter is drawn in `on_attempt_finished`).
    """
    del rand
    firsts = [_observe(i, obs, fleet, now, policy) for i, obs in enumerate(observations)]
    # Confirmations this cycle, whatever was decided about them (acted on, ignored, held).
    confirmed = sum(1 for d in firsts if d.lineage.detected_at == now)
    state = breaker.evaluate(
        fleet.breaker_opened_at,
        (*fleet.recent_detections, *([now] * confirmed)),
        now,
        policy.breaker,
        resumed_at=fleet.breaker_resumed_at,
    )
    candidates = [c for c in firsts if isinstance(c, _Candidate)]
    gated = _gate(candidates, fleet, now, policy, state)
    decisions = [d if isinstance(d, Decision) else gated[d.index] for d in firsts]
    return CyclePlan(decisions, state.opened_at, state.is_open, state.reason)


def _observe(
    index: int, obs: Observation, fleet: FleetView, now: datetime, policy: PolicySettings
) -> Decision | _Candidate:
    before, run = obs.lineage, obs.run
    if run is None:
        if before is None:
            raise ValueError("an observation needs a run, a lineage or both")
        reason = f"run {before.current_run_id} missing from a successful poll: no evidence"
        return Decision(DecisionKind.UNKNOWN, reason, before)
    if before is not None:
        untouched = _untouched(before, run)
        if untouched is not None:
            return untouched
        progressed = machine.credit_progress(before, run)
        if progressed is not None:
            return Decision(
                DecisionKind.WATCH, progressed.reason, machine.settle(before, progressed, now)
            )
    current = before or machine.new_lineage(run, now, preexisting=_preexisting(run, fleet))
    rule = rules.match_rule(run, policy.rules)
    current = machine.resume(machine.note_run(current, run, rule), now)
    step = machine.read(current, run, policy.confirmations, now)
    if _is_operator_held(current, fleet) and (
        step is None or step.lineage.state in machine.HOLDABLE_STATES
    ):
        step = step or machine.Step(current, DecisionKind.HOLD, "")
        return _hold_for_operator(before, step, fleet, now)
    if step is not None and step.kind is DecisionKind.CONFIRM:
        # The Nth corrupted read both confirms and acts: screen the confirmed lineage now,
        # so the first attempt starts in this cycle rather than one poll interval later.
        screened = machine.screen(step.lineage, run, rule, now)
        if isinstance(screened, machine.Step):
            reason = f"{step.reason}; {screened.reason}"
            return Decision(screened.kind, reason, machine.settle(before, screened.lineage, now))
        return _Candidate(index, before, step.lineage, screened, note=step.reason)
    screened = step or machine.screen(current, run, rule, now)
    if isinstance(screened, machine.Step):
        return Decision(
            screened.kind, screened.reason, machine.settle(before, screened.lineage, now)
        )
    return _Candidate(index, before, current, screened)


def _preexisting(run: RunView, fleet: FleetView) -> bool:
    """Already corrupted before this deployment watched anything: nobody drove the run since
    the store was created. A run that broke while every replica was down, or during a failover,
    was driven after that, so it is recovered like any other."""
    started = fleet.watch_started_at
    return run.corrupted and started is not None and run.last_request_time < started


def _untouched(before: Lineage, run: RunView) -> Decision | None:
    """Observations the policy reports without changing anything, or None."""
    if run.run_id != before.current_run_id:
        reason = f"run {run.run_id} is not the lineage's current run {before.current_run_id}"
        return Decision(DecisionKind.WATCH, reason, before)
    if before.state in machine.EXECUTOR_STATES:
        reason = f"attempt {before.attempts_total} in flight ({before.state}): executor owns it"
        return Decision(DecisionKind.WATCH, reason, before)
    return None


def _is_operator_held(current: Lineage, fleet: FleetView) -> bool:
    return fleet.fleet_held or current.lineage_id in fleet.held_lineages


def _hold_for_operator(
    before: Lineage | None, step: machine.Step, fleet: FleetView, now: datetime
) -> Decision:
    why = FLEET_HOLD_REASON if fleet.fleet_held else OPERATOR_HOLD_REASON
    held = replace(step.lineage, state=LineageState.HELD, held_by_operator=True, reason=why)
    # A confirmation still counts while paused (metrics, the breaker); it just starts nothing.
    kind = DecisionKind.CONFIRM if step.kind is DecisionKind.CONFIRM else DecisionKind.HOLD
    reason = f"{why}; {step.reason}" if step.reason else why
    return Decision(kind, reason, machine.settle(before, held, now))


def _gate(
    candidates: Sequence[_Candidate],
    fleet: FleetView,
    now: datetime,
    policy: PolicySettings,
    state: breaker.BreakerState,
) -> dict[int, Decision]:
    """Fleet-wide limits, applied to candidates in priority order (then oldest detection)."""
    stagger = state.is_open and policy.breaker.mode == "stagger"
    allowance = (
        breaker.stagger_allowance(fleet.recent_starts, now, policy.breaker) if stagger else None
    )
    started = 0
    out: dict[int, Decision] = {}
    for cand in sorted(candidates, key=lambda c: _order(c, now)):
        block = _blocker(fleet, policy, state, started, allowance)
        if block is None:
            out[cand.index] = _noted(cand, _start(cand, now, policy.dry_run))
            started += 1
            continue
        parked = replace(
            cand.lineage,
            state=block.state,
            reason=block.lineage_reason,
            next_attempt_at=None,  # the backoff (if any) is over; only the fleet holds it back
            held_by_operator=False,
        )
        settled = machine.settle(cand.before, parked, now)
        out[cand.index] = _noted(cand, Decision(block.kind, block.reason, settled))
    return out


def _noted(cand: _Candidate, decision: Decision) -> Decision:
    return replace(decision, reason=f"{cand.note}; {decision.reason}") if cand.note else decision


@dataclass(frozen=True, slots=True)
class _Block:
    state: LineageState
    kind: DecisionKind
    lineage_reason: str  # stable across cycles, so a parked lineage is not rewritten each time
    reason: str  # this cycle's numbers


def _blocker(
    fleet: FleetView,
    policy: PolicySettings,
    state: breaker.BreakerState,
    started: int,
    allowance: int | None,
) -> _Block | None:
    """Why the next candidate cannot start this cycle, or None when it can."""
    cfg = policy.breaker
    if state.is_open and cfg.mode == "hold":
        why = f"incident breaker (hold): {state.reason}"
        return _Block(LineageState.HELD, DecisionKind.HOLD, BREAKER_HOLD_REASON, why)
    cap = policy.max_concurrent
    if fleet.in_flight + started >= cap:
        return _Block(
            LineageState.CORRUPTED,
            DecisionKind.WAIT,
            f"waiting for a free slot (max_concurrent {cap})",
            f"concurrency cap: {fleet.in_flight} in flight + {started} starting >= {cap}",
        )
    if allowance is not None and started >= allowance:
        per = f"{cfg.stagger_rate} per {humanize.duration(cfg.stagger_interval)}"
        used = cfg.stagger_rate - allowance + started
        return _Block(
            LineageState.CORRUPTED,
            DecisionKind.WAIT,
            f"incident breaker: staggering restarts ({per})",
            f"incident breaker (stagger): {used} starts of {per} used; {state.reason}",
        )
    return None


def _order(cand: _Candidate, now: datetime) -> tuple[int, datetime, str]:
    return (-cand.rule.priority, cand.lineage.detected_at or now, cand.lineage.lineage_id)


def _start(cand: _Candidate, now: datetime, dry_run: bool) -> Decision:
    rule, current = cand.rule, cand.lineage
    used = machine.attempts_in_window(current.attempt_starts, now, rule.window)
    budget = f"{used + 1}/{rule.max_attempts} in {humanize.duration(rule.window)}, rule {rule.name}"
    if dry_run:
        idle = replace(
            current, state=LineageState.CORRUPTED, reason=DRY_RUN_REASON, next_attempt_at=None
        )
        return Decision(
            DecisionKind.DRY_RUN,
            f"dry run: would start attempt {current.attempts_total + 1} ({budget})",
            machine.settle(cand.before, idle, now),
        )
    window_start = now - timedelta(seconds=rule.window)
    number = current.attempts_total + 1
    reason = f"attempt {number} started ({budget})"
    recovering = replace(
        current,
        state=LineageState.RECOVERING,
        reason=reason,
        attempts_total=number,
        # Starts older than the window no longer count; dropping them keeps the row bounded.
        attempt_starts=(*(t for t in current.attempt_starts if t > window_start), now),
        next_attempt_at=None,
        held_by_operator=False,
    )
    return Decision(
        DecisionKind.RECOVER,
        reason,
        machine.settle(cand.before, recovering, now),
        start_attempt=True,
    )


def on_attempt_finished(
    lineage: Lineage,
    attempt: Attempt,
    now: datetime,
    rule: Rule,
    rand: float,
    progressed: bool,
) -> Lineage:
    """The lineage after an attempt reached its outcome.

    succeeded -> HEALTHY watching the successor (progress resets the budget); failed -> WAITING
    with jittered backoff, or EXHAUSTED when the budget is spent; abandoned (shutdown before the
    handoff) or dry run -> CORRUPTED again, the start not charged.
    """
    outcome = attempt.outcome
    match outcome:
        case AttemptOutcome.SUCCEEDED:
            after = _succeeded(lineage, attempt, now, rule, progressed)
        case AttemptOutcome.FAILED:
            after = _failed(lineage, attempt, now, rule, rand)
        case AttemptOutcome.ABANDONED | AttemptOutcome.DRY_RUN:
            after = _abandoned(lineage, attempt)
        case None:
            raise ValueError(f"attempt {attempt.attempt_id} has no outcome yet")
        case _:
            assert_never(outcome)
    return machine.settle(lineage, after, now)


def _succeeded(
    current: Lineage, attempt: Attempt, now: datetime, rule: Rule, progressed: bool
) -> Lineage:
    successor = attempt.successor_run_id or current.current_run_id
    if progressed:
        starts: tuple[datetime, ...] = ()
        budget = "it progressed, so the budget is reset"
    else:
        starts = current.attempt_starts
        used = machine.attempts_in_window(starts, now, rule.window)
        budget = f"no progress yet: {used}/{rule.max_attempts} attempts still count"
    # Progress is judged against the restored checkpoint: a newer one resets the budget later.
    restored = attempt.checkpoint_time or current.last_checkpoint_time
    return replace(
        current,
        last_checkpoint_time=restored,
        state=LineageState.HEALTHY,
        reason=f"attempt {attempt.number} succeeded: watching run {successor}; {budget}",
        current_run_id=successor,
        attempt_starts=starts,
        corrupted_reads=0,
        corrupted_since=None,
        detected_at=None,
        preexisting=False,
        next_attempt_at=None,
    )


def _failed(current: Lineage, attempt: Attempt, now: datetime, rule: Rule, rand: float) -> Lineage:
    used = machine.attempts_in_window(current.attempt_starts, now, rule.window)
    why = f"attempt {attempt.number} failed ({_brief(attempt.reason)})"
    if used >= rule.max_attempts:
        reason = (
            f"{why}: {used} attempts in {humanize.duration(rule.window)} without progress "
            f"(max_attempts {rule.max_attempts}): an operator is needed"
        )
        return replace(current, state=LineageState.EXHAUSTED, reason=reason, next_attempt_at=None)
    delay_s = backoff.next_delay_s(max(used, 1), rule.backoff, rand)
    reason = (
        f"{why}; attempt {used + 1}/{rule.max_attempts} after a backoff of "
        f"{humanize.duration(delay_s)}"
    )
    return replace(
        current,
        state=LineageState.WAITING,
        reason=reason,
        next_attempt_at=now + timedelta(seconds=delay_s),
    )


def _abandoned(current: Lineage, attempt: Attempt) -> Lineage:
    starts = list(current.attempt_starts)
    if attempt.started_at in starts:
        starts.remove(attempt.started_at)
    elif starts:
        # The shell may stamp started_at a moment after the plan's "now"; attempts of one
        # lineage never overlap, so the newest charge is this attempt's.
        starts.remove(max(starts))
    reason = (
        f"attempt {attempt.number} abandoned before the handoff ({_brief(attempt.reason)}); "
        "not charged to the budget"
    )
    return replace(
        current,
        state=LineageState.CORRUPTED,
        reason=reason,
        attempt_starts=tuple(starts),
        next_attempt_at=None,
    )


def _brief(text: str) -> str:
    text = " ".join(text.split()) or "no reason given"
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 3] + "..."
