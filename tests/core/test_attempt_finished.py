"""on_attempt_finished: what an attempt's outcome does to its lineage."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from policy_builders import NOW, RUN_ID, at, lineage, rule

from tinker_recovery.core import policy
from tinker_recovery.core.model import Attempt, AttemptOutcome, AttemptStep, Lineage, LineageState
from tinker_recovery.settings import BackoffSettings, Rule

S = LineageState
Out = AttemptOutcome
RULE = rule(max_attempts=3, window=86400, backoff=BackoffSettings(base=30, factor=2, cap=600))


def recovering(*starts_s: float) -> Lineage:
    starts = tuple(at(s) for s in starts_s)
    return lineage(S.RECOVERING, attempt_starts=starts, attempts_total=len(starts))


def attempt(
    outcome: AttemptOutcome | None, *, number: int = 1, started_s: float = -100, reason: str = "x"
) -> Attempt:
    return Attempt(
        attempt_id=f"{RUN_ID}-{number}",
        lineage_id=RUN_ID,
        number=number,
        corrupted_run_id=RUN_ID,
        step=AttemptStep.DONE,
        started_at=at(started_s),
        updated_at=NOW,
        successor_run_id="sess-9:train:0" if outcome is Out.SUCCEEDED else None,
        outcome=outcome,
        reason=reason,
    )


def finish(
    known: Lineage, done: Attempt, *, rand: float = 0.5, progressed: bool = False, cfg: Rule = RULE
) -> Lineage:
    return policy.on_attempt_finished(known, done, NOW, cfg, rand, progressed)


@pytest.mark.parametrize(
    ("progressed", "starts_after"),
    [
        pytest.param(True, (), id="progress-resets-budget"),
        pytest.param(False, (at(-500), at(-100)), id="no-progress-keeps-budget"),
    ],
)
def test_success_watches_the_successor(progressed: bool, starts_after: tuple[object, ...]) -> None:
    got = finish(recovering(-500, -100), attempt(Out.SUCCEEDED, number=2), progressed=progressed)
    assert got.state is S.HEALTHY
    assert got.current_run_id == "sess-9:train:0"
    assert got.root_run_id == RUN_ID
    assert got.attempt_starts == starts_after
    assert (got.detected_at, got.corrupted_reads, got.next_attempt_at) == (None, 0, None)
    assert got.updated_at == NOW
    assert got.reason.startswith("attempt 2 succeeded: watching run sess-9:train:0")


@pytest.mark.parametrize(
    ("starts_s", "rand", "delay_s", "words"),
    [
        pytest.param((-100,), 0.5, 15.0, "attempt 2/3 after a backoff of 15s", id="first-failure"),
        pytest.param((-900, -100), 0.5, 30.0, "attempt 3/3 after a backoff of 30s", id="second"),
        pytest.param((-100,), 0.0, 0.0, "backoff of 0s", id="jitter-floor"),
        pytest.param((-90000, -100), 0.5, 15.0, "attempt 2/3", id="old-start-not-counted"),
    ],
)
def test_failure_backs_off_with_full_jitter(
    starts_s: tuple[float, ...], rand: float, delay_s: float, words: str
) -> None:
    got = finish(recovering(*starts_s), attempt(Out.FAILED, reason="no successor"), rand=rand)
    assert got.state is S.WAITING
    assert got.next_attempt_at == NOW + timedelta(seconds=delay_s)
    assert words in got.reason
    assert "no successor" in got.reason


def test_failure_that_spends_the_budget_exhausts() -> None:
    got = finish(recovering(-3000, -2000, -100), attempt(Out.FAILED, number=3))
    assert got.state is S.EXHAUSTED
    assert got.next_attempt_at is None
    assert "3 attempts in 24h without progress (max_attempts 3)" in got.reason


@pytest.mark.parametrize(
    ("started_s", "starts_after"),
    [
        pytest.param(-100, (at(-500),), id="exact-start-removed"),
        pytest.param(-99, (at(-500),), id="newest-removed-when-stamped-later"),
    ],
)
def test_abandoned_attempt_is_not_charged(
    started_s: float, starts_after: tuple[object, ...]
) -> None:
    known = recovering(-500, -100)
    got = finish(known, attempt(Out.ABANDONED, number=2, started_s=started_s, reason="shutdown"))
    assert got.state is S.CORRUPTED
    assert got.attempt_starts == starts_after
    assert got.attempts_total == known.attempts_total  # numbers (and keys) are never reused
    assert "abandoned before the handoff (shutdown); not charged" in got.reason


def test_unfinished_attempt_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="no outcome"):
        finish(recovering(-100), attempt(None))


def test_hostile_attempt_reason_is_flattened_and_shortened() -> None:
    got = finish(recovering(-100), attempt(Out.FAILED, reason="line1\nline2\t" + "z" * 5000))
    assert "\n" not in got.reason
    assert "line1 line2" in got.reason
    assert len(got.reason) < 400


def test_backoff_delays_grow_then_cap_over_repeated_failures() -> None:
    cfg = rule(max_attempts=50, backoff=BackoffSettings(base=30, factor=2, cap=600))
    known = lineage(S.RECOVERING)
    delays = []
    for n in range(1, 8):
        known = replace(known, attempt_starts=(*known.attempt_starts, at(-n)), state=S.RECOVERING)
        known = finish(known, attempt(Out.FAILED, number=n), rand=0.999999, cfg=cfg)
        assert known.next_attempt_at is not None
        delays.append(round((known.next_attempt_at - NOW).total_seconds()))
    assert delays == [30, 60, 120, 240, 480, 600, 600]


def test_keyword_call_matches_the_published_signature() -> None:
    got = policy.on_attempt_finished(
        lineage=recovering(-100),
        attempt=attempt(Out.FAILED),
        now=NOW,
        rule=RULE,
        rand=0.0,
        progressed=False,
    )
    assert (got.state, got.next_attempt_at) == (S.WAITING, NOW)
