"""Exactly once under adversity (issue 9): lease flaps, failed writes, hostile or absent
successors. The real executor on the real SQLite store, two store instances on one file where
two replicas are needed, virtual time."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from ex_fakes import (
    LINEAGE_ID,
    RUN_ID,
    T0,
    KillableStore,
    KillSwitch,
    World,
    build_world,
    ckpt,
    corrupted_run,
    lineage,
    new_executor,
    observe_progress,
    rule,
    run_attempt,
    seed,
    stored,
)
from prometheus_client import CollectorRegistry

from tinker_recovery.core.model import (
    TAG_IDEMPOTENCY_KEY,
    Attempt,
    AttemptOutcome,
    AttemptStep,
    LineageState,
)
from tinker_recovery.errors import StoreUnavailable
from tinker_recovery.obs.metrics import Metrics
from tinker_recovery.shell import executor as ex
from tinker_recovery.shell.store.base import Event, Transition

TTL_S = 30.0


@pytest.fixture
async def world(tmp_path: Path) -> World:
    built = await build_world(tmp_path / "state.db")
    built.gateway.checkpoints[RUN_ID] = [ckpt("030", age_s=3600)]
    return built


class Replica:
    """One daemon's store instance and lease view over the shared file."""

    def __init__(self, name: str, store: KillableStore) -> None:
        self.name = name
        self.store = store
        self.epoch: int | None = None

    async def lead(self) -> int:
        lease = await self.store.acquire_or_renew(self.name, TTL_S)
        assert lease is not None, f"{self.name} could not take the lease"
        self.epoch = lease.epoch
        return lease.epoch

    def may_act(self, epoch: int | None) -> bool:
        return epoch is not None and epoch == self.epoch


def executor_for(world: World, replica: Replica) -> ex.Executor:
    return ex.Executor(
        store=replica.store,
        gateway=world.gateway,
        restorer=world.restorer,
        handoffs=world.handoffs(),
        clock=world.clock,
        metrics=Metrics(CollectorRegistry()),
        rand=lambda: 0.5,
        max_concurrent=2,
        rules=world.rules,
        may_act=replica.may_act,
    )


async def test_a_replica_that_regains_the_lease_never_lets_its_old_attempt_hand_off(
    tmp_path: Path,
) -> None:
    """Defect 1: A (epoch 1) has attempt X in a long step; its lease lapses; B (epoch 2)
    settles X, hands off Y and dies; A wins again (epoch 3) with X's task still running. X must
    never hand off, and B's finished row for X must stay finished."""
    world = await build_world(tmp_path / "state.db")
    world.gateway.checkpoints[RUN_ID] = [ckpt("030", age_s=3600)]
    a = Replica("a", world.store)
    other = KillableStore(world.path, clock=world.clock, switch=KillSwitch())
    await other.open()
    b = Replica("b", other)
    executor_a, executor_b = executor_for(world, a), executor_for(world, b)
    entered, gate = asyncio.Event(), asyncio.Event()
    ttl = world.gateway.set_checkpoint_ttl
    calls = 0

    async def slow_once(tinker_path: str, ttl_s: int | None) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:  # X's protect step hangs until we let it go
            entered.set()
            await gate.wait()
        await ttl(tinker_path, ttl_s)

    world.gateway.set_checkpoint_ttl = slow_once  # type: ignore[method-assign]  # X blocks here
    epoch_1 = await a.lead()
    current = await seed(world)

    async with asyncio.TaskGroup() as tg_a:
        x = await executor_a.start(current, corrupted_run(), rule(), tg=tg_a, epoch=epoch_1)
        assert x is not None
        await entered.wait()

        world.clock.advance(TTL_S + 1)  # A's lease lapses while X's task is still running
        epoch_2 = await b.lead()
        await executor_b.reconcile(world.fleet.listing(), epoch=epoch_2)
        settled = await stored(world, x)
        assert settled.outcome is AttemptOutcome.ABANDONED
        after = await other.get_lineage(LINEAGE_ID)
        assert after is not None
        async with asyncio.TaskGroup() as tg_b:
            y = await executor_b.start(
                replace(after, state=LineageState.RECOVERING, attempts_total=2),
                corrupted_run(),
                rule(),
                tg=tg_b,
                epoch=epoch_2,
                before=after,
            )
        assert y is not None
        assert world.handoff.keys() == [y.attempt_id]

        world.clock.advance(TTL_S + 1)  # B dies; A wins the lease again
        epoch_3 = await a.lead()
        assert epoch_3 == epoch_1 + 2
        await executor_a.reconcile(world.fleet.listing(), epoch=epoch_3)
        gate.set()

    assert world.handoff.keys() == [y.attempt_id]  # X never handed off
    assert (await stored(world, x)).outcome is AttemptOutcome.ABANDONED  # not reopened
    adopted = await stored(world, y)
    assert (adopted.step, adopted.outcome, adopted.epoch) == (
        AttemptStep.CONFIRMING,
        None,
        epoch_3,
    )
    assert executor_a.busy(LINEAGE_ID)
    await other.close()


async def test_an_old_epochs_handoff_is_withheld_and_its_writes_refused(tmp_path: Path) -> None:
    """Defect 1, the fence alone: even a task nobody cancelled cannot write or hand off once
    the lease moved to another epoch (here: regained by the same replica)."""
    world = await build_world(tmp_path / "state.db")
    world.gateway.checkpoints[RUN_ID] = [ckpt("030", age_s=3600)]
    a = Replica("a", world.store)
    executor_a = executor_for(world, a)
    entered, gate = asyncio.Event(), asyncio.Event()

    async def slow(tinker_path: str, ttl_s: int | None) -> None:
        entered.set()
        await gate.wait()

    world.gateway.set_checkpoint_ttl = slow  # type: ignore[method-assign]  # block in PROTECTING
    epoch_1 = await a.lead()
    current = await seed(world)
    async with asyncio.TaskGroup() as tg:
        x = await executor_a.start(current, corrupted_run(), rule(), tg=tg, epoch=epoch_1)
        assert x is not None
        await entered.wait()
        world.clock.advance(TTL_S + 1)
        assert await a.lead() == epoch_1 + 1  # a new term: nobody cancelled the old task
        gate.set()

    assert world.handoff.requests == []
    left = await stored(world, x)
    assert left.outcome is None  # its writes were refused; the new term's sweep settles it
    await executor_a.sweep(world.fleet.listing(), epoch=a.epoch)
    assert (await stored(world, x)).outcome is AttemptOutcome.ABANDONED
    assert world.handoff.requests == []


async def test_losing_the_lease_cancels_attempts_before_their_handoff(world: World) -> None:
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
        world.executor.on_leadership(False)

    assert world.handoff.requests == []
    assert (await stored(world, attempt)).outcome is AttemptOutcome.ABANDONED
    assert world.executor.in_flight() == 0


class FailingCommits(KillableStore):
    """The real store, whose next `failures` commits raise a transient error."""

    failures = 0

    async def commit(self, transition: Transition, *, epoch: int | None = None) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise StoreUnavailable("sqlite store: disk I/O error")
        await super().commit(transition, epoch=epoch)


async def test_one_failed_write_does_not_strand_the_lineage(tmp_path: Path) -> None:
    """Defect 4: a store error inside a step left the lineage recovering with nothing in
    flight. The step and its cleanup both fail here; the next sweep settles the attempt and the
    lineage moves on (and is recoverable again)."""
    world = await build_world(tmp_path / "state.db")
    world.gateway.checkpoints[RUN_ID] = [ckpt("030", age_s=3600)]
    flaky = FailingCommits(world.path, clock=world.clock, switch=KillSwitch())
    await flaky.open()
    world.store = flaky
    world.executor = new_executor(world)
    current = await seed(world)
    async with asyncio.TaskGroup() as tg:
        attempt = await world.executor.start(current, corrupted_run(), rule(), tg=tg)
        assert attempt is not None
        flaky.failures = 2  # the SELECTING row, then the FAILED outcome written on the way out

    assert world.handoff.requests == []
    assert (await stored(world, attempt)).outcome is None
    assert world.executor.in_flight() == 0  # nobody carries it out any more

    await world.executor.sweep(world.fleet.listing())

    assert (await stored(world, attempt)).outcome is AttemptOutcome.ABANDONED
    after = await world.store.get_lineage(LINEAGE_ID)
    assert after is not None
    assert after.state not in (LineageState.RECOVERING, LineageState.RECOVERED)


async def test_a_failed_start_writes_nothing_so_the_next_cycle_decides_again(
    tmp_path: Path,
) -> None:
    """Defect 4: the decision (lineage -> recovering) and the attempt's first row are one
    transaction: if it fails, neither is there."""
    world = await build_world(tmp_path / "state.db")
    flaky = FailingCommits(world.path, clock=world.clock, switch=KillSwitch())
    await flaky.open()
    world.store = flaky
    world.executor = new_executor(world)
    before = lineage(state=LineageState.CORRUPTED, attempts_total=0, attempt_starts=())
    await seed(world, before)
    flaky.failures = 1
    async with asyncio.TaskGroup() as tg:
        with pytest.raises(StoreUnavailable):
            await world.executor.start(lineage(), corrupted_run(), rule(), tg=tg, before=before)

    assert await world.store.get_lineage(LINEAGE_ID) == before
    assert await world.store.attempts(LINEAGE_ID) == []
    assert world.executor.in_flight() == 0


async def test_a_corrupted_successor_never_confirms_and_its_checkpoint_becomes_suspect(
    world: World,
) -> None:
    """Defect 9 and issue 10 item 4: a successor that is corrupted before progress is no
    recovery; the checkpoint it started from is suspect, so the next attempt falls back."""
    current = await seed(world)
    attempt = await run_attempt(world, current, corrupted_run(), rule())
    world.fleet.runs["succ-1"] = replace(world.fleet.runs["succ-1"], corrupted=True)

    await observe_progress(world, "succ-1")

    done = await stored(world, attempt)
    assert done.outcome is AttemptOutcome.FAILED
    assert "corrupted before it made progress" in done.reason
    assert await world.store.bad_checkpoints([done.checkpoint_path or ""]) == {done.checkpoint_path}
    events = await world.store.events(lineage_id=LINEAGE_ID)
    assert any(e.kind == "checkpoint_rejected" and e.data["rejection"] == "suspect" for e in events)


async def test_a_successor_that_only_exists_is_not_progress(world: World) -> None:
    """Defect 9: the run's creation time counted as 'sent requests'."""
    current = await seed(world)
    attempt = await run_attempt(world, current, corrupted_run(), rule())
    world.clock.advance(60)
    for _ in range(3):  # listed again and again, never busier than at creation
        await world.executor.observe(world.fleet.listing(), world.clock.now())
        world.clock.advance(30)
    assert (await stored(world, attempt)).outcome is None


async def test_a_seen_successor_missing_from_a_listing_does_not_fail_the_attempt(
    world: World,
) -> None:
    """Defect 2: absent from one listing is not evidence, and never fails an attempt whose
    successor was seen, not even in its handoff grace."""
    current = await seed(world)
    attempt = await run_attempt(world, current, corrupted_run(), rule(confirm_deadline=600.0))
    await world.executor.observe(world.fleet.listing(), world.clock.now())
    assert (await stored(world, attempt)).successor_run_id == "succ-1"
    hidden = [run for run in world.fleet.listing() if run.run_id != "succ-1"]
    for _ in range(5):
        world.clock.advance(60)
        await world.executor.observe(hidden, world.clock.now())
    assert (await stored(world, attempt)).outcome is None
    world.fleet.touch("succ-1")
    await world.executor.observe(world.fleet.listing(), world.clock.now())
    assert (await stored(world, attempt)).outcome is AttemptOutcome.SUCCEEDED


def untagged_job(world: World, run_id: str, labels: dict[str, str]) -> None:
    """A job that resumed without our tags (an unmodified cookbook recipe)."""
    world.fleet.add_run(run_id, labels)


async def test_an_untagged_successor_that_matches_alone_confirms_the_attempt(
    world: World,
) -> None:
    """Issue 10 item 2: exactly one new run with the corrupted run's owner, base model, LoRA
    rank and carried labels is the successor."""
    world.handoff.starts_job = False
    labels = {"renderer_name": "qwen3"}
    await world.executor.observe(world.fleet.listing(), world.clock.now())
    current = await seed(world)
    attempt = await run_attempt(world, current, corrupted_run(labels=labels), rule())
    world.fleet.runs[RUN_ID] = corrupted_run(labels=labels)  # the corrupted run stays listed
    untagged_job(world, "other-team", {"renderer_name": "llama3"})  # another job: labels differ
    untagged_job(world, "resumed", labels)

    await observe_progress(world, "resumed")

    done = await stored(world, attempt)
    assert (done.outcome, done.successor_run_id) == (AttemptOutcome.SUCCEEDED, "resumed")
    assert len(world.handoff.requests) == 1
    events = await world.store.events(lineage_id=LINEAGE_ID)
    assert any("matched without tags" in e.reason for e in events)


async def test_ambiguous_untagged_successors_are_reported_never_guessed(world: World) -> None:
    """Issue 10 item 2: two matching new runs: nothing is chosen; at the deadline the attempt
    fails and the lineage is held for an operator instead of handing off again."""
    world.handoff.starts_job = False
    labels = {"renderer_name": "qwen3"}
    await world.executor.observe(world.fleet.listing(), world.clock.now())
    current = await seed(world)
    attempt = await run_attempt(
        world, current, corrupted_run(labels=labels), rule(confirm_deadline=300.0)
    )
    world.fleet.runs[RUN_ID] = corrupted_run(labels=labels)
    untagged_job(world, "twin-a", labels)
    untagged_job(world, "twin-b", labels)

    await observe_progress(world, "twin-a")
    assert (await stored(world, attempt)).outcome is None
    world.clock.advance(300)
    await world.executor.observe(world.fleet.listing(), world.clock.now())

    done = await stored(world, attempt)
    assert done.outcome is AttemptOutcome.FAILED
    assert "ambiguous" in done.reason
    assert done.successor_run_id is None
    assert LINEAGE_ID in await world.store.holds()
    events = await world.store.events(lineage_id=LINEAGE_ID)
    assert [e.kind for e in events].count("successor_ambiguous") == 1


async def test_only_the_attempts_own_key_is_trusted_not_a_lineage_tag(world: World) -> None:
    """Defect 8: a run carrying only the lineage tag was confirmed ahead of the job's run."""
    world.handoff.starts_job = False
    current = await seed(world)
    attempt = await run_attempt(world, current, corrupted_run(), rule(successor_match="tags"))
    world.fleet.add_run("decoy", {"tinker_recovery.lineage": LINEAGE_ID})
    await observe_progress(world, "decoy")
    assert (await stored(world, attempt)).outcome is None
    world.fleet.add_run("job", {TAG_IDEMPOTENCY_KEY: attempt.attempt_id})
    await observe_progress(world, "job")
    assert (await stored(world, attempt)).successor_run_id == "job"


async def earlier_attempt(world: World, **changes: object) -> Attempt:
    """A finished first attempt of the lineage, as an earlier process left it."""
    base = Attempt(
        attempt_id=f"{LINEAGE_ID}#1-0000000000aa",
        lineage_id=LINEAGE_ID,
        number=1,
        corrupted_run_id=RUN_ID,
        step=AttemptStep.DONE,
        started_at=world.clock.now() - timedelta(hours=1),
        updated_at=world.clock.now() - timedelta(minutes=30),
        outcome=AttemptOutcome.FAILED,
        reason="successor made no progress before the confirm deadline",
        finished_at=world.clock.now() - timedelta(minutes=30),
    )
    attempt = replace(base, **changes)  # type: ignore[arg-type]  # test-only overrides
    await world.store.save_attempt(attempt, Event(at=T0, kind="attempt_finished", reason="x"))
    return attempt


async def test_a_live_successor_of_an_earlier_attempt_is_adopted_not_restarted(
    world: World,
) -> None:
    """Issue 10 item 3: before any new handoff, a live, progressing successor is adopted."""
    first = await earlier_attempt(world, successor_run_id=None)
    world.fleet.add_run("late-job", {TAG_IDEMPOTENCY_KEY: first.attempt_id})
    await observe_progress(world, "late-job")  # seen twice, busier the second time
    current = await seed(world, lineage(attempts_total=2, attempt_starts=(T0, T0)))

    second = await run_attempt(world, current, corrupted_run(), rule())

    assert world.handoff.requests == []  # nothing was started again
    adopted = await stored(world, second)
    assert (adopted.step, adopted.successor_run_id) == (AttemptStep.CONFIRMING, "late-job")
    await observe_progress(world, "late-job")
    assert (await stored(world, second)).outcome is AttemptOutcome.SUCCEEDED


async def test_a_dead_successor_of_an_earlier_attempt_is_not_adopted(world: World) -> None:
    first = await earlier_attempt(world, successor_run_id=None)
    world.fleet.add_run("dead-job", {TAG_IDEMPOTENCY_KEY: first.attempt_id})
    await world.executor.observe(world.fleet.listing(), world.clock.now())
    world.clock.advance(60)
    await world.executor.observe(world.fleet.listing(), world.clock.now())  # no new request
    current = await seed(world, lineage(attempts_total=2, attempt_starts=(T0, T0)))

    await run_attempt(world, current, corrupted_run(), rule())

    assert len(world.handoff.requests) == 1


async def test_a_retry_hands_off_the_newest_checkpoint_a_successor_saved(world: World) -> None:
    """Issue 10 item 3: a retry passed the original, by then stale, checkpoint."""
    await earlier_attempt(
        world,
        successor_run_id="resumed",
        checkpoint_path=f"tinker://{RUN_ID}/weights/030",
        handed_off_path=f"tinker://{RUN_ID}/weights/030",
    )
    newer = ckpt("096", age_s=60, run="resumed")
    world.gateway.checkpoints["resumed"] = [newer]
    current = await seed(world, lineage(attempts_total=2, attempt_starts=(T0, T0)))

    await run_attempt(world, current, corrupted_run(), rule())

    (request,) = world.handoff.requests
    assert request.checkpoint_path == newer.tinker_path


async def test_restore_sdk_reuses_the_proven_copy_of_a_checkpoint(world: World) -> None:
    """Issue 10 item 5: at most one proven copy per checkpoint per lineage."""
    source = f"tinker://{RUN_ID}/weights/030"
    copy = "tinker://restored-1/weights/030-recovery-1"
    await earlier_attempt(world, checkpoint_path=source, handed_off_path=copy)
    current = await seed(world, lineage(attempts_total=2, attempt_starts=(T0, T0)))

    await run_attempt(world, current, corrupted_run(), rule(restore="sdk"))

    assert world.restorer.calls == []
    (request,) = world.handoff.requests
    assert (request.checkpoint_path, request.source_checkpoint_path) == (copy, source)


async def test_two_failed_handoffs_from_one_checkpoint_make_it_suspect(world: World) -> None:
    """Issue 10 item 4, with `restore: none`: a job that dies on an unloadable checkpoint before
    it makes a run leaves no successor to judge; the second failure in a row from the same
    checkpoint marks it suspect, so the next attempt falls back to an older one."""
    newest, older = ckpt("030", age_s=600), ckpt("020", age_s=1200)
    world.gateway.checkpoints[RUN_ID] = [older, newest]
    world.handoff.starts_job = False  # the job dies before it creates its run
    await earlier_attempt(
        world, checkpoint_path=newest.tinker_path, handed_off_path=newest.tinker_path
    )
    current = await seed(world, lineage(attempts_total=2, attempt_starts=(T0, T0)))
    second = await run_attempt(world, current, corrupted_run(), rule(confirm_deadline=60.0))
    assert world.handoff.requests[-1].checkpoint_path == newest.tinker_path
    world.clock.advance(61)
    await world.executor.observe(world.fleet.listing(), world.clock.now())

    assert (await stored(world, second)).outcome is AttemptOutcome.FAILED
    assert await world.store.bad_checkpoints([newest.tinker_path]) == {newest.tinker_path}
    after = await world.store.get_lineage(LINEAGE_ID)
    assert after is not None
    third = await run_attempt(
        world,
        replace(after, state=LineageState.RECOVERING, attempts_total=3),
        corrupted_run(),
        rule(),
    )
    assert (await stored(world, third)).checkpoint_path == older.tinker_path


async def test_one_failed_handoff_does_not_condemn_its_checkpoint(world: World) -> None:
    world.handoff.starts_job = False
    current = await seed(world)
    attempt = await run_attempt(world, current, corrupted_run(), rule(confirm_deadline=60.0))
    world.clock.advance(61)
    await world.executor.observe(world.fleet.listing(), world.clock.now())
    done = await stored(world, attempt)
    assert done.outcome is AttemptOutcome.FAILED
    assert await world.store.bad_checkpoints([done.checkpoint_path or ""]) == set()
