"""Property checks by looping seeds: invariants plan_cycle keeps for any fleet it is shown."""

from __future__ import annotations

import random
from datetime import timedelta

from policy_builders import NOW, at, lineage, rule, run, settings

from tinker_recovery.core import breaker, policy
from tinker_recovery.core import lineage as lineage_mod
from tinker_recovery.core.model import (
    Attempt,
    AttemptOutcome,
    AttemptStep,
    DecisionKind,
    Lineage,
    LineageState,
    RunView,
)
from tinker_recovery.settings import BreakerSettings, PolicySettings

S = LineageState
K = DecisionKind
SEEDS = range(400)


def random_lineage(rng: random.Random, name: str) -> Lineage:
    state = rng.choice(list(S))
    starts = tuple(sorted(at(-rng.uniform(0, 200_000)) for _ in range(rng.randint(0, 4))))
    return lineage(
        state,
        lineage_id=name,
        root_run_id=name,
        current_run_id=name,
        attempt_starts=starts,
        attempts_total=len(starts) + rng.randint(0, 3),
        next_attempt_at=at(rng.uniform(-300, 300)) if rng.random() < 0.5 else None,
        held_by_operator=state is S.HELD and rng.random() < 0.5,
        preexisting=rng.random() < 0.2,
    )


def random_cycle(
    rng: random.Random,
) -> tuple[list[policy.Observation], policy.FleetView, PolicySettings]:
    observations = []
    for i in range(rng.randint(0, 12)):
        name = f"run-{i}"
        known = random_lineage(rng, name) if rng.random() < 0.8 else None
        seen: RunView | None = run(
            name, corrupted=rng.random() < 0.7, idle_s=rng.uniform(0, 200_000)
        )
        if known is not None and rng.random() < 0.15:
            seen = None  # absent from the poll
        observations.append(policy.Observation(seen, known))
    view = policy.FleetView(
        in_flight=rng.randint(0, 5),
        recent_detections=tuple(at(-rng.uniform(0, 1000)) for _ in range(rng.randint(0, 10))),
        recent_starts=tuple(at(-rng.uniform(0, 120)) for _ in range(rng.randint(0, 3))),
        breaker_opened_at=at(-rng.uniform(0, 2000)) if rng.random() < 0.3 else None,
        fleet_held=rng.random() < 0.1,
        held_lineages=frozenset(f"run-{i}" for i in range(12) if rng.random() < 0.1),
        watch_started_at=at(-rng.uniform(0, 600)) if rng.random() < 0.3 else None,
    )
    cfg = settings(
        dry_run=rng.random() < 0.15,
        confirmations=rng.randint(1, 3),
        max_concurrent=rng.randint(1, 6),
        breaker=BreakerSettings(
            threshold=rng.randint(1, 8),
            mode=rng.choice(["stagger", "hold"]),
            stagger_rate=rng.randint(1, 3),
        ),
        rules=[
            rule("hi", priority=5, match={"run_id": "run-1*"}, max_attempts=rng.randint(1, 4)),
            rule("alerts", match={"run_id": "run-2"}, action="alert"),
            rule("rest", recover_preexisting=rng.random() < 0.5),
        ],
    )
    return observations, view, cfg


def test_plan_invariants_hold_for_random_fleets() -> None:
    for seed in SEEDS:
        rng = random.Random(seed)
        observations, view, cfg = random_cycle(rng)
        result = policy.plan_cycle(observations, view, NOW, cfg, rng.random)
        _check(observations, view, cfg, result, seed)


def _check(
    observations: list[policy.Observation],
    view: policy.FleetView,
    cfg: PolicySettings,
    result: policy.CyclePlan,
    seed: int,
) -> None:
    ctx = f"seed {seed}"
    assert len(result.decisions) == len(observations), ctx
    starts = [d for d in result.decisions if d.start_attempt]
    assert len(starts) <= max(0, cfg.max_concurrent - view.in_flight), ctx
    if cfg.dry_run or (result.breaker_open and cfg.breaker.mode == "hold"):
        assert not starts, ctx
    if result.breaker_open and cfg.breaker.mode == "stagger":
        assert len(starts) <= breaker.stagger_allowance(view.recent_starts, NOW, cfg.breaker), ctx
    for obs, decision in zip(observations, result.decisions, strict=True):
        before, after = obs.lineage, decision.lineage
        assert decision.reason, ctx
        assert after.reason, ctx
        assert decision.start_attempt is (decision.kind is K.RECOVER), ctx
        assert after is before or after.updated_at == NOW, ctx
        if obs.run is None:
            assert (decision.kind, after) == (K.UNKNOWN, before), ctx
            continue
        assert after.lineage_id == (before.lineage_id if before else obs.run.run_id), ctx
        if before is not None and before.state in lineage_mod.EXECUTOR_STATES:
            assert after is before, ctx
        if decision.start_attempt:
            _check_start(before, after, view, cfg, ctx)


def _check_start(
    before: Lineage | None,
    after: Lineage,
    view: policy.FleetView,
    cfg: PolicySettings,
    ctx: str,
) -> None:
    if before is None or before.state in (S.HEALTHY, S.SUSPECT):
        # Only the read that completes the confirmation may start an attempt at once.
        assert after.detected_at == NOW, ctx
        assert after.corrupted_reads >= cfg.confirmations, ctx
    else:
        assert before.state in (S.CORRUPTED, S.WAITING, S.HELD), ctx
    assert after.lineage_id not in view.held_lineages, ctx
    assert not view.fleet_held, ctx
    assert after.state is S.RECOVERING, ctx
    assert after.attempts_total == (before.attempts_total if before else 0) + 1, ctx
    matched = next(r for r in cfg.rules if r.name == after.rule)
    assert matched.action == "recover", ctx
    used = lineage_mod.attempts_in_window(after.attempt_starts, NOW, matched.window)
    assert used <= matched.max_attempts, ctx


def test_no_attempt_without_enough_consecutive_corrupted_reads() -> None:
    """Multi-cycle simulation: flaky reads and gaps never start an attempt early."""
    for seed in SEEDS:
        rng = random.Random(seed)
        cfg = settings(confirmations=rng.randint(1, 4), rules=[rule(max_attempts=3)])
        known: Lineage | None = None
        streak = 0  # consecutive corrupted reads on successful polls since the last healthy one
        now = NOW
        for _ in range(40):
            now += timedelta(seconds=30)
            roll = rng.random()
            seen = None if roll < 0.2 and known is not None else run(corrupted=roll < 0.75)
            fleet_view = policy.FleetView(0, (), (), None)
            decision = policy.plan_cycle(
                [policy.Observation(seen, known)], fleet_view, now, cfg, rng.random
            ).decisions[0]
            if seen is not None:
                streak = streak + 1 if seen.corrupted else 0
            if decision.start_attempt:
                assert streak >= cfg.confirmations, f"seed {seed}: started after {streak} reads"
            known = _finish_at_random(rng, decision.lineage, cfg)


def _finish_at_random(rng: random.Random, current: Lineage, cfg: PolicySettings) -> Lineage:
    """Play the executor: a started attempt ends at once with a random outcome."""
    if current.state is not S.RECOVERING:
        return current
    assert current.attempt_starts
    outcome = rng.choice([AttemptOutcome.FAILED, AttemptOutcome.ABANDONED])
    done = Attempt(
        attempt_id=f"a{current.attempts_total}",
        lineage_id=current.lineage_id,
        number=current.attempts_total,
        corrupted_run_id=current.current_run_id,
        step=AttemptStep.DONE,
        started_at=current.attempt_starts[-1],
        updated_at=current.updated_at,
        outcome=outcome,
        reason="simulated",
    )
    finished = policy.on_attempt_finished(
        current, done, current.updated_at, cfg.rules[0], rng.random(), progressed=False
    )
    assert finished.reason
    return finished


def test_budget_is_never_exceeded_across_many_cycles() -> None:
    """Every attempt fails: the lineage ends EXHAUSTED after exactly max_attempts starts."""
    for seed in range(50):
        rng = random.Random(seed)
        max_attempts = rng.randint(1, 5)
        cfg = settings(confirmations=1, rules=[rule(max_attempts=max_attempts)])
        known: Lineage | None = None
        now = NOW
        started = 0
        for _ in range(200):
            now += timedelta(seconds=rng.uniform(1, 400))
            decision = policy.plan_cycle(
                [policy.Observation(run(corrupted=True), known)],
                policy.FleetView(0, (), (), None),
                now,
                cfg,
                rng.random,
            ).decisions[0]
            known = decision.lineage
            if decision.start_attempt:
                started += 1
                known = _fail(known, cfg, rng.random())
        assert known is not None
        assert known.state is S.EXHAUSTED, f"seed {seed}"
        assert started == max_attempts, f"seed {seed}"


def _fail(current: Lineage, cfg: PolicySettings, rand: float) -> Lineage:
    done = Attempt(
        attempt_id="x",
        lineage_id=current.lineage_id,
        number=current.attempts_total,
        corrupted_run_id=current.current_run_id,
        step=AttemptStep.DONE,
        started_at=current.attempt_starts[-1],
        updated_at=current.updated_at,
        outcome=AttemptOutcome.FAILED,
        reason="no successor",
    )
    return policy.on_attempt_finished(current, done, current.updated_at, cfg.rules[0], rand, False)
