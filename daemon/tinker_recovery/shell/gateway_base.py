"""Pieces of the Tinker gateway that need no HTTP loop: its error classes, wire-model -> view
conversion, and the credential (raw key or exchanged JWT) that goes in X-API-Key.

Split from gateway.py to keep each module readable; only gateway.py should import it.
It must never put the key or a JWT in a message or a log line.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import httpx
import pydantic
import structlog
from pydantic import SecretStr
from tinker import types as wire

from tinker_recovery.core.model import CheckpointKind, CheckpointView, RunView
from tinker_recovery.errors import (
    InconsistentListing,
    RecoveryError,
    RemoteRejected,
    RemoteUnavailable,
)
from tinker_recovery.shell.clock import Clock

log = structlog.get_logger(__name__)


class GatewayUnavailable(RemoteUnavailable):
    """RemoteUnavailable with the poll_errors reason it maps to (timeout, connection, ...)."""

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        status_code: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.reason = reason
        self.status_code = status_code


class MalformedResponse(RemoteRejected):
    """The server answered 2xx with a body that does not fit the wire model or the paging."""


def poll_error_reason(exc: BaseException) -> str:
    """Map an exception to a `poll_errors_total{reason}` label value."""
    if isinstance(exc, MalformedResponse):
        return "malformed"
    if isinstance(exc, InconsistentListing):
        return "inconsistent"
    if isinstance(exc, RemoteRejected):
        return "rejected"
    if isinstance(exc, GatewayUnavailable):
        return exc.reason
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "other"


def retry_after_s(response: httpx.Response) -> float | None:
    """Server-suggested wait: `retry-after-ms` first (what the SDK reads), then `Retry-After`."""
    raw_ms = response.headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            return max(0.0, float(raw_ms) / 1000.0)
        except ValueError:
            pass
    raw = response.headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        # An HTTP-date form is legal but rare from APIs; the jittered delay is used instead.
        return None


_ZERO = timedelta(0)
# The SDK's Literal values map 1:1 onto ours; a dict lookup is cheaper than Enum() per run.
_KINDS = {kind.value: kind for kind in CheckpointKind}


def _utc(value: datetime) -> datetime:
    """Aware UTC (`tzinfo is UTC`); a naive wire timestamp is taken to be UTC already."""
    offset = value.utcoffset()
    if offset is None or offset == _ZERO:
        # Three of these per run, 100k runs a cycle: combine() builds the aware value about
        # four times faster than replace(tzinfo=...), whose keyword parsing dominates.
        return datetime.combine(value.date(), value.time(), UTC)
    return value.astimezone(UTC)


def to_checkpoint_view(ckpt: wire.Checkpoint) -> CheckpointView:
    return CheckpointView(
        checkpoint_id=ckpt.checkpoint_id,
        kind=_KINDS[ckpt.checkpoint_type],
        tinker_path=ckpt.tinker_path,
        time=_utc(ckpt.time),
        expires_at=None if ckpt.expires_at is None else _utc(ckpt.expires_at),
        size_bytes=ckpt.size_bytes,
    )


def to_run_view(run: wire.TrainingRun) -> RunView:
    last = run.last_checkpoint
    return RunView(
        run_id=run.training_run_id,
        base_model=run.base_model,
        owner=run.model_owner,
        is_lora=run.is_lora,
        lora_rank=run.lora_rank,
        corrupted=run.corrupted,
        last_request_time=_utc(run.last_request_time),
        last_checkpoint=None if last is None else to_checkpoint_view(last),
        # The parsed model is dropped right after this, so its dict can be kept as it is.
        user_metadata=run.user_metadata or {},
    )


# ---- the listing hot path: a projection of the SDK's TrainingRun ---------------------------
#
# Pages of `GET /training_runs` are the one payload parsed 1,000 times a cycle at 100k runs.
# They are decoded with msgspec into the structs below: only the fields the watcher reads, with
# the SDK's names, types and optionality (tests/shell/gateway/test_gateway_projection.py holds
# them to `tinker.types.TrainingRun`, so an SDK upgrade that changes the wire fails the build).
# Without msgspec installed, pages fall back to the SDK's own pydantic models.
try:
    import msgspec
except ImportError:  # pragma: no cover - the fallback is tested by forcing it, not uninstalling
    msgspec = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class RunsPage:
    """One page of runs, checked by the caller against the request it answers."""

    offset: int  # cursor.offset
    total_count: int  # cursor.total_count
    runs: list[RunView]


if msgspec is not None:

    class SlimCheckpoint(msgspec.Struct, gc=False):
        """`tinker.types.Checkpoint`, the fields a view needs (gc=False: holds no containers)."""

        checkpoint_id: str
        checkpoint_type: Literal["training", "sampler", "external"]
        time: datetime
        tinker_path: str
        size_bytes: int | None = None
        expires_at: datetime | None = None

    class SlimRun(msgspec.Struct, gc=False):
        """`tinker.types.TrainingRun`, the fields the watcher reads. The one container, the
        metadata dict, is tracked by the collector itself, so untracking the struct is safe."""

        training_run_id: str
        base_model: str
        model_owner: str
        is_lora: bool
        last_request_time: datetime
        corrupted: bool = False
        lora_rank: int | None = None
        last_checkpoint: SlimCheckpoint | None = None
        user_metadata: dict[str, str] | None = None

    class SlimCursor(msgspec.Struct, gc=False):
        offset: int
        limit: int
        total_count: int

    class SlimRunsPage(msgspec.Struct):
        training_runs: list[SlimRun]
        cursor: SlimCursor

    # strict=False: lax like pydantic's default mode ("1" for an int, "true" for a bool).
    _PAGE_DECODER = msgspec.json.Decoder(SlimRunsPage, strict=False)


def projection_available() -> bool:
    """True when list_runs parses pages with the msgspec projection (else: the SDK models)."""
    return msgspec is not None


_intern = sys.intern


def _utc_fast(value: datetime) -> datetime:
    # msgspec hands "+00:00"/"Z" timestamps over with tzinfo=UTC already: the usual case.
    return value if value.tzinfo is UTC else _utc(value)


def _slim_checkpoint_view(ckpt: SlimCheckpoint) -> CheckpointView:
    expires = ckpt.expires_at
    return CheckpointView(
        _intern(ckpt.checkpoint_id),
        _KINDS[ckpt.checkpoint_type],
        ckpt.tinker_path,
        _utc_fast(ckpt.time),
        None if expires is None else _utc_fast(expires),
        ckpt.size_bytes,
    )


def _slim_run_view(run: SlimRun) -> RunView:
    last = run.last_checkpoint
    # Base models and owners repeat across the whole fleet: one string object each.
    return RunView(
        run.training_run_id,
        _intern(run.base_model),
        _intern(run.model_owner),
        run.is_lora,
        run.lora_rank,
        run.corrupted,
        _utc_fast(run.last_request_time),
        None if last is None else _slim_checkpoint_view(last),
        # A fresh {} (never a shared or read-only mapping: views are deep-copied by asdict);
        # an empty dict is not tracked by the collector, so it costs next to nothing.
        run.user_metadata or {},
    )


def parse_runs_page(content: bytes, *, use_projection: bool = True) -> RunsPage:
    """A `GET /training_runs` body -> views; MalformedResponse when it does not fit the wire."""
    if use_projection and msgspec is not None:
        try:
            page = _PAGE_DECODER.decode(content)
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError too
            raise MalformedResponse(f"list_runs: malformed response ({exc})") from None
        cursor = page.cursor
        return RunsPage(
            cursor.offset, cursor.total_count, [_slim_run_view(r) for r in page.training_runs]
        )
    try:
        sdk_page = wire.TrainingRunsResponse.model_validate_json(content)
    except pydantic.ValidationError as exc:
        raise malformed("list_runs", exc) from None
    return RunsPage(
        sdk_page.cursor.offset,
        sdk_page.cursor.total_count,
        [to_run_view(run) for run in sdk_page.training_runs],
    )


def malformed(
    endpoint: str, exc: pydantic.ValidationError, status_code: int | None = None
) -> MalformedResponse:
    """A MalformedResponse naming the first place the body does not fit (never its content)."""
    first = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "<body>"
    return MalformedResponse(
        f"{endpoint}: malformed response ({exc.error_count()} errors; "
        f"first at {where}: {first['msg']})",
        status_code=status_code,
    )


def is_invalid_token(response: httpx.Response) -> bool:
    """RFC 6750: the server refused the token itself (not the caller's rights)."""
    return response.status_code == 401 and 'error="invalid_token"' in response.headers.get(
        "www-authenticate", ""
    )


def _jwt_times(token: str) -> tuple[float, float | None]:
    """(exp, iat) claims of a JWT, read without verifying it: it came from the server over
    the connection we trust for everything else, and we only use it to schedule a refresh."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = float(claims["exp"])
        iat = claims.get("iat")
        return exp, None if iat is None else float(iat)
    except (IndexError, ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise MalformedResponse("auth_token: the JWT has no readable exp claim") from exc


class Credentials:
    """What goes in X-API-Key: the raw key, or a JWT exchanged for it (server's choice).

    JWTs are refreshed lazily at about half their lifetime (from iat/exp, so local clock skew
    does not matter), not by a background task: the gateway is called every poll interval.
    """

    _MIN_RUNWAY_S = 60.0  # a cached JWT with less left than this is not used as a fallback

    def __init__(self, api_key: SecretStr, clock: Clock, rand: Callable[[], float]) -> None:
        self._key = api_key
        self._clock = clock
        self._rand = rand
        self._lock = asyncio.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0  # monotonic
        self._expires_at = 0.0  # monotonic
        self.jwt_enabled = False

    def raw_key(self) -> str:
        return self._key.get_secret_value()

    def redact(self, text: str) -> str:
        """`text` with the key and the JWT masked, for server bodies that echo a request."""
        for secret in (self.raw_key(), self._token):
            if secret:
                text = text.replace(secret, "***")
        return text

    async def current(self, exchange: Callable[[], Awaitable[str]]) -> str:
        if not self.jwt_enabled:
            return self.raw_key()
        if self._token is not None and self._clock.monotonic() < self._refresh_at:
            return self._token
        async with self._lock:
            if self._token is not None and self._clock.monotonic() < self._refresh_at:
                return self._token
            try:
                return await self._fetch(exchange)
            except RecoveryError as exc:
                runway_s = self._expires_at - self._clock.monotonic()
                if self._token is None or runway_s <= self._MIN_RUNWAY_S:
                    raise
                log.warning("jwt_refresh_failed", error=str(exc), runway_s=round(runway_s))
                return self._token

    async def replace(self, rejected: str, exchange: Callable[[], Awaitable[str]]) -> None:
        """Exchange again unless a concurrent request already replaced `rejected`."""
        async with self._lock:
            if self._token == rejected:
                await self._fetch(exchange)

    async def _fetch(self, exchange: Callable[[], Awaitable[str]]) -> str:
        token = await exchange()
        exp, iat = _jwt_times(token)
        now_wall = self._clock.now().timestamp()
        lifetime_s = exp - (iat if iat is not None else now_wall)
        if lifetime_s <= 0:
            raise MalformedResponse("auth_token: the JWT has already expired")
        now = self._clock.monotonic()
        self._token = token
        self._refresh_at = now + lifetime_s * (0.45 + 0.1 * self._rand())
        self._expires_at = now + max(0.0, exp - now_wall)
        return token
