"""Test doubles for the gateway tests: a virtual clock and a scriptable fake Tinker server.

The fake server is an httpx.MockTransport handler, so no socket is opened. It serves the
read endpoints the gateway uses, with a page-size cap and per-request fault scripts.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from tinker_recovery.obs.metrics import Metrics
from tinker_recovery.settings import TinkerSettings
from tinker_recovery.shell.gateway import TinkerGateway

API_KEY = "tml-test-key-do-not-log-0123456789"
EPOCH = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


class FakeClock:
    """Virtual time: sleeps are recorded and advance the clock at once."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.sleeps: list[float] = []

    def now(self) -> datetime:
        return EPOCH + timedelta(seconds=self.t - 1000.0)

    def monotonic(self) -> float:
        return self.t

    async def sleep(self, delay_s: float, *, wakeup: asyncio.Event | None = None) -> None:
        self.sleeps.append(delay_s)
        self.t += delay_s
        await asyncio.sleep(0)


def make_run(i: int, *, corrupted: bool = False) -> dict[str, Any]:
    run_id = f"sess-{i:06d}:train:0"
    return {
        "training_run_id": run_id,
        "base_model": "Qwen/Qwen3-8B",
        "model_owner": "alice",
        "is_lora": True,
        "corrupted": corrupted,
        "lora_rank": 32,
        "last_request_time": "2026-11-29T11:00:00Z",
        "last_checkpoint": {
            "checkpoint_id": "weights/000020",
            "checkpoint_type": "training",
            "time": "2026-11-29T10:00:00+02:00",
            "tinker_path": f"tinker://{run_id}/weights/000020",
            "size_bytes": 1234,
            "expires_at": None,
        },
        "user_metadata": {"renderer_name": "qwen3"},
    }


def make_jwt(*, iat: float, exp: float | None, tag: str = "a") -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    claims: dict[str, Any] = {"iat": iat, "sub": tag}
    if exp is not None:
        claims["exp"] = exp
    return f"{part({'alg': 'none'})}.{part(claims)}.sig-{tag}"


Script = Callable[[httpx.Request], Awaitable[httpx.Response | None] | httpx.Response | None]


@dataclass
class FakeTinker:
    """A fake Tinker REST API. `script`, when set, sees each request first and may answer it."""

    runs: list[dict[str, Any]] = field(default_factory=list)
    cap: int | None = None  # server-side page size cap
    echo_requested_limit: bool = False  # cursor.limit echoes what was asked, not the cap
    config: dict[str, Any] = field(default_factory=dict)
    script: Script | None = None
    requests: list[httpx.Request] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    page_delay: bool = False  # yield inside page requests so concurrency is observable
    on_page: Callable[[int], None] | None = None  # called after a page (offset) is built

    def count(self, path_suffix: str) -> int:
        return sum(1 for r in self.requests if r.url.path.endswith(path_suffix))

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.script is not None:
                answer = self.script(request)
                if not isinstance(answer, httpx.Response) and answer is not None:
                    answer = await answer
                if answer is not None:
                    return answer
            return await self._serve(request)
        finally:
            self.in_flight -= 1

    async def _serve(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/api/v1")
        if path == "/client/config":
            return httpx.Response(200, json=self.config)
        if path == "/training_runs":
            if self.page_delay:
                await asyncio.sleep(0)
            return self._page(request)
        if path.startswith("/training_runs/") and path.endswith("/checkpoints"):
            return httpx.Response(200, json={"checkpoints": [], "cursor": None})
        if path.startswith("/training_runs/") and path.endswith("/ttl"):
            return httpx.Response(200, json={})
        if path.startswith("/training_runs/"):
            run_id = path.removeprefix("/training_runs/")
            for run in self.runs:
                if run["training_run_id"] == run_id:
                    return httpx.Response(200, json=run)
            return httpx.Response(404, json={"detail": "not found"})
        return httpx.Response(404, json={"detail": f"no route {path}"})

    def _page(self, request: httpx.Request) -> httpx.Response:
        limit = int(request.url.params["limit"])
        offset = int(request.url.params["offset"])
        served = limit if self.cap is None else min(limit, self.cap)
        body = {
            "training_runs": self.runs[offset : offset + served],
            "cursor": {
                "offset": offset,
                "limit": limit if self.echo_requested_limit else served,
                "total_count": len(self.runs),
            },
        }
        if self.on_page is not None:
            self.on_page(offset)
        return httpx.Response(200, json=body)


def settings(**overrides: Any) -> TinkerSettings:
    base: dict[str, Any] = {
        "page_size": 100,
        "max_concurrent_pages": 4,
        "retry_attempts": 3,
        "retry_base_delay": 0.2,
        "retry_max_delay": 5.0,
        "request_timeout": 2.0,
    }
    base.update(overrides)
    return TinkerSettings(**base)


@dataclass
class Rig:
    gateway: TinkerGateway
    server: FakeTinker
    clock: FakeClock
    metrics: Metrics
    http: httpx.AsyncClient

    def requests_counted(self, endpoint: str, code: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "tinker_recovery_api_requests_total", {"endpoint": endpoint, "code": code}
        )
        return value or 0.0


def make_rig(server: FakeTinker, *, rand: Callable[[], float] = lambda: 0.5, **cfg: Any) -> Rig:
    clock = FakeClock()
    metrics = Metrics(registry=CollectorRegistry())
    http = httpx.AsyncClient(transport=httpx.MockTransport(server))
    gateway = TinkerGateway(
        base_url="http://tinker.test/",
        api_key=SecretStr(API_KEY),
        http=http,
        cfg=settings(**cfg),
        clock=clock,
        metrics=metrics,
        rand=rand,
    )
    return Rig(gateway=gateway, server=server, clock=clock, metrics=metrics, http=http)
