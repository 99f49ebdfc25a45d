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
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

import structlog

from tinker_recovery.core import policy as core_policy
from tinker_recovery.core import rules as core_rules
from tinker_recovery.core.model import (
    TAG_LINEAGE,
    Decision,
    Lineage,
    LineageState,
    RunView,
)
from tinker_recovery.errors import RecoveryError, RemoteRejected, RemoteUnavailable
from tinker_recovery.obs.metrics import Metrics
from tinker_recovery.settings import PolicySettings, PollSettings
from tinker_recovery.shell import manual
from tinker_recovery.shell.clock import Clock
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

    async def reconcile(self, runs: Sequence[RunView] | None) -> None: ...

    def in_flight(self) -> int: ...


class PollHealth(Protocol):
    def mark_poll_success(self, monotonic_s: float) -> None: ...

    def mark_poll_cycle(self, monotonic_s: float) -> None: ...


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
    """What the breaker and the stagger need across cycles (in memory; rebuilt on start-up)."""

    detections: deque[datetime] = dataclasses.field(default_factory=deque)
    starts: deque[datetime] = dataclasses.field(default_factory=deque)
    breaker_opened_at: datetime | None = None

    def forget_before(self, cutoff: datetime) -> None:
        for times in (self.detections, self.starts):
            while times and times[0] < cutoff:
                times.popleft()


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
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._source = source
        self._store = store
        self._executor = executor
        self.policy = policy
        self.poll = poll
        self._clock = clock
        self._metrics = metrics
        self._health = health
        self._is_leader = is_leader
        self._rand = rand
        self._fleet = FleetMemory()
        self._reconciled = False
        self._watch_started_at: datetime | None = None
        self._breaker_hold_set = False
        self._known: dict[str, Lineage] = {}  # lineages as read at the start of this cycle
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
                await self._guarded_cycle(tg)
            else:
                self._reconciled = False  # a later takeover must reconcile again
            # The loop turned (even if Tinker is down): that is what the watchdog wants to see.
            self._health.mark_poll_cycle(self._clock.monotonic())
            if stop.is_set():
                break
            elapsed = self._clock.monotonic() - began
            # `wake` is also set by the app when `stop` is, so one event ends the sleep early.
            await self._clock.sleep(max(0.0, self.poll.interval - elapsed), wakeup=self.wake)

    async def _guarded_cycle(self, tg: asyncio.TaskGroup) -> None:
        try:
            async with asyncio.timeout(self.poll.cycle_timeout):
                await self.cycle(tg)
        except TimeoutError:
            self._poll_failed("timeout", "the poll cycle took longer than cycle_timeout")
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
        """One poll: list, reconcile once, confirm, decide, record, act."""
        began = self._clock.monotonic()
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
            await self._executor.reconcile(runs)
            await self._restore_fleet_memory()
            self._reconciled = True
        await self._executor.observe(runs, now)
        decisions = await self._decide(runs, now)
        started = await self._act(decisions, runs, now, tg)
        started += await manual.take(
            store=self._store,
            executor=self._executor,
            policy=self.policy,
            runs=runs,
            now=now,
            tg=tg,
            on_start=lambda: self._fleet.starts.append(now),
        )
        self.last_cycle = {
            "at": now.isoformat(),
            "runs": len(runs),
            "decisions": dict(Counter(d.kind.value for d in decisions)),
            "attempts_started": started,
            "duration_s": round(self._clock.monotonic() - began, 4),
        }
        log.debug("poll_cycle", **self.last_cycle)

    async def _decide(self, runs: Sequence[RunView], now: datetime) -> list[Decision]:
        lineages = await self._store.list_lineages()
        self._known = {lineage.lineage_id: lineage for lineage in lineages}
        observations = self._observations(runs, lineages)
        holds = await self._store.holds()
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
            recent_detections=tuple(self._fleet.detections),
            recent_starts=tuple(self._fleet.starts),
            breaker_opened_at=self._fleet.breaker_opened_at,
            fleet_held=None in holds,
            held_lineages=frozenset(h for h in holds if h is not None),
            watch_started_at=self._watch_started_at,
        )
        plan = core_policy.plan_cycle(observations, fleet, now, self.policy, self._rand)
        if plan.breaker_open != self.breaker_open:
            log.warning("incident_breaker", open=plan.breaker_open, mode=self.policy.breaker.mode)
            if plan.breaker_open and self.policy.breaker.mode == "hold":
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
    ) -> list[core_policy.Observation]:
        by_current: dict[str, Lineage] = {}
        retired: set[str] = set()  # corrupted runs a lineage has already moved on from
        for lineage in lineages:
            by_current[lineage.current_run_id] = lineage
            if lineage.root_run_id != lineage.current_run_id:
                retired.add(lineage.root_run_id)
        by_id = {lineage.lineage_id: lineage for lineage in by_current.values()}
        observations: list[core_policy.Observation] = []
        seen: set[str] = set()
        for run in runs:
            watched = by_current.get(run.run_id)
            if watched is not None:
                seen.add(watched.lineage_id)
                # Healthy lineages still charged for attempts are watched for progress.
                if run.corrupted or watched.state in _ACTIVE or watched.attempt_starts:
                    observations.append(core_policy.Observation(run=run, lineage=watched))
                continue
            if not run.corrupted or run.run_id in retired:
                continue
            tag = run.user_metadata.get(TAG_LINEAGE)
            if tag is not None and tag in by_id:
                continue  # an earlier run of a lineage that has a newer current run
            observations.append(core_policy.Observation(run=run, lineage=None))
        for lineage in by_current.values():
            if lineage.lineage_id not in seen and lineage.state in _ACTIVE:
                observations.append(core_policy.Observation(run=None, lineage=lineage))
        return observations

    async def _act(
        self,
        decisions: Sequence[Decision],
        runs: Sequence[RunView],
        now: datetime,
        tg: asyncio.TaskGroup,
    ) -> int:
        runs_by_id = {run.run_id: run for run in runs}
        started = 0
        for decision in decisions:
            self._metrics.decisions.labels(decision=decision.kind.value).inc()
            run = runs_by_id.get(decision.lineage.current_run_id)
            if decision.lineage.detected_at == now:
                # Confirmed by this cycle's read, whatever was decided about it.
                self._metrics.corruptions_detected.inc()
                self._fleet.detections.append(now)
            await self._record(decision, run)
            if decision.start_attempt and run is not None:
                rule = core_rules.match_rule(run, self.policy.rules)
                if rule is None:  # the policy only starts attempts for matched runs
                    continue
                await self._executor.start(decision.lineage, run, rule, tg=tg)
                self._fleet.starts.append(now)
                started += 1
        self._export_lineage_gauge(decisions)
        return started

    async def _record(self, decision: Decision, run: RunView | None) -> None:
        # Compare with what the policy decided from (read once this cycle), not a fresh read:
        # an unchanged lineage is never written back, so an executor transition made during
        # the cycle cannot be overwritten by the copy the policy saw.
        previous = self._known.get(decision.lineage.lineage_id)
        if previous == decision.lineage:
            return
        event = Event(
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
        await self._store.save_lineage(decision.lineage, event)
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
        from the next cycle on), without reading the store again."""
        latest = dict(self._known)
        latest.update((d.lineage.lineage_id, d.lineage) for d in decisions)
        counts = Counter(lineage.state for lineage in latest.values())
        for state in LineageState:
            self._metrics.lineages.labels(state=state.value).set(counts.get(state, 0))

    async def _restore_fleet_memory(self) -> None:
        """Rebuild breaker inputs from the store after a (re)start or a takeover."""
        for lineage in await self._store.list_lineages():
            if lineage.detected_at is not None:
                self._fleet.detections.append(lineage.detected_at)
            self._fleet.starts.extend(lineage.attempt_starts)
        self._fleet.detections = deque(sorted(self._fleet.detections))
        self._fleet.starts = deque(sorted(self._fleet.starts))


def _reason(exc: RecoveryError) -> str:
    from tinker_recovery.shell import gateway  # local: keeps the poller testable without httpx

    return gateway.poll_error_reason(exc)
