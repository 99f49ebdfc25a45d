"""Webhook handoff (signed, idempotent, bounded retries) and python entry-point handoff."""

from __future__ import annotations

import base64
import json
import threading
from datetime import UTC, datetime
from typing import Any

import ho_targets
import httpx
import pytest
import standardwebhooks
from ho_fakes import RecordingClock, request
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tinker_recovery.errors import ActionFailed, ConfigError
from tinker_recovery.settings import PythonHandoff, WebhookHandoff
from tinker_recovery.shell.handoff import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    HandoffAction,
    build_handoff,
    sign,
    verify_signature,
)
from tinker_recovery.shell.procs import SubprocessRunner

SECRET = "whsec-test-0123456789"
URL = "https://hooks.example.test/services/T0KEN-IN-PATH/hook"


class Receiver:
    """A starlette app that verifies signatures the way a user's receiver would."""

    def __init__(self, answers: list[Response] | None = None) -> None:
        self.answers = list(answers or [])
        self.seen: list[dict[str, Any]] = []
        self.app = Starlette(routes=[Route("/services/{rest:path}", self.hook, methods=["POST"])])

    async def hook(self, req: Request) -> Response:
        body = await req.body()
        self.seen.append(
            {
                "valid": verify_signature(
                    SECRET.encode(),
                    req.headers[TIMESTAMP_HEADER],
                    body,
                    req.headers.get(SIGNATURE_HEADER, ""),
                ),
                "idempotency_key": req.headers["Idempotency-Key"],
                "payload": json.loads(body),
            }
        )
        if self.answers:
            return self.answers.pop(0)
        return JSONResponse({"ok": True}, status_code=202)


def webhook(
    receiver: Receiver, *, secret: str | None = SECRET, max_attempts: int = 4
) -> tuple[HandoffAction, RecordingClock]:
    clock = RecordingClock()
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=receiver.app))
    cfg = WebhookHandoff(
        type="webhook",
        url=URL,
        secret=None if secret is None else SecretStr(secret),
        max_attempts=max_attempts,
    )
    action = build_handoff(cfg, runner=SubprocessRunner(), http=http, clock=clock, rand=lambda: 0.5)
    return action, clock


async def test_signed_post_verifies_at_the_receiver() -> None:
    receiver = Receiver()
    action, clock = webhook(receiver)
    detail = await action.hand_off(request())
    assert "accepted on attempt 1" in detail
    [seen] = receiver.seen
    assert seen["valid"] is True
    assert seen["idempotency_key"] == "att-123"
    assert seen["payload"] == {
        "event": "tinker_recovery.handoff",
        "lineage_id": "lin-1",
        "corrupted_run_id": "sess-1:train:0",
        "checkpoint_path": "tinker://sess-1:train:0/weights/000020",
        "attempt": 2,
        "idempotency_key": "att-123",
        "restore_optimizer": True,
        "user_metadata": {"tinker_recovery.lineage": "lin-1"},
    }
    assert clock.sleeps == []


async def test_5xx_and_429_are_retried_with_the_same_key() -> None:
    receiver = Receiver(
        [Response(status_code=503), Response(status_code=429, headers={"Retry-After": "3"})]
    )
    action, clock = webhook(receiver)
    await action.hand_off(request())
    assert len(receiver.seen) == 3
    assert {s["idempotency_key"] for s in receiver.seen} == {"att-123"}
    assert all(s["valid"] for s in receiver.seen)
    assert clock.sleeps == [0.25, 3.0]  # 0.5 * 0.5 s jitter, then Retry-After


async def test_retries_are_bounded() -> None:
    receiver = Receiver([Response(status_code=500) for _ in range(10)])
    action, clock = webhook(receiver, max_attempts=3)
    with pytest.raises(ActionFailed, match="gave up after 3 attempts") as caught:
        await action.hand_off(request())
    assert len(receiver.seen) == 3
    assert len(clock.sleeps) == 2
    assert "T0KEN-IN-PATH" not in str(caught.value)  # URLs can carry tokens: host only
    assert caught.value.may_have_acted is True  # a 500 may come after the job was started


async def test_4xx_fails_at_once() -> None:
    receiver = Receiver([JSONResponse({"error": "unknown lineage"}, status_code=422)])
    action, clock = webhook(receiver)
    with pytest.raises(ActionFailed, match="HTTP 422") as caught:
        await action.hand_off(request())
    assert caught.value.may_have_acted is False  # refused outright: no successor to wait for
    assert len(receiver.seen) == 1
    assert clock.sleeps == []


async def test_connection_errors_are_retried() -> None:
    attempts = {"n": 0}

    def refuse(req: httpx.Request) -> httpx.Response:
        attempts["n"] += 1
        raise httpx.ConnectError("refused", request=req)

    clock = RecordingClock()
    cfg = WebhookHandoff(type="webhook", url=URL, max_attempts=2)
    http = httpx.AsyncClient(transport=httpx.MockTransport(refuse))
    action = build_handoff(cfg, runner=SubprocessRunner(), http=http, clock=clock)
    with pytest.raises(ActionFailed, match="connection failed"):
        await action.hand_off(request())
    assert attempts["n"] == 2


async def test_without_secret_no_signature_header_is_sent() -> None:
    receiver = Receiver()
    action, _clock = webhook(receiver, secret=None)
    await action.hand_off(request())
    assert receiver.seen[0]["valid"] is False


@pytest.mark.parametrize(
    ("secret", "timestamp", "body", "header_of"),
    [
        pytest.param(b"other", "100", b"{}", "good", id="wrong-secret"),
        pytest.param(b"k", "101", b"{}", "good", id="timestamp-changed"),
        pytest.param(b"k", "100", b"{ }", "good", id="body-changed"),
        pytest.param(b"k", "100", b"{}", "sha1=abc", id="other-scheme"),
        pytest.param(b"k", "100", b"{}", "sha256=zz\u00e9", id="garbage-hex"),
        pytest.param(b"k", "10\u00e9", b"{}", "good", id="non-ascii-timestamp"),
    ],
)
def test_verify_signature_rejects_anything_else(
    secret: bytes, timestamp: str, body: bytes, header_of: str
) -> None:
    good = sign(b"k", "100", b"{}")
    assert verify_signature(b"k", "100", b"{}", good)
    header = good if header_of == "good" else header_of
    assert not verify_signature(secret, timestamp, body, header)


def test_non_http_url_is_a_config_error() -> None:
    cfg = WebhookHandoff(type="webhook", url="file:///etc/passwd")
    with pytest.raises(ConfigError):
        build_handoff(
            cfg, runner=SubprocessRunner(), http=httpx.AsyncClient(), clock=RecordingClock()
        )


def python(entry_point: str, timeout: float = 5.0) -> HandoffAction:
    cfg = PythonHandoff(type="python", entry_point=entry_point, timeout=timeout)
    return build_handoff(
        cfg, runner=SubprocessRunner(), http=httpx.AsyncClient(), clock=RecordingClock()
    )


async def test_plain_function_runs_in_a_thread() -> None:
    ho_targets.calls.clear()
    detail = await python("ho_targets:sync_target").hand_off(request())
    assert detail == "queued lin-1"
    [(kind, req, thread)] = ho_targets.calls
    assert (kind, req.idempotency_key) == ("sync", "att-123")
    assert thread != threading.main_thread().name


async def test_coroutine_function_is_awaited_on_the_loop() -> None:
    ho_targets.calls.clear()
    detail = await python("ho_targets:async_target").hand_off(request())
    assert detail == "ho_targets:async_target returned"
    assert ho_targets.calls[0][2] == threading.current_thread().name


async def test_dotted_attribute_path_resolves() -> None:
    assert await python("ho_targets:Namespace.nested").hand_off(request()) == "nested ok"


@pytest.mark.parametrize(
    "entry_point",
    ["no_such_module_xyz:f", "ho_targets:missing", "ho_targets:not_callable"],
)
def test_unresolvable_entry_point_is_a_config_error(entry_point: str) -> None:
    with pytest.raises(ConfigError, match=entry_point.split(":")[0]):
        python(entry_point)


async def test_raising_function_is_action_failed() -> None:
    with pytest.raises(ActionFailed, match="RuntimeError: scheduler said no"):
        await python("ho_targets:raises").hand_off(request())


@pytest.mark.looptime
async def test_slow_function_times_out() -> None:
    with pytest.raises(ActionFailed, match="timed out after 30s"):
        await python("ho_targets:never_returns", timeout=30).hand_off(request())


@pytest.mark.parametrize(
    ("secret", "receiver_secret"),
    [
        # What a receiver configures: the whsec_ form of the same key.
        pytest.param(SECRET, "whsec_" + base64.b64encode(SECRET.encode()).decode(), id="plain"),
        pytest.param("whsec_c2VjcmV0LWtleS0xMjM0", "whsec_c2VjcmV0LWtleS0xMjM0", id="whsec"),
    ],
)
async def test_standard_webhooks_headers_verify_with_the_library(
    secret: str, receiver_secret: str
) -> None:
    """Issue 11: receivers verify Standard Webhooks (webhook-id/-timestamp/-signature) with
    the `standardwebhooks` library; the message id is the idempotency key."""
    seen: list[tuple[bytes, dict[str, str]]] = []

    async def hook(req: Request) -> Response:
        seen.append((await req.body(), dict(req.headers)))
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/services/{rest:path}", hook, methods=["POST"])])
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
    cfg = WebhookHandoff(type="webhook", url=URL, secret=SecretStr(secret))
    action = build_handoff(cfg, runner=SubprocessRunner(), http=http, clock=RecordingClock())
    await action.hand_off(request())

    [(body, headers)] = seen
    assert headers["webhook-id"] == "att-123" == headers["idempotency-key"]
    receiver = standardwebhooks.Webhook(receiver_secret)
    when = datetime.fromtimestamp(int(headers["webhook-timestamp"]), tz=UTC)
    # The library's own signer, as its verify() uses it (verify() also checks the timestamp
    # against the real clock, which this test's fixed clock is not).
    assert receiver.sign("att-123", when, body.decode()) == headers["webhook-signature"]
    assert receiver.sign("att-124", when, body.decode()) != headers["webhook-signature"]
