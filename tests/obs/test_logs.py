"""Log setup: one JSON line per record (ours and stdlib's), secrets never rendered."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import structlog

from tinker_recovery.obs import logs

SECRET = "sk-test-7f3a9c0d2e"


@pytest.fixture
def reset_logging() -> Iterator[None]:
    """Undo configure(): later tests (capture_logs, caplog) expect library defaults."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logs._Handler)]:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    structlog.reset_defaults()
    logs.forget_secrets()


@pytest.fixture
def stream(reset_logging: None) -> io.StringIO:
    buf = io.StringIO()
    logs.configure("json", "info", buf)
    return buf


def _lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_event_is_one_json_line_with_utc_iso_timestamp(stream: io.StringIO) -> None:
    structlog.get_logger("tinker_recovery.test").info("poll_finished", runs=3)
    (line,) = _lines(stream)
    assert line["event"] == "poll_finished"
    assert line["runs"] == 3
    assert line["level"] == "info"
    assert line["logger"] == "tinker_recovery.test"
    stamp = datetime.fromisoformat(line["timestamp"])
    assert stamp.utcoffset() is not None
    assert stamp.utcoffset().total_seconds() == 0  # type: ignore[union-attr]  # checked above


def test_stdlib_records_from_sdk_and_httpx_become_json_lines(stream: io.StringIO) -> None:
    logging.getLogger("tinker.lib.retry_handler").warning("retrying %s in %.1fs", "GET", 2.0)
    logging.getLogger("httpx").warning("connection reset")
    logging.getLogger("httpx").info("HTTP Request: GET http://127.0.0.1/api/v1/training_runs")
    lines = _lines(stream)
    assert [line["logger"] for line in lines] == ["tinker.lib.retry_handler", "httpx"]
    assert lines[0]["event"] == "retrying GET in 2.0s"
    assert lines[0]["level"] == "warning"
    assert "timestamp" in lines[1]


def test_level_filters_debug(stream: io.StringIO) -> None:
    log = structlog.get_logger("x")
    log.debug("noise")
    log.info("kept")
    assert [line["event"] for line in _lines(stream)] == ["kept"]


def test_registered_secret_never_appears_in_values_nested_or_exceptions(
    stream: io.StringIO,
) -> None:
    logs.register_secret(SECRET)
    log = structlog.get_logger("x")
    log.info("plain", value=SECRET, url=f"http://h/?key={SECRET}")
    log.info("nested", outer={"inner": [SECRET, {"deep": f"Bearer {SECRET}"}]})
    try:
        raise RuntimeError(f"server refused key {SECRET}")
    except RuntimeError:
        log.exception("call_failed")
    logging.getLogger("tinker").error("auth header was %s", SECRET)
    text = stream.getvalue()
    assert SECRET not in text
    assert text.count("***") >= 6
    lines = _lines(stream)
    assert lines[2]["exception"][0]["exc_value"] == "server refused key ***"


def test_exception_frames_carry_no_locals(stream: io.StringIO) -> None:
    def fail() -> None:
        local_only_value = "unregistered-local-value"
        raise ValueError(len(local_only_value))

    try:
        fail()
    except ValueError:
        structlog.get_logger("x").exception("failed")
    assert "unregistered-local-value" not in stream.getvalue()
    frames = _lines(stream)[0]["exception"][0]["frames"]
    assert frames
    assert all("locals" not in frame for frame in frames)


def test_sensitive_keys_are_masked_whatever_their_value(stream: io.StringIO) -> None:
    structlog.get_logger("x").info(
        "request",
        api_key="k1",
        headers={"Authorization": "Bearer k2", "X-API-Key": "k3", "accept": "json"},
        webhook_secret="k4",
        token="k5",
    )
    (line,) = _lines(stream)
    assert line["api_key"] == "***"
    assert line["headers"] == {"Authorization": "***", "X-API-Key": "***", "accept": "json"}
    assert line["webhook_secret"] == "***"
    assert line["token"] == "***"


@pytest.mark.usefixtures("reset_logging")
def test_console_format_redacts_exception_text() -> None:
    buf = io.StringIO()
    logs.configure("console", "debug", buf)
    logs.register_secret(SECRET)
    try:
        raise RuntimeError(f"boom {SECRET}")
    except RuntimeError:
        structlog.get_logger("x").exception("failed")
    assert "RuntimeError: boom ***" in buf.getvalue()
    assert SECRET not in buf.getvalue()


def test_configure_twice_keeps_one_handler(stream: io.StringIO) -> None:
    second = io.StringIO()
    logs.configure("json", "info", second)
    ours = [h for h in logging.getLogger().handlers if isinstance(h, logs._Handler)]
    assert len(ours) == 1
    structlog.get_logger("x").info("once")
    assert stream.getvalue() == ""
    assert len(_lines(second)) == 1


def test_noisy_libraries_are_quieted(stream: io.StringIO) -> None:
    assert logging.getLogger("httpx").level == logging.WARNING
    assert logging.getLogger("uvicorn.access").level == logging.WARNING


@pytest.mark.usefixtures("reset_logging")
def test_unknown_level_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        logs.configure("json", "chatty", io.StringIO())


@pytest.mark.usefixtures("reset_logging")
def test_redact_leaves_non_strings_alone() -> None:
    logs.register_secret(SECRET)
    assert logs.redact({"n": 1, "xs": (SECRET, None)}) == {"n": 1, "xs": ["***", None]}
