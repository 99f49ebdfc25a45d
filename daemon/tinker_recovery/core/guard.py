"""Keeping active runs recoverable: which checkpoints to extend, work at risk, stalled runs.

Pure: it reads only what one listing already carries (each run's `last_checkpoint` and
`last_request_time`), the matched rules and "now". It decides; `shell/guard.py` makes the TTL
calls, writes events and exports metrics. Nothing here reads a clock or talks to the API.

- Guard: a driven run that a `recover` rule (with `guard.enabled`) matches, whose newest training
  checkpoint expires within `guard.min_remaining`, gets it extended to `guard.extend_to` from now.
  The settings make that at least the service's 1 h minimum and longer than `min_remaining`, so
  an extension never shortens a TTL. At most `guard.max_per_cycle` calls per rule per cycle,
  soonest expiry first; the rest wait (`deferred`). Runs under a hold are left alone (`held`).
- Work at risk: for a driven run under a recover rule, its last request minus the time of its
  newest usable training checkpoint (None: no usable checkpoint in the listing).
- Stalled: a run a rule with `stall_after` selects (or a successor of a lineage the daemon
  recovered) that has been quiet for `stall_after`, has no final checkpoint and is not corrupted.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from tinker_recovery.core import humanize, ranking
from tinker_recovery.core import rules as core_rules
from tinker_recovery.core.model import TAG_RECOVERED_FROM, CheckpointKind, RunView
from tinker_recovery.settings import Rule

DEFAULT_DRIVEN_WITHIN_S = 86400.0
FINAL_CHECKPOINT_NAME = "final"  # tinker-cookbook's last save: `weights/final`, no TTL
QUANTILES = (0.5, 0.9, 0.99, 1.0)  # the `quantile` label values of work_at_risk_seconds


@dataclass(frozen=True, slots=True)
class Extension:
    """One TTL call: set `tinker_path`'s TTL to `ttl_s` from now (it expired at `expires_at`)."""

    run_id: str
    rule: str
    tinker_path: str
    expires_at: datetime
    ttl_s: int


@dataclass(frozen=True, slots=True)
class Risk:
    """Work at risk of one driven run. `work_at_risk_s` None: no usable checkpoint listed."""

    run_id: str
    rule: str
    last_request_time: datetime
    checkpoint_time: datetime | None
    work_at_risk_s: float | None


@dataclass(frozen=True, slots=True)
class Stall:
    run_id: str
    rule: str
    idle_s: float
    successor: bool  # the run continues a lineage the daemon recovered
    recover_reason: str | None  # set only when the rule says `on_stall: recover`


@dataclass(frozen=True, slots=True)
class GuardPlan:
    extend: tuple[Extension, ...] = ()  # call now
    deferred: tuple[Extension, ...] = ()  # needed, over this cycle's per-rule budget
    held: tuple[Extension, ...] = ()  # needed, but a hold says hands off
    risks: tuple[Risk, ...] = ()  # every driven run under a recover rule
    stalls: tuple[Stall, ...] = ()


def driven_within_s(rule: Rule) -> float:
    if rule.guard.driven_within is not None:
        return rule.guard.driven_within
    return rule.max_idle if rule.max_idle is not None else DEFAULT_DRIVEN_WITHIN_S


def is_driven(run: RunView, rule: Rule, now: datetime) -> bool:
    """Sent a request within the rule's window and is not corrupted (that is the policy's)."""
    idle = now - run.last_request_time
    return not run.corrupted and idle <= timedelta(seconds=driven_within_s(rule))


def needed_extension(run: RunView, rule: Rule, now: datetime) -> Extension | None:
    """The TTL call that keeps this run's newest training checkpoint alive, if one is due."""
    checkpoint = run.last_checkpoint
    if checkpoint is None or checkpoint.kind is not CheckpointKind.TRAINING:
        return None
    if checkpoint.expires_at is None or checkpoint.expires_at <= now:
        return None  # never expires, or already gone: nothing an extension can save
    if checkpoint.expires_at - now > timedelta(seconds=rule.guard.min_remaining):
        return None
    return Extension(
        run_id=run.run_id,
        rule=rule.name,
        tinker_path=checkpoint.tinker_path,
        expires_at=checkpoint.expires_at,
        ttl_s=math.ceil(rule.guard.extend_to),
    )


def work_at_risk(run: RunView, rule: Rule, now: datetime) -> Risk:
    checkpoint = run.last_checkpoint
    usable = checkpoint is not None and ranking.is_usable(
        checkpoint, now=now, cfg=rule.checkpoint, bad=()
    )
    if checkpoint is None or not usable:
        return Risk(run.run_id, rule.name, run.last_request_time, None, None)
    at_risk = max(0.0, (run.last_request_time - checkpoint.time).total_seconds())
    return Risk(run.run_id, rule.name, run.last_request_time, checkpoint.time, at_risk)


def has_final_checkpoint(run: RunView) -> bool:
    checkpoint = run.last_checkpoint
    return checkpoint is not None and (
        checkpoint.checkpoint_id.rsplit("/", 1)[-1] == FINAL_CHECKPOINT_NAME
    )


def stall_of(run: RunView, rule: Rule, now: datetime, *, successor: bool) -> Stall | None:
    """A quiet run is stalled for `stall_after` onwards. A run that is not a successor stops
    counting once it has been quiet for longer than `stall_after` plus the rule's driven window:
    it is then an idle run like any other, not one that just stopped."""
    if rule.stall_after is None or rule.action == "ignore" or run.corrupted:
        return None
    if has_final_checkpoint(run):
        return None
    idle_s = (now - run.last_request_time).total_seconds()
    if idle_s < rule.stall_after:
        return None
    if not successor and idle_s > rule.stall_after + driven_within_s(rule):
        return None
    reason = None
    if rule.on_stall == "recover":
        reason = (
            f"stalled: no request for {humanize.duration(idle_s)} "
            f"(stall_after {humanize.duration(rule.stall_after)}) and no final checkpoint"
        )
    return Stall(run.run_id, rule.name, idle_s, successor, reason)


def is_successor(run: RunView, successors: Collection[str]) -> bool:
    return run.run_id in successors or TAG_RECOVERED_FROM in run.user_metadata


Matched = Sequence[tuple[RunView, Rule]]


def match_all(runs: Sequence[RunView], rules: Sequence[Rule]) -> list[tuple[RunView, Rule]]:
    """Each run with the rule it falls under (first match wins); unmatched runs are left out."""
    # Same answer as core_rules.match_rule, with a shortcut for a match-everything rule: at
    # 10k runs per cycle the glob calls were most of the guard's CPU time.
    catch_all = [_matches_everything(rule) for rule in rules]
    matched: list[tuple[RunView, Rule]] = []
    for run in runs:
        for rule, everything in zip(rules, catch_all, strict=True):
            if everything or core_rules.matches(run, rule.match):
                matched.append((run, rule))
                break
    return matched


def _matches_everything(rule: Rule) -> bool:
    m = rule.match
    fields = (m.run_id, m.base_model, m.is_lora, m.owner)
    return all(f is None for f in fields) and not m.labels


def lookups(matched: Matched, now: datetime) -> list[str]:
    """Runs whose lineage the shell must look up before `plan`: those due an extension (is
    their lineage held?) and quiet ones that may be stalled (is it a recovered lineage?)."""
    ids: list[str] = []
    for run, rule in matched:
        quiet = rule.stall_after is not None and (now - run.last_request_time) >= timedelta(
            seconds=rule.stall_after
        )
        due = (
            rule.action == "recover"
            and rule.guard.enabled
            and is_driven(run, rule, now)
            and needed_extension(run, rule, now) is not None
        )
        if quiet or due:
            ids.append(run.run_id)
    return ids


def plan(
    matched: Matched,
    now: datetime,
    *,
    held_runs: Collection[str] = (),
    fleet_held: bool = False,
    successors: Collection[str] = (),
) -> GuardPlan:
    """What the guard does this cycle, and what it sees. `successors`: current runs of
    lineages the daemon recovered (tagged successors are recognised from their metadata)."""
    due: list[Extension] = []
    held: list[Extension] = []
    risks: list[Risk] = []
    stalls: list[Stall] = []
    by_name: dict[str, Rule] = {}
    driven_since: dict[str, datetime] = {}  # per rule: requests after this mean driven
    for run, rule in matched:
        if rule.name not in by_name:
            by_name[rule.name] = rule
            driven_since[rule.name] = now - timedelta(seconds=driven_within_s(rule))
        if rule.stall_after is not None:
            stall = stall_of(run, rule, now, successor=is_successor(run, successors))
            if stall is not None:
                stalls.append(stall)
        if rule.action != "recover" or run.corrupted:
            continue
        if run.last_request_time < driven_since[rule.name]:
            continue
        risks.append(work_at_risk(run, rule, now))
        extension = needed_extension(run, rule, now) if rule.guard.enabled else None
        if extension is None:
            continue
        if fleet_held or run.run_id in held_runs:
            held.append(extension)
        else:
            due.append(extension)
    extend, deferred = _rate_limit(due, by_name)
    return GuardPlan(tuple(extend), tuple(deferred), tuple(held), tuple(risks), tuple(stalls))


def _rate_limit(
    due: Sequence[Extension], rules: dict[str, Rule]
) -> tuple[list[Extension], list[Extension]]:
    """Per rule, the `max_per_cycle` soonest expiries go now; the others wait a cycle."""
    extend: list[Extension] = []
    deferred: list[Extension] = []
    taken: dict[str, int] = {}
    for ext in sorted(due, key=lambda e: (e.expires_at, e.tinker_path)):
        if taken.get(ext.rule, 0) < rules[ext.rule].guard.max_per_cycle:
            taken[ext.rule] = taken.get(ext.rule, 0) + 1
            extend.append(ext)
        else:
            deferred.append(ext)
    return extend, deferred


def quantiles(values: Sequence[float]) -> dict[float, float]:
    """Nearest-rank quantiles (QUANTILES) of `values`; all 0 for an empty fleet."""
    ordered = sorted(values)
    if not ordered:
        return dict.fromkeys(QUANTILES, 0.0)
    return {q: ordered[max(0, math.ceil(q * len(ordered)) - 1)] for q in QUANTILES}


def worst(risks: Sequence[Risk], limit: int) -> list[Risk]:
    """The riskiest driven runs first: no usable checkpoint at all, then most work at risk."""

    def key(risk: Risk) -> tuple[int, float, str]:
        if risk.work_at_risk_s is None:
            return (0, 0.0, risk.run_id)
        return (1, -risk.work_at_risk_s, risk.run_id)

    return sorted(risks, key=key)[:limit]
