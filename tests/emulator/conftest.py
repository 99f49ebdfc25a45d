"""Fixtures: an emulator on 127.0.0.1 and SDK clients pointed at it.

The SDK caches its connection holders per (base_url, api key) for the whole process, so
every server gets a fresh port and every client a key derived from it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import tinker

from tinker_recovery.emulator import EmulatorConfig, EmulatorServer


@pytest.fixture(autouse=True)
def sdk_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Telemetry off: a failing SDK call would otherwise wait on a telemetry flush.
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("TINKER_BASE_URL", raising=False)
    monkeypatch.delenv("TINKER_API_KEY", raising=False)


def api_key(server: EmulatorServer) -> str:
    return f"tml-emulator-test-{server.port}"


@pytest.fixture
def server() -> Iterator[EmulatorServer]:
    with EmulatorServer(EmulatorConfig(runs=30, seed=11, page_max=10, shared_runs=4)) as srv:
        yield srv


@pytest.fixture
def rest(server: EmulatorServer) -> tinker.RestClient:
    return tinker.RestClient(base_url=server.base_url, api_key=api_key(server))


@pytest.fixture
def service(server: EmulatorServer) -> Iterator[tinker.ServiceClient]:
    client = tinker.ServiceClient(
        user_metadata={"who": "contract-test"}, base_url=server.base_url, api_key=api_key(server)
    )
    yield client
    client.close("success").result()
