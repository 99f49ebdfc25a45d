"""tinker-cookbook 0.6.1's supervised loop, unmodified, corrupted mid-run and recovered by a
real daemon through a launcher (tests/cookbook/relaunch.py), as issue 10 item 7 asks:
(i) through `tinker-recovery exec`, (ii) with no integration at all (and the ambiguous case of
two such jobs), (iii) with the newest checkpoint unloadable, `restore: none` and `sdk`.

The scenarios live in cookbook/recovery.py (benchmarks/cookbook_scenarios.py runs the same
ones and prints their figures); each asserts its claims itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cookbook import recovery

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(autouse=True)
def _cookbook(cookbook_interpreter: Path) -> None:
    """Fail (not skip) without .venv-cookbook."""


def test_through_exec_one_handoff_resumes_from_the_daemons_checkpoint_not_the_last_line(
    tmp_path: Path,
) -> None:
    figures = recovery.through_exec(tmp_path)
    assert (figures.handoffs, figures.healthy_killed) == (1, 0)
    assert figures.resumed_from == "000004 (batch 4)"


def test_no_integration_successor_matched_confirmed_and_never_restarted(tmp_path: Path) -> None:
    figures = recovery.no_integration(tmp_path)
    assert (figures.handoffs, figures.healthy_killed) == (1, 0)
    assert figures.outcome == "succeeded"


def test_two_matching_jobs_resuming_at_once_hold_the_lineage_without_a_guess(
    tmp_path: Path,
) -> None:
    figures = recovery.ambiguous(tmp_path)
    assert (figures.handoffs, figures.healthy_killed) == (1, 0)
    assert figures.outcome == "failed"


@pytest.mark.parametrize("restore", ["none", "sdk"])
def test_unloadable_newest_checkpoint_recovers_from_the_one_before(
    tmp_path: Path, restore: str
) -> None:
    figures = recovery.unloadable(tmp_path, restore)
    assert figures.healthy_killed == 0
    assert figures.resumed_from == "000002 (batch 2)"
    # restore: none: the job dies loading 000004 (no run is made), twice in a row, which marks
    # it suspect (3df2bbd); the third handoff is 000002. restore: sdk: the daemon's own restore
    # of 000004 fails, so it hands off its one copy of 000002 at once.
    expected = {"none": "failed,failed,succeeded", "sdk": "succeeded"}[restore]
    assert figures.outcome == expected
