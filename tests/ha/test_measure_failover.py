"""A short run of the failover measurement (measure_failover.py): three SIGKILLs mid-attempt.

No timing is asserted here (the figures are printed; run with -s); what must hold on every run
is that no corrupted run was handed off twice and every one recovered.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ha.measure_failover import measure, measure_flap

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(120)]


def test_three_leader_kills_mid_attempt_no_duplicate_handoff(tmp_path: Path) -> None:
    figures = measure(3, tmp_path)
    print(f"\n{figures.summary()}")  # noqa: T201 - the figures are this test's report
    assert len(figures.failover_s) == 3
    assert figures.corrupted == 3
    assert figures.handoffs == 3
    assert figures.duplicates == 0


def test_lease_flaps_mid_attempt_no_duplicate_handoff(tmp_path: Path) -> None:
    """The leader frozen past the TTL, once while validating (before its handoff) and once while
    its job starts (after it); thawed with its tasks running; then it regains the lease."""
    figures = measure_flap(2, tmp_path)
    print(f"\n{figures.summary()}")  # noqa: T201 - the figures are this test's report
    assert figures.phases == {"validating": 1, "handing_off": 1}
    assert figures.counts.corrupted == 2
    assert figures.counts.handoffs == 2
    assert figures.counts.duplicates == 0
