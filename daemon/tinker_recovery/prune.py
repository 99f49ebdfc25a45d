"""`tinker-recovery prune`: carry out checkpoint retention (core/retention.py) for the store's
lineages. Opt-in: only an operator running this command ever deletes a checkpoint; the daemon
itself never does.

Per lineage: list the training checkpoints of every run of it (one `list_checkpoints` per run),
plan with `retention.plan`, and, unless dry-running, delete the planned ones one at a time. Just
before each deletion the store is read again: once the lineage is held or has an attempt in
flight (the daemon may have started one meanwhile), the rest of its deletions are skipped. A
run whose listing fails leaves its whole lineage untouched (a partial view could only delete
less, but an operator should see it). A failed deletion is reported and the rest go on.
Checkpoints of runs outside any lineage are never looked at.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import structlog
from prometheus_client import CollectorRegistry

from tinker_recovery.core import retention
from tinker_recovery.core.model import CheckpointView, Lineage, LineageState
from tinker_recovery.errors import ConfigError, RecoveryError
from tinker_recovery.obs.metrics import Metrics
from tinker_recovery.operator import OperatorRefused, iso
from tinker_recovery.settings import CheckpointSettings, Settings
from tinker_recovery.shell import secrets
from tinker_recovery.shell.clock import SystemClock
from tinker_recovery.shell.gateway import TinkerGateway, make_http_client
from tinker_recovery.shell.store.base import Store

log = structlog.get_logger(__name__)


class CheckpointApi(Protocol):
    async def list_checkpoints(self, run_id: str) -> list[CheckpointView]: ...

    async def delete_checkpoint(self, tinker_path: str) -> None: ...


# What happened to a checkpoint planned for deletion.
DELETED, WOULD_DELETE, FAILED, SKIPPED = "deleted", "would_delete", "failed", "skipped"


@dataclass
class LineageReport:
    lineage_id: str
    plan: retention.Plan | None = None
    error: str | None = None  # the lineage could not be planned (a listing failed)
    results: dict[str, str] = field(default_factory=dict)  # path -> DELETED, FAILED, ...
    details: dict[str, str] = field(default_factory=dict)  # path -> why it failed or skipped


@dataclass
class Report:
    dry_run: bool
    keep: int
    lineages: list[LineageReport]

    @property
    def failures(self) -> int:
        return sum(
            (1 if r.error else 0) + sum(1 for s in r.results.values() if s == FAILED)
            for r in self.lineages
        )

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0

    def freed(self, status: str) -> tuple[int, int, int]:
        """(checkpoints, bytes, of unknown size) among those with `status`."""
        views = [
            v.checkpoint
            for r in self.lineages
            if r.plan is not None
            for v in r.plan.to_delete
            if r.results.get(v.checkpoint.tinker_path) == status
        ]
        sizes = [c.size_bytes for c in views]
        return len(views), sum(s or 0 for s in sizes), sum(1 for s in sizes if s is None)

    def as_dict(self) -> dict[str, Any]:
        status = WOULD_DELETE if self.dry_run else DELETED
        count, freed, unknown = self.freed(status)
        return {
            "dry_run": self.dry_run,
            "keep": self.keep,
            "sampler_checkpoints": "left alone",
            "deleted" if not self.dry_run else "would_delete": count,
            "frees_bytes": freed,
            "unknown_sizes": unknown,
            "failed": self.failures,
            "lineages": [_lineage_dict(r) for r in self.lineages],
        }


async def prune_with_settings(
    store: Store,
    settings: Settings,
    *,
    keep: int,
    now: datetime,
    lineage_id: str | None = None,
    dry_run: bool = False,
    env: Mapping[str, str] | None = None,
) -> Report:
    """`prune` with the gateway the config describes (the daemon's key and Tinker URL)."""
    key = secrets.resolve_api_key(settings.tinker, os.environ if env is None else env)
    if key is None:
        raise ConfigError(
            "no API key: set TINKER_API_KEY, tinker.api_key_file or a systemd credential named "
            "tinker_api_key"
        )
    http = make_http_client(settings.tinker)
    try:
        api = TinkerGateway(
            base_url=settings.tinker.base_url,
            api_key=key,
            http=http,
            cfg=settings.tinker,
            clock=SystemClock(),
            metrics=Metrics(CollectorRegistry()),
        )
        return await prune(
            store,
            api,
            keep=keep,
            now=now,
            cfg={rule.name: rule.checkpoint for rule in settings.policy.rules},
            lineage_id=lineage_id,
            dry_run=dry_run,
        )
    finally:
        await http.aclose()


async def prune(
    store: Store,
    api: CheckpointApi,
    *,
    keep: int,
    now: datetime,
    cfg: Mapping[str, CheckpointSettings],
    lineage_id: str | None = None,
    dry_run: bool = False,
) -> Report:
    """Plan (and unless `dry_run`, carry out) retention. `cfg` maps rule names to their
    checkpoint settings, which say what "usable" means for a lineage that rule matched
    (defaults for a lineage whose rule is gone)."""
    lineages = await _lineages(store, lineage_id)
    requested = {
        r.checkpoint_path
        for r in await store.pending_manual_requests()
        if r.checkpoint_path is not None
    }
    reports = []
    for lineage in lineages:
        rule_cfg = cfg.get(lineage.rule or "", CheckpointSettings())
        report = await _plan_one(
            store, api, lineage, keep=keep, now=now, cfg=rule_cfg, req=requested
        )
        if report.plan is not None:
            if dry_run:
                report.results = {
                    v.checkpoint.tinker_path: WOULD_DELETE for v in report.plan.to_delete
                }
            else:
                await _delete(store, api, report)
        reports.append(report)
    return Report(dry_run=dry_run, keep=keep, lineages=reports)


async def _lineages(store: Store, lineage_id: str | None) -> list[Lineage]:
    if lineage_id is None:
        lineages = await store.list_lineages()
        if not lineages:
            raise OperatorRefused("nothing to prune: the store has no lineages")
        return sorted(lineages, key=lambda lin: lin.lineage_id)
    lineage = await store.get_lineage(lineage_id)
    if lineage is None:
        raise OperatorRefused(f"lineage {lineage_id}: not in the store")
    return [lineage]


async def _is_protected(store: Store, lineage: Lineage) -> str | None:
    """Why nothing of `lineage` may be deleted now, or None."""
    holds = await store.holds()
    held = lineage.held_by_operator or lineage.state is LineageState.HELD
    if held or None in holds or lineage.lineage_id in holds:
        return str(retention.KeepReason.HELD)
    if any(a.outcome is None for a in await store.attempts(lineage.lineage_id)):
        return str(retention.KeepReason.IN_FLIGHT)
    return None


async def _plan_one(
    store: Store,
    api: CheckpointApi,
    lineage: Lineage,
    *,
    keep: int,
    now: datetime,
    cfg: CheckpointSettings,
    req: set[str],
) -> LineageReport:
    report = LineageReport(lineage.lineage_id)
    attempts = await store.attempts(lineage.lineage_id)
    checkpoints: list[CheckpointView] = []
    for run_id in retention.lineage_runs(lineage, attempts):
        try:
            checkpoints += await api.list_checkpoints(run_id)
        except RecoveryError as exc:
            report.error = f"listing checkpoints of {run_id} failed, lineage left alone: {exc}"
            log.warning("prune_listing_failed", lineage_id=lineage.lineage_id, run_id=run_id)
            return report
    bad = await store.bad_checkpoints([c.tinker_path for c in checkpoints])
    report.plan = retention.plan(
        lineage,
        checkpoints,
        attempts,
        is_held=await _is_protected(store, lineage) == retention.KeepReason.HELD,
        keep=keep,
        now=now,
        cfg=cfg,
        bad=bad,
        requested=req,
    )
    return report


async def _delete(store: Store, api: CheckpointApi, report: LineageReport) -> None:
    assert report.plan is not None
    lineage = await store.get_lineage(report.lineage_id)
    # Oldest first: a prune cut short leaves the newer ones, closer to what it keeps.
    for verdict in reversed(report.plan.to_delete):
        path = verdict.checkpoint.tinker_path
        why = (
            "lineage gone from the store"
            if lineage is None
            else await _is_protected(store, lineage)
        )
        if why is not None:
            report.results[path], report.details[path] = SKIPPED, why
            continue
        try:
            await api.delete_checkpoint(path)
        except RecoveryError as exc:
            report.results[path], report.details[path] = FAILED, str(exc)
            log.warning(
                "prune_delete_failed",
                lineage_id=report.lineage_id,
                tinker_path=path,
                error=str(exc),
            )
            continue
        report.results[path] = DELETED
        log.info(
            "checkpoint_pruned",
            lineage_id=report.lineage_id,
            tinker_path=path,
            reason=str(verdict.reason),
        )


def _lineage_dict(report: LineageReport) -> dict[str, Any]:
    plan = report.plan
    rows: Sequence[retention.Verdict] = () if plan is None else plan.verdicts
    return {
        "lineage_id": report.lineage_id,
        "runs": [] if plan is None else list(plan.run_ids),
        "error": report.error,
        "checkpoints": [
            {
                "tinker_path": v.checkpoint.tinker_path,
                "kind": str(v.checkpoint.kind),
                "time": iso(v.checkpoint.time),
                "expires_at": iso(v.checkpoint.expires_at),
                "size_bytes": v.checkpoint.size_bytes,
                "action": "delete" if v.is_delete else "keep",
                "reason": str(v.reason),
                "result": report.results.get(v.checkpoint.tinker_path),
                "detail": report.details.get(v.checkpoint.tinker_path),
            }
            for v in rows
        ],
    }
