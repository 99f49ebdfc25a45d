"""The watch loop: list the fleet, let the policy decide, record, and start attempts.

One cycle costs ceil(N / page size) list requests and nothing per healthy run: the scan below only
builds observations for runs that are corrupted, tagged by us, or tied to a lineage that is not
healthy. A failed or partial poll yields no decisions at all: "could not check" is not evidence.
The poller acts only while this replica leads; the first cycle as leader reconciles unfinished
attempts before anything new can start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

import structlog

from tinker_recovery.core import lineage as core_lineage
from tinker_recovery.core import policy as core_policy
from tinker_recovery.core import rules as core_rules
from tinker_recovery.core.model import (
    Decision,
    Lineage,
    LineageState,
    RunView,
)
from tinker_recovery.errors import (
    FencedOut,
    RecoveryError,
    RemoteRejected,
    RemoteUnavailable,
    StoreUnavailable,
)
from tinker_recovery.obs.metrics import Metrics
from tinker_recovery.settings import PolicySettings, PollSettings, StateSettings
from tinker_recovery.shell import manual
from tinker_recovery.shell.clock import Clock
from tinker_recovery.shell.guard import CheckpointGuard
from tinker_recovery.shell.store.base import Event, Store

log = structlog.get_logger(__name__)

# Lineage states that still need the policy's attention each cycle even when the run reads healthy.
_ACTIVE = frozenset(
    {
        LineageState.SUSPECT,
        LineageState.CORRUPTED,
        LineageState.WAITING,
        LineageState.HELD,
        LineageState.EXHAUSTED,
        LineageState.IGNORED,
    }
)


class RunSource(Protocol):
    async def list_runs(self) -> list[RunView]: ...


class AttemptRunner(manual.Starter, Protocol):
    """The executor as the poller uses it (`start` and `busy` come from manual.Starter)."""

    async def observe(self, runs: Sequence[RunView], now: datetime) -> None: ...

    async def reconcile(
        self, runs: Sequence[RunView] | None, *, epoch: int | None = None
    ) -> None: ...

    async def sweep(self, runs: Sequence[RunView], *, epoch: int | None = None) -> None: ...

    def in_flight(self) -> int: ...


class PollHealth(Protocol):
    def mark_poll_success(self, monotonic_s: float) -> None: ...

    def mark_poll_cycle(self, monotonic_s: float) -> None: ...

    def mark_store(self, ok: bool) -> None: ...


def run_payload(run: RunView) -> dict[str, Any]:
    """The raw run as the poll saw it, kept in the event log behind every decision."""
    raw = dataclasses.asdict(run)
    raw["user_metadata"] = dict(run.user_metadata)
    payload: dict[str, Any] = _jsonable(raw)
    return payload


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


@dataclasses.dataclass
class FleetMemory:
    """What the breaker and the stagger need across cycles (in memory; rebuilt on start-up).

    Detections are keyed by lineage, so that reading the same corruption again (a decision
    write that failed and is retried, the store's copy after a takeover) never counts twice."""

    detections: dict[str, datetime] = dataclasses.field(default_factory=dict)  # by lineage
    starts: deque[datetime] = dataclasses.field(default_factory=deque)
    breaker_opened_at: datetime | None = None

    def detected(self, lineage_id: str, at: datetime) -> None:
        self.detections[lineage_id] = at

    def detection_times(self) -> tuple[datetime, ...]:
        return tuple(sorted(self.detections.values()))

    def forget_before(self, cutoff: datetime) -> None:
        self.detections = {k: at for k, at in self.detections.items() if at >= cutoff}
        while self.starts and self.starts[0] < cutoff:
            self.starts.popleft()


class Poller:
    def __init__(
        self,
        *,
        source: RunSource,
        store: Store,
        executor: AttemptRunner,
        policy: PolicySettings,
        poll: PollSettings,
        clock: Clock,
        metrics: Metrics,
        health: PollHealth,
        is_leader: Callable[[], bool],
        lease_epoch: Callable[[], int | None] = lambda: None,
        retention: StateSettings | None = None,
        rand: Callable[[], float] = random.random,
        guard: CheckpointGuard | None = None,
    ) -> None:
        self._guard = guard  # checkpoint guard, work at risk, stalls: once per good cycle
        self._source = source
        self._store = store
        self._executor = executor
        self.policy = policy
        self.poll = poll
        self._clock = clock
        self._metrics = metrics
        self._health = health
        self._is_leader = is_leader
        self._lease_epoch = lease_epoch
        self.retention = retention
        self._next_compact_s = 0.0  # monotonic; the first cycle as leader applies retention
        self._stall_routed: set[str] = set()  # stalled runs already turned into a request
        self._epoch: int | None = None  # the lease epoch this cycle acts under
        self._rand = rand
        self._fleet = FleetMemory()
        self._reconciled = False
        self._watch_started_at: datetime | None = None
        self._breaker_hold_set = False
        self._known: dict[str, Lineage] = {}  # lineages as read at the start of this cycle
        self._counts: dict[LineageState, int] = {}  # all lineages by state, this cycle
        self.last_cycle: dict[str, Any] = {}
        self.wake = asyncio.Event()  # set to run the next cycle now (operator actions)

    def configure(self, *, policy: PolicySettings, poll: PollSettings) -> None:
        """Apply a reloaded configuration; takes effect from the next cycle."""
        self.policy = policy
        self.poll = poll

    def on_leadership(self, leading: bool) -> None:
        """Every gain is a takeover (even our own lapsed-and-renewed term): another replica may
        have acted meanwhile, so reconcile before anything new, and poll now."""
        if leading:
            self._reconciled = False
        self.wake.set()

    @property
    def breaker_open(self) -> bool:
        return self._fleet.breaker_opened_at is not None

    async def run(self, stop: asyncio.Event, tg: asyncio.TaskGroup) -> None:
        """Poll every interval until `stop` is set. Never raises for a bad cycle."""
        while not stop.is_set():
            # Cleared before the cycle, so a wake-up (stop, an operator action, a takeover)
            # that arrives during the cycle still cuts the following sleep short.
            self.wake.clear()
            began = self._clock.monotonic()
            if self._is_leader():
                await self.poll_once(tg)
            else:
                self._reconciled = False  # a later takeover must reconcile again
            # The loop turned (even if Tinker is down): that is what the watchdog wants to see.
            self._health.mark_poll_cycle(self._clock.monotonic())
            if stop.is_set():
                break
            elapsed = self._clock.monotonic() - began
            # `wake` is also set by the app when `stop` is, so one event ends the sleep early.
            await self._clock.sleep(max(0.0, self.poll.interval - elapsed), wakeup=self.wake)

    async def poll_once(self, tg: asyncio.TaskGroup) -> None:
        try:
            async with asyncio.timeout(self.poll.cycle_timeout):
                await self.cycle(tg)
        except TimeoutError:
            self._poll_failed("timeout", "the poll cycle took longer than cycle_timeout")
        except StoreUnavailable as exc:
            # Readiness fails until a cycle completes with the store working again.
            self._health.mark_store(False)
            self._poll_failed("store", str(exc))
        except FencedOut as exc:
            self._poll_failed("fenced", str(exc))
        except RecoveryError as exc:
            # Store trouble or a fenced write: this cycle is lost, the next one starts clean.
            self._poll_failed("other", str(exc))
        except Exception as exc:  # the loop's per-iteration boundary: log, count, carry on
            log.exception("poll_cycle_crashed")
            self._poll_failed("other", type(exc).__name__)

    def _poll_failed(self, reason: str, detail: str) -> None:
        self._metrics.poll_errors.labels(reason=reason).inc()
        log.warning("poll_failed", reason=reason, detail=detail)

    async def cycle(self, tg: asyncio.TaskGroup) -> None:
        """One poll: list, reconcile once, confirm, decide, record, act.

        Everything the cycle writes is fenced on the lease epoch read at its start: a cycle that
        spans a lapse and a new term cannot write decisions made from the old term's view."""
        began = self._clock.monotonic()
        self._epoch = self._lease_epoch()
        policy = self.policy  # one configuration for the whole cycle, whatever SIGHUP does
        await self._store.check()
        try:
            runs = await self._source.list_runs()
        except (RemoteUnavailable, RemoteRejected) as exc:
            self._poll_failed(_reason(exc), str(exc))
            return
        now = self._clock.now()
        self._metrics.poll_duration.observe(self._clock.monotonic() - began)
        self._metrics.runs_watched.set(len(runs))
        self._metrics.last_successful_poll.set(now.timestamp())
        self._health.mark_poll_success(self._clock.monotonic())

        if self._watch_started_at is None:
            self._watch_started_at = await self._store.watch_started_at()
        if not self._reconciled:
            await self._executor.reconcile(runs, epoch=self._epoch)
            await self._restore_fleet_memory()
            self._reconciled = True
        await self._executor.observe(runs, now)
        await self._executor.sweep(runs, epoch=self._epoch)
        if self._guard is not None:
            await self._guard.run_cycle(runs, now, policy)
            await self._route_stalls(now)
        decisions = await self._decide(runs, now, policy)
        started = await self._act(decisions, runs, now, tg, policy)
        started += await manual.take(
            store=self._store,
            executor=self._executor,
            policy=policy,
            runs=runs,
            now=now,
            tg=tg,
            epoch=self._epoch,
            on_start=lambda: self._fleet.starts.append(now),
        )
        await self._compact(now)
        self._health.mark_store(True)
        self.last_cycle = {
            "at": now.isoformat(),
            "runs": len(runs),
            "decisions": dict(Counter(d.kind.value for d in decisions)),
            "attempts_started": started,
            "duration_s": round(self._clock.monotonic() - began, 4),
        }
        log.debug("poll_cycle", **self.last_cycle)

    async def _route_stalls(self, now: datetime) -> None:
        """`on_stall: recover`: each stalled run becomes one operator-style request (once per
        stall), so it passes the same checks a `recover RUN` does: in the listing, the current
        run of its lineage, no attempt in flight, a rule with a handoff, no dry run."""
        assert self._guard is not None
        wanted = dict(self._guard.recover_requests())
        for run_id, reason in wanted.items():
            if run_id in self._stall_routed:
                continue
            request_id = await self._store.request_recovery(
                run_id, None, by=f"stall ({reason})"[:256], at=now
            )
            log.warning("stalled_run_recovery_requested", run_id=run_id, request_id=request_id)
        self._stall_routed = set(wanted)

    async def _compact(self, now: datetime) -> None:
        """Event retention, every `compact_interval`: history stays bounded in age and rows,
        and what open lineages need is kept (see Store.compact)."""
        retention = self.retention
        if retention is None or self._clock.monotonic() < self._next_compact_s:
            return
        self._next_compact_s = self._clock.monotonic() + retention.compact_interval
        deleted = await self._store.compact(
            before=now - timedelta(seconds=retention.events_max_age),
            keep=retention.events_max_rows,
            epoch=self._epoch,
        )
        if deleted:
            log.info("events_compacted", deleted=deleted)

    async def _decide(
        self, runs: Sequence[RunView], now: datetime, policy: PolicySettings
    ) -> list[Decision]:
        # Only what this cycle needs: lineages that are active, and those of corrupted runs. A
        # year of healthy history is neither read nor decoded.
        lineages = await self._store.cycle_lineages([r.run_id for r in runs if r.corrupted])
        self._known = {lineage.lineage_id: lineage for lineage in lineages}
        self._counts = await self._store.lineage_counts()
        observations, unknown = self._observations(runs, lineages)
        if unknown:
            observations += await self._place_unknown(unknown, runs, self._known, now)
        holds = await self._store.holds()
        self._metrics.set_fleet_paused(None in holds)
        self._fleet.forget_before(now - timedelta(seconds=self._horizon_s()))
        if self._breaker_hold_set and None not in holds:
            # An operator resumed the fleet after a hold-mode trip: close the breaker and forget
            # the detections that tripped it, or it would trip again on the same evidence.
            log.info("incident_breaker_resumed")
            self._breaker_hold_set = False
            self._fleet.breaker_opened_at = None
            self._fleet.detections.clear()
        fleet = core_policy.FleetView(
            in_flight=self._executor.in_flight(),
            recent_detections=self._fleet.detection_times(),
            recent_starts=tuple(self._fleet.starts),
            breaker_opened_at=self._fleet.breaker_opened_at,
            fleet_held=None in holds,
            held_lineages=frozenset(h for h in holds if h is not None),
            watch_started_at=self._watch_started_at,
        )
        plan = core_policy.plan_cycle(observations, fleet, now, policy, self._rand)
        if plan.breaker_open != self.breaker_open:
            log.warning("incident_breaker", open=plan.breaker_open, mode=policy.breaker.mode)
            if plan.breaker_open and policy.breaker.mode == "hold":
                # Persist the hold so it survives restarts and is lifted only by `resume`.
                await self._store.set_hold(None, True, by="incident_breaker", at=now)
                self._breaker_hold_set = True
        self._fleet.breaker_opened_at = plan.breaker_opened_at
        self._metrics.incident_breaker_open.set(1 if plan.breaker_open else 0)
        return plan.decisions

    def _horizon_s(self) -> float:
        breaker = self.policy.breaker
        return max(breaker.window, breaker.stagger_interval, breaker.cool_down)

    def _observations(
        self, runs: Sequence[RunView], lineages: Iterable[Lineage]
    ) -> tuple[list[core_policy.Observation], list[RunView]]:
        """Observations for the policy, and the corrupted runs nobody knows (checked next)."""
        by_current: dict[str, Lineage] = {}
        retired: set[str] = set()  # corrupted runs a lineage has already moved on from
        for lineage in lineages:
            by_current[lineage.current_run_id] = lineage
            if lineage.root_run_id != lineage.current_run_id:
                retired.add(lineage.root_run_id)
        observations: list[core_policy.Observation] = []
        unknown: list[RunView] = []
        seen: set[str] = set()
        for run in runs:
            watched = by_current.get(run.run_id)
            if watched is not None:
                seen.add(watched.lineage_id)
                # Healthy lineages still charged for attempts are watched for progress.
                if run.corrupted or watched.state in _ACTIVE or watched.attempt_starts:
                    observations.append(core_policy.Observation(run=run, lineage=watched))
                continue
            if run.corrupted and run.run_id not in retired:
                unknown.append(run)
        for lineage in by_current.values():
            if lineage.lineage_id not in seen and lineage.state in _ACTIVE:
                observations.append(core_policy.Observation(run=None, lineage=lineage))
        return observations, unknown

    async def _place_unknown(
        self,
        unknown: Sequence[RunView],
        runs: Sequence[RunView],
        lineages: Mapping[str, Lineage],
        now: datetime,
    ) -> list[core_policy.Observation]:
        """Corrupted runs the store has no lineage for. Rare, so a store read each is fine.

        - Our tags on such a run are trusted only with the idempotency key of an attempt of
          that lineage (anyone can write a tag): an untrusted run is its own lineage.
        - A run of a known lineage with a newer current run is left alone.
        - A run the service's metadata shows was already recovered (a run carrying our key and
          `recovered_from` it, same owner and base model) is never recovered again, whatever
          the local store says: its lineage is rebuilt from the listing instead.
        """
        successors = core_lineage.successors_by_origin(runs)
        current = {lineage.current_run_id for lineage in lineages.values()}
        observations: list[core_policy.Observation] = []
        for run in unknown:
            tag = run.lineage_tag
            if tag is not None and not await self._tag_trusted(run, tag):
                log.warning(
                    "untrusted_lineage_tag",
                    run_id=run.run_id,
                    lineage_tag=tag[:256],
                    reason="no attempt of that lineage has this run's idempotency key",
                )
                run = core_lineage.without_our_tags(run)
                tag = None
            if tag is not None and (
                tag in lineages or await self._store.get_lineage(tag) is not None
            ):
                continue  # an earlier run of a lineage that has a newer current run
            chain = core_lineage.successor_chain(run, successors)
            if chain:
                last = chain[-1].run_id
                if last not in current and await self._store.lineage_for_run(last) is None:
                    await self._rebuild(run, chain, now)
                continue
            observations.append(core_policy.Observation(run=run, lineage=None))
        return observations

    async def _tag_trusted(self, run: RunView, tag: str) -> bool:
        key = run.idempotency_key
        if key is None or not core_lineage.is_valid_lineage_id(tag) or len(key) > 512:
            return False
        attempt = await self._store.get_attempt(key)
        return attempt is not None and attempt.lineage_id == tag

    async def _rebuild(self, origin: RunView, chain: Sequence[RunView], now: datetime) -> None:
        lineage = core_lineage.rebuilt_from_successors(origin, chain, now)
        event = Event(
            at=now,
            kind="lineage_rebuilt",
            reason=lineage.reason,
            lineage_id=lineage.lineage_id,
            run_id=origin.run_id,
            data={"chain": [run.run_id for run in chain], "run": run_payload(origin)},
        )
        await self._store.save_lineage(lineage, event, epoch=self._epoch)
        self._known[lineage.lineage_id] = lineage
        log.warning(
            "lineage_rebuilt",
            lineage_id=lineage.lineage_id,
            run_id=origin.run_id,
            current_run_id=lineage.current_run_id,
            reason=lineage.reason,
        )

    async def _act(
        self,
        decisions: Sequence[Decision],
        runs: Sequence[RunView],
        now: datetime,
        tg: asyncio.TaskGroup,
        policy: PolicySettings,
    ) -> int:
        runs_by_id = {run.run_id: run for run in runs}
        started = 0
        for decision in decisions:
            previous = self._known.get(decision.lineage.lineage_id)
            run = runs_by_id.get(decision.lineage.current_run_id)
            rule = None
            if decision.start_attempt and run is not None:
                rule = core_rules.match_rule(run, policy.rules)
            if rule is not None and run is not None:
                # The decision and the attempt's first row are one transaction (executor.start).
                event = self._decision_event(decision, previous, run)
                attempt = await self._executor.start(
                    decision.lineage,
                    run,
                    rule,
                    tg=tg,
                    epoch=self._epoch,
                    before=previous,
                    decision=event,
                )
                if attempt is None:
                    continue  # not started, nothing written: decided again next cycle
                self._log_decision(decision)
                self._fleet.starts.append(now)
                started += 1
            elif previous == decision.lineage:
                continue  # nothing changed: not a decision worth a write, a count or a metric
            else:
                await self._record(decision, previous, run)
            self._counted(decision, now)
        self._export_lineage_gauge(decisions)
        return started

    def _counted(self, decision: Decision, now: datetime) -> None:
        """Metrics and breaker input for a decision that was written."""
        self._metrics.decisions.labels(decision=decision.kind.value).inc()
        if decision.lineage.detected_at == now:
            # Confirmed by this cycle's read, whatever was decided about it.
            self._metrics.corruptions_detected.inc()
            self._fleet.detected(decision.lineage.lineage_id, now)

    def _decision_event(
        self, decision: Decision, previous: Lineage | None, run: RunView | None
    ) -> Event:
        return Event(
            at=decision.lineage.updated_at,
            kind="decision",
            reason=decision.reason,
            lineage_id=decision.lineage.lineage_id,
            run_id=decision.lineage.current_run_id,
            data={
                "decision": decision.kind.value,
                "from": previous.state.value if previous else None,
                "to": decision.lineage.state.value,
                "run": run_payload(run) if run else None,
            },
        )

    async def _record(
        self, decision: Decision, previous: Lineage | None, run: RunView | None
    ) -> None:
        # Compared with what the policy decided from (read once this cycle), not a fresh read:
        # an unchanged lineage is never written back, so an executor transition made during
        # the cycle cannot be overwritten by the copy the policy saw.
        event = self._decision_event(decision, previous, run)
        await self._store.save_lineage(decision.lineage, event, epoch=self._epoch)
        self._log_decision(decision)

    @staticmethod
    def _log_decision(decision: Decision) -> None:
        log.info(
            "lineage_transition",
            lineage_id=decision.lineage.lineage_id,
            run_id=decision.lineage.current_run_id,
            decision=decision.kind.value,
            state=decision.lineage.state.value,
            reason=decision.reason,
        )

    def _export_lineage_gauge(self, decisions: Sequence[Decision]) -> None:
        """Lineages by state as of this cycle's decisions (the executor's own transitions show
        from the next cycle on): the store's counts, moved by what this cycle decided."""
        counts = Counter(self._counts)
        for decision in decisions:
            before = self._known.get(decision.lineage.lineage_id)
            if before == decision.lineage:
                continue
            if before is not None:
                counts[before.state] -= 1
            counts[decision.lineage.state] += 1
        for state in LineageState:
            self._metrics.lineages.labels(state=state.value).set(counts.get(state, 0))

    async def _restore_fleet_memory(self) -> None:
        """Rebuild breaker inputs from the store after a (re)start or a takeover: replaced,
        not appended to, so each gain of the lease does not count the same detections again."""
        detections: dict[str, datetime] = {}
        starts: list[datetime] = []
        for lineage in await self._store.list_lineages():
            if lineage.detected_at is not None:
                detections[lineage.lineage_id] = lineage.detected_at
            starts.extend(lineage.attempt_starts)
        self._fleet.detections = detections
        self._fleet.starts = deque(sorted(starts))


def _reason(exc: RecoveryError) -> str:
    from tinker_recovery.shell import gateway  # local: keeps the poller testable without httpx

    return gateway.poll_error_reason(exc)
