"""The daemon's one HTTP port: /metrics, /healthz, /readyz, /status and operator endpoints.

A Starlette app served by uvicorn inside the daemon's TaskGroup, so a scrape is answered by the
same event loop that polls (a stuck loop fails the scrape, unlike prometheus_client's thread).
uvicorn's own signal handlers are off (the daemon owns signals) and so is its log config (its
records go through structlog like everything else).

Mutating endpoints (POST /pause, /resume, /recover) exist only when a bearer token is configured
and an `OperatorApi` is given. The token is compared in constant time and never echoed. Their
bodies are bounded before anything is parsed: at most `MAX_BODY_BYTES` are read (413 beyond),
every malformed body is a 400 (including nesting deep enough to exhaust the parser's recursion),
and ids obey the limits the rest of the daemon applies (`core.lineage.is_valid_lineage_id`), so
a hold that could never match a lineage is refused instead of stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Literal, Protocol, TypeVar

import structlog
import uvicorn
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tinker_recovery.core import lineage as core_lineage
from tinker_recovery.errors import FencedOut
from tinker_recovery.obs import logs
from tinker_recovery.shell.clock import Clock

log = structlog.get_logger(__name__)

Role = Literal["leader", "standby", "starting"]


class Health:
    """Mutable facts the daemon updates and the probes read. Times are monotonic seconds.

    /healthz fails only when the loop heartbeat (`tick`) is older than `loop_stall_s`; that the
    handler runs at all already proves the event loop is alive. /readyz needs the config loaded,
    the store open, a successful poll within `ready_poll_intervals` intervals, and a role.
    """

    def __init__(
        self,
        *,
        poll_interval_s: float = 30.0,
        loop_stall_s: float = 30.0,
        ready_poll_intervals: float = 3.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config_loaded = False
        self.store_open = False
        self.role: Role = "starting"
        self.poll_interval_s = poll_interval_s
        self.loop_stall_s = loop_stall_s
        self.ready_poll_intervals = ready_poll_intervals
        self.last_poll_success: float | None = None
        self.last_poll_cycle: float | None = None
        self.last_loop_tick: float | None = None
        self._monotonic = monotonic
        self._started = monotonic()

    def mark_poll_success(self, monotonic_s: float) -> None:
        self.last_poll_success = monotonic_s
        self.last_poll_cycle = monotonic_s

    def mark_poll_cycle(self, monotonic_s: float) -> None:
        """A poll cycle ended, successful or not (the loop is turning)."""
        self.last_poll_cycle = monotonic_s

    def mark_store(self, ok: bool) -> None:
        """Whether the store kept what this cycle wrote (or could be reached): /readyz fails
        while it does not."""
        self.store_open = ok

    def tick(self, monotonic_s: float) -> None:
        self.last_loop_tick = monotonic_s

    def is_progressing(self, within_s: float | None = None) -> bool:
        """A poll cycle ended (or the daemon started) within `within_s` (default 3 intervals).

        Meant for the sd_notify watchdog: failing polls (Tinker down) still count as progress,
        since restarting the daemon would not fix them; a cycle stuck forever does not.
        """
        limit = self.poll_interval_s * self.ready_poll_intervals if within_s is None else within_s
        last = self.last_poll_cycle if self.last_poll_cycle is not None else self._started
        return self._monotonic() - last <= limit

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        now = self._monotonic()
        age = None if self.last_loop_tick is None else now - self.last_loop_tick
        ok = age is None or age <= self.loop_stall_s
        return ok, {"event_loop": True, "heartbeat_age_s": age, "heartbeat_ok": ok}

    def readiness(self) -> tuple[bool, dict[str, bool]]:
        now = self._monotonic()
        window = self.poll_interval_s * self.ready_poll_intervals
        checks = {
            "config_loaded": self.config_loaded,
            "store_open": self.store_open,
            # A standby does not poll (the leader does); it is ready to take over instead.
            "recent_poll": self.role == "standby"
            or (self.last_poll_success is not None and now - self.last_poll_success <= window),
            "role": self.role in ("leader", "standby"),
        }
        return all(checks.values()), checks

    async def heartbeat(self, stop: asyncio.Event, clock: Clock, interval_s: float = 1.0) -> None:
        """Tick every `interval_s` until `stop`; run it as a TaskGroup child (`name="heartbeat"`).

        Ticks use this object's `monotonic`, the same source the probes compare against.
        """
        while not stop.is_set():
            self.tick(self._monotonic())
            await clock.sleep(interval_s, wakeup=stop)


class OperatorApi(Protocol):
    async def pause(self, lineage: str | None) -> None:
        """Hold one lineage, or every lineage when None."""
        ...

    async def resume(self, lineage: str | None) -> None: ...

    async def recover(self, run_id: str, checkpoint: str | None) -> int:
        """Queue a manual recovery; returns the request id."""
        ...


_Body = TypeVar("_Body", bound=BaseModel)


# Operator bodies are a few short strings; anything near this size is a mistake or an attack.
MAX_BODY_BYTES = 16 * 1024
# A tinker:// path is a run id plus a short suffix (`/weights/000020`).
MAX_CHECKPOINT_PATH_CHARS = 1024
CHECKPOINT_SCHEME = "tinker://"


def _check_id(value: str, what: str) -> str:
    if not core_lineage.is_valid_lineage_id(value):
        raise ValueError(
            f"{what} must be 1 to {core_lineage.MAX_LINEAGE_ID_CHARS} printable characters "
            "without whitespace"
        )
    return value


class _LineageBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    lineage: str | None = None

    @field_validator("lineage")
    @classmethod
    def _lineage_id(cls, value: str | None) -> str | None:
        return None if value is None else _check_id(value, "a lineage id")


class _RecoverBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    run_id: str
    checkpoint: str | None = Field(None, max_length=MAX_CHECKPOINT_PATH_CHARS)

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, value: str) -> str:
        # A run id is what a lineage id defaults to, so the same limits apply.
        return _check_id(value, "a run id")

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_path(cls, value: str | None) -> str | None:
        if value is None:
            return None
        run = value.removeprefix(CHECKPOINT_SCHEME).split("/", 1)[0]
        if not value.startswith(CHECKPOINT_SCHEME) or not core_lineage.is_valid_lineage_id(run):
            raise ValueError("a checkpoint must be a tinker://RUN/... path")
        if not value.isprintable() or any(ch.isspace() for ch in value):
            raise ValueError("a checkpoint path must be printable, without whitespace")
        return value


def _error(status: int, code: str, detail: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


class _Refused(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


@contextlib.contextmanager
def _operator_errors(action: str) -> Iterator[None]:
    """Map what an OperatorApi raises to HTTP answers; log what nobody expected."""
    try:
        yield
    except LookupError as exc:
        raise _Refused(_error(404, "not_found", str(exc))) from None
    except ValueError as exc:
        raise _Refused(_error(400, "bad_request", str(exc))) from None
    except FencedOut:
        raise _Refused(_error(503, "not_leader", "this replica is not the leader")) from None
    except Exception as exc:  # request boundary: answer 500, keep serving
        log.exception("operator_request_failed", action=action, error_type=type(exc).__name__)
        raise _Refused(_error(500, "internal", f"{action} failed")) from None


def build_app(
    *,
    registry: CollectorRegistry,
    health: Health,
    status: Callable[[], Awaitable[dict[str, Any]]],
    operator: OperatorApi | None,
    token: SecretStr | None,
) -> Starlette:
    """The Starlette app; routes are fixed at build time (no token: no mutating routes)."""
    token_text = token.get_secret_value().strip() if token is not None else ""
    token_bytes = token_text.encode()
    logs.register_secret(token_text)  # no-op when empty

    async def metrics(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(registry), headers={"Content-Type": content_type})

    async def healthz(_: Request) -> Response:
        ok, checks = health.liveness()
        return JSONResponse({"status": "ok" if ok else "fail", **checks}, 200 if ok else 503)

    async def readyz(_: Request) -> Response:
        ok, checks = health.readiness()
        return JSONResponse({"ready": ok, "checks": checks}, 200 if ok else 503)

    async def status_endpoint(_: Request) -> Response:
        try:
            body = await status()
        except Exception as exc:  # request boundary: answer 500, keep serving
            log.exception("status_failed", error_type=type(exc).__name__)
            return _error(500, "internal", "status unavailable")
        # Belt and braces: nothing registered as a secret leaves through /status.
        return JSONResponse(logs.redact(body))

    routes = [
        Route("/metrics", metrics, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/status", status_endpoint, methods=["GET"]),
    ]
    if token_bytes and operator is not None:
        routes += _operator_routes(operator, token_bytes)
    return Starlette(routes=routes)


def _check_token(request: Request, token_bytes: bytes) -> None:
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise _Refused(
            _error(401, "unauthorized", "bearer token required", **{"WWW-Authenticate": "Bearer"})
        )
    if not hmac.compare_digest(presented.strip().encode(), token_bytes):
        log.warning("operator_request_denied", path=request.url.path)
        raise _Refused(
            _error(
                401,
                "invalid_token",
                "bearer token not accepted",
                **{"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        )


def _too_large() -> _Refused:
    return _Refused(
        _error(413, "payload_too_large", f"body must be at most {MAX_BODY_BYTES} bytes")
    )


async def _read_body(request: Request) -> bytes:
    """The body, read only up to MAX_BODY_BYTES: a declared or actual excess is a 413."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise _Refused(_error(400, "bad_request", "invalid Content-Length"))
        if int(declared) > MAX_BODY_BYTES:
            raise _too_large()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse(request: Request, model: type[_Body]) -> _Body:
    raw = await _read_body(request)
    try:
        data = json.loads(raw) if raw.strip() else {}
        return model.model_validate(data)
    except RecursionError:
        # `[[[[...` a few thousand deep (well within the size cap) exhausts json's recursion.
        raise _Refused(_error(400, "bad_request", "body is nested too deeply")) from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        if isinstance(exc, ValidationError):
            raise _Refused(_error(400, "bad_request", _validation_detail(exc))) from None
        raise _Refused(_error(400, "bad_request", "body must be JSON")) from None


def _validation_detail(exc: ValidationError) -> str:
    # Messages only, never the input: a refused body may be huge or carry a secret.
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
        for e in exc.errors(include_url=False, include_input=False)
    )


def _operator_routes(operator: OperatorApi, token_bytes: bytes) -> list[Route]:
    async def pause(request: Request) -> Response:
        try:
            _check_token(request, token_bytes)
            body = await _parse(request, _LineageBody)
            with _operator_errors("pause"):
                await operator.pause(body.lineage)
        except _Refused as refused:
            return refused.response
        log.info("operator_paused", lineage=body.lineage or "all")
        return JSONResponse({"paused": body.lineage or "all"})

    async def resume(request: Request) -> Response:
        try:
            _check_token(request, token_bytes)
            body = await _parse(request, _LineageBody)
            with _operator_errors("resume"):
                await operator.resume(body.lineage)
        except _Refused as refused:
            return refused.response
        log.info("operator_resumed", lineage=body.lineage or "all")
        return JSONResponse({"resumed": body.lineage or "all"})

    async def recover(request: Request) -> Response:
        try:
            _check_token(request, token_bytes)
            body = await _parse(request, _RecoverBody)
            with _operator_errors("recover"):
                request_id = await operator.recover(body.run_id, body.checkpoint)
        except _Refused as refused:
            return refused.response
        log.info("operator_recover_queued", run_id=body.run_id, request_id=request_id)
        return JSONResponse({"request_id": request_id, "run_id": body.run_id}, status_code=202)

    return [
        Route("/pause", pause, methods=["POST"]),
        Route("/resume", resume, methods=["POST"]),
        Route("/recover", recover, methods=["POST"]),
    ]


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The daemon's own handlers set its stop event; uvicorn must not replace them.
        yield


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)  # accept into the backlog from now on, before uvicorn takes over
    except OSError:
        sock.close()
        raise
    return sock


async def serve(
    app: Starlette,
    *,
    host: str,
    port: int,
    stop: asyncio.Event,
    bound: Callable[[int], None] | None = None,
) -> None:
    """Serve `app` until `stop` is set. `bound(port)` gets the real port (useful with port=0).

    A bind failure raises OSError (the daemon exits 1); so does the server ending on its own.
    """
    sock = _bind(host, port)
    real_port = int(sock.getsockname()[1])
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,  # scrapes every few seconds would drown the log; metrics count them
        lifespan="off",
        ws="none",  # no websocket routes; skips importing a websockets library
        server_header=False,
        timeout_graceful_shutdown=5,
    )
    server = _Server(config)
    log.info("http_listening", host=host, port=real_port)
    if bound is not None:
        bound(real_port)
    try:
        async with asyncio.TaskGroup() as tg:
            serving = tg.create_task(server.serve(sockets=[sock]), name="http-server")
            stopping = tg.create_task(stop.wait(), name="http-stop")
            await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
            ended_early = serving.done() and not stop.is_set()
            server.should_exit = True  # uvicorn notices within its 0.1 s tick, then drains
            stopping.cancel()
    finally:
        sock.close()
    if ended_early:
        raise OSError(f"http server on {host}:{real_port} stopped unexpectedly")
    log.info("http_stopped")
