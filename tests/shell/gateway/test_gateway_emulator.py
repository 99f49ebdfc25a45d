"""Integration: the gateway and the SDK restorer against the local emulator over real HTTP."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from gw_fakes import API_KEY, FakeClock, settings
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from tinker_recovery.core.model import TAG_ATTEMPT, TAG_LINEAGE, CheckpointKind
from tinker_recovery.emulator import EmulatorConfig, EmulatorServer
from tinker_recovery.errors import ActionFailed
from tinker_recovery.obs.metrics import Metrics
from tinker_recovery.shell.clock import SystemClock
from tinker_recovery.shell.gateway import (
    GatewayUnavailable,
    MalformedResponse,
    TinkerGateway,
    poll_error_reason,
)
from tinker_recovery.shell.restore import SdkRestorer

pytestmark = pytest.mark.slow


@pytest.fixture
async def emulator() -> AsyncIterator[EmulatorServer]:
    async with EmulatorServer(EmulatorConfig(runs=250, seed=11, page_max=30)) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False) as client:
        yield client


def gateway(server: EmulatorServer, http: httpx.AsyncClient, **cfg: Any) -> TinkerGateway:
    return TinkerGateway(
        base_url=server.base_url,
        api_key=SecretStr(API_KEY),
        http=http,
        cfg=settings(**cfg),
        clock=FakeClock(),
        metrics=Metrics(registry=CollectorRegistry()),
    )


async def add_fault(http: httpx.AsyncClient, server: EmulatorServer, **spec: Any) -> None:
    response = await http.post(f"{server.base_url}/_emulator/faults", json=spec)
    assert response.status_code == 201, response.text


async def test_lists_the_whole_fleet_through_a_page_cap(
    emulator: EmulatorServer, http: httpx.AsyncClient
) -> None:
    gw = gateway(emulator, http, page_size=100)
    runs = await gw.list_runs()
    assert len({r.run_id for r in runs}) == len(runs) == 250
    with_ckpt = next(r for r in runs if r.last_checkpoint is not None)
    assert with_ckpt.last_checkpoint is not None
    assert with_ckpt.last_checkpoint.kind is CheckpointKind.TRAINING

    again = await gw.get_run(with_ckpt.run_id)
    assert again.run_id == with_ckpt.run_id
    checkpoints = await gw.list_checkpoints(with_ckpt.run_id)
    assert with_ckpt.last_checkpoint.tinker_path in {c.tinker_path for c in checkpoints}
    info = await gw.weights_info(with_ckpt.last_checkpoint.tinker_path)
    assert info.base_model == with_ckpt.base_model
    await gw.set_checkpoint_ttl(with_ckpt.last_checkpoint.tinker_path, 86400)


async def test_transient_5xx_on_pages_is_retried_to_a_full_fleet(
    emulator: EmulatorServer, http: httpx.AsyncClient
) -> None:
    await add_fault(
        http, emulator, kind="error", status=503, endpoints=["list_training_runs"], times=2
    )
    runs = await gateway(emulator, http).list_runs()
    assert len(runs) == 250


@pytest.mark.parametrize("kind", ["malformed", "truncate"])
async def test_bad_page_from_the_emulator_raises(
    emulator: EmulatorServer, http: httpx.AsyncClient, kind: str
) -> None:
    await add_fault(http, emulator, kind=kind, endpoints=["list_training_runs"])
    with pytest.raises(MalformedResponse):
        await gateway(emulator, http).list_runs()


async def test_hanging_emulator_is_given_up_on_within_the_bound(
    emulator: EmulatorServer, http: httpx.AsyncClient
) -> None:
    await add_fault(http, emulator, kind="hang", hang_s=30, endpoints=["list_training_runs"])
    gw = TinkerGateway(
        base_url=emulator.base_url,
        api_key=SecretStr(API_KEY),
        http=http,
        cfg=settings(request_timeout=0.3, retry_attempts=2, retry_max_delay=0.2),
        clock=SystemClock(),  # real waits: this test proves the bound on a real socket
        metrics=Metrics(registry=CollectorRegistry()),
    )
    started = time.monotonic()
    with pytest.raises(GatewayUnavailable) as caught:
        await gw.list_runs()
    elapsed_s = time.monotonic() - started
    assert poll_error_reason(caught.value) == "timeout"
    # Bound: 2 x 0.3 s timeouts + one delay <= 0.2 s; the server would have held us 30 s.
    assert elapsed_s < 30


async def tagged_run(gw: TinkerGateway) -> tuple[str, str]:
    runs = await gw.list_runs()
    run = next(r for r in runs if r.last_checkpoint is not None)
    assert run.last_checkpoint is not None
    return run.run_id, run.last_checkpoint.tinker_path


@pytest.mark.parametrize("with_optimizer", [True, False])
async def test_sdk_restore_creates_a_tagged_run_and_a_fresh_checkpoint(
    emulator: EmulatorServer,
    http: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    with_optimizer: bool,
) -> None:
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    gw = gateway(emulator, http)
    _run_id, path = await tagged_run(gw)
    restorer = SdkRestorer(base_url=emulator.base_url, api_key=SecretStr(API_KEY), timeout_s=60)
    tags = {TAG_LINEAGE: "lin-7", TAG_ATTEMPT: "1"}
    result = await restorer.restore(
        path, with_optimizer=with_optimizer, user_metadata=tags, save_name="recovery-1"
    )
    assert result.saved_path == f"tinker://{result.new_run_id}/weights/recovery-1"
    successor = await gw.get_run(result.new_run_id)
    assert successor.user_metadata[TAG_LINEAGE] == "lin-7"
    saved = await gw.list_checkpoints(result.new_run_id)
    assert result.saved_path in {c.tinker_path for c in saved}


async def test_sdk_restore_of_an_unloadable_checkpoint_is_action_failed(
    emulator: EmulatorServer, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    gw = gateway(emulator, http)
    _run_id, path = await tagged_run(gw)
    response = await http.post(
        f"{emulator.base_url}/_emulator/checkpoints/unloadable", json={"tinker_path": path}
    )
    assert response.status_code == 200
    restorer = SdkRestorer(base_url=emulator.base_url, api_key=SecretStr(API_KEY), timeout_s=60)
    with pytest.raises(ActionFailed) as caught:
        await restorer.restore(path, with_optimizer=True, user_metadata={}, save_name="r-1")
    assert caught.value.action == "restore"
    assert "unreadable" in str(caught.value)
    assert API_KEY not in str(caught.value)
