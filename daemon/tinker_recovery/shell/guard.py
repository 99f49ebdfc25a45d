"""Carries out the checkpoint guard once per successful poll cycle (see core/guard.py).

Per cycle: one read of the store's lineages and holds, the pure plan, then one TTL call per
extension (bounded by `max_per_cycle` per rule), each counted in `api_requests_total` by the
gateway and here in `checkpoint_guard_total{outcome}`. A run that needs nothing costs nothing.
A failed call is counted and logged once and simply planned again next cycle (the listing will
still show the old `expires_at`). `dry_run` records what would be done and calls nothing.
Holds mean hands off: a held lineage (or a paused fleet) gets no TTL call from the guard; it
is counted as `held` so the operator can see what waits for them.

It must not decide anything the policy owns: a stalled run with `on_stall: recover` is only
offered (`recover_requests`), never started from here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

import structlog

from tinker_recovery.core import guard as core_guard
from tinker_recovery.core.model import Lineage, RunView
from tinker_recovery.errors import RemoteRejected, RemoteUnavailable
from tinker_recovery.obs.metrics import Metrics
from tinker_recovery.settings import PolicySettings
from tinker_recovery.shell.store.base import Event

log = structlog.get_logger(__name__)

STATUS_WORST = 10  # lineages listed in /status by work at risk


class TtlSetter(Protocol):
    async def set_checkpoint_ttl(self, tinker_path: str, ttl_s: int | None) -> None: ...


class GuardStore(Protocol):
    async def cycle_lineages(self, run_ids: Sequence[str]) -> list[Lineage]: ...

    async def holds(self) -> set[str | None]: ...

    async def append_event(self, event: Event) -> None: ...


class CheckpointGuard:
    def __init__(
        self,
        *,
        gateway: TtlSetter,
        store: GuardStore,
        metrics: Metrics,
        call_timeout_s: float = 30.0,
    ) -> None:
        self._gateway = gateway
        self._store = store
        self._metrics = metrics
        self._call_timeout_s = call_timeout_s
        self._stalled: dict[str, core_guard.Stall] = {}  # run id -> stall, reported once
        self._dry_run_seen: set[tuple[str, datetime]] = set()  # (path, expires_at) recorded
        self._lineage_of: dict[str, str] = {}  # current run id -> lineage id, last cycle
        self._last: core_guard.GuardPlan = core_guard.GuardPlan()
        self._last_at: datetime | None = None

    async def run_cycle(
        self, runs: Sequence[RunView], now: datetime, policy: PolicySettings
    ) -> core_guard.GuardPlan:
        matched = core_guard.match_all(runs, policy.rules)
        # Store reads scale with the runs that need attention, never with the fleet.
        lineages = await self._store.cycle_lineages(core_guard.lookups(matched, now))
        holds = await self._store.holds()
        self._lineage_of = {lin.current_run_id: lin.lineage_id for lin in lineages}
        held_runs = {lin.current_run_id for lin in lineages if lin.lineage_id in holds}
        successors = {
            lin.current_run_id for lin in lineages if lin.current_run_id != lin.root_run_id
        }
        plan = core_guard.plan(
            matched,
            now,
            held_runs=held_runs,
            fleet_held=None in holds,
            successors=successors,
        )
        self._count("held", len(plan.held))
        self._count("deferred", len(plan.deferred))
        for extension in plan.extend:
            await self._extend(extension, now, dry_run=policy.dry_run)
        self._export_risk(plan)
        await self._report_stalls(plan.stalls, now)
        self._last, self._last_at = plan, now
        return plan

    def recover_requests(self) -> list[tuple[str, str]]:
        """(run id, reason) of stalled runs whose rule says `on_stall: recover`, for the
        policy path to route; the guard itself never starts an attempt."""
        return [
            (stall.run_id, stall.recover_reason)
            for stall in self._stalled.values()
            if stall.recover_reason is not None
        ]

    def status(self) -> dict[str, Any]:
        """The /status section: the worst driven runs by work at risk, and stalled runs."""
        plan = self._last
        return {
            "at": None if self._last_at is None else self._last_at.isoformat(),
            "driven_runs": len(plan.risks),
            "without_usable_checkpoint": sum(1 for r in plan.risks if r.work_at_risk_s is None),
            "worst": [self._risk_dict(r) for r in core_guard.worst(plan.risks, STATUS_WORST)],
            "stalled": [self._stall_dict(s) for s in self._stalled.values()],
            "extensions_waiting": {"held": len(plan.held), "deferred": len(plan.deferred)},
        }

    # ---- the side effects ----------------------------------------------------------------

    async def _extend(self, ext: core_guard.Extension, now: datetime, *, dry_run: bool) -> None:
        bound = log.bind(run_id=ext.run_id, rule=ext.rule, tinker_path=ext.tinker_path)
        if dry_run:
            self._count("dry_run", 1)
            key = (ext.tinker_path, ext.expires_at)
            if key not in self._dry_run_seen:  # one event per checkpoint, not one per cycle
                self._dry_run_seen.add(key)
                await self._event(ext, now, outcome="dry_run")
                bound.info("checkpoint_guarded", outcome="dry_run", ttl_s=ext.ttl_s)
            return
        try:
            async with asyncio.timeout(self._call_timeout_s):
                await self._gateway.set_checkpoint_ttl(ext.tinker_path, ext.ttl_s)
        except (RemoteUnavailable, RemoteRejected, TimeoutError) as exc:
            self._count("failed", 1)
            bound.warning(
                "checkpoint_guard_failed",
                error_type=type(exc).__name__,
                expires_at=ext.expires_at.isoformat(),
            )
            return
        self._count("extended", 1)
        await self._event(ext, now, outcome="extended")
        bound.info(
            "checkpoint_guarded",
            outcome="extended",
            ttl_s=ext.ttl_s,
            expired_at=ext.expires_at.isoformat(),
        )

    async def _event(self, ext: core_guard.Extension, now: datetime, *, outcome: str) -> None:
        new_expiry = now + timedelta(seconds=ext.ttl_s)
        await self._store.append_event(
            Event(
                at=now,
                kind="checkpoint_guarded",
                reason=f"{outcome}: {ext.tinker_path} would have expired at "
                f"{ext.expires_at.isoformat()}; TTL set to {ext.ttl_s}s",
                lineage_id=self._lineage_of.get(ext.run_id),
                run_id=ext.run_id,
                data={
                    "outcome": outcome,
                    "rule": ext.rule,
                    "tinker_path": ext.tinker_path,
                    "expires_at_before": ext.expires_at.isoformat(),
                    "expires_at_after": new_expiry.isoformat(),
                    "ttl_s": ext.ttl_s,
                },
            )
        )

    async def _report_stalls(self, stalls: Sequence[core_guard.Stall], now: datetime) -> None:
        current = {stall.run_id: stall for stall in stalls}
        for run_id, stall in current.items():
            if run_id in self._stalled:
                continue
            await self._store.append_event(
                Event(
                    at=now,
                    kind="lineage_stalled",
                    reason=f"no request for {stall.idle_s:.0f}s and no final checkpoint",
                    lineage_id=self._lineage_of.get(run_id),
                    run_id=run_id,
                    data={
                        "rule": stall.rule,
                        "idle_s": stall.idle_s,
                        "successor": stall.successor,
                        "recover_reason": stall.recover_reason,
                    },
                )
            )
            log.warning(
                "lineage_stalled",
                run_id=run_id,
                lineage_id=self._lineage_of.get(run_id),
                rule=stall.rule,
                idle_s=round(stall.idle_s, 1),
            )
        for run_id in self._stalled.keys() - current.keys():
            log.info("lineage_stall_cleared", run_id=run_id)
        self._stalled = current
        self._metrics.lineages_stalled.set(len(current))

    # ---- metrics -------------------------------------------------------------------------

    def _count(self, outcome: str, n: int) -> None:
        if n:
            self._metrics.checkpoint_guard.labels(outcome=outcome).inc(n)

    def _export_risk(self, plan: core_guard.GuardPlan) -> None:
        known = [r.work_at_risk_s for r in plan.risks if r.work_at_risk_s is not None]
        self._metrics.driven_runs.set(len(plan.risks))
        self._metrics.runs_without_usable_checkpoint.set(len(plan.risks) - len(known))
        for q, value in core_guard.quantiles(known).items():
            self._metrics.work_at_risk.labels(rank=f"{q:g}").set(value)

    def _risk_dict(self, risk: core_guard.Risk) -> dict[str, Any]:
        return {
            "run_id": risk.run_id,
            "lineage_id": self._lineage_of.get(risk.run_id),
            "rule": risk.rule,
            "work_at_risk_s": risk.work_at_risk_s,
            "last_request_time": risk.last_request_time.isoformat(),
            "checkpoint_time": None
            if risk.checkpoint_time is None
            else risk.checkpoint_time.isoformat(),
        }

    def _stall_dict(self, stall: core_guard.Stall) -> dict[str, Any]:
        return {
            "run_id": stall.run_id,
            "lineage_id": self._lineage_of.get(stall.run_id),
            "rule": stall.rule,
            "idle_s": round(stall.idle_s, 1),
            "successor": stall.successor,
            "on_stall": "recover" if stall.recover_reason else "alert",
        }
