"""Durable state: lineages, attempts, the append-only event log, holds, leadership.

`open_store(url, ...)` picks the backend from the state URL:
- None: `$STATE_DIRECTORY/state.db` when a state directory is given (systemd), else `./state.db`;
- `sqlite:///abs/path.db` (absolute) or `sqlite:relative/path.db`;
- `postgresql://...` or `postgres://...` (libpq URL; `?options=-csearch_path%3Dmyschema` works).
It only builds the store; the caller awaits `store.open()`. Error messages never echo the URL
itself, only its scheme or a password-free form, so a DSN password cannot leak into logs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

from tinker_recovery.errors import ConfigError
from tinker_recovery.shell.clock import Clock

from .base import Store
from .sqlite import SqliteStore

if TYPE_CHECKING:
    from .postgres import PostgresStore


def __getattr__(name: str) -> Any:
    # psycopg costs ~9 MB of memory: load it only for deployments that use PostgreSQL.
    if name == "PostgresStore":
        from .postgres import PostgresStore

        return PostgresStore
    raise AttributeError(name)


__all__ = ["PostgresStore", "SqliteStore", "Store", "open_store", "redact_url"]

_PG_SCHEMES = ("postgresql", "postgres")


def open_store(url: str | None, *, clock: Clock, state_directory: str | None) -> Store:
    if url is None or not url.strip():
        folder = Path(state_directory) if state_directory else Path()
        return SqliteStore(folder / "state.db", clock=clock)
    scheme, sep, _ = url.partition(":")
    scheme = scheme.lower()
    if not sep:
        raise ConfigError("state URL needs a scheme: sqlite:///PATH or postgresql://...")
    if scheme == "sqlite":
        return SqliteStore(_sqlite_path(url), clock=clock)
    if scheme in _PG_SCHEMES:
        _check_postgres_url(url)
        from .postgres import PostgresStore

        return PostgresStore(url, clock=clock)
    raise ConfigError(
        f"unsupported state URL scheme {scheme!r}: use sqlite:///PATH or postgresql://..."
    )


def _check_postgres_url(url: str) -> None:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(url)  # libpq's own parser: what the driver will see
    except psycopg.Error as exc:
        raise ConfigError(f"invalid PostgreSQL state URL {redact_url(url)}") from exc
    # libpq only checks ports when it connects; a typo should fail at start-up instead.
    for port in str(params.get("port") or "").split(","):
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(f"invalid PostgreSQL state URL {redact_url(url)}: bad port")


def _sqlite_path(url: str) -> Path:
    rest = url[len("sqlite:") :]
    if rest.startswith("//"):
        rest = rest[2:]
        if not rest.startswith("/"):
            raise ConfigError(
                "sqlite URLs take no host: use sqlite:///absolute/path.db or sqlite:relative.db"
            )
    path = unquote(rest.split("?", 1)[0])
    if not path or path.endswith("/"):
        raise ConfigError("sqlite state URL names no database file")
    if path.startswith("//"):  # sqlite:////abs/path, as f"sqlite:///{absolute}" spells it
        path = "/" + path.lstrip("/")
    return Path(path)


def redact_url(url: str) -> str:
    """The URL with any password (userinfo or `password=` parameter) replaced by `***`."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, hostinfo = netloc.rpartition("@")
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:***@{hostinfo}"
        query = "&".join(
            "password=***" if pair.lower().startswith("password=") else pair
            for pair in parts.query.split("&")
        )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:  # unparseable (e.g. a bad port): show nothing of it
        return "<unparseable URL>"
