"""A real daemon process against the in-process emulator, with a fake systemd notify socket.

`NotifySocket` binds the AF_UNIX datagram socket systemd would own and keeps every datagram
with the time it arrived, so tests can reason about windows ("no WATCHDOG=1 while frozen")
instead of sleeping. `LiveDaemon` starts `python -m tinker_recovery run` with a config file,
logs to a file (a pipe nobody reads would fill and stall the daemon), and fails the test with
the log's tail if the process dies early.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

DAEMON_KEY = "tml-live-daemon-test"  # the emulator accepts any tml- key
# Never hand the child our own systemd wiring or config overrides (pytest may run under a
# unit, or with TINKER_* set by a developer); "TINKER_" covers TINKER_RECOVERY_* as well.
_NOT_INHERITED = ("NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_", "TINKER_")


@dataclass(frozen=True)
class Datagram:
    at: float  # time.monotonic() when it arrived
    raw: bytes
    fields: dict[str, str]

    def has(self, key: str, value: str | None = None) -> bool:
        return key in self.fields and (value is None or self.fields[key] == value)

    def __str__(self) -> str:
        return self.raw.decode("utf-8", "replace").replace("\n", " | ")


def parse(raw: bytes) -> dict[str, str]:
    """`KEY=value` lines -> dict: sd_notify's wire format, one field per line."""
    fields: dict[str, str] = {}
    for line in raw.decode("utf-8").split("\n"):
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields


class NotifySocket:
    """The receiving end of `$NOTIFY_SOCKET`: a path, or `@name` for the abstract namespace."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.seen: list[Datagram] = []

    def close(self) -> None:
        self.sock.close()

    def receive(self, timeout_s: float) -> Datagram | None:
        """The next datagram within `timeout_s`, or None."""
        self.sock.settimeout(max(timeout_s, 0.001))
        try:
            raw = self.sock.recv(65536)
        except TimeoutError:
            return None
        got = Datagram(at=time.monotonic(), raw=raw, fields=parse(raw))
        self.seen.append(got)
        return got

    def collect(self, seconds: float) -> list[Datagram]:
        """Everything that arrives during the next `seconds`."""
        got: list[Datagram] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            one = self.receive(left)
            if one is not None:
                got.append(one)
        return got

    def drain(self) -> list[Datagram]:
        """What is already queued, without waiting."""
        got: list[Datagram] = []
        while (one := self.receive(0.001)) is not None:
            got.append(one)
        return got

    def wait_for(
        self, match: Callable[[Datagram], bool], daemon: LiveDaemon, timeout_s: float = 30.0
    ) -> list[Datagram]:
        """Datagrams until (and including) the first that matches; fails if the daemon dies."""
        got: list[Datagram] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            one = self.receive(min(0.5, max(deadline - time.monotonic(), 0.001)))
            if one is not None:
                got.append(one)
                if match(one):
                    return got
            elif daemon.proc.poll() is not None:
                break
        daemon.fail(f"no matching datagram within {timeout_s}s; saw {[str(d) for d in got]}")
        raise AssertionError("unreachable")  # fail() raises; this is for mypy's flow analysis


@dataclass
class LiveDaemon:
    """`python -m tinker_recovery run --config FILE` as a child process."""

    workdir: Path
    config: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    watchdog_pid_is_self: bool = False  # export WATCHDOG_PID=<the daemon's own pid>

    def __post_init__(self) -> None:
        self.config_path = self.workdir / "config.yaml"
        self.log_path = self.workdir / "daemon.log"
        self.config_path.write_text(json.dumps(self.config, indent=2))  # JSON is YAML
        argv = [sys.executable, "-m", "tinker_recovery", "run", "--config", str(self.config_path)]
        if self.watchdog_pid_is_self:
            # What systemd does: the pid is known only once the process exists, so a shell
            # exports its own pid and then becomes the daemon (exec keeps the pid).
            argv = ["/bin/sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh", *argv]
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(_NOT_INHERITED)},
            "TINKER_API_KEY": DAEMON_KEY,
            "TINKER_TELEMETRY": "0",
            **self.env,
        }
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.workdir
        )

    @property
    def port(self) -> int:
        port: int = self.config["http"]["port"]
        return port

    def get(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.port}{path}", headers=headers, timeout=5)

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON log lines so far (tracebacks and other text lines are skipped)."""
        events = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("{"):
                events.append(json.loads(line))
        return events

    def fail(self, why: str) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        tail = self.log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        pytest.fail(f"{why} (exit {self.proc.returncode}); daemon log tail:\n{tail}")

    def wait_until(self, done: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
        """Check `done` every 0.1 s; fail if the daemon dies or time runs out first."""
        deadline = time.monotonic() + timeout_s
        while not done():
            if self.proc.poll() is not None:
                self.fail(f"the daemon exited while waiting for {what}")
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}")
            time.sleep(0.1)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 30.0) -> int:
        """One SIGTERM (a second one cancels the graceful stop) and wait; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout_s)

    def wait_exit(self, timeout_s: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.fail(f"no exit within {timeout_s}s")
            raise

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()


def process_state(pid: int) -> str:
    """The one-letter state from /proc/PID/stat (`T` = stopped by a signal)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]  # the command name may contain spaces


def base_config(base_url: str, workdir: Path, port: int) -> dict[str, Any]:
    """Loopback only, a short poll interval, SQLite state under `workdir`, JSON logs."""
    return {
        "tinker": {"base_url": base_url, "request_timeout": "5s"},
        "poll": {"interval": "500ms", "cycle_timeout": "20s"},
        "state": {"url": f"sqlite:///{workdir / 'state.db'}"},
        "policy": {"rules": [{"name": "watch-only", "action": "alert"}]},
        "http": {"host": "127.0.0.1", "port": port},
        "log": {"format": "json", "level": "info"},
    }
