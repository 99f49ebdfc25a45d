"""make_http_client: the gateway's client, with httpx-aiohttp's transport when it is installed.

Against the emulator over real HTTP on 127.0.0.1, with each transport this machine has, and the
clean fallback when httpx-aiohttp is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from gw_fakes import API_KEY, FakeClock, settings
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from tinker_recovery.emulator import EmulatorConfig, EmulatorServer
from tinker_recovery.obs.metrics import Metrics
from tinker_recovery.shell.gateway import GatewayUnavailable, TinkerGateway, make_http_client

pytestmark = pytest.mark.slow

HAS_AIOHTTP = importlib.util.find_spec("httpx_aiohttp") is not None
TRANSPORTS = [
    "httpx",
    pytest.param(
        "aiohttp",
        marks=pytest.mark.skipif(not HAS_AIOHTTP, reason="httpx-aiohttp is not installed"),
    ),
]


@pytest.fixture
async def emulator() -> AsyncIterator[EmulatorServer]:
    async with EmulatorServer(EmulatorConfig(runs=250, seed=11, page_max=30)) as server:
        yield server


@asynccontextmanager
async def gateway_over(base_url: str, transport: str) -> AsyncIterator[TinkerGateway]:
    cfg = settings(page_size=100)
    async with make_http_client(cfg, transport=transport) as http:
        yield TinkerGateway(
            base_url=base_url,
            api_key=SecretStr(API_KEY),
            http=http,
            cfg=cfg,
            clock=FakeClock(),
            metrics=Metrics(registry=CollectorRegistry()),
        )


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_each_transport_lists_the_whole_fleet(
    emulator: EmulatorServer, transport: str
) -> None:
    async with gateway_over(emulator.base_url, transport) as gw:
        runs = await gw.list_runs()
        assert len({r.run_id for r in runs}) == len(runs) == 250
        with_ckpt = next(r for r in runs if r.last_checkpoint is not None)
        assert with_ckpt.last_checkpoint is not None
        info = await gw.weights_info(with_ckpt.last_checkpoint.tinker_path)
        assert info.base_model == with_ckpt.base_model


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_closed_port_is_a_connection_failure_with_either_transport(
    unused_tcp_port: int, transport: str
) -> None:
    async with gateway_over(f"http://127.0.0.1:{unused_tcp_port}", transport) as gw:
        with pytest.raises(GatewayUnavailable) as caught:
            await gw.list_runs()
    assert caught.value.reason == "connection"


def test_auto_falls_back_to_httpx_without_httpx_aiohttp(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def without_aiohttp(name: str, package: str | None = None) -> object:
        if name == "httpx_aiohttp":
            raise ImportError(name)
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", without_aiohttp)
    client = make_http_client(settings())
    assert isinstance(client._transport, httpx.AsyncHTTPTransport)
    with pytest.raises(RuntimeError, match="not installed"):
        make_http_client(settings(), transport="aiohttp")
