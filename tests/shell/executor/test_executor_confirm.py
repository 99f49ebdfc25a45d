"""Confirmation of handed-off attempts, start-up reconciliation, and graceful drain."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
from ex_fakes import (
    LINEAGE_ID,
    RUN_ID,
    T0,
    World,
    build_world,
    ckpt,
    corrupted_run,
    lineage,
    lineage_tagged,
    new_executor,
    observe_progress,
    only,
    rule,
    run_attempt,
    seed,
    stored,
)
from structlog.testing import capture_logs

from tinker_recovery.core.model import (
    TAG_IDEMPOTENCY_KEY,
    Attempt,
    AttemptOutcome,
    AttemptStep,
    LineageState,
)
from tinker_recovery.shell.store.base import Event


@pytest.fixture
async def world(tmp_path: Path) -> World:
    built = await build_world(tmp_path / "state.db")
    built.gateway.checkpoints[RUN_ID] = [ckpt("030", age_s=3600)]
    return built


async def test_successor_requests_confirm_the_attempt(world: World) -> None:
    current = await seed(world)
    attempt = await run_attempt(world, current, corrupted_run(), rule())
    world.clock.advance(60)

    with capture_logs() as logs:
        await observe_progress(world, "succ-1")

    done = await stored(world, attempt)
    assert done.outcome is AttemptOutcome.SUCCEEDED
    assert done.successor_run_id == "succ-1"
    after = await world.store.get_lineage(LINEAGE_ID)
    assert after is not None
    assert after.state is LineageState.HEALTHY
    assert after.current_run_id == "succ-1"
    assert world.sample("attempts_total", outcome="succeeded") == 1
    assert world.sample("attempt_duration_seconds_count") == 1
    # detected 29 min before T0, confirmed 70 s after T0 (the second listing)
    assert world.sample("time_to_recovery_seconds_sum") == 29 * 60 + 70
    # corrupted 30 min before T0; the restored checkpoint is an hour old
    assert world.sample("work_lost_seconds_sum") == 30 * 60
    assert world.executor.in_flight() == 0
    finished = [e for e in logs if e["event"] == "attempt_finished"]
    assert finished[0]["outcome"] == "succeeded"


async def test_newer_checkpoint_counts_as_progress(world: World) -> None:
    current = await seed(world, lineage(attempt_starts=(T0 - timedelta(hours=1), T0)))
    attempt = await run_attempt(world, current, corrupted_run(), rule())
    world.clock.advance(120)
    world.fleet.touch(
        "succ-1", checkpoint=ckpt("040", age_s=0, run="succ-1", now=world.clock.now())
    )

    await world.executor.observe(world.fleet.listing(), world.clock.now())

    assert (await stored(world, attempt)).outcome is AttemptOutcome.SUCCEEDED
    after = await world.store.get_lineage(LINEAGE_ID)
    assert after is not None
    assert after.attempt_starts == ()  # progress resets the budget


async def test_successor_that_never_appears_fails_at_the_deadline(world: World) -> None:
    world.handoff.starts_job = False
    current = await seed(world)
    attempt = await run_attempt(world, current, corrupted_run(), rule(confirm_deadline=300.0))

    world.clock.advance(299)
    await world.executor.observe(world.fleet.listing(), world.clock.now())
    assert (await stored(world, attempt)).outcome is None

    world.clock.advance(1)
    await world.executor.observe(world.fleet.listing(), world.clock.now())
    done = await stored(world, attempt)
    assert done.outcome is AttemptOutcome.FAILED
    assert "never appeared" in done.reason
    after = await world.store.get_lineage(LINEAGE_ID)
    assert after is not None
    assert after.state is LineageState.WAITING


async def test_a_lineage_tag_alone_never_confirms_only_the_attempts_key_does(
    world: World,
) -> None:
    # Anyone can write `tinker_recovery.lineage`: a run carrying only that tag (busy, new) is
    # not the successor; the run that carries the attempt's idempotency key is.
    world.fleet.add_run("old-run", lineage_tagged("old"))
    await world.executor.observe(world.fleet.listing(), world.clock.now())
    world.handoff.starts_job = False
    current = await seed(world)
    attempt = await run_attempt(world, current, corrupted_run(), rule(successor_match="tags"))
    world.fleet.add_run("decoy", lineage_tagged("decoy"))  # lineage tag only, new and busy
    await observe_progress(world, "decoy")
    world.fleet.touch("old-run")
    await world.executor.observe(world.fleet.listing(), world.clock.now())
    assert (await stored(world, attempt)).outcome is None

    world.fleet.add_run(
        "job-run", {**lineage_tagged("job"), TAG_IDEMPOTENCY_KEY: attempt.attempt_id}
    )
    await observe_progress(world, "job-run")
    done = await stored(world, attempt)
    assert (done.outcome, done.successor_run_id) == (AttemptOutcome.SUCCEEDED, "job-run")


async def test_reconcile_finds_the_successor_by_key_and_never_hands_off_again(
    world: World,
) -> None:
    current = await seed(world)
    attempt = await run_attempt(world, current, corrupted_run(), rule())
    # The process dies here; a new one starts on the same store.
    world.clock.advance(60)
    restarted = new_executor(world)

    await restarted.reconcile(world.fleet.listing())

    resumed = await stored(world, attempt)
    assert (resumed.step, resumed.successor_run_id) == (AttemptStep.CONFIRMING, "succ-1")
    assert restarted.in_flight() == 1
    await restarted.observe(world.fleet.listing(), world.clock.now())
    world.clock.advance(10)
    world.fleet.touch("succ-1")
    await restarted.observe(world.fleet.listing(), world.clock.now())
    assert (await stored(world, attempt)).outcome is AttemptOutcome.SUCCEEDED
    assert world.handoff.keys() == [attempt.attempt_id]


async def test_reconcile_keeps_the_original_confirm_deadline(world: World) -> None:
    world.handoff.starts_job = False
    short = rule(confirm_deadline=300.0)
    world.rules = (short,)  # the restarted process finds the rule by the lineage's rule name
    current = await seed(world)
    attempt = await run_attempt(world, current, corrupted_run(), short)
    world.clock.advance(200)
    restarted = new_executor(world)
    await restarted.reconcile(world.fleet.listing())

    world.clock.advance(100)  # 300 s after the handoff, 100 s after the restart
    await restarted.observe(world.fleet.listing(), world.clock.now())

    assert (await stored(world, attempt)).outcome is AttemptOutcome.FAILED


async def test_reconcile_abandons_attempts_stopped_before_the_handoff(world: World) -> None:
    current = await seed(world)
    orphan = Attempt(
        attempt_id=f"{LINEAGE_ID}#1-dead",
        lineage_id=LINEAGE_ID,
        number=1,
        corrupted_run_id=RUN_ID,
        step=AttemptStep.PROTECTING,
        started_at=T0,
        updated_at=T0,
    )
    await world.store.save_attempt(orphan, Event(at=T0, kind="attempt_step", reason="protecting"))

    await world.executor.reconcile(world.fleet.listing())

    assert (await stored(world, orphan)).outcome is AttemptOutcome.ABANDONED
    after = await world.store.get_lineage(LINEAGE_ID)
    assert after is not None
    assert after.state is LineageState.CORRUPTED
    assert after.attempt_starts == ()  # an abandoned start is not charged
    assert current.attempt_starts != ()
    assert world.handoff.requests == []


async def test_reconcile_repairs_a_lineage_left_recovering_without_an_attempt(
    world: World,
) -> None:
    await seed(world)  # the poller saved RECOVERING, then the process died

    await world.executor.reconcile(world.fleet.listing())

    recorded = only(await world.store.attempts(LINEAGE_ID))
    assert recorded.outcome is AttemptOutcome.ABANDONED
    after = await world.store.get_lineage(LINEAGE_ID)
    assert after is not None
    assert after.state is LineageState.CORRUPTED


async def test_drain_cancels_steps_before_the_handoff_as_abandoned(world: World) -> None:
    entered, gate = asyncio.Event(), asyncio.Event()

    async def stuck(tinker_path: str, ttl_s: int | None) -> None:
        entered.set()
        await gate.wait()

    world.gateway.set_checkpoint_ttl = stuck  # type: ignore[method-assign]  # block in PROTECTING
    current = await seed(world)
    async with asyncio.TaskGroup() as tg:
        attempt = await world.executor.start(current, corrupted_run(), rule(), tg=tg)
        assert attempt is not None
        await entered.wait()
        assert (await stored(world, attempt)).step is AttemptStep.PROTECTING
        await world.executor.drain(0.0)

    assert (await stored(world, attempt)).outcome is AttemptOutcome.ABANDONED
    assert world.handoff.requests == []
    assert world.executor.in_flight() == 0


async def test_drain_during_the_handoff_leaves_it_for_reconcile(world: World) -> None:
    world.handoff.block = asyncio.Event()
    current = await seed(world)
    async with asyncio.TaskGroup() as tg:
        attempt = await world.executor.start(current, corrupted_run(), rule(), tg=tg)
        assert attempt is not None
        await world.handoff.entered.wait()
        await world.executor.drain(0.0)

    left = await stored(world, attempt)
    assert (left.step, left.outcome) == (AttemptStep.HANDING_OFF, None)
    restarted = new_executor(world)
    await restarted.reconcile(world.fleet.listing())
    assert (await stored(world, attempt)).step is AttemptStep.CONFIRMING
    assert world.handoff.requests == []


async def test_snapshot_lists_in_flight_attempts(world: World) -> None:
    current = await seed(world)
    attempt = await run_attempt(world, current, corrupted_run(), rule())

    (entry,) = world.executor.snapshot()

    assert entry["attempt_id"] == attempt.attempt_id
    assert entry["step"] == "confirming"
    assert entry["confirm_deadline"] is not None
    assert TAG_IDEMPOTENCY_KEY not in str(entry)  # ids and paths only
