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
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import httpx
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
