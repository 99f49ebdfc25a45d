"""Log setup: structlog through stdlib logging, one line per event, secrets redacted.

Everything (our structlog events and stdlib records from httpx, uvicorn and the tinker SDK)
goes through one `ProcessorFormatter` on the root logger, so every line has the same shape.
Redaction runs last, on the fully built event dict (exceptions already turned into dicts or
text) and once more on the rendered line, so a registered secret cannot slip through in a
nested value, an exception message or an object's repr.

This module must not import from app/shell/core: anyone may import it.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Mapping
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


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]  # generic only in typeshed
    """Marks the handler we install so a later `configure` replaces it (idempotency)."""


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


def configure(
    format: Literal["json", "console"],  # shadows the builtin, but it is the public keyword
    level: str,
    stream: TextIO = sys.stderr,
) -> None:
    """Route structlog and stdlib logging to `stream` as JSON lines or console text.

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

    handler = _Handler(stream)
    handler.setFormatter(_formatter(format))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric_level)
    for name, quiet_level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(quiet_level)
