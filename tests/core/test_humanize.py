"""The short wording used in decision reasons."""

from __future__ import annotations

import pytest
from policy_builders import NOW

from tinker_recovery.core import humanize


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        pytest.param(0, "0s", id="zero"),
        pytest.param(0.25, "250ms", id="sub-second"),
        pytest.param(2.5, "2.5s", id="fractional"),
        pytest.param(45, "45s", id="seconds"),
        pytest.param(90, "1m30s", id="minutes-and-seconds"),
        pytest.param(300, "5m", id="minutes"),
        pytest.param(3600 + 120, "1h2m", id="hours-and-minutes"),
        pytest.param(86400, "24h", id="a-day-in-hours"),
        pytest.param(-90, "-1m30s", id="negative"),
    ],
)
def test_duration(seconds: float, text: str) -> None:
    assert humanize.duration(seconds) == text


def test_instant_is_iso_to_the_second() -> None:
    assert humanize.instant(NOW.replace(microsecond=123)) == "2026-03-01T12:00:00+00:00"
