"""Table tests for the checkpoint guard, work at risk and stall detection (core/guard.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pydantic
import pytest

from tinker_recovery.core import guard
from tinker_recovery.core.model import TAG_RECOVERED_FROM, CheckpointKind, CheckpointView, RunView
from tinker_recovery.settings import GuardSettings, Rule

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
HOUR = 3600.0
DAY = 86400.0


def rule(name: str = "r", **knobs: Any) -> Rule:
    body: dict[str, Any] = {"name": name, "max_idle": DAY}
    body.update(knobs)
    return Rule.model_validate(body)


def run(
    run_id: str = "run-a",
    *,
    idle_s: float = 60.0,
    ckpt_age_s: float | None = 600.0,
    expires_in_s: float | None = 7 * DAY,
    kind: CheckpointKind = CheckpointKind.TRAINING,
    name: str = "000100",
    corrupted: bool = False,
    metadata: dict[str, str] | None = None,
) -> RunView:
    checkpoint = None
    if ckpt_age_s is not None:
        checkpoint = CheckpointView(
            checkpoint_id=f"weights/{name}",
            kind=kind,
            tinker_path=f"tinker://{run_id}/weights/{name}",
            time=NOW - timedelta(seconds=ckpt_age_s),
            expires_at=None if expires_in_s is None else NOW + timedelta(seconds=expires_in_s),
        )
    return RunView(
        run_id=run_id,
        base_model="Qwen/Qwen3-8B",
        owner="alice",
        is_lora=True,
        lora_rank=32,
        corrupted=corrupted,
        last_request_time=NOW - timedelta(seconds=idle_s),
        last_checkpoint=checkpoint,
        user_metadata=metadata or {},
    )


def plan(runs: list[RunView], rules: list[Rule], **kw: Any) -> guard.GuardPlan:
    return guard.plan(guard.match_all(runs, rules), NOW, **kw)


@pytest.mark.parametrize(
    ("view", "knobs", "expect_extension"),
    [
        pytest.param(run(expires_in_s=DAY), {}, True, id="expires-within-min-remaining"),
        pytest.param(run(expires_in_s=3 * DAY), {}, False, id="plenty-of-ttl-left"),
        pytest.param(run(expires_in_s=None), {}, False, id="never-expires"),
        pytest.param(run(expires_in_s=-1.0), {}, False, id="already-expired"),
        pytest.param(run(ckpt_age_s=None), {}, False, id="no-checkpoint"),
        pytest.param(
            run(expires_in_s=DAY, kind=CheckpointKind.SAMPLER), {}, False, id="sampler-weights"
        ),
        pytest.param(run(expires_in_s=DAY, idle_s=2 * DAY), {}, False, id="not-driven"),
        pytest.param(run(expires_in_s=DAY, corrupted=True), {}, False, id="corrupted"),
        pytest.param(run(expires_in_s=DAY), {"action": "alert"}, False, id="alert-rule"),
        pytest.param(
            run(expires_in_s=DAY), {"guard": {"enabled": False}}, False, id="guard-disabled"
        ),
        pytest.param(
            run(expires_in_s=DAY, idle_s=2 * DAY),
            {"max_idle": None, "guard": {"driven_within": "3d"}},
            True,
            id="driven-within-overrides",
        ),
    ],
)
def test_which_runs_get_an_extension(
    view: RunView, knobs: dict[str, Any], expect_extension: bool
) -> None:
    result = plan([view], [rule(**knobs)])
    assert bool(result.extend) is expect_extension
    if expect_extension:
        (ext,) = result.extend
        assert ext.tinker_path == f"tinker://{view.run_id}/weights/000100"
        assert ext.ttl_s == int(7 * DAY)


def test_the_extension_is_never_shorter_than_the_ttl_it_replaces() -> None:
    # min_remaining < extend_to is enforced, so anything due expires sooner than the new TTL.
    cfg = rule(guard={"min_remaining": "6d", "extend_to": "7d"})
    (ext,) = plan([run(expires_in_s=6 * DAY)], [cfg]).extend
    assert NOW + timedelta(seconds=ext.ttl_s) > ext.expires_at


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"extend_to": "30m", "min_remaining": "10m"}, id="below-the-api-minimum"),
        pytest.param({"extend_to": "2d", "min_remaining": "2d"}, id="not-longer-than-trigger"),
        pytest.param({"max_per_cycle": 0}, id="zero-rate"),
    ],
)
def test_unbounded_guard_settings_are_refused(body: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        GuardSettings.model_validate(body)


def test_rate_limit_takes_the_soonest_expiries_and_defers_the_rest() -> None:
    runs = [run(f"run-{i}", expires_in_s=HOUR * (10 - i)) for i in range(5)]
    result = plan(runs, [rule(guard={"max_per_cycle": 2})])
    assert [e.run_id for e in result.extend] == ["run-4", "run-3"]
    assert sorted(e.run_id for e in result.deferred) == ["run-0", "run-1", "run-2"]


def test_the_rate_limit_is_per_rule() -> None:
    a = rule("a", match={"labels": {"team": "a"}}, guard={"max_per_cycle": 1})
    b = rule("b", guard={"max_per_cycle": 1})
    runs = [
        run("a1", expires_in_s=HOUR, metadata={"team": "a"}),
        run("a2", expires_in_s=2 * HOUR, metadata={"team": "a"}),
        run("b1", expires_in_s=3 * HOUR),
    ]
    result = plan(runs, [a, b])
    assert sorted(e.run_id for e in result.extend) == ["a1", "b1"]
    assert [e.run_id for e in result.deferred] == ["a2"]


@pytest.mark.parametrize(
    ("kw", "held"),
    [
        pytest.param({"held_runs": {"run-a"}}, True, id="lineage-held"),
        pytest.param({"fleet_held": True}, True, id="fleet-held"),
        pytest.param({"held_runs": {"other"}}, False, id="another-lineage-held"),
    ],
)
def test_holds_mean_hands_off(kw: dict[str, Any], held: bool) -> None:
    result = plan([run(expires_in_s=HOUR)], [rule()], **kw)
    assert bool(result.held) is held
    assert bool(result.extend) is not held


@pytest.mark.parametrize(
    ("view", "expected"),
    [
        pytest.param(run(idle_s=60.0, ckpt_age_s=3600.0), 3540.0, id="last-request-minus-ckpt"),
        pytest.param(run(idle_s=7200.0, ckpt_age_s=3600.0), 0.0, id="saved-after-last-request"),
        pytest.param(run(ckpt_age_s=None), None, id="no-checkpoint"),
        pytest.param(run(expires_in_s=60.0), None, id="expiring-within-min-ttl"),
        pytest.param(run(kind=CheckpointKind.SAMPLER), None, id="sampler-only"),
    ],
)
def test_work_at_risk(view: RunView, expected: float | None) -> None:
    (risk,) = plan([view], [rule()]).risks
    assert risk.work_at_risk_s == expected


def test_work_at_risk_counts_only_driven_runs_under_recover_rules() -> None:
    runs = [run("driven"), run("idle", idle_s=2 * DAY), run("hurt", corrupted=True)]
    assert [r.run_id for r in plan(runs, [rule()]).risks] == ["driven"]
    assert plan(runs, [rule(action="alert")]).risks == ()


def test_quantiles_are_nearest_rank_and_zero_for_no_runs() -> None:
    assert guard.quantiles([]) == {0.5: 0.0, 0.9: 0.0, 0.99: 0.0, 1.0: 0.0}
    values = [float(v) for v in range(1, 101)]
    assert guard.quantiles(values) == {0.5: 50.0, 0.9: 90.0, 0.99: 99.0, 1.0: 100.0}


def test_worst_lists_runs_without_a_checkpoint_first_then_most_at_risk() -> None:
    runs = [run("small", ckpt_age_s=120.0), run("none", ckpt_age_s=None), run("big")]
    risks = plan(runs, [rule()]).risks
    assert [r.run_id for r in guard.worst(risks, 2)] == ["none", "big"]


STALL = {"stall_after": "2h"}


@pytest.mark.parametrize(
    ("view", "knobs", "stalled"),
    [
        pytest.param(run(idle_s=3 * HOUR), STALL, True, id="quiet-past-stall-after"),
        pytest.param(run(idle_s=HOUR), STALL, False, id="quiet-but-not-long-enough"),
        pytest.param(run(idle_s=3 * HOUR), {}, False, id="stall-detection-off"),
        pytest.param(run(idle_s=3 * HOUR, name="final"), STALL, False, id="finished"),
        pytest.param(run(idle_s=3 * HOUR, corrupted=True), STALL, False, id="corrupted"),
        pytest.param(run(idle_s=3 * DAY), STALL, False, id="long-idle-not-a-successor"),
        pytest.param(
            run(idle_s=3 * DAY, metadata={TAG_RECOVERED_FROM: "run-0"}),
            STALL,
            True,
            id="long-idle-tagged-successor",
        ),
        pytest.param(run(idle_s=3 * HOUR), {**STALL, "action": "ignore"}, False, id="ignored-runs"),
        pytest.param(run(idle_s=3 * HOUR), {**STALL, "action": "alert"}, True, id="alert-rule"),
    ],
)
def test_stall_detection(view: RunView, knobs: dict[str, Any], stalled: bool) -> None:
    assert bool(plan([view], [rule(**knobs)]).stalls) is stalled


def test_a_recovered_lineage_known_to_the_store_stays_stalled_past_the_window() -> None:
    view = run(idle_s=3 * DAY)
    (stall,) = plan([view], [rule(**STALL)], successors={"run-a"}).stalls
    assert stall.successor


def test_only_on_stall_recover_produces_a_reason_for_the_policy() -> None:
    view = run(idle_s=3 * HOUR)
    (alerting,) = plan([view], [rule(**STALL)]).stalls
    (recovering,) = plan([view], [rule(**STALL, on_stall="recover")]).stalls
    assert alerting.recover_reason is None
    assert recovering.recover_reason is not None
    assert recovering.recover_reason.startswith("stalled: no request for 3h")


def test_lookups_name_only_runs_that_need_attention() -> None:
    runs = [
        run("fine"),
        run("due", expires_in_s=HOUR),
        run("quiet", idle_s=3 * HOUR),
    ]
    matched = guard.match_all(runs, [rule(**STALL)])
    assert guard.lookups(matched, NOW) == ["due", "quiet"]
