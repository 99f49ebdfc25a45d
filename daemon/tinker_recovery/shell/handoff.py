"""Handoff actions: tell the user's job to resume a lineage from a checkpoint.

Three kinds, built once from config by `build_handoff` (bad config fails there, at start-up):
- command: an argv list (never a shell string) with fixed placeholders, run in its own process
  group with a deadline; details travel as TINKER_RECOVERY_* environment variables too.
- webhook: a signed JSON POST with an Idempotency-Key and bounded, jittered retries.
- python: `module:function`, called with the HandoffRequest under a deadline.

Every failure leaves as `errors.ActionFailed(action="handoff")`. Exactly-once is the executor's
job (the attempt row and its idempotency key are written first); these actions pass the key on
so the receiving side can deduplicate. Secrets never go into argv, messages or logs.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import importlib
import inspect
import json
import os
import random
import signal
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import standardwebhooks
import structlog

import tinker_recovery
from tinker_recovery.errors import ActionFailed, ConfigError
from tinker_recovery.settings import CommandHandoff, PythonHandoff, WebhookHandoff
from tinker_recovery.shell.clock import Clock
from tinker_recovery.shell.procs import CommandRunner

log = structlog.get_logger(__name__)

PLACEHOLDERS = frozenset(
    {"lineage", "corrupted_run", "checkpoint", "attempt", "idempotency_key", "restore_optimizer"}
)
SIGNATURE_HEADER = "X-Tinker-Recovery-Signature"
TIMESTAMP_HEADER = "X-Tinker-Recovery-Timestamp"

# The daemon's own secrets and systemd plumbing stay with the daemon. Everything else in its
# environment (PATH, HOME, KUBECONFIG, cloud credentials the command needs) is passed on.
_WITHHELD_ENV = frozenset(
    {
        "TINKER_API_KEY",
        "TINKER_CREDENTIAL_CMD",
        "CLOUDFLARE_ACCESS_CLIENT_ID",
        "CLOUDFLARE_ACCESS_CLIENT_SECRET",
        "PGPASSWORD",
        "NOTIFY_SOCKET",
        "WATCHDOG_PID",
        "WATCHDOG_USEC",
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "CREDENTIALS_DIRECTORY",
    }
)
_WITHHELD_PREFIX = "TINKER_RECOVERY_"  # config overrides, which may carry tokens and DB URLs

_WEBHOOK_BASE_DELAY_S = 0.5
_WEBHOOK_MAX_DELAY_S = 30.0


@dataclass(frozen=True, slots=True)
class HandoffRequest:
    lineage_id: str
    corrupted_run_id: str
    checkpoint_path: str
    attempt: int
    idempotency_key: str
    restore_optimizer: bool
    user_metadata: Mapping[str, str]  # the TAG_* keys the successor must carry
    # restore: sdk hands off a fresh copy (checkpoint_path) of this original checkpoint; jobs
    # that keep their own records of checkpoints (tinker-cookbook's checkpoints.jsonl) look the
    # loop state up by it. None when the original itself is handed off.
    source_checkpoint_path: str | None = None

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "event": "tinker_recovery.handoff",
            "lineage_id": self.lineage_id,
            "corrupted_run_id": self.corrupted_run_id,
            "checkpoint_path": self.checkpoint_path,
            "attempt": self.attempt,
            "idempotency_key": self.idempotency_key,
            "restore_optimizer": self.restore_optimizer,
            "user_metadata": dict(self.user_metadata),
        }
        if self.source_checkpoint_path is not None:  # absent, not null: older receivers
            body["source_checkpoint_path"] = self.source_checkpoint_path
        return body

    def placeholder_values(self) -> dict[str, str]:
        return {
            "lineage": self.lineage_id,
            "corrupted_run": self.corrupted_run_id,
            "checkpoint": self.checkpoint_path,
            "attempt": str(self.attempt),
            "idempotency_key": self.idempotency_key,
            "restore_optimizer": "1" if self.restore_optimizer else "0",
        }

    def environment(self) -> dict[str, str]:
        values = self.placeholder_values()
        env = {
            "TINKER_RECOVERY_LINEAGE": values["lineage"],
            "TINKER_RECOVERY_CORRUPTED_RUN": values["corrupted_run"],
            "TINKER_RECOVERY_CHECKPOINT": values["checkpoint"],
            "TINKER_RECOVERY_ATTEMPT": values["attempt"],
            "TINKER_RECOVERY_IDEMPOTENCY_KEY": values["idempotency_key"],
            "TINKER_RECOVERY_RESTORE_OPTIMIZER": values["restore_optimizer"],
            "TINKER_RECOVERY_USER_METADATA": json.dumps(dict(self.user_metadata), sort_keys=True),
        }
        if self.source_checkpoint_path is not None:
            env["TINKER_RECOVERY_SOURCE_CHECKPOINT"] = self.source_checkpoint_path
        return env


class HandoffAction(Protocol):
    kind: str  # "command" | "webhook" | "python"

    async def hand_off(self, request: HandoffRequest) -> str:
        """Ask the job to resume; a short detail on success, ActionFailed otherwise."""
        ...


def build_handoff(
    cfg: CommandHandoff | WebhookHandoff | PythonHandoff,
    *,
    runner: CommandRunner,
    http: httpx.AsyncClient,
    clock: Clock,
    rand: Callable[[], float] = random.random,
) -> HandoffAction:
    """The action for one `handoffs:` entry. Raises ConfigError for what config can't catch."""
    if isinstance(cfg, CommandHandoff):
        return CommandAction(cfg, runner=runner)
    if isinstance(cfg, WebhookHandoff):
        return WebhookAction(cfg, http=http, clock=clock, rand=rand)
    return PythonAction(cfg)


# ---- command ----------------------------------------------------------------------------


def check_placeholders(argv: list[str]) -> None:
    """Only bare names from PLACEHOLDERS: no attribute access, indexing, conversion or spec."""
    for i, element in enumerate(argv):
        try:
            fields = list(string.Formatter().parse(element))
        except ValueError as exc:
            raise ConfigError(f"handoff argv[{i}]: {exc} in {element!r}") from None
        for _literal, name, spec, conversion in fields:
            if name is None:
                continue
            if name not in PLACEHOLDERS or spec or conversion:
                allowed = " ".join(f"{{{p}}}" for p in sorted(PLACEHOLDERS))
                raise ConfigError(
                    f"handoff argv[{i}]: unknown placeholder in {element!r}; allowed: {allowed} "
                    "(write {{ and }} for literal braces)"
                )


def handoff_environment(extra: Mapping[str, str], request: HandoffRequest) -> dict[str, str]:
    """The daemon's environment minus its secrets, plus `extra`, plus the request's fields."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _WITHHELD_ENV and not k.startswith(_WITHHELD_PREFIX)
    }
    env.update(extra)
    env.update(request.environment())
    return env


class CommandAction:
    kind = "command"

    def __init__(self, cfg: CommandHandoff, *, runner: CommandRunner) -> None:
        check_placeholders(cfg.argv)
        self._cfg = cfg
        self._runner = runner

    async def hand_off(self, request: HandoffRequest) -> str:
        values = request.placeholder_values()
        # Each element is formatted on its own, so a value can never split into two arguments
        # or reach a shell: there is none.
        argv = [element.format_map(values) for element in self._cfg.argv]
        try:
            result = await self._runner.run(
                argv,
                timeout_s=self._cfg.timeout,
                env=handoff_environment(self._cfg.env, request),
                cwd=self._cfg.cwd,
            )
        except OSError as exc:  # not found, not executable, bad cwd
            raise ActionFailed(
                f"handoff command {argv[0]!r} could not start: {exc.strerror or exc}",
                action="handoff",
                may_have_acted=False,
            ) from exc
        if result.timed_out:
            raise ActionFailed(
                f"handoff command {argv[0]!r} timed out after {self._cfg.timeout:g}s; "
                "its process group was killed",
                action="handoff",
            )
        if result.exit_code != 0:
            tail = result.stderr_tail.strip()[-300:]
            raise ActionFailed(
                f"handoff command {argv[0]!r} {_how_it_ended(result.exit_code)}"
                + (f": {tail}" if tail else ""),
                action="handoff",
                exit_code=result.exit_code,
            )
        return f"command {argv[0]!r} exited 0 in {result.duration_s:.1f}s"


def _how_it_ended(exit_code: int | None) -> str:
    """'exited 3', or 'was killed by SIGABRT' for a negative (signal) exit code."""
    if exit_code is None or exit_code >= 0:
        return f"exited {exit_code}"
    try:
        return f"was killed by {signal.Signals(-exit_code).name}"
    except ValueError:
        return f"was killed by signal {-exit_code}"


# ---- webhook ----------------------------------------------------------------------------


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """Header value: `sha256=` + hex HMAC-SHA256 of `<timestamp>.<body>`."""
    digest = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def standard_webhook_key(secret: str) -> bytes:
    """The signing key as Standard Webhooks receivers derive it: a `whsec_<base64>` secret is
    decoded, anything else is used as its UTF-8 bytes (give receivers `whsec_` + its base64)."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_") + "==")
    return secret.encode()


def standard_webhook_headers(
    secret: str, message_id: str, timestamp: str, body: bytes
) -> dict[str, str]:
    """`webhook-id`, `webhook-timestamp`, `webhook-signature` (v1) for this body."""
    signer = standardwebhooks.Webhook(standard_webhook_key(secret))
    when = datetime.fromtimestamp(int(timestamp), tz=UTC)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": timestamp,
        "webhook-signature": signer.sign(message_id, when, body.decode()),
    }


def verify_signature(secret: bytes, timestamp: str, body: bytes, header: str) -> bool:
    """For receivers: does `header` sign exactly this timestamp and body with `secret`?

    Check the timestamp's age yourself too (e.g. reject older than 5 minutes) against replays.
    """
    if not header.startswith("sha256="):
        return False
    try:
        expected = sign(secret, timestamp, body)
    except UnicodeEncodeError:  # a non-ASCII timestamp was never ours
        return False
    return hmac.compare_digest(expected.encode(), header.encode("utf-8", "replace"))


def _retry_after_s(response: httpx.Response) -> float | None:
    raw = response.headers.get("retry-after")
    try:
        return None if raw is None else max(0.0, float(raw))
    except ValueError:
        return None


class WebhookAction:
    kind = "webhook"

    def __init__(
        self,
        cfg: WebhookHandoff,
        *,
        http: httpx.AsyncClient,
        clock: Clock,
        rand: Callable[[], float],
    ) -> None:
        parts = urlsplit(cfg.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("handoff webhook url must be an http(s) URL with a host")
        self._cfg = cfg
        self._http = http
        self._clock = clock
        self._rand = rand
        # The path may hold a token (many webhook URLs do): messages name the host only.
        self._where = parts.hostname

    async def hand_off(self, request: HandoffRequest) -> str:
        body = json.dumps(request.as_json(), sort_keys=True, separators=(",", ":")).encode()
        attempts = self._cfg.max_attempts
        for attempt in range(1, attempts + 1):
            failure, retry_after = await self._post_once(body, request.idempotency_key)
            if failure is None:
                return f"webhook {self._where} accepted on attempt {attempt}"
            if attempt == attempts:
                break
            delay = self._rand() * min(
                _WEBHOOK_MAX_DELAY_S, _WEBHOOK_BASE_DELAY_S * 2 ** (attempt - 1)
            )
            if retry_after is not None:
                delay = min(retry_after, _WEBHOOK_MAX_DELAY_S)
            log.info("webhook_retrying", host=self._where, attempt=attempt, delay_s=delay)
            await self._clock.sleep(delay)
        raise ActionFailed(
            f"webhook {self._where}: gave up after {attempts} attempts: {failure}",
            action="handoff",
        )

    async def _post_once(
        self, body: bytes, idempotency_key: str
    ) -> tuple[str | None, float | None]:
        """(None, _) on success; (why, retry_after) if worth another try; raises if not."""
        timestamp = str(int(self._clock.now().timestamp()))  # fresh per try: replay windows
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"tinker-recovery/{tinker_recovery.__version__}",
            "Idempotency-Key": idempotency_key,
            TIMESTAMP_HEADER: timestamp,
        }
        if self._cfg.secret is not None:
            key = self._cfg.secret.get_secret_value()
            headers[SIGNATURE_HEADER] = sign(key.encode(), timestamp, body)
            # Standard Webhooks, which receivers verify with their libraries: the message id is
            # the idempotency key, so a redelivery is recognised as the same message.
            headers.update(standard_webhook_headers(key, idempotency_key, timestamp, body))
        try:
            async with asyncio.timeout(self._cfg.timeout):
                response = await self._http.post(self._cfg.url, content=body, headers=headers)
        except (TimeoutError, httpx.TimeoutException):
            return f"no answer within {self._cfg.timeout:g}s", None
        except httpx.TransportError as exc:
            return f"connection failed ({type(exc).__name__})", None
        status = response.status_code
        if response.is_success:
            return None, None
        if status in (408, 429) or status >= 500:
            return f"HTTP {status}", _retry_after_s(response)
        raise ActionFailed(
            f"webhook {self._where} refused the handoff: HTTP {status}",
            action="handoff",
            exit_code=None,
            may_have_acted=False,
        )


# ---- python -----------------------------------------------------------------------------


def resolve_entry_point(entry_point: str) -> Callable[..., Any]:
    module_name, _, attr_path = entry_point.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"handoff entry_point {entry_point!r}: cannot import: {exc}") from None
    for attr in attr_path.split("."):
        try:
            target = getattr(target, attr)
        except AttributeError:
            raise ConfigError(
                f"handoff entry_point {entry_point!r}: {module_name} has no {attr_path}"
            ) from None
    if not callable(target):
        raise ConfigError(f"handoff entry_point {entry_point!r} is not callable")
    return target  # type: ignore[no-any-return]  # callable() checked it; user code is untyped


class PythonAction:
    kind = "python"

    def __init__(self, cfg: PythonHandoff) -> None:
        self._cfg = cfg
        self._func = resolve_entry_point(cfg.entry_point)
        self._is_async = inspect.iscoroutinefunction(self._func)

    async def hand_off(self, request: HandoffRequest) -> str:
        try:
            async with asyncio.timeout(self._cfg.timeout):
                if self._is_async:
                    result = await self._func(request)
                else:
                    # A plain function may block; a thread keeps the loop alive. It cannot be
                    # killed on timeout: it finishes in the background (documented).
                    result = await asyncio.to_thread(self._func, request)
        except TimeoutError:
            raise ActionFailed(
                f"handoff {self._cfg.entry_point} timed out after {self._cfg.timeout:g}s",
                action="handoff",
            ) from None
        except ActionFailed:
            raise
        except Exception as exc:  # user code may raise anything: translate it once, here
            raise ActionFailed(
                f"handoff {self._cfg.entry_point} raised {type(exc).__name__}: {exc}",
                action="handoff",
            ) from exc
        if isinstance(result, str) and result:
            return result[:200]
        return f"{self._cfg.entry_point} returned"
