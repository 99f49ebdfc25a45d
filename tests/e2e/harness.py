"""End-to-end harness: the emulator in this process, the real daemon as a child process.

`Emu` drives the emulator's control API (create, corrupt, faults, request counts). `DaemonProc`
runs `python -m tinker_recovery run --config FILE` with a config built by `daemon_config`, reads
its JSON log lines, its HTTP endpoints and its SQLite store. Its `command` handoffs run
handoff_job.py, which logs one JSON line per call (tests count handoffs per idempotency key).
Every wait is bounded and fails with what it was waiting for and the daemon's last log lines.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from tinker_recovery.core.model import Attempt, Lineage
from tinker_recovery.emulator import EmulatorConfig, EmulatorServer
from tinker_recovery.shell.clock import SystemClock
from tinker_recovery.shell.store import open_store
from tinker_recovery.shell.store.base import Event, Store

T = TypeVar("T")

API_KEY = "tml-e2e-daemon-key"
JOB_KEY = "tml-e2e-job-key"  # what the test itself uses against the Tinker API
POLL_S = 0.3
WAIT_S = 20.0

HANDOFF_JOB = Path(__file__).with_name("handoff_job.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    check: Callable[[], Any], what: str, timeout_s: float = WAIT_S, on_fail: str = ""
) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}\n{on_fail}")
        time.sleep(0.05)


class Emu:
    """The emulator plus a client for its control API and the Tinker API (with a job key)."""

    def __init__(self, server: EmulatorServer) -> None:
        self.server = server
        self.base_url = server.base_url
        self.http = httpx.Client(
            base_url=server.base_url, headers={"X-API-Key": JOB_KEY}, timeout=10, trust_env=False
        )

    def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        answer = self.http.request(method, path, json=body)
        answer.raise_for_status()
        return answer.json() if answer.content else None

    def create_run(self, *, corrupted: bool = False, **spec: Any) -> str:
        spec.setdefault("kind", "driven")
        spec.setdefault("checkpoints", 3)
        row = self._json("POST", "/_emulator/runs", {**spec, "corrupted": corrupted})
        return str(row["run_id"])

    def corrupt(self, run_id: str) -> None:
        self._json("POST", f"/_emulator/runs/{run_id}/corrupt")

    def heal(self, run_id: str) -> None:
        """Clear a run's corrupted flag. The control API has no lever for this (the service
        never heals a run either); tests that need a flapping read reach into the state."""
        state = self.server.emulator
        with state.lock:
            run = state.run(run_id)
            run.corrupted_at = None
            run.touch()

    def all_runs(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._json("GET", "/_emulator/runs?limit=10000")["runs"]
        return rows

    def successors(self, run_id: str) -> list[str]:
        """Runs whose recovered_from tag names `run_id` (what the daemon or a job created)."""
        return [r["run_id"] for r in self.all_runs() if r.get("recovered_from") == run_id]

    def training_checkpoints(self, run_id: str) -> list[str]:
        """Training checkpoint paths of a run, oldest first."""
        listed = self._json("GET", f"/api/v1/training_runs/{run_id}/checkpoints")
        return [
            c["tinker_path"] for c in listed["checkpoints"] if c["checkpoint_type"] == "training"
        ]

    def unloadable(self, tinker_path: str) -> None:
        self._json("POST", "/_emulator/checkpoints/unloadable", {"tinker_path": tinker_path})

    def expire(self, tinker_path: str, *, listed: bool = False) -> None:
        body = {"tinker_path": tinker_path, "listed": listed}
        self._json("POST", "/_emulator/checkpoints/expire", body)

    def add_fault(self, **spec: Any) -> int:
        return int(self._json("POST", "/_emulator/faults", spec)["id"])

    def requests(self) -> dict[str, Any]:
        counts: dict[str, Any] = self._json("GET", "/_emulator/requests")
        return counts

    def count(self, endpoint: str) -> int:
        """Requests served for one endpoint name (0 if never called)."""
        return int(self.requests()["requests"].get(endpoint, 0))


@contextmanager
def emulator(runs: int = 4, **config: Any) -> Iterator[Emu]:
    # Driven runs' last_request_time steps every request_interval_s. The default (30 s) would
    # date a run created right after the daemon started to before its watch began, which the
    # policy reads as "corrupted before anyone watched" (pre-existing).
    config.setdefault("request_interval_s", 0.25)
    server = EmulatorServer(EmulatorConfig(runs=runs, seed=11, page_max=100, **config))
    with server:
        emu = Emu(server)
        try:
            yield emu
        finally:
            emu.http.close()


def handoffs(emu: Emu, log_path: Path) -> dict[str, Any]:
    """`command` handoffs logging to `log_path`: `job` resumes the run with the SDK (so a
    successor appears and progresses), `log` only records the call, `fail` records it and exits
    1, `crash` does what `job` does and then dies of SIGABRT."""
    job_env = {"TINKER_BASE_URL": emu.base_url, "TINKER_API_KEY": JOB_KEY, "TINKER_TELEMETRY": "0"}
    return {
        mode: {
            "type": "command",
            "argv": [sys.executable, str(HANDOFF_JOB), str(log_path), mode, "{checkpoint}"],
            "timeout": "20s",
            "env": job_env,
        }
        for mode in ("job", "log", "fail", "crash")
    }


def handoff_calls(log_path: Path) -> list[dict[str, Any]]:
    if not log_path.exists():
        return []
    return [json.loads(line) for line in log_path.read_text().splitlines() if line]


def rule(name: str, label: str, **knobs: Any) -> dict[str, Any]:
    """A recover rule for runs labelled `scenario=<label>`, fast knobs unless overridden."""
    body: dict[str, Any] = {
        "name": name,
        "match": {"labels": {"scenario": label}},
        "action": "recover",
        "max_attempts": 3,
        "backoff": {"base": "200ms", "cap": "500ms"},
        "max_idle": None,
        "checkpoint": {"min_ttl": "1m", "protect_ttl": "1d"},
        "restore": "none",
        "handoff": "job",
        "confirm_deadline": "20s",
        "handoff_grace": "1s",
    }
    body.update(knobs)
    return body


def daemon_config(
    emu: Emu,
    workdir: Path,
    rules: list[dict[str, Any]],
    **policy: Any,
) -> dict[str, Any]:
    return {
        "tinker": {
            "base_url": emu.base_url,
            "request_timeout": "1s",
            "retry_attempts": 2,
            "retry_base_delay": "50ms",
            "retry_max_delay": "200ms",
            "restore_timeout": "20s",
        },
        "poll": {"interval": f"{POLL_S}s", "cycle_timeout": "5s"},
        # A short lease: a daemon restarted after SIGKILL takes over within a second or so.
        "state": {
            "url": sqlite_url(workdir),
            "lease_ttl": "1s",
            "lease_renew_interval": "250ms",
        },
        "policy": {
            "confirmations": 2,
            "max_concurrent": 8,
            "breaker": {"threshold": 50},
            **policy,
            "rules": [*rules, {"name": "everything-else", "action": "alert"}],
        },
        "handoffs": handoffs(emu, workdir / "handoffs.jsonl"),
        "http": {"host": "127.0.0.1", "port": free_port()},
        "log": {"format": "json", "level": "info"},
    }


def clean_env(**extra: str) -> dict[str, str]:
    """The parent's environment minus anything that would steer the daemon, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TINKER_RECOVERY_", "TINKER_", "NOTIFY_SOCKET"))
    }
    env.update({"TINKER_API_KEY": API_KEY, "TINKER_TELEMETRY": "0", **extra})
    return env


def cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tinker_recovery", *args],
        capture_output=True,
        text=True,
        env=env or clean_env(),
        cwd=cwd,
        timeout=30,
        check=False,
    )


class DaemonProc:
    """One `tinker-recovery run` child process with its config file, log file and store."""

    def __init__(self, workdir: Path, config: dict[str, Any], api_key: str = API_KEY) -> None:
        self.api_key = api_key
        self.workdir = workdir
        self.config = config
        self.config_path = workdir / "config.yaml"
        self.log_path = workdir / "daemon.log"
        self.port = int(config["http"]["port"])
        self.proc: subprocess.Popen[bytes] | None = None
        self.write_config(config)

    def write_config(self, config: dict[str, Any]) -> None:
        self.config = config
        self.config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML

    def start(self, *, failpoint: str | None = None, ready: bool = True) -> DaemonProc:
        extra = {"TINKER_API_KEY": self.api_key}
        if failpoint:
            extra["TINKER_RECOVERY_FAILPOINT"] = failpoint
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tinker_recovery", "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=clean_env(**extra),
                cwd=self.workdir,
            )
        if ready:
            wait_until(self.is_ready, "the daemon's /readyz", on_fail=self.tail())
        return self

    def is_ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            pytest.fail(f"the daemon exited with {self.proc.returncode}\n{self.tail()}")
        try:
            return httpx.get(self.url("/readyz"), timeout=1, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url(path), timeout=5, trust_env=False)

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = self.get("/status").json()
        return body

    def logs(self) -> list[dict[str, Any]]:
        rows = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                rows.append({"event": "<not json>", "line": line})
        return rows

    def events(self, name: str, **match: Any) -> list[dict[str, Any]]:
        return [
            row
            for row in self.logs()
            if row.get("event") == name and all(row.get(k) == v for k, v in match.items())
        ]

    def handoff_calls(self) -> list[dict[str, Any]]:
        return handoff_calls(self.workdir / "handoffs.jsonl")

    def tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return "(no daemon log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_for(self, check: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
        def guarded() -> Any:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"the daemon exited ({self.proc.returncode}) while waiting for {what}")
            return check()

        deadline = time.monotonic() + timeout_s
        while True:
            value = guarded()
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}\n{self.tail()}")
            time.sleep(0.05)

    def wait_polls(self, count: int = 2) -> None:
        """Let `count` more successful poll cycles pass (read from /status)."""

        def cycle_at() -> str | None:
            at = self.status().get("last_cycle", {}).get("at")
            return None if at is None else str(at)

        for _ in range(count):
            before = cycle_at()
            self.wait_for(lambda b=before: cycle_at() != b, "the next poll cycle")  # type: ignore[misc]  # default binds the loop value

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout_s: float = 25.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"the daemon did not exit within {timeout_s}s\n{self.tail()}")

    def stop(self) -> int:
        """SIGTERM and wait; the exit code."""
        self.signal(signal.SIGTERM)
        return self.wait_exit()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    # the store ----------------------------------------------------------------------------------
    def lineage_for_run(self, run_id: str) -> Lineage | None:
        return with_store(sqlite_url(self.workdir), lambda s: s.lineage_for_run(run_id))

    def attempts_for_run(self, run_id: str) -> list[Attempt]:
        async def read(store: Store) -> list[Attempt]:
            lineage = await store.lineage_for_run(run_id)
            return [] if lineage is None else list(await store.attempts(lineage.lineage_id))

        return with_store(sqlite_url(self.workdir), read)

    def store_events(self, run_id: str) -> list[Event]:
        async def read(store: Store) -> list[Event]:
            lineage = await store.lineage_for_run(run_id)
            if lineage is None:
                return []
            return list(await store.events(lineage_id=lineage.lineage_id, limit=1000))

        return with_store(sqlite_url(self.workdir), read)

    def lineage_state(self, run_id: str) -> str | None:
        lineage = self.lineage_for_run(run_id)
        return None if lineage is None else lineage.state.value


def sqlite_url(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'state.db'}"


def with_store(url: str, read: Callable[[Store], Awaitable[T]]) -> T:
    """Open the store at `url`, `read` it, close it: from a synchronous test."""

    async def go() -> T:
        store = open_store(url, clock=SystemClock(), state_directory=None)
        await store.open()
        try:
            return await read(store)
        finally:
            await store.close()

    # In a worker thread: asyncio.run on the main thread of a sync test leaves the loop policy
    # in a state that later leaks an unclosed loop (an error under filterwarnings=error).
    with concurrent.futures.ThreadPoolExecutor(1) as worker:
        return worker.submit(asyncio.run, go()).result()
