"""Crash safety: a daemon killed at any instant never hands off the same attempt twice.

A reference run lists every side effect of one attempt (store writes before and after they
commit, API calls, the handoff before and after it returns). Then, for each of those points k,
a fresh world is killed exactly there (`Killed` skips every `except Exception`, as SIGKILL
would), a NEW executor is built on the same store, reconciles, and confirms. Across all k the
handoff runs at most once, exactly once when the kill came after it returned, and every attempt
ends with an outcome.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from ex_fakes import (
    LINEAGE_ID,
    RUN_ID,
    Killed,
    World,
    build_world,
    ckpt,
    corrupted_run,
    new_executor,
    rule,
    seed,
)

from tinker_recovery.core.model import AttemptOutcome, LineageState
from tinker_recovery.errors import RemoteRejected
from tinker_recovery.settings import Rule

DEADLINE_S = 600.0


async def prepared(path: Path, the_rule: Rule) -> World:
    world = await build_world(path, rules=(the_rule,))
    rejected, good = ckpt("040", age_s=60), ckpt("030", age_s=120)
    world.gateway.checkpoints[RUN_ID] = [rejected, good]
    world.gateway.infos[rejected.tinker_path] = RemoteRejected("unloadable", status_code=400)
    return world


async def attempt_once(world: World, the_rule: Rule, kill_at: int | None) -> bool:
    """Run one attempt's steps; True if the process was 'killed' on the way."""
    current = await seed(world)
    world.switch.labels.clear()
    world.switch.at = None if kill_at is None else world.switch.count + kill_at
    killed = False
    try:
        async with asyncio.TaskGroup() as tg:
            await world.executor.start(current, corrupted_run(), the_rule, tg=tg)
    except* Killed:
        killed = True
    world.switch.at = None
    return killed


async def confirm_by_progress(world: World) -> None:
    """Two listings, the successor busier in the second: the attempt is confirmed."""
    await world.executor.observe(world.fleet.listing(), world.clock.now())
    world.clock.advance(5)
    world.fleet.touch("succ-1")
    await world.executor.observe(world.fleet.listing(), world.clock.now())


async def restart_and_settle(world: World) -> None:
    """A new process on the same store: reconcile, then confirm until every attempt is done."""
    restarted = new_executor(world)
    world.clock.advance(5)
    await restarted.reconcile(world.fleet.listing())
    world.clock.advance(5)
    for run_id in list(world.fleet.runs):
        if run_id.startswith("succ-"):
            world.fleet.touch(run_id)
    await restarted.observe(world.fleet.listing(), world.clock.now())
    world.clock.advance(DEADLINE_S + 1)
    await restarted.observe(world.fleet.listing(), world.clock.now())
    assert restarted.in_flight() == 0


@pytest.mark.parametrize(
    "the_rule",
    [
        pytest.param(rule(confirm_deadline=DEADLINE_S), id="handoff"),
        pytest.param(rule(confirm_deadline=DEADLINE_S, restore="sdk"), id="sdk-restore-handoff"),
    ],
)
async def test_kill_at_any_point_hands_off_at_most_once(tmp_path: Path, the_rule: Rule) -> None:
    reference = await prepared(tmp_path / "reference.db", the_rule)
    assert not await attempt_once(reference, the_rule, None)
    points = list(reference.switch.labels)
    returned_at = points.index("handoff_returned") + 1  # 1-based kill point
    assert len(points) > 15, points

    for k in range(1, len(points) + 1):
        world = await prepared(tmp_path / f"kill-{k}.db", the_rule)
        assert await attempt_once(world, the_rule, k), f"no kill at point {k}"
        assert world.switch.fired == points[k - 1]

        await restart_and_settle(world)

        context = f"killed at {k}: {points[k - 1]}"
        keys = world.handoff.keys()
        assert len(keys) <= 1, context
        attempts = await world.store.attempts(LINEAGE_ID)
        assert all(a.outcome is not None for a in attempts), context
        after = await world.store.get_lineage(LINEAGE_ID)
        assert after is not None
        assert after.state not in (LineageState.RECOVERING, LineageState.RECOVERED), context
        if k > returned_at:
            # The handoff returned before the kill: exactly once, and it is confirmed.
            assert len(keys) == 1, context
            (attempt,) = attempts
            assert attempt.attempt_id == keys[0], context
            assert attempt.outcome is AttemptOutcome.SUCCEEDED, context
            assert attempt.successor_run_id == "succ-1", context


async def test_kill_while_confirming_still_settles_the_lineage(tmp_path: Path) -> None:
    the_rule = rule(confirm_deadline=DEADLINE_S)
    reference = await prepared(tmp_path / "reference.db", the_rule)
    assert not await attempt_once(reference, the_rule, None)
    reference.switch.labels.clear()
    await confirm_by_progress(reference)
    points = list(reference.switch.labels)
    assert len(points) >= 4, points  # successor row, then outcome + lineage in one commit

    for k in range(1, len(points) + 1):
        world = await prepared(tmp_path / f"confirm-kill-{k}.db", the_rule)
        assert not await attempt_once(world, the_rule, None)
        world.switch.at = world.switch.count + k
        with pytest.raises(Killed):
            await confirm_by_progress(world)
        world.switch.at = None

        await restart_and_settle(world)

        context = f"killed at {k}: {points[k - 1]}"
        (attempt,) = await world.store.attempts(LINEAGE_ID)
        assert attempt.outcome is AttemptOutcome.SUCCEEDED, context
        assert len(world.handoff.keys()) == 1, context
        after = await world.store.get_lineage(LINEAGE_ID)
        assert after is not None
        assert after.state is LineageState.HEALTHY, context
