"""Log setup: structlog through stdlib logging, one line per event, secrets redacted.

Everything (our structlog events and stdlib records from httpx, uvicorn and the tinker SDK)
goes through one `ProcessorFormatter` on the root logger, so every line has the same shape.
Redaction runs last, on the fully built event dict (exceptions already turned into dicts or
text) and once more on the rendered line, so a registered secret cannot slip through in a
nested value, an exception message or an object's repr.

Three things make the log usable at 3 a.m.:
- Journal priorities. Under systemd, stderr is a stream to journald and every line would land
  at priority 6 (info). When `JOURNAL_STREAM` names the very stream we write to (systemd.exec(5);
  a redirect to a file or a pipe does not match), each line starts with the `<N>` prefix of
  sd-daemon(3), which journald strips and stores as the line's priority: `journalctl -p warning`
  then shows warnings and errors only.
- Repeats summarised. Of warnings (or worse) that are identical (same logger, level, event and
  fields, apart from `VARYING_KEYS` such as a retry's number and delay), at most
  `REPEAT_BURST` are written per `REPEAT_WINDOW_S`; the rest are counted, and the first line
  of the next window carries `repeats_suppressed=N`. Metrics still count every occurrence.
- Stable events for library records. uvicorn's, httpx's and the tinker SDK's records carry
  free text; their `event` becomes a snake_case name (`uvicorn_started`, or `<library>_log`
  for messages without a name of their own) and the text moves to `message`.

This module must not import from app/shell/core: anyone may import it.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Literal, TextIO

import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, Processor, WrappedLogger

MASK = "***"

# Keys whose values are masked whatever they hold. Matched case-insensitively, with '-' read
# as '_', either whole or as a suffix (`webhook_secret`, `bearer_token`).
SENSITIVE_KEYS = frozenset({"api_key", "token", "secret", "authorization", "x_api_key"})

# Noisy libraries: httpx logs every request URL at INFO; uvicorn logs every scrape at INFO.
QUIET_LOGGERS = {
    "httpx": logging.WARNING,
    "httpcore": logging.WARNING,
    "uvicorn.access": logging.WARNING,
}

_lock = threading.Lock()
_secrets: tuple[str, ...] = ()  # longest first, so a secret containing another is masked whole


def register_secret(value: str) -> None:
    """Mask `value` as "***" in every line rendered from now on. Empty values are ignored."""
    global _secrets
    if not value:
        return
    with _lock:
        if value not in _secrets:
            _secrets = tuple(sorted((*_secrets, value), key=len, reverse=True))


def forget_secrets() -> None:
    """Drop every registered secret (tests only)."""
    global _secrets
    with _lock:
        _secrets = ()


def _is_sensitive_key(key: object) -> bool:
    if not isinstance(key, str):
        return False
    norm = key.lower().replace("-", "_")
    return norm in SENSITIVE_KEYS or any(norm.endswith("_" + k) for k in SENSITIVE_KEYS)


def redact_text(text: str) -> str:
    """Replace every registered secret in `text`."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def redact(value: Any) -> Any:
    """A copy of `value` (nested dicts, lists, tuples, strings) with secrets and keys masked.

    Other objects are returned as they are; the rendered line is redacted again as text.
    """
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: MASK if _is_sensitive_key(k) else redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def _redact_processor(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    redacted: EventDict = redact(event_dict)
    return redacted


_FIRST_KEYS = ("timestamp", "level", "logger", "event")


def _leading_keys(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    # Readers scan lines by time, level and event; put those first, the rest as logged.
    ordered = {k: event_dict[k] for k in _FIRST_KEYS if k in event_dict}
    ordered.update((k, v) for k, v in event_dict.items() if k not in ordered)
    return ordered


class _RedactingRenderer:
    """Wraps the final renderer so the rendered line itself is scrubbed too."""

    def __init__(self, inner: Processor) -> None:
        self._inner = inner

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> str:
        rendered = self._inner(logger, name, event_dict)
        text = rendered if isinstance(rendered, str) else str(rendered)
        return redact_text(text)


# syslog priorities (sd-daemon(3) / syslog(3)) for each stdlib level.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def journal_priority(levelno: int) -> int:
    """The syslog priority journald should store for a record of `levelno` (debug -> 7)."""
    return next((prio for level, prio in _PRIORITIES if levelno >= level), 7)


def writes_to_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True when `stream` is the journald stream systemd named in JOURNAL_STREAM (dev:ino)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not (sep and dev.isdigit() and ino.isdigit()):
        return False
    try:
        info = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # StringIO, closed or detached streams
        return False
    return (info.st_dev, info.st_ino) == (int(dev), int(ino))


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]  # generic only in typeshed
    """Our one handler (a later `configure` replaces it); adds `<N>` prefixes for journald."""

    def __init__(self, stream: TextIO, *, journal: bool) -> None:
        super().__init__(stream)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.journal:
            return text
        # journald reads the prefix per line; a multi-line traceback keeps its priority.
        prefix = f"<{journal_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.split("\n"))


# Fields that may differ between lines that are still "the same" warning (a retry's number and
# delay, a timer). Every other field tells two warnings apart: two lineages, two reasons, two
# checkpoints or two error texts are never merged.
VARYING_KEYS = frozenset(
    {
        "timestamp",
        "delay_s",
        "attempt",
        "elapsed_s",
        "retry_after_s",
        "runway_s",
        "wait_s",
        "duration_s",
        "repeats_suppressed",
    }
)
REPEAT_WINDOW_S = 60.0
REPEAT_BURST = 3  # identical lines written per window before the rest are held back
_MAX_TRACKED = 1024


class RepeatFilter(logging.Filter):
    """Write at most `burst` identical warnings per `window_s`; count the rest.

    The first line of the next window carries `repeats_suppressed=N`. State is per key and
    bounded (the least recently seen keys are forgotten first).
    """

    def __init__(
        self,
        window_s: float = REPEAT_WINDOW_S,
        burst: int = REPEAT_BURST,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.window_s = window_s
        self.burst = burst
        self._monotonic = monotonic
        self._lock = threading.Lock()
        # key -> [window start (monotonic s), lines written in it, lines held back in it]
        self._seen: OrderedDict[tuple[Any, ...], list[float]] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = _repeat_key(record)
        now = self._monotonic()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen[0] < self.window_s:
                self._seen.move_to_end(key)
                if seen[1] < self.burst:
                    seen[1] += 1
                    return True
                seen[2] += 1
                return False
            suppressed = int(seen[2]) if seen is not None else 0
            self._seen[key] = [now, 1, 0]
            self._seen.move_to_end(key)
            while len(self._seen) > _MAX_TRACKED:
                self._seen.popitem(last=False)
        if suppressed:
            if isinstance(record.msg, dict):  # a structlog event dict
                record.msg["repeats_suppressed"] = suppressed
            else:
                record.repeats_suppressed = suppressed  # ExtraAdder puts it into the line
        return True


def _repeat_key(record: logging.LogRecord) -> tuple[Any, ...]:
    if isinstance(record.msg, dict):
        fields = tuple(
            sorted((str(k), repr(v)) for k, v in record.msg.items() if k not in VARYING_KEYS)
        )
        return (record.name, record.levelno, fields)
    # A library record: its format template is the stable part (`%s` arguments vary).
    return (record.name, record.levelno, str(record.msg))


# Known library messages (their stdlib format templates) -> a stable event name.
LIBRARY_EVENTS = {
    "Started server process [%d]": "uvicorn_started",
    "Waiting for application startup.": "uvicorn_startup_waiting",
    "Application startup complete.": "uvicorn_startup_complete",
    "Uvicorn running on %s://%s:%d (Press CTRL+C to quit)": "uvicorn_listening",
    "Shutting down": "uvicorn_shutting_down",
    "Waiting for application shutdown.": "uvicorn_shutdown_waiting",
    "Application shutdown complete.": "uvicorn_shutdown_complete",
    "Finished server process [%d]": "uvicorn_stopped",
    "Invalid HTTP request received.": "uvicorn_invalid_request",
    "Exception in ASGI application\n": "uvicorn_asgi_exception",
    "Cancel %s running task(s), timeout graceful shutdown exceeded": "uvicorn_tasks_cancelled",
}
_NOT_SNAKE = re.compile(r"[^a-z0-9]+")


def _library_event(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """Give a stdlib record from a library a snake_case event; its text goes to `message`."""
    record = event_dict.get("_record")
    if event_dict.get("_from_structlog") or not isinstance(record, logging.LogRecord):
        return event_dict
    if record.name.startswith("tinker_recovery"):
        return event_dict  # our own stdlib records (rare) already name their event
    template = str(record.msg)
    library = _NOT_SNAKE.sub("_", record.name.split(".", 1)[0].lower()).strip("_") or "library"
    event_dict["message"] = event_dict.get("event")
    event_dict["event"] = LIBRARY_EVENTS.get(template, f"{library}_log")
    return event_dict


def _drop_color_message(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    # uvicorn passes an ANSI-coloured copy of each message in `extra`; it is noise in JSON.
    event_dict.pop("color_message", None)
    return event_dict


def _shared_processors() -> list[Processor]:
    # Run for our events and, as foreign_pre_chain, for stdlib records alike.
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        _drop_color_message,
        _library_event,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def _formatter(fmt: Literal["json", "console"]) -> structlog.stdlib.ProcessorFormatter:
    final: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if fmt == "json":
        # Frame locals can hold secrets (an API key in a local variable): never render them.
        final.append(
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))
        )
        renderer: Processor = structlog.processors.JSONRenderer(sort_keys=False)
    else:
        final.append(structlog.processors.format_exc_info)
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    final += [_redact_processor, _leading_keys, _RedactingRenderer(renderer)]
    return structlog.stdlib.ProcessorFormatter(
        processors=final, foreign_pre_chain=_shared_processors()
    )


_LIBRARY_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


def configure(
    format: Literal["json", "console"],  # shadows the builtin, but it is the public keyword
    level: str,
    stream: TextIO = sys.stderr,
    *,
    journal: bool | None = None,
    repeat_window_s: float = REPEAT_WINDOW_S,
) -> None:
    """Route structlog and stdlib logging to `stream` as JSON lines or console text.

    `journal`: prefix lines with journald priorities (None: when JOURNAL_STREAM names
    `stream`). `repeat_window_s`: the window of RepeatFilter (0: write every line).
    Safe to call again (reload, tests): it replaces the handler it installed before and leaves
    other handlers (pytest's caplog) alone.
    """
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        raise ValueError(f"unknown log level {level!r}")

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: configure() may run again (SIGHUP, tests) and capture_logs() must work.
        cache_logger_on_first_use=False,
    )

    handler = _Handler(stream, journal=writes_to_journal(stream) if journal is None else journal)
    handler.setFormatter(_formatter(format))
    if repeat_window_s > 0:
        handler.addFilter(RepeatFilter(repeat_window_s))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric_level)
    for name in _LIBRARY_LOGGERS:
        # A uvicorn server started with its default log config (an embedded emulator, a
        # library user's own server) gives these loggers handlers of their own and stops them
        # propagating: their records would bypass ours (no JSON, no journal priority).
        library = logging.getLogger(name)
        for own in list(library.handlers):
            library.removeHandler(own)
        library.propagate = True
        library.disabled = False
        library.setLevel(logging.NOTSET)  # uvicorn sets its own from `log_level`
    for name, quiet_level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(quiet_level)
