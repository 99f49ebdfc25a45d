"""`tinker-recovery doctor --config FILE`: will `run` work here, with this config, now?

The checks, in order, each one line (ok / warn / FAIL / skip, and a detail with secrets masked):
- config: the same `config_loader.preflight` that `run` and `check-config` use; its warnings
  are shown as warn lines. A refused config stops here (exit 2, like check-config).
- tinker: the API key is found and accepted: `client/config` (and the JWT exchange when the
  server asks for it), then one page of `training_runs`, through the daemon's own
  `TinkerGateway`, under one deadline.
- store: the state store opens (migrations applied, as `run` would) and takes a write: a row
  inserted in a transaction that is rolled back, so nothing is left behind. A SQLite file that
  does not exist yet is not created: its directory must be writable instead.
- handoff <name>: a command's executable exists and is executable (on the handoff's PATH); a
  webhook's host resolves and accepts a TCP connection (no HTTP request is sent, so nothing is
  triggered); a python entry point imported during the preflight.
- http: the configured port is free to bind (a running daemon on it is a warning, not a FAIL).

Exit 0 when nothing failed (warnings allowed), 1 when a check failed, 2 when the config is
refused.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import socket
import sqlite3
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
import psycopg
from prometheus_client import CollectorRegistry

from tinker_recovery import settings as settings_mod
from tinker_recovery.errors import ConfigError, RecoveryError
from tinker_recovery.obs import logs
from tinker_recovery.obs.metrics import Metrics
from tinker_recovery.shell import config_loader, secrets
from tinker_recovery.shell.clock import SystemClock
from tinker_recovery.shell.gateway import TinkerGateway
from tinker_recovery.shell.store import open_store
from tinker_recovery.shell.store.sqlite import SqliteStore

Level = Literal["ok", "warn", "FAIL", "skip"]
PROBE_SCOPE = "tinker-recovery-doctor-probe"


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    detail: str


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    config_refused: bool = False

    def add(self, name: str, level: Level, detail: str) -> None:
        self.checks.append(Check(name, level, detail))

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.level == "FAIL"]

    @property
    def exit_code(self) -> int:
        if self.config_refused:
            return 2
        return 1 if self.failed else 0

    @property
    def verdict(self) -> str:
        total = len([c for c in self.checks if c.level != "skip"])
        warned = len([c for c in self.checks if c.level == "warn"])
        if self.config_refused:
            return "verdict: FAIL: the config is refused; nothing else was checked"
        if self.failed:
            names = ", ".join(dict.fromkeys(c.name for c in self.failed))
            return f"verdict: FAIL: {len(self.failed)} of {total} checks failed ({names})"
        if warned:
            return f"verdict: ok, with {warned} warning{'s' if warned > 1 else ''} to read"
        return f"verdict: ok: all {total} checks passed"

    def as_dict(self) -> dict[str, Any]:
        return {
            "verdict": "fail" if self.exit_code else "ok",
            "exit_code": self.exit_code,
            "checks": [
                {"check": c.name, "result": c.level, "detail": c.detail} for c in self.checks
            ],
        }


async def diagnose(
    path: Path, *, timeout_s: float = 15.0, env: Mapping[str, str] | None = None
) -> Report:
    env = os.environ if env is None else env
    report = Report()
    try:
        checked = config_loader.preflight(path, env=env)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            report.add("config", "FAIL", line)
        report.config_refused = True
        return report
    cfg = checked.settings
    rules = len(cfg.policy.rules)
    report.add(
        "config",
        "ok",
        f"{path}: valid ({rules} rule{'s' if rules != 1 else ''}, "
        f"{len(cfg.handoffs)} handoff{'s' if len(cfg.handoffs) != 1 else ''})",
    )
    for warning in checked.warnings:
        report.add("config", "warn", warning.removeprefix("warning: "))
    level, detail = await _tinker(cfg, env, timeout_s)
    report.add("tinker", level, detail)
    level, detail = await _store(cfg, env)
    report.add("store", level, detail)
    for name, entry in cfg.handoffs.items():
        level, detail = await _handoff(entry, env, timeout_s)
        report.add(f"handoff {name}", level, detail)
    level, detail = await _http_port(cfg.http)
    report.add("http", level, detail)
    return report


# -- tinker ---------------------------------------------------------------------------------


async def _tinker(
    cfg: settings_mod.Settings, env: Mapping[str, str], timeout_s: float
) -> tuple[Level, str]:
    try:
        key = secrets.resolve_api_key(cfg.tinker, env)
    except ConfigError as exc:
        return "FAIL", str(exc)
    if key is None:
        return "FAIL", (
            "no API key: set TINKER_API_KEY, tinker.api_key_file or a systemd credential named "
            "tinker_api_key"
        )
    base_url = cfg.tinker.base_url
    raw = key.get_secret_value()
    client = httpx.AsyncClient(timeout=httpx.Timeout(cfg.tinker.request_timeout), trust_env=False)
    gateway = TinkerGateway(
        base_url=base_url,
        api_key=key,
        http=client,
        cfg=cfg.tinker,
        clock=SystemClock(),
        metrics=Metrics(CollectorRegistry()),
    )
    try:
        async with asyncio.timeout(timeout_s):
            await gateway.connect()
            # One page, as the poller's first request of a listing asks it (the whole listing
            # could be 100k runs); the same parsing and page checks apply.
            page = await gateway._page(offset=0, limit=cfg.tinker.page_size)
    except TimeoutError:
        return "FAIL", f"{base_url}: no answer within {timeout_s:g}s"
    except RecoveryError as exc:
        return "FAIL", f"{base_url}: {_mask(str(exc), raw)}"
    finally:
        await client.aclose()
    return "ok", (
        f"{base_url}: key accepted (client config), first page lists {len(page.runs)} of "
        f"{page.total} runs in scope {cfg.tinker.access_scope}"
    )


def _mask(text: str, secret: str) -> str:
    return text.replace(secret, logs.MASK) if secret else text


# -- store ----------------------------------------------------------------------------------


async def _store(cfg: settings_mod.Settings, env: Mapping[str, str]) -> tuple[Level, str]:
    url = cfg.state.url
    shown = config_loader.mask_url_password(url, logs.MASK) if url else None
    store = open_store(url, clock=SystemClock(), state_directory=env.get("STATE_DIRECTORY"))
    if isinstance(store, SqliteStore):
        shown = f"sqlite {store.path}"
        if not store.path.exists():
            parent = store.path.parent
            if not parent.is_dir():
                return "FAIL", f"{shown}: directory {parent} does not exist"
            if not os.access(parent, os.W_OK | os.X_OK):
                return "FAIL", f"{shown}: directory {parent} is not writable"
            return "ok", f"{shown}: not created yet; `run` creates it (directory writable)"
    try:
        await store.open()
        try:
            await store.check()
        finally:
            await store.close()
        if isinstance(store, SqliteStore):
            await asyncio.to_thread(_probe_sqlite, store.path)
        else:
            assert url is not None  # only SQLite has a default location
            await asyncio.to_thread(_probe_postgres, url)
    except (RecoveryError, OSError, sqlite3.Error, psycopg.Error) as exc:
        return "FAIL", f"{shown}: {_store_error(exc, url)}"
    return "ok", f"{shown}: opens, schema current, takes a write (rolled back)"


def _store_error(exc: BaseException, url: str | None) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    password = config_loader.url_password(url) if url else None
    return text.replace(password, logs.MASK) if password else text


def _probe_row() -> dict[str, str]:
    return {"scope": PROBE_SCOPE, "by": "doctor", "at": datetime.now(UTC).isoformat()}


def _probe_sqlite(path: Path) -> None:
    conn = sqlite3.connect(path, timeout=5, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "INSERT INTO holds (scope, held_by, at) VALUES (:scope, :by, :at)", _probe_row()
            )
        finally:
            conn.execute("ROLLBACK")
    finally:
        conn.close()


def _probe_postgres(url: str) -> None:
    with (
        psycopg.connect(url, connect_timeout=5) as conn,
        conn.transaction(force_rollback=True),
    ):
        conn.execute(
            "INSERT INTO holds (scope, held_by, at) VALUES (%(scope)s, %(by)s, now())",
            _probe_row(),
        )


# -- handoffs -------------------------------------------------------------------------------


async def _handoff(
    entry: settings_mod.Handoff, env: Mapping[str, str], timeout_s: float
) -> tuple[Level, str]:
    if isinstance(entry, settings_mod.CommandHandoff):
        return _command(entry, env)
    if isinstance(entry, settings_mod.WebhookHandoff):
        return await _webhook(entry.url, timeout_s)
    return "ok", f"python entry point {entry.entry_point} imports"


def _command(entry: settings_mod.CommandHandoff, env: Mapping[str, str]) -> tuple[Level, str]:
    program = entry.argv[0]
    if "{" in program:
        return "warn", f"{program}: the executable is filled in per attempt, not checkable"
    if os.sep in program:
        base = entry.cwd if entry.cwd is not None else Path.cwd()
        target = Path(program) if Path(program).is_absolute() else base / program
        if not target.is_file():
            return "FAIL", f"{program}: no file there"
        if not os.access(target, os.X_OK):
            return "FAIL", f"{program}: not executable"
        return "ok", f"{target}: executable"
    found = shutil.which(program, path=entry.env.get("PATH", env.get("PATH")))
    if found is None:
        return "FAIL", f"{program}: not found on PATH"
    return "ok", f"{program}: {found}"


async def _webhook(url: str, timeout_s: float) -> tuple[Level, str]:
    shown = config_loader.mask_url_password(url, logs.MASK)
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname
    if not host:
        return "FAIL", f"{shown}: no host in the URL"
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return "FAIL", f"{shown}: bad port"
    try:
        async with asyncio.timeout(timeout_s):
            loop = asyncio.get_running_loop()
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError:
        return "FAIL", f"{shown}: {host} did not resolve within {timeout_s:g}s"
    except OSError as exc:
        return "FAIL", f"{shown}: {host} does not resolve ({exc.strerror or exc})"
    address = infos[0][4][0]
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host, port)
        writer.close()
        await writer.wait_closed()
    except TimeoutError:
        return "FAIL", f"{shown}: {address}:{port} did not accept a connection in {timeout_s:g}s"
    except OSError as exc:
        return "FAIL", f"{shown}: {address}:{port} refuses connections ({exc.strerror or exc})"
    return "ok", f"{shown}: {host} resolves to {address}, port {port} accepts connections"


# -- http -----------------------------------------------------------------------------------


async def _http_port(cfg: settings_mod.HttpSettings) -> tuple[Level, str]:
    if not cfg.enabled:
        return "ok", "HTTP is off (no /metrics, /readyz, /status)"
    if cfg.port == 0:
        return "ok", f"{cfg.host}:0: any free port is taken at start"
    where = f"{cfg.host}:{cfg.port}"
    try:
        infos = socket.getaddrinfo(
            cfg.host, cfg.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as sock:
            # As the daemon binds it (SO_REUSEADDR): TIME_WAIT leftovers do not count as taken.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            if await _is_our_daemon(cfg.host, cfg.port):
                return "warn", (
                    f"{where} is in use by a running tinker-recovery (its /healthz answers): "
                    "a second `run` with this config would fail to bind"
                )
            return "FAIL", f"{where} is in use by another program"
        return "FAIL", f"{where}: cannot bind ({exc.strerror or exc})"
    return "ok", f"{where} is free"


async def _is_our_daemon(host: str, port: int) -> bool:
    target = "127.0.0.1" if host in ("", "0.0.0.0") else host
    if ":" in target:
        target = f"[{target}]"
    try:
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
            answer = await client.get(f"http://{target}:{port}/healthz")
        body = answer.json()
    except (httpx.HTTPError, ValueError):
        return False
    return isinstance(body, dict) and "event_loop" in body
