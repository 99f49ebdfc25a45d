"""breaker.evaluate and stagger_allowance on their own."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import pytest
from policy_builders import NOW, at

from tinker_recovery.core import breaker
from tinker_recovery.settings import BreakerSettings

STAGGER = BreakerSettings(threshold=3, window=300, mode="stagger", cool_down=900)
HOLD = STAGGER.model_copy(update={"mode": "hold"})


@pytest.mark.parametrize(
    ("cfg", "opened_at", "detections", "resumed_at", "expect_opened", "words"),
    [
        pytest.param(
            STAGGER, None, [at(-1)] * 3, None, None, "closed: 3 corruptions", id="at-threshold"
        ),
        pytest.param(
            STAGGER, None, [at(-1)] * 4, None, NOW, "open (stagger): 4 corruptions", id="over-trips"
        ),
        pytest.param(
            STAGGER, None, [at(-301)] * 9, None, None, "closed: 0 corruptions", id="outside-window"
        ),
        pytest.param(STAGGER, None, [at(10)] * 9, None, None, "closed: 0", id="future-ignored"),
        pytest.param(
            STAGGER, at(-50), [at(-1)] * 9, None, at(-50), "open", id="keeps-first-open-time"
        ),
        pytest.param(
            STAGGER,
            at(-1000),
            [at(-100)],
            None,
            at(-1000),
            "last corruption 1m40s ago",
            id="cooling",
        ),
        pytest.param(
            STAGGER, at(-1000), [at(-950)], None, None, "no corruption for 15m50s", id="cooled"
        ),
        pytest.param(
            STAGGER, at(-100), [], None, at(-100), "open (stagger)", id="quiet-since-opening"
        ),
        pytest.param(
            HOLD, at(-99999), [], None, at(-99999), "open (hold) since", id="hold-stays-open"
        ),
        pytest.param(
            HOLD, None, [at(-5)] * 9, at(-1), None, "closed", id="resume-forgets-incident"
        ),
        pytest.param(
            HOLD,
            None,
            [at(-5)] * 9 + [at(0)] * 4,
            at(-1),
            NOW,
            "4 corruptions",
            id="new-incident-after-resume",
        ),
    ],
)
def test_evaluate(
    cfg: BreakerSettings,
    opened_at: datetime | None,
    detections: Sequence[datetime],
    resumed_at: datetime | None,
    expect_opened: datetime | None,
    words: str,
) -> None:
    state = breaker.evaluate(opened_at, detections, NOW, cfg, resumed_at=resumed_at)
    assert state.opened_at == expect_opened
    assert state.is_open is (expect_opened is not None)
    assert words in state.reason


@pytest.mark.parametrize(
    ("starts", "allowed"),
    [
        pytest.param([], 2, id="none-used"),
        pytest.param([at(-10)], 1, id="one-used"),
        pytest.param([at(-10), at(-20), at(-30)], 0, id="over-used-floors-at-zero"),
        pytest.param([at(-60), at(-61)], 2, id="outside-interval"),
    ],
)
def test_stagger_allowance(starts: Sequence[datetime], allowed: int) -> None:
    cfg = BreakerSettings(stagger_rate=2, stagger_interval=60)
    assert breaker.stagger_allowance(starts, NOW, cfg) == allowed
