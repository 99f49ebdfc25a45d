"""TinkerGateway: the daemon's bounded reader of the Tinker REST API.

It owns the read and TTL endpoints (training runs, checkpoints, weights_info, checkpoint TTL;
and checkpoint deletion, for `prune`),
the `client/config` handshake and, when the server asks for it, the JWT exchange. Payloads are
parsed with the SDK's public wire models (`tinker.types`), then turned into `core.model` views;
listing pages, the hot path, with a msgspec projection of `TrainingRun` held to the SDK's model
by a contract test (gateway_base.py). A listing counts only when its pages add up to one fleet.

Why not the SDK's RestClient: it retries 5xx/429/connection errors for about five minutes with
no knob, which would freeze the monitor (docs/tinker-gateway.md). Here every request has its
own deadline and a small, jittered retry budget, so a cycle always ends in bounded time.

This is the one module that knows httpx, aiohttp and pydantic exception types: everything
leaving it is an `errors.RemoteUnavailable` or `errors.RemoteRejected`. It must never put the
key in a message.
"""

from __future__ import annotations

import asyncio
import importlib
import random
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import pydantic
import structlog
import tinker
from pydantic import SecretStr
from tinker import types as wire

from tinker_recovery.core.model import CheckpointView, RunView, WeightsInfo
from tinker_recovery.errors import InconsistentListing, RemoteRejected, RemoteUnavailable
from tinker_recovery.obs.metrics import Metrics
from tinker_recovery.settings import TinkerSettings
from tinker_recovery.shell.clock import Clock
from tinker_recovery.shell.gateway_base import (
    Credentials,
    GatewayUnavailable,
    MalformedResponse,
    RunsPage,
    is_invalid_token,
    malformed,
    parse_runs_page,
    poll_error_reason,
    retry_after_s,
    to_checkpoint_view,
    to_run_view,
)

__all__ = [
    "GatewayUnavailable",
    "MalformedResponse",
    "TinkerGateway",
    "make_http_client",
    "poll_error_reason",
]

log = structlog.get_logger(__name__)

_ModelT = TypeVar("_ModelT", bound=pydantic.BaseModel)

# Statuses worth another try: the request may succeed unchanged a moment later.
_RETRY_STATUSES = frozenset({408, 429})


# Listings per list_runs() call: the first and up to two re-lists when the fleet moved under it.
_LISTING_TRIES = 3


class _Shifted(Exception):
    """One listing's pages do not add up; list_runs() lists again (never leaves the module)."""


@dataclass(frozen=True, slots=True)
class _Page:
    total: int  # cursor.total_count as this page saw it
    runs: list[RunView]


class TinkerGateway:
    """Bounded, retried access to the Tinker read/TTL endpoints. One instance per daemon."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: SecretStr,
        http: httpx.AsyncClient,
        cfg: TinkerSettings,
        clock: Clock,
        metrics: Metrics,
        rand: Callable[[], float] = random.random,
        projection: bool = True,
    ) -> None:
        self._root = base_url.rstrip("/") + "/api/v1"
        self._http = http
        self._cfg = cfg
        self._clock = clock
        self._metrics = metrics
        self._rand = rand
        # Parse listing pages with the slim projection (when msgspec is installed); False keeps
        # the SDK's models, for the benchmark's side-by-side figures.
        self._projection = projection
        # httpx-aiohttp maps most aiohttp errors to httpx ones, not all (a response that is not
        # HTTP raises aiohttp's own ClientResponseError): those count as connection failures.
        aiohttp = sys.modules.get("aiohttp")
        extra = () if aiohttp is None else (aiohttp.ClientError,)
        self._transport_errors: tuple[type[BaseException], ...] = (httpx.TransportError, *extra)
        self._auth = Credentials(api_key, clock, rand)
        self._config_lock = asyncio.Lock()
        self._configured = asyncio.Event()

    # ---- public API -------------------------------------------------------------------

    async def connect(self) -> None:
        """Fetch `client/config` (and a JWT if the server wants one). Idempotent.

        Called lazily by every other method; call it at start-up to fail early.
        """
        if self._configured.is_set():
            return
        async with self._config_lock:
            if self._configured.is_set():
                return
            # Like the SDK, ask with the raw key; the answer says whether to exchange it.
            response = await self._send(
                "client_config",
                "POST",
                "/client/config",
                json={"sdk_version": tinker.__version__},
                raw_key=True,
            )
            config = self._parse(wire.ClientConfigResponse, response, "client_config")
            if config.pjwt_auth_enabled:
                self._auth.jwt_enabled = True
                await self._auth.current(self._exchange)  # exchange now: fail early if refused
            log.info("tinker_connected", jwt_auth=config.pjwt_auth_enabled)
            self._configured.set()

    async def list_runs(self) -> list[RunView]:
        """Every run in scope from one consistent listing, or an exception: never a partial
        fleet, never a listing whose pages do not add up (DESIGN.md "Talking to Tinker").

        Offset paging while runs come, go or move shifts later pages: a run can be hidden and
        another served twice. A listing counts only when its ids are unique, their count equals
        `total_count` and every page reported that same total. Otherwise the fleet is listed
        again (at most `_LISTING_TRIES` listings, all inside the poller's cycle_timeout), and
        then `InconsistentListing` makes the cycle "unknown"."""
        shift: _Shifted | None = None
        for listing in range(1, _LISTING_TRIES + 1):
            try:
                return await self._one_listing()
            except _Shifted as exc:
                shift = exc
                log.info("fleet_changed_during_listing", listing=listing, detail=str(exc))
        raise InconsistentListing(
            f"list_runs: no consistent listing in {_LISTING_TRIES} tries (last: {shift})"
        )

    async def _one_listing(self) -> list[RunView]:
        first = await self._page(offset=0, limit=self._cfg.page_size)
        total = first.total
        # The server may serve fewer runs per page than we asked for (a cap), and may or may
        # not say so in cursor.limit. Page 0's own length is the step: even if page 0 was cut
        # short, stepping by what we actually got skips nothing.
        step = len(first.runs) or self._cfg.page_size
        pages: dict[int, _Page] = {0: first}
        offsets = range(step, total, step)
        if offsets:
            await self._fetch_pages(offsets, step, total, pages)
        return _consistent(pages, total)

    async def get_run(self, run_id: str) -> RunView:
        response = await self._send(
            "get_run",
            "GET",
            f"/training_runs/{_seg(run_id)}",
            params={"access_scope": self._cfg.access_scope},
        )
        return to_run_view(self._parse(wire.TrainingRun, response, "get_run"))

    async def list_checkpoints(self, run_id: str) -> list[CheckpointView]:
        response = await self._send(
            "list_checkpoints", "GET", f"/training_runs/{_seg(run_id)}/checkpoints"
        )
        parsed = self._parse(wire.CheckpointsListResponse, response, "list_checkpoints")
        return [to_checkpoint_view(c) for c in parsed.checkpoints]

    async def weights_info(self, tinker_path: str) -> WeightsInfo:
        response = await self._send(
            "weights_info", "POST", "/weights_info", json={"tinker_path": tinker_path}
        )
        info = self._parse(wire.WeightsInfoResponse, response, "weights_info")
        return WeightsInfo(
            base_model=info.base_model,
            is_lora=info.is_lora,
            lora_rank=info.lora_rank,
            # The SDK model defaults optimizer_config to Adam when the key is absent, so only
            # an explicit key in the payload is evidence that optimizer state was saved.
            has_optimizer_state="optimizer_config" in info.model_fields_set,
        )

    async def set_checkpoint_ttl(self, tinker_path: str, ttl_s: int | None) -> None:
        try:
            parsed = wire.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
        except ValueError as exc:
            raise RemoteRejected(f"not a tinker checkpoint path: {tinker_path!r}") from exc
        path = (
            f"/training_runs/{_seg(parsed.training_run_id)}"
            f"/checkpoints/{quote(parsed.checkpoint_id, safe='/:')}/ttl"
        )
        await self._send("set_checkpoint_ttl", "PUT", path, json={"ttl_seconds": ttl_s})

    async def delete_checkpoint(self, tinker_path: str) -> None:
        """Delete one checkpoint (`tinker-recovery prune` only; the daemon never deletes)."""
        try:
            parsed = wire.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
        except ValueError as exc:
            raise RemoteRejected(f"not a tinker checkpoint path: {tinker_path!r}") from exc
        path = (
            f"/training_runs/{_seg(parsed.training_run_id)}"
            f"/checkpoints/{quote(parsed.checkpoint_id, safe='/:')}"
        )
        await self._send("delete_checkpoint", "DELETE", path)

    # ---- paging -----------------------------------------------------------------------

    async def _page(self, *, offset: int, limit: int) -> _Page:
        params: dict[str, str | int] = {
            "limit": limit,
            "offset": offset,
            "access_scope": self._cfg.access_scope,
        }
        if self._cfg.project_id is not None:
            params["project_id"] = self._cfg.project_id
        response = await self._send("list_runs", "GET", "/training_runs", params=params)
        # Views right away, so 100k parsed models never live at once (GC time, memory).
        try:
            page = parse_runs_page(response.content, use_projection=self._projection)
        except MalformedResponse as exc:
            raise MalformedResponse(
                self._auth.redact(str(exc)), status_code=response.status_code
            ) from None
        _check_page(page, offset=offset, limit=limit, first=offset == 0)
        return _Page(page.total_count, page.runs)

    async def _fetch_pages(
        self, offsets: range, step: int, total: int, into: dict[int, _Page]
    ) -> None:
        todo: Iterator[int] = iter(offsets)

        async def worker() -> None:
            # Workers share one iterator, so at most max_concurrent_pages requests are in flight.
            for offset in todo:
                page = await self._page(offset=offset, limit=step)
                if page.total != total:
                    # The fleet changed under the listing: stop fetching pages of this one.
                    raise _Shifted(f"page {offset} says total {page.total}, page 0 said {total}")
                into[offset] = page

        n_workers = min(self._cfg.max_concurrent_pages, len(offsets))
        try:
            async with asyncio.TaskGroup() as group:
                for i in range(n_workers):
                    group.create_task(worker(), name=f"list-runs-page-{i}")
        except* (RemoteUnavailable, RemoteRejected, _Shifted) as failed:
            # One page failing sinks the whole listing; report the first failure as itself
            # (a failed request before a shift: a re-list would not be evidence either).
            errors = failed.exceptions
            first_failure = next((e for e in errors if not isinstance(e, _Shifted)), errors[0])
            assert isinstance(first_failure, RemoteUnavailable | RemoteRejected | _Shifted)
            raise first_failure from None

    # ---- one request ------------------------------------------------------------------

    def _parse(self, model: type[_ModelT], response: httpx.Response, endpoint: str) -> _ModelT:
        try:
            return model.model_validate_json(response.content)
        except pydantic.ValidationError as exc:
            raise malformed(endpoint, exc, response.status_code) from None

    async def _exchange(self) -> str:
        """POST auth/token with the raw key -> a JWT, the exchange the SDK does."""
        response = await self._send("auth_token", "POST", "/auth/token", json={}, raw_key=True)
        return self._parse(wire.AuthTokenResponse, response, "auth_token").jwt

    async def _send(
        self,
        endpoint: str,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        json: Any = None,
        raw_key: bool = False,
    ) -> httpx.Response:
        """One logical request: bounded attempts, each under its own deadline."""
        if not raw_key:
            await self.connect()
        replayed = False
        attempt = 1
        while True:
            key = self._auth.raw_key() if raw_key else await self._auth.current(self._exchange)
            try:
                response = await self._attempt(endpoint, method, path, key, params, json)
                if response.is_success:
                    return response
                if self._should_replay(response, raw_key=raw_key, replayed=replayed):
                    # The server dropped our JWT before it expired: exchange once, replay.
                    replayed = True
                    await self._auth.replace(key, self._exchange)
                    continue
                raise self._classify(endpoint, response, self._auth.redact)
            except GatewayUnavailable as failure:
                if attempt >= self._cfg.retry_attempts:
                    raise
                await self._back_off(endpoint, attempt, failure)
                attempt += 1

    def _should_replay(self, response: httpx.Response, *, raw_key: bool, replayed: bool) -> bool:
        return self._auth.jwt_enabled and not (raw_key or replayed) and is_invalid_token(response)

    async def _attempt(
        self,
        endpoint: str,
        method: str,
        path: str,
        key: str,
        params: Mapping[str, str | int] | None,
        json: Any,
    ) -> httpx.Response:
        counter = self._metrics.api_requests
        try:
            async with asyncio.timeout(self._cfg.request_timeout):
                response = await self._http.request(
                    method,
                    self._root + path,
                    params=params,
                    json=json,
                    headers={"X-API-Key": key, "Accept": "application/json"},
                )
        except (TimeoutError, httpx.TimeoutException) as exc:
            if not self._timed_out(exc):
                raise self._connection_failed(endpoint, exc) from None
            counter.labels(endpoint=endpoint, code="timeout").inc()
            raise GatewayUnavailable(
                f"{endpoint}: no answer within {self._cfg.request_timeout:g}s", reason="timeout"
            ) from None
        except self._transport_errors as exc:
            raise self._connection_failed(endpoint, exc) from None
        counter.labels(endpoint=endpoint, code=str(response.status_code)).inc()
        return response

    def _timed_out(self, exc: BaseException) -> bool:
        # httpx-aiohttp reports a refused connection as httpx.ConnectTimeout; its cause says
        # whether time really ran out (aiohttp's timeouts are TimeoutErrors).
        cause = exc.__cause__
        foreign = self._transport_errors[1:]
        return not (foreign and isinstance(cause, foreign) and not isinstance(cause, TimeoutError))

    def _connection_failed(self, endpoint: str, exc: BaseException) -> GatewayUnavailable:
        self._metrics.api_requests.labels(endpoint=endpoint, code="connection").inc()
        return GatewayUnavailable(
            f"{endpoint}: connection failed ({type(exc).__name__})", reason="connection"
        )

    @staticmethod
    def _classify(
        endpoint: str, response: httpx.Response, redact: Callable[[str], str]
    ) -> RemoteRejected | GatewayUnavailable:
        status = response.status_code
        if status in _RETRY_STATUSES or status >= 500:
            reason = "rate_limited" if status == 429 else "timeout" if status == 408 else "http_5xx"
            return GatewayUnavailable(
                f"{endpoint}: HTTP {status}",
                reason=reason,
                status_code=status,
                retry_after_s=retry_after_s(response),
            )
        # The body of a 4xx can help an operator; keep it short and never echo our headers.
        detail = redact(response.text[:200]).replace("\n", " ")
        return RemoteRejected(f"{endpoint}: HTTP {status}: {detail}", status_code=status)

    async def _back_off(self, endpoint: str, attempt: int, failure: GatewayUnavailable) -> None:
        """Full jitter; a server's Retry-After wins, but never beyond retry_max_delay."""
        cap = self._cfg.retry_max_delay
        delay_s = self._rand() * min(cap, self._cfg.retry_base_delay * 2 ** (attempt - 1))
        if failure.retry_after_s is not None:
            delay_s = min(failure.retry_after_s, cap)
        log.info(
            "tinker_request_retrying",
            endpoint=endpoint,
            attempt=attempt,
            delay_s=round(delay_s, 3),
            error=str(failure),
        )
        await self._clock.sleep(delay_s)


def _consistent(pages: Mapping[int, _Page], total: int) -> list[RunView]:
    """The runs of a listing whose pages all reported `total`, if they are `total` unique ids."""
    runs = [run for offset in sorted(pages) for run in pages[offset].runs]
    ids = {run.run_id for run in runs}
    if len(ids) != len(runs) or len(runs) != total:
        raise _Shifted(f"{len(runs)} runs, {len(ids)} distinct ids, total_count {total}")
    return runs


def make_http_client(cfg: TinkerSettings, *, transport: str = "auto") -> httpx.AsyncClient:
    """The httpx client the gateway is meant to get: pooled, no proxies from the environment,
    and httpx-aiohttp's transport when it is installed (`transport="auto"`; "httpx" forces
    httpx's own). docs/tinker-gateway.md has the measurement behind the choice."""
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
    aio = None if transport == "httpx" else _aiohttp_transport(limits)
    if aio is None and transport == "aiohttp":
        raise RuntimeError("transport 'aiohttp' asked for, but httpx-aiohttp is not installed")
    return httpx.AsyncClient(
        limits=limits,
        timeout=httpx.Timeout(cfg.request_timeout),
        trust_env=False,
        transport=aio,  # None: httpx's own
    )


def _aiohttp_transport(limits: httpx.Limits) -> httpx.AsyncBaseTransport | None:
    try:  # optional: imported by name so the daemon type-checks and runs without it
        module = importlib.import_module("httpx_aiohttp")
    except ImportError:
        return None
    transport: httpx.AsyncBaseTransport = module.AiohttpTransport(trust_env=False, limits=limits)
    return transport


def _check_page(page: RunsPage, *, offset: int, limit: int, first: bool) -> None:
    """Refuse pages that cannot be right; a later page must be full unless it reaches the end
    its own cursor announces (the total may move mid-cycle as runs come and go)."""
    total, got = page.total_count, len(page.runs)
    if page.offset != offset or total < 0:
        raise MalformedResponse(
            f"list_runs: cursor offset {page.offset} / total {total} "
            f"does not fit a request at offset {offset}"
        )
    remaining = max(0, total - offset)
    if first:
        is_ok = got <= min(limit, remaining) and (got > 0 or remaining == 0)
    else:
        is_ok = got == min(limit, remaining)
    if not is_ok:
        raise MalformedResponse(
            f"list_runs: page at offset {offset} has {got} runs; asked for {limit}, "
            f"total {total}: truncated or inconsistent page"
        )


def _seg(value: str) -> str:
    """One URL path segment; ':' stays literal, as the SDK sends run ids."""
    return quote(value, safe=":")
