"""Log setup: one JSON line per record (ours and stdlib's), secrets never rendered."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
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
    # Free text moves to `message`; the event is a stable name per library.
    assert lines[0]["event"] == "tinker_log"
    assert lines[0]["message"] == "retrying GET in 2.0s"
    assert lines[1]["event"] == "httpx_log"
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


# -- journald priorities ---------------------------------------------------------------------


def _journal_env(stream: Any) -> dict[str, str]:
    info = os.fstat(stream.fileno())
    return {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}


def test_journal_stream_is_detected_only_for_the_stream_it_names(tmp_path: Path) -> None:
    with (tmp_path / "a.log").open("w") as named, (tmp_path / "b.log").open("w") as other:
        env = _journal_env(named)
        assert logs.writes_to_journal(named, env)
        # stderr redirected to a file or pipe inherits JOURNAL_STREAM but is another stream.
        assert not logs.writes_to_journal(other, env)
        assert not logs.writes_to_journal(named, {})
        assert not logs.writes_to_journal(named, {"JOURNAL_STREAM": "garbage"})
    assert not logs.writes_to_journal(io.StringIO(), env)


def test_lines_to_the_journal_carry_syslog_priorities(
    tmp_path: Path, reset_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal.log"
    with path.open("w") as stream:
        monkeypatch.setenv("JOURNAL_STREAM", _journal_env(stream)["JOURNAL_STREAM"])
        logs.configure("json", "debug", stream)
        log = structlog.get_logger("tinker_recovery.test")
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e")
        log.critical("c")
        logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
    lines = path.read_text().splitlines()
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<2>", "<4>"]
    assert [json.loads(line[3:])["event"] for line in lines] == [
        "d",
        "i",
        "w",
        "e",
        "c",
        "uvicorn_invalid_request",
    ]


def test_every_line_of_a_console_traceback_keeps_the_priority(
    tmp_path: Path, reset_logging: None
) -> None:
    path = tmp_path / "journal.log"
    with path.open("w") as stream:
        logs.configure("console", "info", stream, journal=True)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            structlog.get_logger("x").exception("crashed")
    lines = path.read_text().splitlines()
    assert len(lines) > 3
    assert all(line.startswith("<3>") for line in lines)


def test_a_plain_stream_gets_no_prefix(stream: io.StringIO) -> None:
    structlog.get_logger("x").warning("w")
    assert stream.getvalue().startswith("{")


# -- repeats ---------------------------------------------------------------------------------


class FakeMonotonic:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(stream: io.StringIO) -> FakeMonotonic:
    """The configured handler with a RepeatFilter on a fake clock."""
    fake = FakeMonotonic()
    (handler,) = [h for h in logging.getLogger().handlers if isinstance(h, logs._Handler)]
    for old in list(handler.filters):
        handler.removeFilter(old)
    handler.addFilter(logs.RepeatFilter(60.0, burst=3, monotonic=fake))
    return fake


def test_an_outage_writes_a_few_lines_and_a_count_not_one_per_retry(
    stream: io.StringIO, clock: FakeMonotonic
) -> None:
    log = structlog.get_logger("tinker_recovery.shell.gateway")
    for attempt in range(200):  # one retry every 0.5 s: differs only in attempt and delay
        log.warning(
            "tinker_request_retrying",
            endpoint="list_runs",
            reason="timeout",
            attempt=attempt,
            delay_s=0.1 * attempt,
        )
        clock.t += 0.5
    lines = _lines(stream)
    # 100 s of retries: two 60 s windows of three lines each; the first line of the second
    # window reports the 117 held back in the first.
    assert [line["attempt"] for line in lines] == [0, 1, 2, 120, 121, 122]
    assert [line.get("repeats_suppressed") for line in lines] == [None] * 3 + [117, None, None]


def test_different_lineages_or_reasons_are_never_merged(
    stream: io.StringIO, clock: FakeMonotonic
) -> None:
    log = structlog.get_logger("tinker_recovery.shell.executor")
    for lineage in ("a", "b", "c", "d", "e"):
        for reason in ("exit 1", "timeout"):
            log.warning("handoff_failed", lineage_id=lineage, reason=reason)
    assert len(_lines(stream)) == 10


def test_info_lines_are_never_held_back(stream: io.StringIO, clock: FakeMonotonic) -> None:
    log = structlog.get_logger("x")
    for _ in range(20):
        log.info("poll_finished", runs=3)
    assert len(_lines(stream)) == 20


def test_library_repeats_are_keyed_on_their_template(
    stream: io.StringIO, clock: FakeMonotonic
) -> None:
    sdk = logging.getLogger("tinker.lib.retry_handler")
    for i in range(10):
        sdk.warning("retrying %s in %.1fs", "GET", i / 10)
    clock.t += 61
    sdk.warning("retrying %s in %.1fs", "GET", 5.0)
    lines = _lines(stream)
    assert len(lines) == 4
    assert lines[-1]["repeats_suppressed"] == 7
    assert lines[-1]["event"] == "tinker_log"


# -- library events --------------------------------------------------------------------------


def test_uvicorn_records_get_stable_snake_case_events(stream: io.StringIO) -> None:
    uvicorn = logging.getLogger("uvicorn.error")
    uvicorn.info("Started server process [%d]", 4242)
    uvicorn.info("Application startup complete.")
    uvicorn.info("Something new in a later uvicorn")
    lines = _lines(stream)
    assert [line["event"] for line in lines] == [
        "uvicorn_started",
        "uvicorn_startup_complete",
        "uvicorn_log",
    ]
    assert lines[0]["message"] == "Started server process [4242]"
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", line["event"]) for line in lines)
