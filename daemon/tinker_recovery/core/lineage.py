"""The per-lineage state machine: what one poll's read of one run does to its lineage.

Owns lineage identity, confirmation counting, healthy-again resets, the rule screen (ignore,
alert, pre-existing, idle, budget, backoff) and resuming from a hold. Fleet-wide gating (operator
pauses, the incident breaker, the concurrency cap, dry run) lives in `policy.py`, which calls in.
Pure: "now" is an argument; nothing here reads a clock or does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from tinker_recovery.core import humanize
from tinker_recovery.core.model import (
    TAG_IDEMPOTENCY_KEY,
    TAG_LINEAGE,
    TAG_PREFIX,
    TAG_RECOVERED_FROM,
    CheckpointKind,
    DecisionKind,
    Lineage,
    LineageState,
    RunView,
)
from tinker_recovery.settings import Rule

# The executor owns lineages in these states; the policy reports them and changes nothing.
EXECUTOR_STATES = frozenset({LineageState.RECOVERING, LineageState.RECOVERED})
# States an operator pause (or a breaker hold) may turn into HELD. Terminal states stay as they
# are, so a pause and a resume can never turn an exhausted lineage back into a recoverable one.
HOLDABLE_STATES = frozenset(
    {LineageState.HEALTHY, LineageState.SUSPECT, LineageState.CORRUPTED, LineageState.WAITING}
)
MAX_LINEAGE_ID_CHARS = 256


@dataclass(frozen=True, slots=True)
class Step:
    """A lineage after one read, the decision kind it earns, and why."""

    lineage: Lineage
    kind: DecisionKind
    reason: str


def is_valid_lineage_id(value: object) -> bool:
    """A tag we accept as a lineage id: short, printable, no whitespace (it is user-writable)."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_LINEAGE_ID_CHARS
        and value.isprintable()
        and not any(ch.isspace() for ch in value)
    )


def lineage_id_for(run: RunView) -> str:
    """The run's `tinker_recovery.lineage` tag when it is a sane id, else the run's own id.

    The daemon tags successors with the root run id, so both branches name the same lineage.
    """
    tag = run.user_metadata.get(TAG_LINEAGE)
    return tag if tag is not None and is_valid_lineage_id(tag) else run.run_id


def new_lineage(run: RunView, now: datetime, *, preexisting: bool) -> Lineage:
    """A lineage for a run the store does not know yet, in HEALTHY before this read applies."""
    lineage_id = lineage_id_for(run)
    return Lineage(
        lineage_id=lineage_id,
        root_run_id=lineage_id,
        current_run_id=run.run_id,
        state=LineageState.HEALTHY,
        reason=f"first seen: run {run.run_id}",
        first_seen_at=now,
        updated_at=now,
        preexisting=preexisting,
    )


def without_our_tags(run: RunView) -> RunView:
    """The run as seen when its `tinker_recovery.*` tags are not to be trusted."""
    labels = {k: v for k, v in run.user_metadata.items() if not k.startswith(TAG_PREFIX)}
    return replace(run, user_metadata=labels)


def successors_by_origin(runs: Iterable[RunView]) -> dict[str, RunView]:
    """Runs that say which run they were recovered from: `recovered_from` -> the run, for runs
    that also carry an idempotency key (what the daemon passes on every handoff). When several
    claim the same origin, the busiest wins."""
    found: dict[str, RunView] = {}
    for run in runs:
        origin = run.user_metadata.get(TAG_RECOVERED_FROM)
        if origin is None or TAG_IDEMPOTENCY_KEY not in run.user_metadata:
            continue
        known = found.get(origin)
        if known is None or (run.last_request_time, run.run_id) > (
            known.last_request_time,
            known.run_id,
        ):
            found[origin] = run
    return found


def successor_chain(origin: RunView, successors: Mapping[str, RunView]) -> list[RunView]:
    """The runs that continued `origin`, oldest first, per the service's run metadata. Only
    runs of the same owner and base model count (a stranger's tag cannot claim our run)."""
    chain: list[RunView] = []
    seen = {origin.run_id}
    run = successors.get(origin.run_id)
    while run is not None and run.run_id not in seen:
        if run.owner != origin.owner or run.base_model != origin.base_model:
            break
        chain.append(run)
        seen.add(run.run_id)
        run = successors.get(run.run_id)
    return chain


def rebuilt_from_successors(origin: RunView, chain: Sequence[RunView], now: datetime) -> Lineage:
    """A lineage the store lost, rebuilt from the listing: `origin` was already recovered into
    `chain` (oldest first), so its current run is the last of them and nothing is restarted."""
    last = chain[-1]
    tag = last.user_metadata.get(TAG_LINEAGE)
    lineage_id = tag if tag is not None and is_valid_lineage_id(tag) else origin.run_id
    path = " -> ".join(run.run_id for run in (origin, *chain))
    return Lineage(
        lineage_id=lineage_id,
        root_run_id=origin.run_id,
        current_run_id=last.run_id,
        state=LineageState.HEALTHY,
        reason=(
            f"rebuilt from the service's run metadata ({path}): run {origin.run_id} was already "
            "recovered, so it is not recovered again"
        ),
        first_seen_at=now,
        updated_at=now,
    )


def attempts_in_window(starts: Iterable[datetime], now: datetime, window_s: float) -> int:
    """Attempts charged to the budget that started within the last `window_s`."""
    window_start = now - timedelta(seconds=window_s)
    return sum(1 for started in starts if started > window_start)


def settle(before: Lineage | None, after: Lineage, now: datetime) -> Lineage:
    """`before` itself when nothing but updated_at differs, else `after` stamped updated_at=now.

    The shell persists a decision's lineage when it differs from what it has: this keeps
    steady states (healthy, backing off, held) from rewriting the row every cycle.
    """
    if before is not None and replace(after, updated_at=before.updated_at) == before:
        return before
    return replace(after, updated_at=now)


def note_run(lineage: Lineage, run: RunView, rule: Rule | None) -> Lineage:
    """Record the matching rule and the newest training checkpoint seen on the current run."""
    ckpt = run.last_checkpoint
    newest = lineage.last_checkpoint_time
    if ckpt is not None and ckpt.kind is CheckpointKind.TRAINING:
        newest = ckpt.time if newest is None else max(newest, ckpt.time)
    return replace(
        lineage, rule=rule.name if rule is not None else None, last_checkpoint_time=newest
    )


def credit_progress(before: Lineage, run: RunView) -> Lineage | None:
    """A healthy lineage whose successor saved a training checkpoint newer than any seen before
    (the restored one, after an attempt) made progress: its budget is reset. None otherwise."""
    ckpt = run.last_checkpoint
    if (
        before.state is not LineageState.HEALTHY
        or not before.attempt_starts
        or run.corrupted
        or run.run_id != before.current_run_id
        or ckpt is None
        or ckpt.kind is not CheckpointKind.TRAINING
        or (before.last_checkpoint_time is not None and ckpt.time <= before.last_checkpoint_time)
    ):
        return None
    return replace(
        before,
        attempt_starts=(),
        last_checkpoint_time=ckpt.time,
        reason=f"run {run.run_id} saved {ckpt.checkpoint_id}: progress, budget reset",
    )


def resume(lineage: Lineage, now: datetime) -> Lineage:
    """A HELD lineage as the state its recorded facts imply; any other lineage unchanged."""
    if lineage.state is not LineageState.HELD:
        return lineage
    if lineage.detected_at is not None:
        backing_off = lineage.next_attempt_at is not None and now < lineage.next_attempt_at
        state = LineageState.WAITING if backing_off else LineageState.CORRUPTED
    elif lineage.corrupted_reads > 0:
        state = LineageState.SUSPECT
    else:
        state = LineageState.HEALTHY
    return replace(lineage, state=state, held_by_operator=False, reason=f"resumed as {state}")


def read(lineage: Lineage, run: RunView, confirmations: int, now: datetime) -> Step | None:
    """Apply one successful poll's read of the lineage's current run.

    None means: the corruption was confirmed on an earlier cycle (CORRUPTED, or WAITING), and
    the caller must `screen` it and gate it. Call with a lineage that is not HELD (`resume`).
    """
    if not run.corrupted:
        return _healthy_read(lineage, run)
    match lineage.state:
        case LineageState.HEALTHY | LineageState.SUSPECT:
            return _corrupted_read(lineage, confirmations, now)
        case LineageState.EXHAUSTED:
            return Step(lineage, DecisionKind.EXHAUST, f"still exhausted: {lineage.reason}")
        case LineageState.IGNORED:
            return Step(lineage, DecisionKind.IGNORE, f"still ignored: {lineage.reason}")
        case LineageState.CORRUPTED | LineageState.WAITING:
            return None
        case _:  # RECOVERING, RECOVERED (executor's) or HELD: not ours to move here.
            return Step(lineage, DecisionKind.WATCH, f"{lineage.state}: {lineage.reason}")


def _healthy_read(lineage: Lineage, run: RunView) -> Step:
    if lineage.state is LineageState.HEALTHY:
        return Step(lineage, DecisionKind.WATCH, f"run {run.run_id} is healthy")
    if lineage.state is LineageState.SUSPECT:
        reason = f"healthy read after {lineage.corrupted_reads} corrupted read(s): false alarm"
    else:
        reason = f"run {run.run_id} is healthy again (was {lineage.state})"
    healthy = replace(
        lineage,
        state=LineageState.HEALTHY,
        reason=reason,
        corrupted_reads=0,
        corrupted_since=None,
        detected_at=None,
        preexisting=False,
        next_attempt_at=None,
    )
    return Step(healthy, DecisionKind.WATCH, reason)


def _corrupted_read(lineage: Lineage, confirmations: int, now: datetime) -> Step:
    reads = lineage.corrupted_reads + 1
    since = lineage.corrupted_since or now
    if reads >= confirmations:
        reason = f"{reads}/{confirmations} corrupted reads: corruption confirmed"
        confirmed = replace(
            lineage,
            state=LineageState.CORRUPTED,
            reason=reason,
            corrupted_reads=reads,
            corrupted_since=since,
            detected_at=now,
        )
        return Step(confirmed, DecisionKind.CONFIRM, reason)
    reason = f"{reads}/{confirmations} corrupted reads"
    suspect = replace(
        lineage,
        state=LineageState.SUSPECT,
        reason=reason,
        corrupted_reads=reads,
        corrupted_since=since,
    )
    return Step(suspect, DecisionKind.SUSPECT, reason)


def screen(lineage: Lineage, run: RunView, rule: Rule | None, now: datetime) -> Step | Rule:
    """A step when a confirmed corruption gets no attempt now (ignored, alert only, exhausted,
    backing off); otherwise the rule it would start under: it is a candidate.
    """
    if rule is None:
        reason = f"no rule matches run {run.run_id}"
        return Step(
            replace(lineage, state=LineageState.IGNORED, reason=reason), DecisionKind.IGNORE, reason
        )
    ignored = _ignore_reason(lineage, run, rule)
    if ignored is not None:
        kind, reason = ignored
        return Step(replace(lineage, state=LineageState.IGNORED, reason=reason), kind, reason)
    used = attempts_in_window(lineage.attempt_starts, now, rule.window)
    if used >= rule.max_attempts:
        reason = (
            f"{used} attempts in {humanize.duration(rule.window)} without progress "
            f"(max_attempts {rule.max_attempts}): an operator is needed"
        )
        exhausted = replace(lineage, state=LineageState.EXHAUSTED, reason=reason)
        return Step(exhausted, DecisionKind.EXHAUST, reason)
    due = lineage.next_attempt_at
    if lineage.state is LineageState.WAITING and due is not None and now < due:
        reason = (
            f"backing off until {humanize.instant(due)} "
            f"({humanize.duration((due - now).total_seconds())} left); "
            f"next is attempt {used + 1}/{rule.max_attempts}"
        )
        return Step(lineage, DecisionKind.WAIT, reason)
    return rule


def _ignore_reason(lineage: Lineage, run: RunView, rule: Rule) -> tuple[DecisionKind, str] | None:
    if rule.action == "ignore":
        return DecisionKind.IGNORE, f"rule {rule.name}: ignore"
    if rule.action == "alert":
        return DecisionKind.ALERT, f"rule {rule.name}: alert only"
    if lineage.preexisting and not rule.recover_preexisting:
        return DecisionKind.IGNORE, (
            f"already corrupted when first seen (rule {rule.name}: recover_preexisting is off)"
        )
    since = lineage.corrupted_since
    if rule.max_idle is not None and since is not None:
        idle_s = (since - run.last_request_time).total_seconds()
        if idle_s > rule.max_idle:
            return DecisionKind.IGNORE, (
                f"idle: no request for {humanize.duration(idle_s)} before the corruption "
                f"(rule {rule.name}: max_idle {humanize.duration(rule.max_idle)})"
            )
    return None
