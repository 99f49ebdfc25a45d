"""The checkpoint guard against the emulator over real HTTP, the real gateway and a SQLite store.

The emulator's clock is frozen (a vanishing time scale) and moved only by `advance`, and the guard
is given the emulator's "now", so checkpoint ages and expiries are exact, with no sleeps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from tinker_recovery.core.model import Lineage, LineageState
from tinker_recovery.emulator import EmulatorConfig, EmulatorServer, levers
from tinker_recovery.emulator.faults import FaultSpec
from tinker_recovery.obs.metrics import Metrics
from tinker_recovery.settings import PolicySettings, Rule, TinkerSettings
from tinker_recovery.shell.clock import SystemClock
from tinker_recovery.shell.gateway import TinkerGateway
from tinker_recovery.shell.guard import CheckpointGuard
from tinker_recovery.shell.store.base import Event
from tinker_recovery.shell.store.sqlite import SqliteStore

API_KEY = "tml-guard-test"
DAY = 86400.0
START = 1_800_000_000.0


@dataclass
class Rig:
    server: EmulatorServer
    gateway: TinkerGateway
    store: SqliteStore
    metrics: Metrics
    guard: CheckpointGuard

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.server.emulator.now(), UTC)

    def create(self, **spec: Any) -> str:
        spec.setdefault("checkpoints", 3)
        spec.setdefault("checkpoint_interval_s", 1800.0)
        row = levers.create_run(self.server.emulator, levers.CreateRun(**spec))
        return str(row["run_id"])

    def ttl_calls(self) -> int:
        return int(self.server.emulator.request_counts()["requests"].get("set_checkpoint_ttl", 0))

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(f"tinker_recovery_{name}", labels)
        return value or 0.0

    async def cycle(self, **policy: Any) -> None:
        runs = await self.gateway.list_runs()
        rules = policy.pop("rules", None) or [guarded()]
        await self.guard.run_cycle(runs, self.now(), PolicySettings(rules=rules, **policy))

    async def events(self, kind: str) -> list[Any]:
        return [e for e in await self.store.events(limit=1000) if e.kind == kind]


def guarded(**knobs: Any) -> Rule:
    body: dict[str, Any] = {"name": "guarded", "max_idle": DAY}
    body.update(knobs)
    return Rule.model_validate(body)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    config = EmulatorConfig(runs=0, seed=3, start_time=START, time_scale=1e-9)
    store = SqliteStore(tmp_path / "state.db", clock=SystemClock())
    await store.open()
    async with EmulatorServer(config) as server, httpx.AsyncClient(trust_env=False) as http:
        metrics = Metrics(CollectorRegistry())
        gateway = TinkerGateway(
            base_url=server.base_url,
            api_key=SecretStr(API_KEY),
            http=http,
            cfg=TinkerSettings(retry_attempts=1, request_timeout=2.0),
            clock=SystemClock(),
            metrics=metrics,
        )
        guard = CheckpointGuard(gateway=gateway, store=store, metrics=metrics)
        yield Rig(server, gateway, store, metrics, guard)
    await store.close()


async def newest_expiry(rig: Rig, run_id: str) -> datetime | None:
    run = await rig.gateway.get_run(run_id)
    assert run.last_checkpoint is not None
    return run.last_checkpoint.expires_at


async def test_an_expiring_checkpoint_is_extended_once_and_then_left_alone(rig: Rig) -> None:
    run_id = rig.create(periodic_ttl_s=DAY)  # newest expires in ~1d, within min_remaining (2d)
    before = await newest_expiry(rig, run_id)
    await rig.cycle()
    after = await newest_expiry(rig, run_id)
    assert before is not None
    assert after is not None
    assert (after - rig.now()).total_seconds() == pytest.approx(7 * DAY, abs=2)
    assert rig.ttl_calls() == 1
    assert rig.sample("checkpoint_guard_total", outcome="extended") == 1
    assert rig.sample("api_requests_total", endpoint="set_checkpoint_ttl", code="200") == 1
    (event,) = await rig.events("checkpoint_guarded")
    assert event.run_id == run_id
    assert event.data["outcome"] == "extended"
    assert event.data["expires_at_before"] == before.isoformat()

    await rig.cycle()  # the listing now shows 7d left: nothing more to do
    assert rig.ttl_calls() == 1


async def test_runs_that_need_nothing_cost_no_request(rig: Rig) -> None:
    for _ in range(40):
        rig.create(periodic_ttl_s=30 * DAY)  # far from expiry
    rig.create()  # no TTL at all
    rig.create(periodic_ttl_s=DAY, user_metadata={"team": "x"})  # expiring, alert rule only
    rules = [Rule(name="alerting", match={"labels": {"team": "x"}}, action="alert"), guarded()]
    runs = await rig.gateway.list_runs()
    before = rig.server.emulator.request_counts()["requests"]
    await rig.guard.run_cycle(runs, rig.now(), PolicySettings(rules=rules))
    assert rig.server.emulator.request_counts()["requests"] == before


async def test_dry_run_calls_nothing_and_records_each_checkpoint_once(rig: Rig) -> None:
    rig.create(periodic_ttl_s=DAY)
    await rig.cycle(dry_run=True)
    await rig.cycle(dry_run=True)
    assert rig.ttl_calls() == 0
    assert rig.sample("checkpoint_guard_total", outcome="dry_run") == 2
    (event,) = await rig.events("checkpoint_guarded")
    assert event.data["outcome"] == "dry_run"


async def test_a_failed_call_is_counted_and_retried_next_cycle(rig: Rig) -> None:
    run_id = rig.create(periodic_ttl_s=DAY)
    rig.server.emulator.faults.add(
        FaultSpec(kind="error", status=503, endpoints=("set_checkpoint_ttl",), times=1)
    )
    await rig.cycle()
    assert rig.sample("checkpoint_guard_total", outcome="failed") == 1
    assert await rig.events("checkpoint_guarded") == []
    await rig.cycle()
    assert rig.sample("checkpoint_guard_total", outcome="extended") == 1
    expiry = await newest_expiry(rig, run_id)
    assert expiry is not None
    assert (expiry - rig.now()).total_seconds() > 6 * DAY


async def test_the_rate_limit_spreads_extensions_over_cycles(rig: Rig) -> None:
    for _ in range(5):
        rig.create(periodic_ttl_s=DAY)
    rule = guarded(guard={"max_per_cycle": 2})
    calls = []
    for _ in range(3):
        await rig.cycle(rules=[rule])
        calls.append(rig.ttl_calls())
    assert calls == [2, 4, 5]
    assert rig.sample("checkpoint_guard_total", outcome="deferred") == 3 + 1


@pytest.mark.parametrize("fleet", [False, True], ids=["lineage-hold", "fleet-hold"])
async def test_a_hold_means_hands_off(rig: Rig, fleet: bool) -> None:
    run_id = rig.create(periodic_ttl_s=DAY)
    now = rig.now()
    lineage = Lineage(
        lineage_id="lin-1",
        root_run_id=run_id,
        current_run_id=run_id,
        state=LineageState.HEALTHY,
        reason="watched",
        first_seen_at=now,
        updated_at=now,
    )
    await rig.store.save_lineage(lineage, Event(at=now, kind="test", reason="setup"))
    await rig.store.set_hold(None if fleet else "lin-1", True, by="test", at=now)
    await rig.cycle()
    assert rig.ttl_calls() == 0
    assert rig.sample("checkpoint_guard_total", outcome="held") == 1
    await rig.store.set_hold(None if fleet else "lin-1", False, by="test", at=now)
    await rig.cycle()
    assert rig.ttl_calls() == 1


async def test_work_at_risk_moves_as_the_checkpoint_ages(rig: Rig) -> None:
    rig.create(periodic_ttl_s=30 * DAY, checkpoint_interval_s=3600.0)
    await rig.cycle()
    first = rig.sample("work_at_risk_seconds", rank="1")
    rig.server.emulator.advance(1200.0)  # requests go on; the next save is due in ~40 min
    await rig.cycle()
    second = rig.sample("work_at_risk_seconds", rank="1")
    assert second == pytest.approx(first + 1200.0, abs=31)  # last_request_time steps by 30 s
    assert rig.sample("driven_runs") == 1
    assert rig.sample("runs_without_usable_checkpoint") == 0
    status = rig.guard.status()
    assert status["worst"][0]["work_at_risk_s"] == second


async def test_a_driven_run_without_a_usable_checkpoint_is_counted(rig: Rig) -> None:
    rig.create(checkpoints=0)
    await rig.cycle()
    assert rig.sample("runs_without_usable_checkpoint") == 1
    assert rig.guard.status()["worst"][0]["work_at_risk_s"] is None


async def test_a_stalled_run_is_reported_once_and_cleared_when_it_resumes(rig: Rig) -> None:
    run_id = rig.create(kind="idle")  # stopped sending requests just now
    rule = guarded(stall_after="10m")
    await rig.cycle(rules=[rule])
    assert rig.sample("lineages_stalled") == 0
    rig.server.emulator.advance(11 * 60.0)
    await rig.cycle(rules=[rule])
    await rig.cycle(rules=[rule])
    (event,) = await rig.events("lineage_stalled")
    assert event.run_id == run_id
    assert rig.sample("lineages_stalled") == 1
    assert [s["run_id"] for s in rig.guard.status()["stalled"]] == [run_id]
    assert rig.guard.recover_requests() == []
    rule_recover = guarded(stall_after="10m", on_stall="recover")
    await rig.cycle(rules=[rule_recover])
    ((stalled_run, reason),) = rig.guard.recover_requests()
    assert stalled_run == run_id
    assert reason.startswith("stalled:")
