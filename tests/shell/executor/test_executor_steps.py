"""The executor's steps: selection with fallback, validation, protection, restore and handoff."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest
from ex_fakes import (
    GOOD_INFO,
    LINEAGE_ID,
    RUN_ID,
    World,
    build_world,
    ckpt,
    corrupted_run,
    lineage,
    new_executor,
    observe_progress,
    only,
    rule,
    run_attempt,
    seed,
)
from structlog.testing import capture_logs

from tinker_recovery.core.model import (
    TAG_ATTEMPT,
    TAG_IDEMPOTENCY_KEY,
    TAG_LINEAGE,
    TAG_RECOVERED_FROM,
    AttemptOutcome,
    AttemptStep,
    LineageState,
)
from tinker_recovery.errors import ActionFailed, RemoteRejected, RemoteUnavailable
from tinker_recovery.settings import CheckpointSettings


@pytest.fixture
async def world(tmp_path: Path) -> World:
    return await build_world(tmp_path / "state.db")


async def test_falls_back_past_rejected_and_expiring_checkpoints(world: World) -> None:
    newest = ckpt("040", age_s=60, expires_in_s=120)  # expires within min_ttl
    no_optimizer = ckpt("030", age_s=120)
    good = ckpt("020", age_s=180)
    world.gateway.checkpoints[RUN_ID] = [good, no_optimizer, newest]
    world.gateway.infos[no_optimizer.tinker_path] = replace(GOOD_INFO, has_optimizer_state=False)
    current = await seed(world)

    with capture_logs() as logs:
        attempt = await run_attempt(world, current, corrupted_run(), rule())

    assert world.gateway.info_calls == [no_optimizer.tinker_path, good.tinker_path]
    assert only(world.handoff.requests).checkpoint_path == good.tinker_path
    stored = await world.store.get_attempt(attempt.attempt_id)
    assert stored is not None
    assert stored.step is AttemptStep.CONFIRMING
    assert stored.checkpoint_path == good.tinker_path
    assert stored.checkpoint_time == good.time
    assert await world.store.bad_checkpoints([no_optimizer.tinker_path, good.tinker_path]) == {
        no_optimizer.tinker_path
    }
    assert world.sample("checkpoints_rejected_total", reason="optimizer_state_missing") == 1
    rejected = [e for e in logs if e["event"] == "checkpoint_rejected"]
    assert [e["checkpoint_path"] for e in rejected] == [no_optimizer.tinker_path]
    assert {"lineage_id", "attempt_id", "step", "reason"} <= rejected[0].keys()


async def test_unloadable_checkpoint_is_marked_bad_and_the_next_is_used(world: World) -> None:
    first, second = ckpt("030", age_s=60), ckpt("020", age_s=120)
    world.gateway.checkpoints[RUN_ID] = [first, second]
    world.gateway.infos[first.tinker_path] = RemoteRejected("not found", status_code=404)
    current = await seed(world)

    await run_attempt(world, current, corrupted_run(), rule())

    assert only(world.handoff.requests).checkpoint_path == second.tinker_path
    assert await world.store.bad_checkpoints([first.tinker_path]) == {first.tinker_path}
    assert world.sample("checkpoints_rejected_total", reason="unloadable") == 1


async def test_checkpoint_marked_bad_earlier_is_not_tried(world: World) -> None:
    first, second = ckpt("030", age_s=60), ckpt("020", age_s=120)
    world.gateway.checkpoints[RUN_ID] = [first, second]
    await world.store.mark_checkpoint_bad(first.tinker_path, "earlier attempt", world.clock.now())
    current = await seed(world)

    await run_attempt(world, current, corrupted_run(), rule())

    assert world.gateway.info_calls == [second.tinker_path]


async def test_all_checkpoints_bad_fails_and_lineage_waits(world: World) -> None:
    only_one = ckpt("030", age_s=60)
    world.gateway.checkpoints[RUN_ID] = [only_one]
    world.gateway.infos[only_one.tinker_path] = replace(GOOD_INFO, base_model="other/model")
    current = await seed(world)

    attempt = await run_attempt(world, current, corrupted_run(), rule())

    stored = await world.store.get_attempt(attempt.attempt_id)
    assert stored is not None
    assert stored.outcome is AttemptOutcome.FAILED
    assert "no usable checkpoint" in stored.reason
    assert world.handoff.requests == []
    after = await world.store.get_lineage(LINEAGE_ID)
    assert after is not None
    assert after.state is LineageState.WAITING
    assert world.sample("attempts_total", outcome="failed") == 1
    assert world.executor.in_flight() == 0


async def test_last_checkpoint_and_earlier_runs_are_candidates(world: World) -> None:
    # The corrupted run lists nothing (gone from the listing API); its last_checkpoint and
    # a checkpoint of the lineage's root run remain.
    world.gateway.checkpoints[RUN_ID] = RemoteRejected("gone", status_code=404)
    last = ckpt("050", age_s=60)
    older_root = ckpt("010", age_s=600, run="run-root")
    world.gateway.checkpoints["run-root"] = [older_root]
    world.gateway.infos[last.tinker_path] = RemoteRejected("corrupt", status_code=400)
    current = await seed(world, lineage(root_run_id="run-root"))

    await run_attempt(world, current, corrupted_run(last=last), rule())

    assert only(world.handoff.requests).checkpoint_path == older_root.tinker_path


async def test_weights_info_unavailable_fails_without_marking_bad(world: World) -> None:
    first = ckpt("030", age_s=60)
    world.gateway.checkpoints[RUN_ID] = [first]
    world.gateway.infos[first.tinker_path] = RemoteUnavailable("503")
    current = await seed(world)

    attempt = await run_attempt(world, current, corrupted_run(), rule())

    stored = await world.store.get_attempt(attempt.attempt_id)
    assert stored is not None
    assert stored.outcome is AttemptOutcome.FAILED
    assert "unavailable" in stored.reason
    assert await world.store.bad_checkpoints([first.tinker_path]) == set()


async def test_protect_sets_ttl_on_the_chosen_checkpoint(world: World) -> None:
    chosen = ckpt("030", age_s=60)
    world.gateway.checkpoints[RUN_ID] = [chosen]
    current = await seed(world)

    await run_attempt(world, current, corrupted_run(), rule())

    assert world.gateway.ttl_calls == [(chosen.tinker_path, 86400)]


async def test_protect_failure_is_not_fatal(world: World) -> None:
    world.gateway.checkpoints[RUN_ID] = [ckpt("030", age_s=60)]
    world.gateway.ttl_error = RemoteRejected("forbidden", status_code=403)
    current = await seed(world)

    await run_attempt(world, current, corrupted_run(), rule())

    assert len(world.handoff.requests) == 1


async def test_no_protect_when_protect_ttl_is_unset(world: World) -> None:
    world.gateway.checkpoints[RUN_ID] = [ckpt("030", age_s=60)]
    current = await seed(world)
    no_protect = rule(checkpoint=CheckpointSettings(min_ttl=600.0, protect_ttl=None))

    await run_attempt(world, current, corrupted_run(), no_protect)

    assert world.gateway.ttl_calls == []
    assert len(world.handoff.requests) == 1


async def test_handoff_carries_tags_and_keeps_the_runs_labels(world: World) -> None:
    chosen = ckpt("030", age_s=60)
    world.gateway.checkpoints[RUN_ID] = [chosen]
    current = await seed(world)
    labels = {"team": "nlp", TAG_ATTEMPT: "stale"}

    attempt = await run_attempt(world, current, corrupted_run(labels=labels), rule())

    request = only(world.handoff.requests)
    assert request.idempotency_key == attempt.attempt_id
    assert request.attempt == 1
    assert request.corrupted_run_id == RUN_ID
    assert request.restore_optimizer is True
    assert dict(request.user_metadata) == {
        "team": "nlp",
        TAG_LINEAGE: LINEAGE_ID,
        TAG_RECOVERED_FROM: RUN_ID,
        TAG_ATTEMPT: "1",
        TAG_IDEMPOTENCY_KEY: attempt.attempt_id,
    }
    after = await world.store.get_lineage(LINEAGE_ID)
    assert after is not None
    assert after.state is LineageState.RECOVERED
    assert world.sample("handoffs_total", type="command", outcome="succeeded") == 1


async def test_restore_sdk_hands_off_the_saved_path(world: World) -> None:
    chosen = ckpt("030", age_s=60)
    world.gateway.checkpoints[RUN_ID] = [chosen]
    current = await seed(world)

    attempt = await run_attempt(world, current, corrupted_run(), rule(restore="sdk"))

    (call,) = world.restorer.calls
    assert call["checkpoint_path"] == chosen.tinker_path
    assert call["with_optimizer"] is True
    assert call["save_name"] == f"{chosen.checkpoint_id.rsplit('/', 1)[-1]}-recovery-1"
    assert call["user_metadata"][TAG_IDEMPOTENCY_KEY] == attempt.attempt_id
    saved = f"tinker://restored-1/weights/{call['save_name']}"
    assert only(world.handoff.requests).checkpoint_path == saved
    stored = await world.store.get_attempt(attempt.attempt_id)
    assert stored is not None
    assert (stored.checkpoint_path, stored.handed_off_path) == (chosen.tinker_path, saved)


async def test_restore_failure_fails_before_any_handoff(world: World) -> None:
    world.gateway.checkpoints[RUN_ID] = [ckpt("030", age_s=60)]
    world.restorer.error = ActionFailed("load failed", action="restore")
    current = await seed(world)

    attempt = await run_attempt(world, current, corrupted_run(), rule(restore="sdk"))

    stored = await world.store.get_attempt(attempt.attempt_id)
    assert stored is not None
    assert stored.outcome is AttemptOutcome.FAILED
    assert world.handoff.requests == []


async def test_checkpoint_the_service_cannot_restore_falls_back_to_an_older_one(
    world: World,
) -> None:
    newest, older = ckpt("030", age_s=60), ckpt("020", age_s=120)
    world.gateway.checkpoints[RUN_ID] = [newest, older]
    world.restorer.refused.add(newest.tinker_path)
    current = await seed(world)

    attempt = await run_attempt(world, current, corrupted_run(), rule(restore="sdk"))

    assert [c["checkpoint_path"] for c in world.restorer.calls] == [
        newest.tinker_path,
        older.tinker_path,
    ]
    assert await world.store.bad_checkpoints([newest.tinker_path, older.tinker_path]) == {
        newest.tinker_path
    }
    stored = await world.store.get_attempt(attempt.attempt_id)
    assert stored is not None
    assert stored.checkpoint_path == older.tinker_path
    assert only(world.handoff.requests).checkpoint_path.startswith("tinker://restored-")
    assert world.sample("checkpoints_rejected_total", reason="unloadable") == 1
    # Only the checkpoint the restore proved gets the longer TTL, not the unloadable one.
    assert world.gateway.ttl_calls == [(older.tinker_path, 86400)]


async def test_restore_sdk_without_handoff_makes_the_restored_run_the_successor(
    world: World,
) -> None:
    world.gateway.checkpoints[RUN_ID] = [ckpt("030", age_s=60)]
    current = await seed(world)

    attempt = await run_attempt(world, current, corrupted_run(), rule(restore="sdk", handoff=None))

    # The restore's own save proves the successor; nothing else will drive it, so the
    # attempt succeeds at once instead of waiting for progress that cannot come.
    done = await world.store.get_attempt(attempt.attempt_id)
    assert done is not None
    assert done.successor_run_id == "restored-1"
    assert done.outcome is AttemptOutcome.SUCCEEDED
    assert world.handoff.requests == []
    recovered = await world.store.get_lineage(current.lineage_id)
    assert recovered is not None
    assert (recovered.state, recovered.current_run_id) == (LineageState.HEALTHY, "restored-1")


async def test_no_handoff_and_no_restore_fails(world: World) -> None:
    world.gateway.checkpoints[RUN_ID] = [ckpt("030", age_s=60)]
    current = await seed(world)

    attempt = await run_attempt(world, current, corrupted_run(), rule(handoff=None))

    stored = await world.store.get_attempt(attempt.attempt_id)
    assert stored is not None
    assert (stored.outcome, stored.reason) == (AttemptOutcome.FAILED, "no handoff configured")


async def test_a_handoff_that_surely_did_nothing_fails_at_once_and_lineage_waits(
    world: World,
) -> None:
    world.gateway.checkpoints[RUN_ID] = [ckpt("030", age_s=60)]
    world.handoff.error = ActionFailed("not found", action="handoff", may_have_acted=False)
    current = await seed(world)

    with capture_logs() as logs:
        attempt = await run_attempt(world, current, corrupted_run(), rule())

    stored = await world.store.get_attempt(attempt.attempt_id)
    assert stored is not None
    assert stored.outcome is AttemptOutcome.FAILED
    assert stored.reason.startswith("handoff failed")
    after = await world.store.get_lineage(LINEAGE_ID)
    assert after is not None
    assert after.state is LineageState.WAITING
    assert after.next_attempt_at is not None
    assert world.sample("handoffs_total", type="command", outcome="failed") == 1
    assert any(e["event"] == "handoff_failed" for e in logs)


async def test_a_replica_that_lost_its_lease_withholds_the_handoff(world: World) -> None:
    world.gateway.checkpoints[RUN_ID] = [ckpt("030", age_s=60)]
    world.executor = new_executor(world, may_act=lambda epoch: False)
    current = await seed(world)

    attempt = await run_attempt(world, current, corrupted_run(), rule())

    assert world.handoff.requests == []
    stored = await world.store.get_attempt(attempt.attempt_id)
    assert stored is not None
    # Nothing left the daemon, and the row says so: the lineage is not left recovering with
    # nobody tracking it (the store's fence still let this epoch write).
    assert (stored.step, stored.outcome) == (AttemptStep.DONE, AttemptOutcome.ABANDONED)
    assert "withheld" in stored.reason
    assert world.executor.in_flight() == 0
    after = await world.store.get_lineage(LINEAGE_ID)
    assert after is not None
    assert after.state is not LineageState.RECOVERING


async def test_dry_run_never_starts(tmp_path: Path) -> None:
    world = await build_world(tmp_path / "state.db", dry_run=True)
    current = await seed(world)

    async with asyncio.TaskGroup() as tg:
        # A reload to dry run between decision and start: refused before anything is written.
        assert await world.executor.start(current, corrupted_run(), rule(), tg=tg) is None

    assert await world.store.attempts(LINEAGE_ID) == []


async def test_one_attempt_per_lineage(world: World) -> None:
    world.gateway.checkpoints[RUN_ID] = [ckpt("030", age_s=60)]
    current = await seed(world)

    async with asyncio.TaskGroup() as tg:
        assert await world.executor.start(current, corrupted_run(), rule(), tg=tg) is not None
        assert await world.executor.start(current, corrupted_run(), rule(), tg=tg) is None

    assert len(await world.store.attempts(LINEAGE_ID)) == 1


async def test_every_step_is_recorded_before_it_is_taken(world: World) -> None:
    world.gateway.checkpoints[RUN_ID] = [ckpt("030", age_s=60)]
    current = await seed(world)

    await run_attempt(world, current, corrupted_run(), rule(restore="sdk"))

    events = await world.store.events(lineage_id=LINEAGE_ID)
    steps = [e.data["step"] for e in events if e.kind == "attempt_step"]
    assert steps == [
        "created",
        "selecting",
        "restoring",
        "protecting",
        "handing_off",
        "handed_off",
        "confirming",
    ]
    assert all(e.reason for e in events)


async def test_unexpected_error_before_the_handoff_fails_the_attempt(world: World) -> None:
    world.gateway.checkpoints[RUN_ID] = [ckpt("030", age_s=60)]
    world.gateway.ttl_error = ZeroDivisionError("bug")  # not a RecoveryError: a bug
    current = await seed(world)

    with capture_logs() as logs:
        attempt = await run_attempt(world, current, corrupted_run(), rule())

    stored = await world.store.get_attempt(attempt.attempt_id)
    assert stored is not None
    assert stored.outcome is AttemptOutcome.FAILED
    assert stored.reason.startswith("internal error")
    assert world.handoff.requests == []
    assert any(e["event"] == "attempt_crashed" for e in logs)


async def test_unexpected_handoff_error_is_never_retried_only_confirmed(world: World) -> None:
    world.gateway.checkpoints[RUN_ID] = [ckpt("030", age_s=60)]
    world.handoff.starts_job = False
    world.handoff.error = OSError("connection reset after the job may have started")
    current = await seed(world)

    attempt = await run_attempt(world, current, corrupted_run(), rule())

    stored = await world.store.get_attempt(attempt.attempt_id)
    assert stored is not None
    assert (stored.step, stored.outcome) == (AttemptStep.HANDING_OFF, None)
    assert world.executor.in_flight() == 1  # still watched: the job may have started
    world.fleet.add_run("late", {TAG_IDEMPOTENCY_KEY: attempt.attempt_id})
    await observe_progress(world, "late")
    done = await world.store.get_attempt(attempt.attempt_id)
    assert done is not None
    assert (done.outcome, done.successor_run_id) == (AttemptOutcome.SUCCEEDED, "late")
    assert len(world.handoff.requests) == 1
