"""The attempt's exactly-once rules (core/attempt.py) as table tests."""

from __future__ import annotations

import pytest

from tinker_recovery.core import attempt as rules
from tinker_recovery.core.model import AttemptOutcome, AttemptStep

Verdict = rules.Verdict
S = rules.Sighting
C = rules.Clocks


@pytest.mark.parametrize(
    ("attempt_epoch", "leader_epoch", "is_leader", "allowed"),
    [
        pytest.param(3, 3, True, True, id="leading-in-its-epoch"),
        pytest.param(1, 3, True, False, id="regained-lease-old-attempt"),
        pytest.param(3, 3, False, False, id="lost-the-lease"),
        pytest.param(None, 5, True, True, id="unfenced-store"),
        pytest.param(None, None, False, False, id="unfenced-not-leading"),
    ],
)
def test_may_hand_off(
    attempt_epoch: int | None, leader_epoch: int | None, is_leader: bool, allowed: bool
) -> None:
    assert (
        rules.may_hand_off(
            attempt_epoch=attempt_epoch, leader_epoch=leader_epoch, is_leader=is_leader
        )
        is allowed
    )


@pytest.mark.parametrize(
    ("attempt_epoch", "current", "stale"),
    [
        pytest.param(1, 2, True, id="older-term"),
        pytest.param(2, 2, False, id="this-term"),
        pytest.param(None, 2, False, id="unfenced-attempt"),
        pytest.param(1, None, False, id="no-lease-known"),
    ],
)
def test_is_stale(attempt_epoch: int | None, current: int | None, stale: bool) -> None:
    assert rules.is_stale(attempt_epoch, current) is stale


@pytest.mark.parametrize("step", sorted(rules.BEFORE_HANDOFF))
def test_a_step_before_the_handoff_is_abandoned(step: AttemptStep) -> None:
    assert rules.settle(step) is rules.Settle.ABANDON
    assert rules.after_interruption(step, rules.Interruption.CANCELLED) is AttemptOutcome.ABANDONED
    assert rules.after_interruption(step, rules.Interruption.CRASHED) is AttemptOutcome.FAILED


@pytest.mark.parametrize(
    "step", [AttemptStep.HANDING_OFF, AttemptStep.HANDED_OFF, AttemptStep.CONFIRMING]
)
def test_from_the_handoff_on_an_attempt_is_only_ever_confirmed(step: AttemptStep) -> None:
    assert rules.settle(step) is rules.Settle.CONFIRM
    assert rules.after_interruption(step, rules.Interruption.CANCELLED) is None
    assert rules.after_interruption(step, rules.Interruption.CRASHED) is None


def test_a_withheld_handoff_is_abandoned_it_never_happened() -> None:
    outcome = rules.after_interruption(AttemptStep.HANDING_OFF, rules.Interruption.WITHHELD)
    assert outcome is AttemptOutcome.ABANDONED


@pytest.mark.parametrize(
    ("sighting", "clocks", "verdict"),
    [
        pytest.param(S(present=True, progressed=True), C(False), Verdict.SUCCEED, id="progress"),
        pytest.param(S(present=True), C(False), Verdict.WAIT, id="present-no-progress-yet"),
        pytest.param(
            S(present=True), C(True), Verdict.FAIL_SUSPECT, id="present-no-progress-deadline"
        ),
        pytest.param(
            S(present=True, corrupted=True), C(False), Verdict.FAIL_SUSPECT, id="corrupted-at-once"
        ),
        pytest.param(
            S(present=True, corrupted=True, progressed=True),
            C(False),
            Verdict.FAIL_SUSPECT,
            id="corrupted-requests-are-not-enough",
        ),
        pytest.param(
            S(present=True, corrupted=True, progressed=True, checkpointed=True),
            C(False),
            Verdict.SUCCEED,
            id="corrupted-after-a-newer-checkpoint",
        ),
        pytest.param(S(present=False), C(False), Verdict.WAIT, id="not-yet"),
        pytest.param(S(present=False), C(True), Verdict.FAIL, id="never-appeared"),
        pytest.param(
            S(present=False, seen_before=True),
            C(False, handoff_failed=True, grace_over=True),
            Verdict.WAIT,
            id="seen-then-missing-in-grace",
        ),
        pytest.param(
            S(present=False, seen_before=True), C(False), Verdict.WAIT, id="seen-then-missing"
        ),
        pytest.param(
            S(present=False, seen_before=True),
            C(True),
            Verdict.FAIL_SUSPECT,
            id="seen-then-gone-at-deadline",
        ),
        pytest.param(S(present=False), C(False, handoff_failed=True), Verdict.WAIT, id="in-grace"),
        pytest.param(
            S(present=False),
            C(False, handoff_failed=True, grace_over=True),
            Verdict.FAIL,
            id="grace-over-nothing-seen",
        ),
    ],
)
def test_confirm(sighting: rules.Sighting, clocks: rules.Clocks, verdict: rules.Verdict) -> None:
    assert rules.confirm(sighting, clocks) is verdict
