"""A handoff that reports a failure may still have started the job: never start it twice.

A command can crash on its way out after launching the job (the SDK's pyqwest transport aborts
some interpreters at exit, a wrapper script fails after `systemctl restart`), a webhook's answer
can be lost. The attempt then watches `handoff_grace` for a successor carrying its key, and
only fails (so the policy may try again) when none appears.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from ex_fakes import (
    LINEAGE_ID,
    RUN_ID,
    World,
    build_world,
    ckpt,
    corrupted_run,
    new_executor,
    only,
    rule,
    run_attempt,
    seed,
    stored,
)

from tinker_recovery.core.model import AttemptOutcome, AttemptStep, LineageState
from tinker_recovery.errors import ActionFailed


@pytest.fixture
async def world(tmp_path: Path) -> World:
    built = await build_world(tmp_path / "state.db")
    built.gateway.checkpoints[RUN_ID] = [ckpt("030", age_s=600)]
    return built


def crashed_on_exit() -> ActionFailed:
    return ActionFailed("command was killed by SIGABRT", action="handoff", exit_code=-6)


async def observe(world: World, after_s: float) -> None:
    world.clock.advance(after_s)
    await world.executor.observe(world.fleet.listing(), world.clock.now())


async def test_a_job_started_by_a_failing_handoff_is_adopted_not_restarted(world: World) -> None:
    world.handoff.error = crashed_on_exit()
    world.handoff.error_after_start = True
    current = await seed(world)

    attempt = await run_attempt(world, current, corrupted_run(), rule(handoff_grace=30.0))

    waiting = await stored(world, attempt)
    assert (waiting.step, waiting.outcome) == (AttemptStep.CONFIRMING, None)
    events = await world.store.events(lineage_id=LINEAGE_ID)
    assert events[-1].reason.endswith("watching 30s for a successor it may have started")
    assert world.sample("handoffs_total", type="command", outcome="failed") == 1

    await observe(world, 5)
    world.fleet.touch("succ-1")  # the job it started is busy: progress
    await observe(world, 5)

    done = await stored(world, attempt)
    assert (done.outcome, done.successor_run_id) == (AttemptOutcome.SUCCEEDED, "succ-1")
    assert len(world.handoff.requests) == 1
    after = await world.store.get_lineage(LINEAGE_ID)
    assert after is not None
    assert (after.state, after.current_run_id) == (LineageState.HEALTHY, "succ-1")
    events = await world.store.events(lineage_id=LINEAGE_ID)
    mine = [e.reason for e in events if e.attempt_id == attempt.attempt_id]
    assert any("although the handoff reported a failure" in reason for reason in mine)


async def test_without_a_successor_it_fails_after_the_grace_and_a_later_listing(
    world: World,
) -> None:
    world.handoff.error = crashed_on_exit()
    world.handoff.starts_job = False
    current = await seed(world)
    attempt = await run_attempt(world, current, corrupted_run(), rule(handoff_grace=30.0))

    await observe(world, 31)  # past the grace, but the first listing may predate the failure...
    assert (await stored(world, attempt)).outcome is None
    assert world.executor.in_flight() == 1

    await observe(world, 1)  # ...and this one surely began after it

    done = await stored(world, attempt)
    assert done.outcome is AttemptOutcome.FAILED
    assert done.reason.startswith("handoff failed: command was killed by SIGABRT")
    assert done.reason.endswith("no successor appeared after it")
    after = await world.store.get_lineage(LINEAGE_ID)
    assert after is not None
    assert after.state is LineageState.WAITING
    assert after.next_attempt_at is not None
    assert len(world.handoff.requests) == 1


async def test_a_listing_before_the_grace_ends_does_not_fail_it(world: World) -> None:
    world.handoff.error = crashed_on_exit()
    world.handoff.starts_job = False
    current = await seed(world)
    attempt = await run_attempt(world, current, corrupted_run(), rule(handoff_grace=30.0))

    for _ in range(5):
        await observe(world, 5)

    assert (await stored(world, attempt)).outcome is None


async def test_a_zero_grace_fails_at_once(world: World) -> None:
    world.handoff.error = crashed_on_exit()
    world.handoff.error_after_start = True
    current = await seed(world)

    attempt = await run_attempt(world, current, corrupted_run(), rule(handoff_grace=0.0))

    done = await stored(world, attempt)
    assert done.outcome is AttemptOutcome.FAILED
    assert done.reason == "handoff failed: command was killed by SIGABRT"


async def test_a_restart_during_the_grace_confirms_and_never_hands_off_again(
    world: World,
) -> None:
    world.handoff.error = crashed_on_exit()
    world.handoff.error_after_start = True
    current = await seed(world)
    attempt = await run_attempt(world, current, corrupted_run(), rule(handoff_grace=30.0))

    restarted = new_executor(world)  # a fresh process: nothing in memory, only the store
    world.clock.advance(5)
    await restarted.reconcile(world.fleet.listing())
    world.clock.advance(5)
    world.fleet.touch("succ-1")
    await restarted.observe(world.fleet.listing(), world.clock.now())

    done = await stored(world, attempt)
    assert (done.outcome, done.successor_run_id) == (AttemptOutcome.SUCCEEDED, "succ-1")
    assert only(world.handoff.requests).idempotency_key == attempt.attempt_id


async def test_a_restart_during_the_grace_keeps_the_grace_not_the_confirm_deadline(
    world: World,
) -> None:
    world.handoff.error = crashed_on_exit()
    world.handoff.starts_job = False
    current = await seed(world)
    the_rule = rule(handoff_grace=30.0, confirm_deadline=900.0)
    attempt = await run_attempt(world, current, corrupted_run(), the_rule)

    restarted = new_executor(world)  # a fresh process: only the store remembers the failure
    world.clock.advance(5)
    await restarted.reconcile(world.fleet.listing())
    world.clock.advance(30)  # past the grace, far before the confirm deadline
    await restarted.observe(world.fleet.listing(), world.clock.now())
    assert (await stored(world, attempt)).outcome is None  # the first listing since the restart
    world.clock.advance(1)
    await restarted.observe(world.fleet.listing(), world.clock.now())

    done = await stored(world, attempt)
    assert done.outcome is AttemptOutcome.FAILED
    assert done.reason.startswith("handoff failed: command was killed by SIGABRT")
    assert len(world.handoff.requests) == 1
