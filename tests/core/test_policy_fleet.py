"""plan_cycle across the fleet: operator holds, the incident breaker, the concurrency cap."""

from __future__ import annotations

from datetime import datetime

import pytest
from policy_builders import NOW, at, fleet, lineage, plan, rule, run, settings

from tinker_recovery.core import policy
from tinker_recovery.core.model import DecisionKind, Lineage, LineageState
from tinker_recovery.settings import BreakerSettings, PolicySettings

S = LineageState
K = DecisionKind


def corrupted_lineage(name: str, *, detected_s: float = -60, rule_name: str = "default") -> Lineage:
    return lineage(
        S.CORRUPTED,
        lineage_id=name,
        root_run_id=name,
        current_run_id=name,
        detected_at=at(detected_s),
        rule=rule_name,
    )


def observe(*known: Lineage, corrupted: bool = True) -> list[policy.Observation]:
    return [policy.Observation(run(k.current_run_id, corrupted=corrupted), k) for k in known]


# --- operator holds -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("view", "reason"),
    [
        pytest.param(fleet(fleet_held=True), "fleet paused by an operator", id="fleet-paused"),
        pytest.param(
            fleet(held_lineages=frozenset({"a"})), "paused by an operator", id="lineage-paused"
        ),
    ],
)
def test_operator_pause_holds_instead_of_starting(view: policy.FleetView, reason: str) -> None:
    decision = plan(observe(corrupted_lineage("a")), fleet_view=view).decisions[0]
    assert decision.kind is K.HOLD
    assert not decision.start_attempt
    assert decision.lineage.state is S.HELD
    assert decision.lineage.held_by_operator
    assert decision.lineage.reason == reason


def test_pausing_one_lineage_leaves_the_others_alone() -> None:
    view = fleet(held_lineages=frozenset({"a"}))
    kinds = [
        d.kind
        for d in plan(
            observe(corrupted_lineage("a"), corrupted_lineage("b")), fleet_view=view
        ).decisions
    ]
    assert kinds == [K.HOLD, K.RECOVER]


@pytest.mark.parametrize(
    ("known", "corrupted", "kind", "state"),
    [
        pytest.param(lineage(S.HEALTHY), False, K.HOLD, S.HELD, id="healthy-held"),
        pytest.param(lineage(S.SUSPECT), True, K.CONFIRM, S.HELD, id="confirms-while-held"),
        pytest.param(lineage(S.EXHAUSTED), True, K.EXHAUST, S.EXHAUSTED, id="exhausted-stays"),
        pytest.param(lineage(S.IGNORED), True, K.IGNORE, S.IGNORED, id="ignored-stays"),
        pytest.param(lineage(S.RECOVERING), True, K.WATCH, S.RECOVERING, id="executor-owned"),
    ],
)
def test_fleet_pause_by_state(known: Lineage, corrupted: bool, kind: K, state: S) -> None:
    decision = plan(
        [policy.Observation(run(corrupted=corrupted), known)], fleet_view=fleet(fleet_held=True)
    ).decisions[0]
    assert (decision.kind, decision.lineage.state) == (kind, state)


def test_confirmation_while_held_is_recorded() -> None:
    decision = plan(
        [policy.Observation(run(corrupted=True), lineage(S.SUSPECT))],
        fleet_view=fleet(fleet_held=True),
    ).decisions[0]
    assert decision.lineage.detected_at == NOW
    assert "2/2 corrupted reads" in decision.reason


def test_held_lineage_is_not_rewritten_every_cycle() -> None:
    view = fleet(fleet_held=True)
    first = plan(observe(corrupted_lineage("a")), fleet_view=view).decisions[0]
    second = plan(observe(first.lineage), fleet_view=view, now=at(30)).decisions[0]
    assert second.lineage is first.lineage


@pytest.mark.parametrize(
    ("held", "corrupted", "kind", "state"),
    [
        pytest.param(
            lineage(S.HELD, held_by_operator=True, corrupted_reads=2, detected_at=at(-60)),
            True,
            K.RECOVER,
            S.RECOVERING,
            id="confirmed-recovers",
        ),
        pytest.param(
            lineage(
                S.HELD,
                held_by_operator=True,
                corrupted_reads=2,
                detected_at=at(-60),
                next_attempt_at=at(60),
                attempt_starts=(at(-30),),
            ),
            True,
            K.WAIT,
            S.WAITING,
            id="backoff-resumes",
        ),
        pytest.param(
            lineage(S.HELD, held_by_operator=True, corrupted_reads=1, detected_at=None),
            True,
            K.RECOVER,
            S.RECOVERING,
            id="suspect-confirms-and-acts",
        ),
        pytest.param(
            lineage(S.HELD, held_by_operator=True, corrupted_reads=2, detected_at=at(-60)),
            False,
            K.WATCH,
            S.HEALTHY,
            id="healthy-again",
        ),
    ],
)
def test_resume_re_decides_from_the_recorded_facts(
    held: Lineage, corrupted: bool, kind: K, state: S
) -> None:
    decision = plan([policy.Observation(run(corrupted=corrupted), held)]).decisions[0]
    assert (decision.kind, decision.lineage.state) == (kind, state)
    assert not decision.lineage.held_by_operator


# --- concurrency cap and ordering ---------------------------------------------------------------


def test_concurrency_cap_counts_attempts_in_flight() -> None:
    decision = plan(
        observe(corrupted_lineage("a")),
        fleet_view=fleet(in_flight=4),
        cfg=settings(max_concurrent=4),
    ).decisions[0]
    assert decision.kind is K.WAIT
    assert decision.lineage.state is S.CORRUPTED
    assert decision.reason == "concurrency cap: 4 in flight + 0 starting >= 4"
    assert decision.lineage.reason == "waiting for a free slot (max_concurrent 4)"


def test_cap_admits_highest_priority_then_oldest_detection() -> None:
    cfg = settings(
        max_concurrent=2,
        rules=[rule("vip", priority=10, match={"run_id": "vip-*"}), rule("default")],
    )
    known = [
        corrupted_lineage("old", detected_s=-300),
        corrupted_lineage("new", detected_s=-10),
        corrupted_lineage("vip-late", detected_s=-5, rule_name="vip"),
    ]
    kinds = {d.lineage.lineage_id: d.kind for d in plan(observe(*known), cfg=cfg).decisions}
    assert kinds == {"vip-late": K.RECOVER, "old": K.RECOVER, "new": K.WAIT}


def test_decisions_keep_observation_order() -> None:
    known = [corrupted_lineage(n) for n in ("c", "a", "b")]
    ids = [d.lineage.lineage_id for d in plan(observe(*known)).decisions]
    assert ids == ["c", "a", "b"]


def test_due_waiting_lineage_over_the_cap_parks_as_corrupted() -> None:
    known = lineage(S.WAITING, next_attempt_at=at(-1), attempt_starts=(at(-100),))
    decision = plan(observe(known), fleet_view=fleet(in_flight=4)).decisions[0]
    assert (decision.kind, decision.lineage.state) == (K.WAIT, S.CORRUPTED)
    assert decision.lineage.next_attempt_at is None
    again = plan(observe(decision.lineage), fleet_view=fleet(in_flight=4), now=at(30)).decisions[0]
    assert again.lineage is decision.lineage  # parked and steady: nothing new to persist


# --- the incident breaker inside a cycle ---------------------------------------------------------


def _breaker(**fields: object) -> PolicySettings:
    return settings(breaker=BreakerSettings.model_validate(fields), max_concurrent=100)


def test_breaker_trips_on_this_cycles_confirmations() -> None:
    suspects = [lineage(S.SUSPECT, lineage_id=n, current_run_id=n) for n in "abc"]
    result = plan(
        observe(*suspects),
        fleet_view=fleet(recent_detections=(at(-100), at(-50), at(-400))),
        cfg=_breaker(threshold=4, window=300),
    )
    # Confirmed and acted on in the same cycle, through the now-open breaker's stagger (2/min).
    assert [d.kind for d in result.decisions] == [K.RECOVER, K.RECOVER, K.WAIT]
    assert all(d.lineage.detected_at == NOW for d in result.decisions)
    assert result.breaker_open
    assert result.breaker_opened_at == NOW
    assert "5 corruptions within 5m (threshold 4)" in result.breaker_reason


def test_breaker_at_threshold_stays_closed() -> None:
    result = plan(
        observe(corrupted_lineage("a")),
        fleet_view=fleet(recent_detections=(at(-1),) * 4),
        cfg=_breaker(threshold=4),
    )
    assert not result.breaker_open
    assert result.breaker_opened_at is None
    assert result.decisions[0].kind is K.RECOVER


def test_hold_mode_holds_every_candidate_with_a_breaker_reason() -> None:
    result = plan(
        observe(corrupted_lineage("a"), corrupted_lineage("b")),
        fleet_view=fleet(breaker_opened_at=at(-600)),
        cfg=_breaker(mode="hold"),
    )
    assert result.breaker_open
    assert result.breaker_opened_at == at(-600)  # stays open without new corruptions
    for decision in result.decisions:
        assert decision.kind is K.HOLD
        assert decision.lineage.state is S.HELD
        assert not decision.lineage.held_by_operator
        assert decision.lineage.reason.startswith("incident breaker")


def test_breaker_held_lineage_is_steady_then_recovers_after_resume() -> None:
    cfg = _breaker(mode="hold")
    held = plan(
        observe(corrupted_lineage("a")), fleet_view=fleet(breaker_opened_at=at(-60)), cfg=cfg
    )
    again = plan(
        observe(held.decisions[0].lineage),
        fleet_view=fleet(breaker_opened_at=at(-60)),
        cfg=cfg,
        now=at(30),
    )
    assert again.decisions[0].lineage is held.decisions[0].lineage
    # The operator resumes: the shell passes the breaker closed and the resume time.
    detections = tuple(at(-i) for i in range(10))
    resumed = plan(
        observe(held.decisions[0].lineage),
        fleet_view=fleet(recent_detections=detections, breaker_resumed_at=at(1)),
        cfg=cfg,
        now=at(60),
    )
    assert not resumed.breaker_open  # the incident that tripped it no longer counts
    assert resumed.decisions[0].kind is K.RECOVER


def test_stagger_admits_only_the_rate_per_interval_in_priority_order() -> None:
    cfg = _breaker(stagger_rate=2, stagger_interval=60)
    cfg = cfg.model_copy(
        update={"rules": [rule("vip", priority=5, match={"run_id": "vip*"}), rule("default")]}
    )
    known = [
        corrupted_lineage("b", detected_s=-20),
        corrupted_lineage("a", detected_s=-30),
        corrupted_lineage("vip", detected_s=-1, rule_name="vip"),
    ]
    result = plan(
        observe(*known),
        fleet_view=fleet(
            breaker_opened_at=at(-10),
            recent_detections=(at(-10),),
            recent_starts=(at(-30), at(-90)),
        ),
        cfg=cfg,
    )
    kinds = {d.lineage.lineage_id: d.kind for d in result.decisions}
    assert kinds == {"vip": K.RECOVER, "a": K.WAIT, "b": K.WAIT}  # one slot left of 2/1m
    waiting = next(d for d in result.decisions if d.lineage.lineage_id == "a")
    assert "2 starts of 2 per 1m used" in waiting.reason
    assert waiting.lineage.reason == "incident breaker: staggering restarts (2 per 1m)"


@pytest.mark.parametrize(
    ("last_detection", "still_open"),
    [
        pytest.param(at(-899), True, id="within-cool-down"),
        pytest.param(at(-900), False, id="cool-down-passed"),
    ],
)
def test_stagger_breaker_closes_after_quiet_cool_down(
    last_detection: datetime, still_open: bool
) -> None:
    result = plan(
        [],
        fleet_view=fleet(breaker_opened_at=at(-1000), recent_detections=(last_detection,)),
        cfg=_breaker(cool_down=900),
    )
    assert result.breaker_open is still_open
    assert (result.breaker_opened_at is not None) is still_open
