"""Table tests for checkpoint retention (core/retention.py): which checkpoints prune deletes."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from tinker_recovery.core import retention
from tinker_recovery.core.model import (
    Attempt,
    AttemptOutcome,
    AttemptStep,
    CheckpointKind,
    CheckpointView,
    Lineage,
    LineageState,
)
from tinker_recovery.core.retention import DeleteReason, KeepReason
from tinker_recovery.settings import CheckpointSettings

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
CFG = CheckpointSettings(min_ttl=600.0, max_age=None)
ROOT = "root:train:0"
SUCC = "succ:train:0"

LINEAGE = Lineage(
    lineage_id="lin",
    root_run_id=ROOT,
    current_run_id=SUCC,
    state=LineageState.HEALTHY,
    reason="test fixture",
    first_seen_at=NOW - timedelta(days=3),
    updated_at=NOW - timedelta(hours=1),
)


def path(name: str) -> str:
    """ "r10" -> tinker://root:train:0/weights/000010, "s40" -> the successor's; a trailing "S"
    names the sampler checkpoint of that step."""
    run = ROOT if name[0] == "r" else SUCC
    segment = "sampler_weights" if name.endswith("S") else "weights"
    return f"tinker://{run}/{segment}/{int(name[1:].rstrip('S')):06d}"


def ckpt(name: str, *, expires_in_s: float | None = None, size: int | None = 100) -> CheckpointView:
    step = int(name[1:].rstrip("S"))
    kind = CheckpointKind.SAMPLER if name.endswith("S") else CheckpointKind.TRAINING
    return CheckpointView(
        checkpoint_id=path(name).split("/", 3)[3],
        kind=kind,
        tinker_path=path(name),
        time=NOW - timedelta(hours=100 - step),
        expires_at=None if expires_in_s is None else NOW + timedelta(seconds=expires_in_s),
        size_bytes=size,
    )


def attempt(
    checkpoint: str | None = "r20", *, outcome: AttemptOutcome | None = AttemptOutcome.SUCCEEDED
) -> Attempt:
    return Attempt(
        attempt_id="att-1",
        lineage_id="lin",
        number=1,
        corrupted_run_id=ROOT,
        step=AttemptStep.DONE if outcome is not None else AttemptStep.HANDED_OFF,
        started_at=NOW - timedelta(hours=50),
        updated_at=NOW - timedelta(hours=49),
        checkpoint_path=None if checkpoint is None else path(checkpoint),
        handed_off_path=None if checkpoint is None else path(checkpoint),
        successor_run_id=SUCC,
        outcome=outcome,
    )


FLEET = [ckpt(n) for n in ("r10", "r20", "r20S", "r30", "s40", "s50", "s60", "s70")]


def verdicts(
    checkpoints: list[CheckpointView] = FLEET,
    attempts: tuple[Attempt, ...] = (),
    *,
    keep: int = 3,
    is_held: bool = False,
    bad: frozenset[str] = frozenset(),
    requested: frozenset[str] = frozenset(),
    lineage: Lineage = LINEAGE,
) -> dict[str, str]:
    plan = retention.plan(
        lineage,
        checkpoints,
        list(attempts),
        is_held=is_held,
        keep=keep,
        now=NOW,
        cfg=CFG,
        bad=bad,
        requested=requested,
    )
    by_path = {path(n): n for n in ("r10", "r20", "r20S", "r30", "s40", "s50", "s60", "s70")}
    return {by_path[v.checkpoint.tinker_path]: str(v.reason) for v in plan.verdicts}


K, N, D = KeepReason, KeepReason.NEWEST, DeleteReason.BEYOND_KEEP


@pytest.mark.parametrize(
    ("got", "expected"),
    [
        pytest.param(
            verdicts(),
            {"s70": K.GUARDED, "s60": N, "s50": N, "s40": D, "r30": D, "r20S": K.NOT_TRAINING}
            | {"r20": D, "r10": D},
            id="newest-k-usable-kept-sampler-left-alone",
        ),
        pytest.param(
            verdicts(attempts=(attempt("r20"),)),
            {"s70": K.GUARDED, "s60": N, "s50": N, "s40": D, "r30": D, "r20S": K.NOT_TRAINING}
            | {"r20": K.USED_BY_ATTEMPT, "r10": D},
            id="used-by-a-finished-attempt-kept",
        ),
        pytest.param(
            verdicts(attempts=(attempt("r20", outcome=None),)),
            dict.fromkeys(("s70", "s60", "s50", "s40", "r30", "r20S", "r20", "r10"), K.IN_FLIGHT),
            id="unfinished-attempt-keeps-everything",
        ),
        pytest.param(
            verdicts(is_held=True),
            dict.fromkeys(("s70", "s60", "s50", "s40", "r30", "r20S", "r20", "r10"), K.HELD),
            id="held-lineage-keeps-everything",
        ),
        pytest.param(
            verdicts([ckpt("s40"), ckpt("s50")], keep=3),
            {"s50": K.GUARDED, "s40": N},
            id="fewer-than-k-all-kept",
        ),
        pytest.param(
            verdicts(
                [
                    *(ckpt("r10"), ckpt("r20"), ckpt("s40", expires_in_s=-60), ckpt("s50")),
                    *(ckpt("s60", expires_in_s=120), ckpt("s70")),
                ],
                keep=2,
            ),
            {"s70": K.GUARDED, "s60": DeleteReason.EXPIRED, "s50": N, "s40": DeleteReason.EXPIRED}
            | {"r20": D, "r10": D},
            id="expired-and-expiring-do-not-count-toward-k-and-are-deletable",
        ),
        pytest.param(
            verdicts([ckpt("s50"), ckpt("s60"), ckpt("s70")], keep=1, bad=frozenset({path("s60")})),
            {"s70": K.GUARDED, "s60": DeleteReason.UNUSABLE, "s50": D},
            id="bad-checkpoint-is-not-usable-and-deletable",
        ),
        pytest.param(
            verdicts([ckpt("s70", expires_in_s=-1), ckpt("s60"), ckpt("s50")], keep=1),
            {"s70": DeleteReason.EXPIRED, "s60": K.GUARDED, "s50": D},
            id="guard-keeps-newest-live-one-of-current-run",
        ),
        pytest.param(
            verdicts(keep=1, requested=frozenset({path("r10")})),
            {"s70": K.GUARDED, "s60": D, "s50": D, "s40": D, "r30": D, "r20S": K.NOT_TRAINING}
            | {"r20": D, "r10": K.REQUESTED},
            id="operator-requested-checkpoint-kept",
        ),
        pytest.param(
            verdicts(keep=1, lineage=replace(LINEAGE, current_run_id=ROOT)),
            {"s70": N, "s60": D, "s50": D, "s40": D, "r30": K.GUARDED, "r20S": K.NOT_TRAINING}
            | {"r20": D, "r10": D},
            id="newest-usable-of-lineage-kept-even-if-not-current-run",
        ),
    ],
)
def test_plan_keeps_and_deletes(got: dict[str, str], expected: dict[str, str]) -> None:
    assert got == {name: str(reason) for name, reason in expected.items()}


def test_the_newest_usable_checkpoint_is_never_deleted() -> None:
    """Even with keep=1 and no guard (current run has no checkpoints), the newest stays."""
    plan = retention.plan(
        replace(LINEAGE, current_run_id="other:train:0"),
        FLEET,
        [],
        is_held=False,
        keep=1,
        now=NOW,
        cfg=CFG,
    )
    kept = [v.checkpoint.tinker_path for v in plan.verdicts if not v.is_delete]
    assert kept == [path("s70"), path("r20S")]


def test_frees_counts_sizes_and_unknown_ones() -> None:
    checkpoints = [ckpt("s70"), ckpt("s60", size=None), ckpt("s50", size=250), ckpt("s40")]
    plan = retention.plan(LINEAGE, checkpoints, [], is_held=False, keep=1, now=NOW, cfg=CFG)
    assert [v.checkpoint.tinker_path for v in plan.to_delete] == [
        path(n) for n in ("s60", "s50", "s40")
    ]
    assert (plan.frees_bytes, plan.unknown_sizes) == (350, 1)


def test_runs_of_a_lineage_include_attempts_runs_once() -> None:
    restored = replace(attempt("r20"), handed_off_path="tinker://restored:train:0/weights/fresh")
    assert retention.lineage_runs(LINEAGE, [restored]) == (ROOT, SUCC, "restored:train:0")


def test_keep_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        retention.plan(LINEAGE, FLEET, [], is_held=False, keep=0, now=NOW, cfg=CFG)
