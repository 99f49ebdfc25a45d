"""The executor behind the real poller and policy: detection -> attempt -> handoff -> confirmed."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from ex_fakes import RUN_ID, build_world, ckpt, corrupted_run, only, rule

from tinker_recovery.core.model import AttemptOutcome, LineageState, RunView
from tinker_recovery.settings import PolicySettings, PollSettings
from tinker_recovery.shell.poller import Poller


class Source:
    def __init__(self, runs: list[RunView]) -> None:
        self.runs = runs

    async def list_runs(self) -> list[RunView]:
        return list(self.runs)


class Health:
    def mark_poll_success(self, monotonic_s: float) -> None:
        pass

    def mark_poll_cycle(self, monotonic_s: float) -> None:
        pass

    def mark_store(self, ok: bool) -> None:
        pass


async def test_poller_starts_the_attempt_and_a_later_cycle_confirms_it(tmp_path: Path) -> None:
    the_rule = rule(recover_preexisting=True, max_idle=None)
    world = await build_world(tmp_path / "state.db", rules=(the_rule,))
    world.gateway.checkpoints[RUN_ID] = [ckpt("030", age_s=600)]
    healthy = replace(corrupted_run(), corrupted=False, last_request_time=world.clock.now())
    source = Source([healthy])
    poller = Poller(
        source=source,
        store=world.store,
        executor=world.executor,
        policy=PolicySettings(rules=[the_rule], confirmations=2),
        poll=PollSettings(),
        clock=world.clock,
        metrics=world.metrics,
        health=Health(),
        is_leader=lambda: True,
        rand=lambda: 0.5,
    )

    async with asyncio.TaskGroup() as tg:
        await poller.cycle(tg)  # healthy: the lineage is born
        source.runs = [replace(healthy, corrupted=True)]
        for _ in range(3):  # suspect, confirmed, then the attempt starts
            world.clock.advance(30)
            await poller.cycle(tg)

    request = only(world.handoff.requests)
    assert request.checkpoint_path == "tinker://run-a/weights/030"
    async with asyncio.TaskGroup() as tg:
        for _ in range(2):  # the successor is first seen, then seen busier: progress
            world.clock.advance(30)
            world.fleet.touch("succ-1")
            source.runs = [*world.fleet.listing(), replace(healthy, corrupted=True)]
            await poller.cycle(tg)

    attempt = only(await world.store.attempts(request.lineage_id))
    assert attempt.outcome is AttemptOutcome.SUCCEEDED
    lineage = await world.store.get_lineage(request.lineage_id)
    assert lineage is not None
    assert (lineage.state, lineage.current_run_id) == (LineageState.HEALTHY, "succ-1")
    assert world.executor.in_flight() == 0
