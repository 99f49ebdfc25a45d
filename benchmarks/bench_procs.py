"""Process plumbing for the benchmark: the emulator and the daemon each in their own process.

Owns: starting `tinker-recovery emulate` and `tinker-recovery run` (the latter under
`/usr/bin/time -v`, for the whole process's peak RSS), reading CPU time from /proc, following
the daemon's JSON log as it grows, and the emulator's control API. It measures nothing itself;
bench_scenarios.py decides what to measure and when.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

BIN = Path(sys.executable).parent
DAEMON_KEY = "tml-bench-daemon"  # the emulator takes any tml- key; nothing real is used
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_s(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds; 1/CLK_TCK resolution."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the ")" that ends comm, field 3 (state) is index 0: utime is field 14, stime 15.
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def child_pid(parent: int, timeout_s: float = 10.0) -> int:
    """The one child of `parent` (the program /usr/bin/time started)."""
    deadline = time.monotonic() + timeout_s
    path = Path(f"/proc/{parent}/task/{parent}/children")
    while time.monotonic() < deadline:
        children = path.read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.01)
    raise RuntimeError(f"process {parent} started no child within {timeout_s}s")


def peak_rss_mb(time_report: Path) -> float:
    """'Maximum resident set size (kbytes)' from a `/usr/bin/time -v` report, in MB (10^6)."""
    for line in time_report.read_text().splitlines():
        if "Maximum resident set size" in line:
            return int(line.rsplit(":", 1)[1]) * 1024 / 1e6
    raise RuntimeError(f"no peak RSS in {time_report}")


def wait_until(check: Any, timeout_s: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes], pid: int | None = None, timeout_s: float = 20.0) -> int:
    """SIGTERM `pid` (default: the process itself), then wait for `proc`; SIGKILL if it hangs."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):  # it may have exited meanwhile
            os.kill(pid or proc.pid, signal.SIGTERM)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


class Emulator:
    """`tinker-recovery emulate` in its own process, plus its control API."""

    def __init__(self, *, runs: int, workdir: Path, seed: int = 7) -> None:
        self.runs = runs
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.command = [
            str(BIN / "tinker-recovery"),
            "emulate",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--runs",
            str(runs),
            "--seed",
            str(seed),
            "--page-max",
            "100",
        ]
        self._log = (workdir / f"emulator-{runs}.log").open("wb")
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.base_url, timeout=60)
        wait_until(self._is_up, 120, "the emulator", self.proc)

    def _is_up(self) -> bool:
        try:
            return self.http.get("/_emulator").status_code == 200
        except httpx.HTTPError:
            return False

    def requests(self) -> dict[str, int]:
        counts: dict[str, int] = self.http.get("/_emulator/requests").json()["requests"]
        return counts

    def cpu_s(self) -> float:
        return cpu_s(self.proc.pid)

    def reset_requests(self) -> None:
        self.http.delete("/_emulator/requests").raise_for_status()

    def driven_runs(self, limit: int) -> list[str]:
        """Healthy runs that are being driven: they have fresh training checkpoints."""
        rows = self.http.get(
            "/_emulator/runs", params={"kind": "driven", "corrupted": "false", "limit": limit}
        ).json()
        listed = rows["runs"] if isinstance(rows, dict) else rows
        return [str(row["run_id"]) for row in listed]

    def corrupt(self, run_id: str) -> float:
        """Corrupt one run; returns the wall time (time.time()) the control call returned."""
        self.http.post(f"/_emulator/runs/{run_id}/corrupt").raise_for_status()
        return time.time()

    def close(self) -> None:
        self.http.close()
        stop(self.proc)
        self._log.close()


@dataclass
class LogTail:
    """Reads the daemon's JSON log lines as they are appended."""

    path: Path
    _offset: int = 0
    _partial: str = ""
    seen: list[dict[str, Any]] = field(default_factory=list)

    def read(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with self.path.open("r", encoding="utf-8", errors="replace") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
            self._offset = handle.tell()
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()  # an unfinished last line waits for the next read
        for line in lines:
            if not line.startswith("{"):
                continue
            try:
                event: dict[str, Any] = json.loads(line)
            except ValueError:
                continue
            self.seen.append(event)
            yield event


class Daemon:
    """`tinker-recovery run --config FILE` under `/usr/bin/time -v`, logging JSON to a file."""

    def __init__(
        self, *, config: dict[str, Any], workdir: Path, name: str, gc_tuned: bool = False
    ) -> None:
        self.http_port = int(config["http"]["port"])
        self.config_path = workdir / f"{name}.config.yaml"
        self.config_path.write_text(json.dumps(config, indent=2))  # JSON is valid YAML
        self.log_path = workdir / f"{name}.log"
        self.time_path = workdir / f"{name}.time.txt"
        self.command = [
            "/usr/bin/time",
            "-v",
            "-o",
            str(self.time_path),
            *(
                [sys.executable, str(Path(__file__).with_name("bench_gc_daemon.py"))]
                if gc_tuned
                else [str(BIN / "tinker-recovery")]
            ),
            "run",
            "--config",
            str(self.config_path),
        ]
        env = {**os.environ, "TINKER_API_KEY": DAEMON_KEY, "TINKER_TELEMETRY": "0"}
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, env=env
        )
        self.pid = child_pid(self.proc.pid)
        self.tail = LogTail(self.log_path)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.http_port}", timeout=10)
        wait_until(self._is_ready, 300, "the daemon's /readyz", self.proc)

    def _is_ready(self) -> bool:
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def cpu_s(self) -> float:
        return cpu_s(self.pid)

    def wait_event(self, event: str, timeout_s: float) -> dict[str, Any]:
        """The next log line with this event name (lines read meanwhile stay in tail.seen)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.tail.read():
                if line.get("event") == event:
                    return line
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the daemon exited ({self.proc.returncode}); see {self.log_path}"
                )
            time.sleep(0.005)
        raise RuntimeError(f"no {event} line within {timeout_s}s; see {self.log_path}")

    def stop(self) -> float:
        """Stop the daemon; returns its peak RSS in MB as /usr/bin/time saw it."""
        self.http.close()
        stop(self.proc, self.pid, timeout_s=180.0)  # a 1M-run cycle in flight takes ~60 s
        self._log.close()
        return peak_rss_mb(self.time_path)


def daemon_config(
    *,
    base_url: str,
    workdir: Path,
    name: str,
    interval_s: float,
    probe_file: Path,
) -> dict[str, Any]:
    """A config that recovers any corrupted run through the probe handoff, with the breaker
    and the concurrency cap raised so that 50 corruptions one after another trip neither."""
    return {
        "tinker": {"base_url": base_url, "request_timeout": "20s"},
        "poll": {"interval": f"{interval_s}s", "cycle_timeout": "120s"},
        "state": {"url": f"sqlite:///{workdir / (name + '.db')}"},
        "policy": {
            "confirmations": 2,
            "max_concurrent": 1000,
            "breaker": {"threshold": 100000, "window": "5m"},
            "rules": [
                {
                    "name": "bench",
                    "action": "recover",
                    "max_attempts": 1,
                    "backoff": {"base": "1s", "cap": "1s"},
                    "max_idle": None,
                    # Emulated runs move last_request_time in 30 s steps, so a run corrupted
                    # soon after the daemon started can look idle since before it watched
                    # ("preexisting"). The benchmark times detection and handoff, not that rule.
                    "recover_preexisting": True,
                    "checkpoint": {"min_ttl": "0s", "protect_ttl": None},
                    "restore": "none",
                    "handoff": "probe",
                    "confirm_deadline": "1h",
                }
            ],
        },
        "handoffs": {
            "probe": {
                "type": "command",
                "argv": [sys.executable, str(Path(__file__).with_name("bench_probe.py"))],
                "env": {"BENCH_PROBE_FILE": str(probe_file)},
                "timeout": "30s",
            }
        },
        "http": {"host": "127.0.0.1", "port": free_port()},
        "log": {"format": "json", "level": "debug"},
    }
