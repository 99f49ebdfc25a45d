"""Table tests for checkpoint ranking and validation (core/ranking.py)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from tinker_recovery.core import ranking
from tinker_recovery.core.model import (
    TAG_IDEMPOTENCY_KEY,
    TAG_LINEAGE,
    Attempt,
    AttemptStep,
    CheckpointKind,
    CheckpointView,
    Lineage,
    LineageState,
    RunView,
    WeightsInfo,
)
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


# successors --------------------------------------------------------------------------------

KEY = "lin#1-abc"
ATTEMPT = Attempt(
    attempt_id=KEY,
    lineage_id="lin",
    number=1,
    corrupted_run_id="run-a",
    step=AttemptStep.CONFIRMING,
    started_at=NOW,
    updated_at=NOW,
    checkpoint_path="tinker://run-a/weights/030",
    checkpoint_time=NOW - timedelta(hours=1),
    handed_off_path="tinker://run-a/weights/030",
)


def listed(run_id: str, metadata: dict[str, str] | None = None, *, active_s: float = 60) -> RunView:
    return replace(
        RUN,
        run_id=run_id,
        corrupted=False,
        last_request_time=NOW + timedelta(seconds=active_s),
        user_metadata=metadata or {},
    )


KEYED = {TAG_LINEAGE: "lin", TAG_IDEMPOTENCY_KEY: KEY}


@pytest.mark.parametrize(
    ("runs", "exclude", "expected"),
    [
        pytest.param([listed("s", KEYED)], set(), "s", id="by-idempotency-key"),
        pytest.param(
            [listed("busy", {TAG_LINEAGE: "lin"}, active_s=90), listed("k", KEYED, active_s=1)],
            set(),
            "k",
            id="key-beats-lineage-tag",
        ),
        # Anyone can write a lineage tag: without the attempt's key it proves nothing.
        pytest.param(
            [listed("t", {TAG_LINEAGE: "lin"})], set(), None, id="lineage-tag-alone-untrusted"
        ),
        pytest.param([listed("t", {TAG_LINEAGE: "lin"})], {"t"}, None, id="earlier-run-excluded"),
        pytest.param(
            [listed("o", {TAG_LINEAGE: "lin", TAG_IDEMPOTENCY_KEY: "lin#2-zzz"})],
            set(),
            None,
            id="other-attempts-run-is-not-ours",
        ),
        pytest.param([listed("x", {TAG_LINEAGE: "other"})], set(), None, id="other-lineage"),
        pytest.param([listed("u")], set(), None, id="untagged"),
    ],
)
def test_find_successor(runs: list[RunView], exclude: set[str], expected: str | None) -> None:
    found = ranking.find_successor(ATTEMPT, runs, exclude=exclude)
    assert (found.run_id if found else None) == expected


def test_known_runs_excludes_the_daemons_own_restored_run() -> None:
    sdk = replace(ATTEMPT, handed_off_path="tinker://restored-1/weights/recovery-1")
    earlier = replace(ATTEMPT, attempt_id="lin#0-x", corrupted_run_id="root", successor_run_id="b")
    lineage = Lineage(
        lineage_id="lin",
        root_run_id="root",
        current_run_id="run-a",
        state=LineageState.RECOVERED,
        reason="handed off",
        first_seen_at=NOW,
        updated_at=NOW,
    )
    assert ranking.known_runs(lineage, [earlier, sdk], sdk) == {"root", "run-a", "b", "restored-1"}


def newer_checkpoint(seconds_after_handoff: float, path: str = "tinker://s/weights/1") -> RunView:
    return replace(
        listed("s", active_s=-10),
        last_checkpoint=CheckpointView(
            checkpoint_id="weights/1",
            kind=CheckpointKind.TRAINING,
            tinker_path=path,
            time=NOW + timedelta(seconds=seconds_after_handoff),
        ),
    )


@pytest.mark.parametrize(
    ("successor", "requested", "checkpointed"),
    [
        # Its creation sets the last request: at first sight no request is progress yet.
        pytest.param(listed("s", active_s=5), False, False, id="first-sight-is-not-progress"),
        pytest.param(listed("s", active_s=-5), False, False, id="quiet-since-handoff"),
        pytest.param(newer_checkpoint(-1800), False, True, id="checkpoint-newer-than-restored"),
        pytest.param(
            newer_checkpoint(10, path=ATTEMPT.checkpoint_path or ""),
            False,
            False,
            id="the-restored-checkpoint-itself",
        ),
    ],
)
def test_judge_progress(successor: RunView, requested: bool, checkpointed: bool) -> None:
    progress = ranking.judge_progress(ATTEMPT, successor, handed_off_at=NOW)
    assert (progress.requested, progress.checkpointed) == (requested, checkpointed)
    assert progress.confirmed is (requested or checkpointed)


def test_judge_progress_after_sdk_restore_counts_only_checkpoints_after_the_handoff() -> None:
    sdk = replace(ATTEMPT, handed_off_path="tinker://restored-1/weights/recovery-1")
    assert not ranking.judge_progress(sdk, newer_checkpoint(-60), handed_off_at=NOW).checkpointed
    assert ranking.judge_progress(sdk, newer_checkpoint(60), handed_off_at=NOW).checkpointed


@pytest.mark.parametrize(
    ("first_seen_s", "now_s", "requested"),
    [
        pytest.param(-30, -20, True, id="later-request-than-first-seen"),
        pytest.param(-30, -30, False, id="same-request-as-first-seen"),
        pytest.param(None, -20, False, id="no-earlier-sighting"),
    ],
)
def test_progress_survives_a_service_clock_behind_ours(
    first_seen_s: float | None, now_s: float, requested: bool
) -> None:
    # The service's clock runs 60 s behind ours: every request looks older than the handoff.
    first_seen = None if first_seen_s is None else NOW + timedelta(seconds=first_seen_s)
    successor = listed("s", active_s=now_s)
    progress = ranking.judge_progress(
        ATTEMPT, successor, handed_off_at=NOW, first_seen_request=first_seen
    )
    assert progress.requested is requested
