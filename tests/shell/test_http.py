"""The HTTP surface through httpx.ASGITransport, plus one real uvicorn serve on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from tinker_recovery.errors import FencedOut
from tinker_recovery.obs import logs
from tinker_recovery.obs.metrics import Metrics
from tinker_recovery.shell import http

TOKEN = "op-token-5b1e0c"


class FakeTime:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeOperator:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail_with: Exception | None = None

    async def pause(self, lineage: str | None) -> None:
        self._maybe_fail()
        self.calls.append(("pause", lineage))

    async def resume(self, lineage: str | None) -> None:
        self._maybe_fail()
        self.calls.append(("resume", lineage))

    async def recover(self, run_id: str, checkpoint: str | None) -> int:
        self._maybe_fail()
        self.calls.append(("recover", (run_id, checkpoint)))
        return 41

    def _maybe_fail(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with


async def _status() -> dict[str, Any]:
    return {"role": "leader", "lineages": [{"id": "l1", "note": f"key {TOKEN}"}]}


@pytest.fixture
def clock() -> FakeTime:
    return FakeTime()


@pytest.fixture
def health(clock: FakeTime) -> http.Health:
    return http.Health(poll_interval_s=10.0, loop_stall_s=30.0, monotonic=clock)


@pytest.fixture
def operator() -> FakeOperator:
    return FakeOperator()


def _client(
    health: http.Health, operator: FakeOperator | None, token: str | None
) -> httpx.AsyncClient:
    registry = CollectorRegistry()
    Metrics(registry).corruptions_detected.inc()
    app = http.build_app(
        registry=registry,
        health=health,
        status=_status,
        operator=operator,
        token=SecretStr(token) if token is not None else None,
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture(autouse=True)
def _forget_secrets() -> Any:
    yield
    logs.forget_secrets()


async def test_metrics_scrape_is_prometheus_text(health: http.Health) -> None:
    async with _client(health, None, None) as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "tinker_recovery_corruptions_detected_total 1.0" in response.text
    assert 'tinker_recovery_poll_errors_total{reason="timeout"} 0.0' in response.text


async def test_metrics_negotiates_openmetrics(health: http.Health) -> None:
    accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
    async with _client(health, None, None) as client:
        response = await client.get("/metrics", headers=accept)
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


async def test_healthz_fails_only_when_the_heartbeat_stalls(
    health: http.Health, clock: FakeTime
) -> None:
    async with _client(health, None, None) as client:
        assert (await client.get("/healthz")).status_code == 200  # no heartbeat yet: alive
        health.tick(clock.t)
        clock.t += 29
        assert (await client.get("/healthz")).status_code == 200
        clock.t += 2
        response = await client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["heartbeat_ok"] is False


async def test_readyz_transitions(health: http.Health, clock: FakeTime) -> None:
    async with _client(health, None, None) as client:
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert response.json() == {
            "ready": False,
            "checks": {
                "config_loaded": False,
                "store_open": False,
                "recent_poll": False,
                "role": False,
            },
        }
        health.config_loaded = True
        health.store_open = True
        health.mark_poll_success(clock.t)
        assert (await client.get("/readyz")).status_code == 503  # still "starting"
        health.role = "standby"
        assert (await client.get("/readyz")).status_code == 200
        health.role = "leader"
        clock.t += 30  # exactly three intervals: still fresh
        assert (await client.get("/readyz")).status_code == 200
        clock.t += 1
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["checks"]["recent_poll"] is False
        health.mark_poll_success(clock.t)
        assert (await client.get("/readyz")).status_code == 200


def test_is_progressing_counts_failed_cycles(health: http.Health, clock: FakeTime) -> None:
    assert health.is_progressing()  # just started
    clock.t += 31
    assert not health.is_progressing()
    health.mark_poll_cycle(clock.t)
    assert health.is_progressing()
    assert health.last_poll_success is None


async def test_heartbeat_ticks_until_stopped(health: http.Health, clock: FakeTime) -> None:
    stop = asyncio.Event()

    class TickingClock:
        def now(self) -> datetime:
            return datetime.fromtimestamp(clock.t, UTC)

        def monotonic(self) -> float:
            return clock.t

        async def sleep(self, delay_s: float, *, wakeup: asyncio.Event | None = None) -> None:
            clock.t += delay_s
            if clock.t >= 1003:
                stop.set()

    await health.heartbeat(stop, TickingClock())
    assert health.last_loop_tick == 1002.0


async def test_status_is_json_and_redacted(health: http.Health) -> None:
    async with _client(health, FakeOperator(), TOKEN) as client:
        response = await client.get("/status")
    assert response.status_code == 200
    assert response.json()["role"] == "leader"
    assert TOKEN not in response.text


async def test_status_failure_is_a_500_without_details(health: http.Health) -> None:
    async def broken() -> dict[str, Any]:
        raise RuntimeError(f"db password {TOKEN}")

    app = http.build_app(
        registry=CollectorRegistry(), health=health, status=broken, operator=None, token=None
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/status")
    assert response.status_code == 500
    assert response.json() == {"error": "internal", "detail": "status unavailable"}


async def test_no_mutating_routes_without_a_token(
    health: http.Health, operator: FakeOperator
) -> None:
    async with _client(health, operator, None) as client:
        for path in ("/pause", "/resume", "/recover"):
            response = await client.post(path, json={}, headers={"Authorization": "Bearer x"})
            assert response.status_code == 404
    assert operator.calls == []


async def test_token_required(health: http.Health, operator: FakeOperator) -> None:
    async with _client(health, operator, TOKEN) as client:
        response = await client.post("/pause")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"] == "unauthorized"
    assert operator.calls == []


async def test_bad_token_is_401_and_never_echoed(
    health: http.Health, operator: FakeOperator
) -> None:
    async with _client(health, operator, TOKEN) as client:
        response = await client.post("/resume", headers={"Authorization": f"Bearer {TOKEN}x"})
        basic = await client.post("/resume", headers={"Authorization": f"Basic {TOKEN}"})
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"
    assert TOKEN not in response.text
    assert basic.status_code == 401
    assert operator.calls == []


async def test_pause_resume_recover_with_token(health: http.Health, operator: FakeOperator) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with _client(health, operator, TOKEN) as client:
        paused = await client.post("/pause", headers=auth)
        resumed = await client.post("/resume", headers=auth, json={"lineage": "lin-1"})
        recovered = await client.post(
            "/recover", headers=auth, json={"run_id": "run-9", "checkpoint": "tinker://x/w/1"}
        )
    assert paused.json() == {"paused": "all"}
    assert resumed.json() == {"resumed": "lin-1"}
    assert recovered.status_code == 202
    assert recovered.json() == {"request_id": 41, "run_id": "run-9"}
    assert operator.calls == [
        ("pause", None),
        ("resume", "lin-1"),
        ("recover", ("run-9", "tinker://x/w/1")),
    ]


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        pytest.param(b"{not json", "body must be JSON", id="not-json"),
        pytest.param(b'{"checkpoint": "p"}', "run_id", id="missing-run"),
        pytest.param(b'{"run_id": "r", "extra": 1}', "extra", id="unknown-field"),
    ],
)
async def test_recover_rejects_bad_bodies(
    health: http.Health, operator: FakeOperator, body: bytes, detail: str
) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    async with _client(health, operator, TOKEN) as client:
        response = await client.post("/recover", headers=auth, content=body)
    assert response.status_code == 400
    assert detail in response.json()["detail"]
    assert operator.calls == []


@pytest.mark.parametrize(
    ("path", "body", "detail"),
    [
        pytest.param("/recover", b"[" * 5000 + b"]" * 5000, "nested too deeply", id="deep-list"),
        pytest.param(
            "/pause",
            b'{"lineage": ' + b'{"a":' * 2000 + b"1" + b"}" * 2000 + b"}",
            "nested",
            id="deep-object",
        ),
        pytest.param("/pause", b"\xff\xfe{}", "body must be JSON", id="not-utf8"),
        pytest.param("/pause", b"[1, 2]", "dictionary", id="not-an-object"),
        pytest.param("/pause", b'{"lineage": 7}', "string", id="lineage-not-a-string"),
        pytest.param(
            "/pause", b'{"lineage": "' + b"l" * 257 + b'"}', "256", id="lineage-over-256-chars"
        ),
        pytest.param("/pause", b'{"lineage": "two words"}', "whitespace", id="lineage-with-space"),
        pytest.param("/resume", b'{"lineage": ""}', "256", id="lineage-empty"),
        pytest.param("/recover", b'{"run_id": "' + b"r" * 300 + b'"}', "256", id="run-id-too-long"),
        pytest.param(
            "/recover", b'{"run_id": "r", "checkpoint": "not-a-path"}', "tinker://", id="bad-path"
        ),
        pytest.param(
            "/recover",
            b'{"run_id": "r", "checkpoint": "tinker://r/w/1 x"}',
            "whitespace",
            id="path-with-space",
        ),
    ],
)
async def test_malformed_bodies_are_400_never_500(
    health: http.Health, operator: FakeOperator, path: str, body: bytes, detail: str
) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    async with _client(health, operator, TOKEN) as client:
        response = await client.post(path, headers=auth, content=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "bad_request"
    assert detail in response.json()["detail"]
    assert len(response.content) < 1000  # the refusal never echoes the input
    assert operator.calls == []


async def test_a_lineage_id_at_the_limit_is_accepted(
    health: http.Health, operator: FakeOperator
) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    longest = "l" * 256
    async with _client(health, operator, TOKEN) as client:
        response = await client.post("/pause", headers=auth, json={"lineage": longest})
    assert response.status_code == 200
    assert operator.calls == [("pause", longest)]


async def test_a_declared_oversized_body_is_413_before_reading(
    health: http.Health, operator: FakeOperator
) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = b'{"lineage": "' + b"x" * (http.MAX_BODY_BYTES + 10) + b'"}'
    async with _client(health, operator, TOKEN) as client:
        response = await client.post("/pause", headers=auth, content=body)
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
    assert operator.calls == []


async def test_a_streamed_body_is_cut_off_at_the_cap(
    health: http.Health, operator: FakeOperator
) -> None:
    # No Content-Length (chunked): the server must stop reading once past the cap, not buffer
    # the whole 20 MB.
    sent = 0

    async def chunks() -> Any:
        nonlocal sent
        yield b'{"lineage": "'
        for _ in range(20 * 1024):
            sent += 1024
            yield b"x" * 1024

    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with _client(health, operator, TOKEN) as client:
        response = await client.post("/pause", headers=auth, content=chunks())
    assert response.status_code == 413
    assert sent < 20 * 1024 * 1024
    assert operator.calls == []


async def test_a_non_numeric_content_length_is_400(
    health: http.Health, operator: FakeOperator
) -> None:
    app = _client(health, operator, TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Length": "12abc"}
    async with app as client:
        response = await client.post("/pause", headers=auth, content=b"{}")
    assert response.status_code == 400
    assert operator.calls == []


@pytest.mark.parametrize(
    ("error", "status"),
    [
        pytest.param(LookupError("no lineage lin-x"), 404, id="unknown-lineage"),
        pytest.param(FencedOut("lease lost"), 503, id="not-leader"),
        pytest.param(RuntimeError("store exploded"), 500, id="unexpected"),
    ],
)
async def test_operator_errors_map_to_statuses(
    health: http.Health, operator: FakeOperator, error: Exception, status: int
) -> None:
    operator.fail_with = error
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with _client(health, operator, TOKEN) as client:
        response = await client.post("/pause", headers=auth, json={"lineage": "lin-x"})
    assert response.status_code == status


async def test_serve_reports_its_port_and_stops_on_the_event(health: http.Health) -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    app = http.build_app(
        registry=registry, health=health, status=_status, operator=None, token=None
    )
    stop, listening = asyncio.Event(), asyncio.Event()
    ports: list[int] = []

    def on_bound(port: int) -> None:
        ports.append(port)
        listening.set()

    async with asyncio.TaskGroup() as tg:
        tg.create_task(
            http.serve(app, host="127.0.0.1", port=0, stop=stop, bound=on_bound), name="http"
        )
        await listening.wait()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[0]}") as client:
            response = await client.get("/metrics")
        stop.set()
    assert ports[0] > 0
    assert response.status_code == 200
    assert "tinker_recovery_build_info" in response.text


async def test_serve_bind_failure_raises(health: http.Health) -> None:
    app = http.build_app(
        registry=CollectorRegistry(), health=health, status=_status, operator=None, token=None
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="in use"):
            await http.serve(app, host="127.0.0.1", port=port, stop=asyncio.Event())
