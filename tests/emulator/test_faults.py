"""Injected faults, each observed with plain httpx (the SDK would retry them for minutes)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tinker_recovery.emulator import Emulator, EmulatorConfig, EmulatorServer, FaultSpec, create_app

KEY = {"X-API-Key": "tml-fault-tests"}


@pytest.fixture
def http(server: EmulatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=KEY, timeout=5.0) as client:
        yield client


def _add(http: httpx.Client, **spec: Any) -> int:
    response = http.post("/_emulator/faults", json=spec)
    assert response.status_code == 201, response.text
    fault_id = response.json()["id"]
    assert isinstance(fault_id, int)
    return fault_id


def test_error_fault_answers_the_chosen_status_with_a_json_detail(http: httpx.Client) -> None:
    _add(http, kind="error", endpoints=["list_training_runs"], status=502)
    response = http.get("/api/v1/training_runs")
    assert response.status_code == 502
    assert "detail" in response.json()
    assert response.headers["x-emulator-faults"] == "error"
    # Scoped: other endpoints are untouched.
    assert http.post("/api/v1/weights_info", json={"tinker_path": "bad"}).status_code == 400


def test_rate_limit_fault_sends_retry_after(http: httpx.Client) -> None:
    _add(http, kind="rate_limit", endpoints=["get_training_run"], retry_after_s=2.5)
    run_id = http.get("/api/v1/training_runs").json()["training_runs"][0]["training_run_id"]
    response = http.get(f"/api/v1/training_runs/{run_id}")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert response.headers["retry-after-ms"] == "2500"


def test_latency_fault_delays_but_still_answers(http: httpx.Client) -> None:
    _add(http, kind="latency", endpoints=["list_training_runs"], latency_s=0.05)
    response = http.get("/api/v1/training_runs")
    assert response.status_code == 200
    assert response.headers["x-emulator-faults"] == "latency"
    assert len(response.json()["training_runs"]) == 10


def test_hang_fault_outlasts_the_client_timeout(http: httpx.Client) -> None:
    _add(http, kind="hang", endpoints=["list_training_runs"], hang_s=30.0, times=1)
    with pytest.raises(httpx.ReadTimeout):
        http.get("/api/v1/training_runs", timeout=0.2)
    assert http.get("/api/v1/training_runs").status_code == 200


def test_malformed_fault_breaks_the_json(http: httpx.Client) -> None:
    _add(http, kind="malformed", endpoints=["list_training_runs"])
    response = http.get("/api/v1/training_runs")
    assert response.status_code == 200
    with pytest.raises(ValueError, match=r"Expecting|Unterminated|delimiter"):
        response.json()


def test_truncate_fault_serves_a_short_page_with_the_full_total(http: httpx.Client) -> None:
    _add(http, kind="truncate", endpoints=["list_training_runs"], keep_fraction=0.3)
    body = http.get("/api/v1/training_runs", params={"limit": 10}).json()
    assert len(body["training_runs"]) == 3
    assert body["cursor"] == {"offset": 0, "limit": 10, "total_count": 30}


def test_times_retires_a_fault_and_counts_record_every_answer(
    http: httpx.Client, server: EmulatorServer
) -> None:
    _add(http, kind="error", endpoints=["*"], status=500, times=2)
    statuses = [http.get("/api/v1/training_runs").status_code for _ in range(3)]
    assert statuses == [500, 500, 200]
    counts = http.get("/_emulator/requests").json()
    assert counts["requests"]["list_training_runs"] == 3
    assert counts["by_status"]["list_training_runs"] == {"200": 1, "500": 2}
    assert http.get("/_emulator/faults").json()["faults"] == []


def test_probability_is_seeded_and_repeatable(server: EmulatorServer) -> None:
    def outcomes(emu_seed_server: EmulatorServer) -> list[bool]:
        book = emu_seed_server.emulator.faults
        book.clear()
        book.add(FaultSpec(kind="error", probability=0.5))
        return [bool(book.pick("list_training_runs")) for _ in range(40)]

    first = outcomes(server)
    assert 5 < sum(first) < 35
    with EmulatorServer(server.config) as twin:
        assert outcomes(twin) == first


def test_reset_clears_faults_and_counters(http: httpx.Client) -> None:
    fault_id = _add(http, kind="error", endpoints=["healthz"])
    assert http.get("/api/v1/healthz").status_code == 503
    listed = http.get("/_emulator/faults").json()["faults"]
    assert [f["id"] for f in listed] == [fault_id]
    reset = http.post("/_emulator/reset").json()
    assert reset["faults"] == []
    assert reset["requests"] == {}
    assert http.get("/api/v1/healthz").status_code == 200


def test_single_fault_can_be_removed(http: httpx.Client) -> None:
    fault_id = _add(http, kind="error", endpoints=["healthz"])
    assert http.delete(f"/_emulator/faults/{fault_id}").status_code == 204
    assert http.delete(f"/_emulator/faults/{fault_id}").status_code == 404
    assert http.get("/api/v1/healthz").status_code == 200


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param({"kind": "explode"}, id="unknown-kind"),
        pytest.param({"kind": "error", "endpoints": ["nope"]}, id="unknown-endpoint"),
        pytest.param({"kind": "error", "status": 200}, id="status-not-an-error"),
        pytest.param({"kind": "latency", "probability": 2}, id="probability-above-one"),
        pytest.param({"kind": "error", "colour": "red"}, id="unknown-key"),
    ],
)
def test_bad_fault_specs_are_rejected_with_a_detail(
    http: httpx.Client, spec: dict[str, Any]
) -> None:
    response = http.post("/_emulator/faults", json=spec)
    assert response.status_code == 400
    assert response.json()["detail"]


async def test_clearing_faults_releases_held_requests() -> None:
    app = create_app(EmulatorConfig(runs=3))
    emu: Emulator = app.state.emulator
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://emulator") as client:
        await client.post("/_emulator/faults", json={"kind": "hang", "hang_s": 600, "times": 1})
        held = asyncio.create_task(client.get("/api/v1/healthz", headers=KEY))
        # Same loop, no threads: a bounded number of turns lets the request reach the hang.
        for _ in range(1000):
            if not emu.faults.describe():  # the fault retires once the request picked it up
                break
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert emu.faults.describe() == []
        assert not held.done()

        await client.delete("/_emulator/faults")

        response = await held
    assert response.status_code == 200
    assert response.headers["x-emulator-faults"] == "hang"
