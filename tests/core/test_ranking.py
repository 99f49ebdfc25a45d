"""Table tests for checkpoint ranking and validation (core/ranking.py)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from tinker_recovery.core import ranking
from tinker_recovery.core.model import CheckpointKind, CheckpointView, RunView, WeightsInfo
from tinker_recovery.core.ranking import RejectionReason
from tinker_recovery.settings import CheckpointSettings

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
CFG = CheckpointSettings(min_ttl=600.0, max_age=None)


def ckpt(
    name: str,
    *,
    age_s: float,
    kind: CheckpointKind = CheckpointKind.TRAINING,
    expires_in_s: float | None = None,
    run: str = "run-a",
) -> CheckpointView:
    return CheckpointView(
        checkpoint_id=f"weights/{name}",
        kind=kind,
        tinker_path=f"tinker://{run}/weights/{name}",
        time=NOW - timedelta(seconds=age_s),
        expires_at=None if expires_in_s is None else NOW + timedelta(seconds=expires_in_s),
    )


def names(checkpoints: list[CheckpointView]) -> list[str]:
    return [c.tinker_path.rsplit("/", 1)[-1] for c in checkpoints]


@pytest.mark.parametrize(
    ("checkpoints", "cfg", "bad", "expected"),
    [
        pytest.param(
            [ckpt("010", age_s=300), ckpt("030", age_s=100), ckpt("020", age_s=200)],
            CFG,
            set(),
            ["030", "020", "010"],
            id="newest-first",
        ),
        pytest.param(
            [ckpt("030", age_s=100, kind=CheckpointKind.SAMPLER), ckpt("020", age_s=200)],
            CFG,
            set(),
            ["020"],
            id="sampler-weights-skipped",
        ),
        pytest.param(
            [ckpt("030", age_s=100, kind=CheckpointKind.EXTERNAL), ckpt("020", age_s=200)],
            CFG,
            set(),
            ["020"],
            id="external-skipped",
        ),
        pytest.param(
            [ckpt("030", age_s=100, expires_in_s=-1), ckpt("020", age_s=200)],
            CFG,
            set(),
            ["020"],
            id="expired-skipped",
        ),
        pytest.param(
            [ckpt("030", age_s=100, expires_in_s=599), ckpt("020", age_s=200)],
            CFG,
            set(),
            ["020"],
            id="expiring-within-min-ttl-skipped",
        ),
        pytest.param(
            [ckpt("030", age_s=100, expires_in_s=601), ckpt("020", age_s=200)],
            CFG,
            set(),
            ["030", "020"],
            id="expiring-after-min-ttl-kept",
        ),
        pytest.param(
            [ckpt("030", age_s=100), ckpt("020", age_s=7200)],
            CheckpointSettings(min_ttl=0.0, max_age=3600.0),
            set(),
            ["030"],
            id="older-than-max-age-skipped",
        ),
        pytest.param(
            [ckpt("030", age_s=100), ckpt("020", age_s=200)],
            CFG,
            {"tinker://run-a/weights/030"},
            ["020"],
            id="bad-skipped",
        ),
        pytest.param(
            [ckpt("030", age_s=100), ckpt("030", age_s=100), ckpt("020", age_s=200)],
            CFG,
            set(),
            ["030", "020"],
            id="duplicates-once",
        ),
        pytest.param(
            [ckpt("030", age_s=100, kind=CheckpointKind.SAMPLER)],
            CFG,
            set(),
            [],
            id="nothing-usable",
        ),
    ],
)
def test_rank_checkpoints(
    checkpoints: list[CheckpointView],
    cfg: CheckpointSettings,
    bad: set[str],
    expected: list[str],
) -> None:
    ranked = ranking.rank_checkpoints(checkpoints, now=NOW, cfg=cfg, bad=bad)
    assert names(ranked) == expected


def test_rank_breaks_time_ties_by_path_regardless_of_input_order() -> None:
    a = ckpt("000", age_s=100, run="run-a")
    b = ckpt("000", age_s=100, run="run-b")
    assert ranking.rank_checkpoints([a, b], now=NOW, cfg=CFG, bad=()) == ranking.rank_checkpoints(
        [b, a], now=NOW, cfg=CFG, bad=()
    )


RUN = RunView(
    run_id="run-a",
    base_model="Qwen/Qwen3-8B",
    owner="team",
    is_lora=True,
    lora_rank=32,
    corrupted=True,
    last_request_time=NOW,
)


BASE_INFO = WeightsInfo(
    base_model="Qwen/Qwen3-8B", is_lora=True, lora_rank=32, has_optimizer_state=True
)


@pytest.mark.parametrize(
    ("weights", "restore_optimizer", "expected"),
    [
        pytest.param(BASE_INFO, True, None, id="matching"),
        pytest.param(
            replace(BASE_INFO, base_model="Qwen/Qwen3-32B"),
            True,
            RejectionReason.BASE_MODEL_MISMATCH,
            id="other-base-model",
        ),
        pytest.param(
            replace(BASE_INFO, lora_rank=64),
            True,
            RejectionReason.LORA_RANK_MISMATCH,
            id="other-rank",
        ),
        pytest.param(
            replace(BASE_INFO, is_lora=False, lora_rank=None),
            True,
            RejectionReason.LORA_MISMATCH,
            id="full-vs-lora",
        ),
        pytest.param(
            replace(BASE_INFO, lora_rank=None), True, None, id="rank-unknown-not-a-mismatch"
        ),
        pytest.param(
            replace(BASE_INFO, has_optimizer_state=False),
            True,
            RejectionReason.OPTIMIZER_STATE_MISSING,
            id="optimizer-required-missing",
        ),
        pytest.param(
            replace(BASE_INFO, has_optimizer_state=False),
            False,
            None,
            id="optimizer-not-required-missing",
        ),
    ],
)
def test_rejection_reason(
    weights: WeightsInfo, restore_optimizer: bool, expected: RejectionReason | None
) -> None:
    assert ranking.rejection_reason(RUN, weights, restore_optimizer=restore_optimizer) == expected
