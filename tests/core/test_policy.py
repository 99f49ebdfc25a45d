"""plan_cycle for one lineage at a time: reads, confirmation, the rule screen, starting."""

from __future__ import annotations

from datetime import datetime

import pytest
from policy_builders import NOW, RUN_ID, at, decide, fleet, lineage, rule, run, settings

from tinker_recovery.core import policy
from tinker_recovery.core.model import (
    TAG_LINEAGE,
    Attempt,
    AttemptOutcome,
    AttemptStep,
    CheckpointKind,
    Decision,
    DecisionKind,
    Lineage,
    LineageState,
    RunView,
)
from tinker_recovery.settings import PolicySettings

S = LineageState
K = DecisionKind


@pytest.mark.parametrize(
    "known",
    [
        pytest.param(lineage(S.HEALTHY), id="healthy"),
        pytest.param(lineage(S.SUSPECT), id="suspect"),
        pytest.param(lineage(S.CORRUPTED), id="corrupted"),
        pytest.param(lineage(S.WAITING, next_attempt_at=at(-1)), id="waiting-due"),
        pytest.param(lineage(S.RECOVERING), id="recovering"),
        pytest.param(lineage(S.HELD, held_by_operator=True), id="held"),
    ],
)
def test_missing_run_is_unknown_and_changes_nothing(known: Lineage) -> None:
    decision = decide(None, known)
    assert decision.kind is K.UNKNOWN
    assert decision.lineage is known
    assert not decision.start_attempt
    assert "no evidence" in decision.reason


def test_observation_without_run_or_lineage_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="needs a run"):
        decide(None, None)


def test_healthy_run_with_healthy_lineage_is_watched_unchanged() -> None:
    known = lineage(S.HEALTHY)
    decision = decide(run(), known)
    assert (decision.kind, decision.lineage) == (K.WATCH, known)
    assert decision.lineage is known


@pytest.mark.parametrize(
    ("watch_started_at", "preexisting"),
    [
        pytest.param(at(-3600), False, id="driven-after-watching-began"),
        pytest.param(at(-10), True, id="idle-since-before-watching-began"),
        pytest.param(None, False, id="watch-start-unknown"),
    ],
)
def test_first_corrupted_read_of_unknown_run_makes_a_suspect_lineage(
    watch_started_at: datetime | None, preexisting: bool
) -> None:
    decision = decide(
        run(corrupted=True),  # last request 60 s ago
        None,
        fleet_view=policy.FleetView(0, (), (), None, watch_started_at=watch_started_at),
    )
    made = decision.lineage
    assert decision.kind is K.SUSPECT
    assert decision.reason == "1/2 corrupted reads"
    assert (made.lineage_id, made.root_run_id, made.current_run_id) == (RUN_ID,) * 3
    assert (made.state, made.corrupted_reads, made.corrupted_since) == (S.SUSPECT, 1, NOW)
    assert (made.first_seen_at, made.updated_at) == (NOW, NOW)
    assert made.preexisting is preexisting
    assert made.rule == "default"


def test_second_corrupted_read_confirms_and_acts_in_the_same_cycle() -> None:
    decision = decide(run(corrupted=True), lineage(S.SUSPECT))
    assert decision.kind is K.RECOVER
    assert decision.reason.startswith("2/2 corrupted reads: corruption confirmed; attempt 1")
    assert decision.lineage.state is S.RECOVERING
    assert decision.lineage.detected_at == NOW
    assert decision.lineage.corrupted_since == at(-30)  # the episode's first read is kept
    assert decision.lineage.updated_at == NOW
    assert decision.start_attempt


@pytest.mark.parametrize(
    ("confirmations", "reads_before", "kind", "state"),
    [
        pytest.param(1, 0, K.RECOVER, S.RECOVERING, id="one-read-policy-acts-at-once"),
        pytest.param(3, 1, K.SUSPECT, S.SUSPECT, id="2-of-3-still-suspect"),
        pytest.param(3, 2, K.RECOVER, S.RECOVERING, id="3-of-3-confirms-and-acts"),
    ],
)
def test_confirmation_needs_the_configured_number_of_reads(
    confirmations: int, reads_before: int, kind: K, state: S
) -> None:
    known = lineage(S.SUSPECT if reads_before else S.HEALTHY, corrupted_reads=reads_before)
    decision = decide(run(corrupted=True), known, cfg=settings(confirmations=confirmations))
    assert (decision.kind, decision.lineage.state) == (kind, state)
    assert f"{reads_before + 1}/{confirmations} corrupted reads" in decision.reason


def test_unknown_between_corrupted_reads_does_not_reset_the_count() -> None:
    suspect = decide(run(corrupted=True), None).lineage
    missing = decide(None, suspect, now=at(30))
    confirmed = decide(run(corrupted=True), missing.lineage, now=at(60))
    assert [missing.kind, confirmed.kind] == [K.UNKNOWN, K.RECOVER]
    assert confirmed.lineage.detected_at == at(60)


@pytest.mark.parametrize(
    "known",
    [
        pytest.param(lineage(S.SUSPECT), id="suspect-false-alarm"),
        pytest.param(lineage(S.CORRUPTED), id="corrupted"),
        pytest.param(lineage(S.WAITING, next_attempt_at=at(60)), id="waiting"),
        pytest.param(lineage(S.EXHAUSTED, attempt_starts=(at(-10),)), id="exhausted"),
        pytest.param(lineage(S.IGNORED, preexisting=True), id="ignored"),
    ],
)
def test_healthy_read_returns_the_lineage_to_healthy(known: Lineage) -> None:
    decision = decide(run(), known)
    got = decision.lineage
    assert (decision.kind, got.state) == (K.WATCH, S.HEALTHY)
    assert (got.corrupted_reads, got.corrupted_since, got.detected_at) == (0, None, None)
    assert (got.next_attempt_at, got.preexisting) == (None, False)
    assert got.attempt_starts == known.attempt_starts  # the budget is not forgiven by luck
    assert got.updated_at == NOW
    assert decision.reason == got.reason != ""


@pytest.mark.parametrize("state", [S.RECOVERING, S.RECOVERED])
@pytest.mark.parametrize("corrupted", [True, False], ids=["corrupted", "healthy"])
def test_executor_owned_lineages_are_left_alone(state: S, corrupted: bool) -> None:
    known = lineage(state, attempts_total=1)
    decision = decide(run(corrupted=corrupted), known)
    assert decision.kind is K.WATCH
    assert decision.lineage is known
    assert "executor" in decision.reason


@pytest.mark.parametrize(
    ("state", "kind"),
    [
        pytest.param(S.EXHAUSTED, K.EXHAUST, id="exhausted"),
        pytest.param(S.IGNORED, K.IGNORE, id="ignored"),
    ],
)
def test_terminal_states_stay_while_the_run_is_corrupted(state: S, kind: K) -> None:
    known = lineage(state)
    decision = decide(run(corrupted=True), known)
    assert decision.kind is kind
    assert decision.lineage is known
    assert decision.reason.startswith("still ")


def test_a_run_that_is_not_the_current_one_changes_nothing() -> None:
    known = lineage(S.HEALTHY, current_run_id="sess-2:train:0")
    decision = decide(run(RUN_ID, corrupted=True), known)
    assert decision.kind is K.WATCH
    assert decision.lineage is known


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        pytest.param("root-run:train:0", "root-run:train:0", id="tag-wins"),
        pytest.param("evil\nid", RUN_ID, id="newline-rejected"),
        pytest.param("a b", RUN_ID, id="space-rejected"),
        pytest.param("x" * 10_000, RUN_ID, id="huge-rejected"),
        pytest.param("", RUN_ID, id="empty-rejected"),
    ],
)
def test_lineage_id_is_the_tag_when_sane_else_the_run_id(tag: str, expected: str) -> None:
    decision = decide(run(metadata={TAG_LINEAGE: tag}), None)
    assert decision.lineage.lineage_id == expected
    assert decision.lineage.root_run_id == expected
    assert decision.lineage.current_run_id == RUN_ID


def test_tagged_healthy_run_gets_a_watched_lineage() -> None:
    decision = decide(run(metadata={TAG_LINEAGE: "root"}), None)
    assert decision.kind is K.WATCH
    assert decision.lineage.state is S.HEALTHY
    assert decision.lineage.updated_at == NOW


@pytest.mark.parametrize(
    ("kind", "newest"),
    [
        pytest.param(CheckpointKind.TRAINING, at(-5), id="training-recorded"),
        pytest.param(CheckpointKind.SAMPLER, at(-500), id="sampler-ignored"),
    ],
)
def test_newest_training_checkpoint_time_is_recorded(kind: CheckpointKind, newest: object) -> None:
    known = lineage(S.HEALTHY, last_checkpoint_time=at(-500))
    decision = decide(run(checkpoint_at=at(-5), checkpoint_kind=kind), known)
    assert decision.lineage.last_checkpoint_time == newest


# --- the rule screen: what a confirmed corruption leads to ---------------------------------


def _screen(
    known: Lineage, cfg: PolicySettings | None = None, observed: RunView | None = None
) -> Decision:
    return decide(observed or run(corrupted=True), known, cfg=cfg)


@pytest.mark.parametrize(
    ("cfg", "known", "observed", "kind", "state", "words"),
    [
        pytest.param(
            settings(rules=[rule(action="ignore")]),
            lineage(S.CORRUPTED),
            None,
            K.IGNORE,
            S.IGNORED,
            "rule default: ignore",
            id="rule-ignore",
        ),
        pytest.param(
            settings(rules=[rule(action="alert")]),
            lineage(S.CORRUPTED),
            None,
            K.ALERT,
            S.IGNORED,
            "alert only",
            id="rule-alert",
        ),
        pytest.param(
            settings(rules=[rule(match={"owner": "other-team"})]),
            lineage(S.CORRUPTED),
            None,
            K.IGNORE,
            S.IGNORED,
            "no rule matches",
            id="no-rule-matches",
        ),
        pytest.param(
            settings(),
            lineage(S.CORRUPTED, preexisting=True),
            None,
            K.IGNORE,
            S.IGNORED,
            "recover_preexisting is off",
            id="preexisting-skipped",
        ),
        pytest.param(
            settings(rules=[rule(recover_preexisting=True)]),
            lineage(S.CORRUPTED, preexisting=True),
            None,
            K.RECOVER,
            S.RECOVERING,
            "attempt 1 started",
            id="preexisting-opted-in",
        ),
        pytest.param(
            settings(rules=[rule(max_idle=3600)]),
            lineage(S.CORRUPTED),
            run(corrupted=True, idle_s=7200),
            K.IGNORE,
            S.IGNORED,
            "idle: no request for 1h58m",
            id="idle-skipped",
        ),
        pytest.param(
            settings(rules=[rule(max_idle=3480)]),
            lineage(S.CORRUPTED),
            run(corrupted=True, idle_s=3600),
            K.RECOVER,
            S.RECOVERING,
            "attempt 1",
            id="idle-exactly-max-idle-recovers",
        ),
        pytest.param(
            settings(rules=[rule(max_idle=None)]),
            lineage(S.CORRUPTED),
            run(corrupted=True, idle_s=1e7),
            K.RECOVER,
            S.RECOVERING,
            "attempt 1",
            id="no-max-idle",
        ),
        pytest.param(
            settings(),
            lineage(S.CORRUPTED, attempt_starts=(at(-3000), at(-2000), at(-1000))),
            None,
            K.EXHAUST,
            S.EXHAUSTED,
            "3 attempts in 24h without progress",
            id="budget-spent",
        ),
        pytest.param(
            settings(),
            lineage(S.CORRUPTED, attempt_starts=(at(-90000), at(-2000), at(-1000))),
            None,
            K.RECOVER,
            S.RECOVERING,
            "attempt 1 started (3/3 in 24h",
            id="old-start-expired",
        ),
        pytest.param(
            settings(),
            lineage(S.WAITING, next_attempt_at=at(45), attempt_starts=(at(-100),)),
            None,
            K.WAIT,
            S.WAITING,
            "(45s left); next is attempt 2/3",
            id="backing-off",
        ),
        pytest.param(
            settings(),
            lineage(S.WAITING, next_attempt_at=NOW, attempt_starts=(at(-100),)),
            None,
            K.RECOVER,
            S.RECOVERING,
            "(2/3 in 24h, rule default)",
            id="backoff-over",
        ),
        pytest.param(
            settings(dry_run=True),
            lineage(S.CORRUPTED),
            None,
            K.DRY_RUN,
            S.CORRUPTED,
            "dry run: would start attempt 1",
            id="dry-run",
        ),
    ],
)
def test_confirmed_corruption_is_screened_by_the_rule(
    cfg: PolicySettings, known: Lineage, observed: RunView | None, kind: K, state: S, words: str
) -> None:
    decision = _screen(known, cfg, observed)
    assert (decision.kind, decision.lineage.state) == (kind, state)
    assert words in decision.reason
    assert decision.start_attempt is (kind is K.RECOVER)
    assert decision.lineage.reason


def test_confirmation_held_back_by_the_cap_starts_on_a_later_cycle() -> None:
    cfg = settings(max_concurrent=1)
    confirmed = decide(
        run(corrupted=True), lineage(S.SUSPECT), cfg=cfg, fleet_view=fleet(in_flight=1)
    )
    assert (confirmed.kind, confirmed.lineage.state) == (K.WAIT, S.CORRUPTED)
    assert confirmed.lineage.detected_at == NOW
    assert confirmed.reason.startswith("2/2 corrupted reads: corruption confirmed; ")
    started = decide(run(corrupted=True), confirmed.lineage, cfg=cfg, now=at(30))
    assert (started.kind, started.lineage.detected_at) == (K.RECOVER, NOW)


def test_start_charges_the_budget_and_counts_the_attempt() -> None:
    known = lineage(S.CORRUPTED, attempts_total=4, attempt_starts=(at(-90000), at(-500)))
    decision = _screen(known)
    got = decision.lineage
    assert decision.start_attempt
    assert got.state is S.RECOVERING
    assert got.attempts_total == 5  # the shell starts attempt number attempts_total
    assert got.attempt_starts == (at(-500), NOW)  # outside the window: dropped
    assert got.updated_at == NOW
    assert decision.reason == "attempt 5 started (2/3 in 24h, rule default)"


def test_dry_run_records_the_would_be_start_and_acts_on_nothing() -> None:
    known = lineage(S.CORRUPTED)
    decision = _screen(known, settings(dry_run=True))
    assert not decision.start_attempt
    assert decision.lineage.reason == "dry run: would recover"
    assert decision.lineage.attempts_total == 0
    assert decision.lineage.attempt_starts == ()
    again = _screen(decision.lineage, settings(dry_run=True))
    assert again.lineage is decision.lineage  # steady: nothing to persist


def test_first_matching_rule_decides() -> None:
    cfg = settings(
        rules=[
            rule("eval", match={"labels": {"purpose": "eval*"}}, action="ignore"),
            rule("catch-all", action="alert"),
        ]
    )
    ignored = decide(
        run(corrupted=True, metadata={"purpose": "eval-nightly"}), lineage(S.CORRUPTED), cfg=cfg
    )
    alerted = decide(
        run(corrupted=True, metadata={"purpose": "train"}), lineage(S.CORRUPTED), cfg=cfg
    )
    assert (ignored.kind, ignored.lineage.rule) == (K.IGNORE, "eval")
    assert (alerted.kind, alerted.lineage.rule) == (K.ALERT, "catch-all")


def test_full_episode_from_first_read_to_recovery() -> None:
    cfg = settings()
    steps = []
    known = None
    for i, corrupted in enumerate([False, True, True, True]):
        d = decide(
            run(corrupted=corrupted, metadata={TAG_LINEAGE: RUN_ID}), known, cfg=cfg, now=at(30 * i)
        )
        steps.append((d.kind, d.lineage.state))
        known = d.lineage
    assert steps == [
        (K.WATCH, S.HEALTHY),
        (K.SUSPECT, S.SUSPECT),
        (K.RECOVER, S.RECOVERING),
        (K.WATCH, S.RECOVERING),  # the executor owns it now
    ]
    assert known is not None
    assert known.attempt_starts == (at(60),)


# --- progress after a recovery resets the budget -------------------------------------------------


@pytest.mark.parametrize(
    ("observed", "resets"),
    [
        pytest.param(run(checkpoint_at=at(-10)), True, id="newer-checkpoint-resets"),
        pytest.param(run(checkpoint_at=at(-500)), False, id="restored-checkpoint-again"),
        pytest.param(run(), False, id="no-checkpoint-yet"),
        pytest.param(
            run(checkpoint_at=at(-10), checkpoint_kind=CheckpointKind.SAMPLER),
            False,
            id="sampler-checkpoint-is-not-progress",
        ),
    ],
)
def test_successor_progress_resets_the_budget(observed: RunView, resets: bool) -> None:
    recovered = lineage(S.HEALTHY, attempt_starts=(at(-300),), last_checkpoint_time=at(-500))
    decision = decide(observed, recovered)
    assert decision.kind is K.WATCH
    assert decision.lineage.state is S.HEALTHY
    assert decision.lineage.attempt_starts == (() if resets else (at(-300),))
    if resets:
        assert "progress, budget reset" in decision.reason
        assert decision.lineage.last_checkpoint_time == at(-10)


def test_success_remembers_the_restored_checkpoint_as_the_progress_mark() -> None:
    current = lineage(S.RECOVERED, attempts_total=1, attempt_starts=(at(-60),))
    attempt = Attempt(
        attempt_id="a",
        lineage_id=RUN_ID,
        number=1,
        corrupted_run_id=RUN_ID,
        step=AttemptStep.DONE,
        started_at=at(-60),
        updated_at=NOW,
        checkpoint_time=at(-900),
        successor_run_id="successor",
        outcome=AttemptOutcome.SUCCEEDED,
    )
    after = policy.on_attempt_finished(current, attempt, NOW, rule(), 0.5, progressed=False)
    assert (after.state, after.current_run_id) == (S.HEALTHY, "successor")
    assert after.last_checkpoint_time == at(-900)
    assert after.attempt_starts == (at(-60),)
