"""`tinker-recovery demo`: the emulator, the daemon, a few training jobs and a scripted incident.

Everything runs on 127.0.0.1 with embedded defaults and SQLite state under the work directory:
1. the emulator (in this process) with a seeded fleet, plus one base checkpoint per job;
2. the daemon (`tinker-recovery run`, a child process) with a `command` handoff that restarts a
   job through `examples/launch_job.py`, and `restore: sdk` so a checkpoint is proven loadable
   before a job is pointed at it;
3. the jobs (`examples/train_job.py`), official SDK, saving state every second;
4. the incident: several job runs corrupted at once, one with its newest checkpoint unloadable.
A live view follows the lineages through `/status`; the run ends with a table read from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from tinker_recovery.core.model import AttemptOutcome
from tinker_recovery.emulator import EmulatorConfig, EmulatorServer
from tinker_recovery.shell.clock import SystemClock
from tinker_recovery.shell.store import open_store

_DAEMON_KEY = "tml-demo-daemon"  # the emulator accepts any tml- key; nothing real is used
_JOB_KEY = "tml-demo-job"
_CORRUPTED_JOBS = 3
_DEADLINE_S = 120.0
_DONE = "RECOVERED"  # healthy again, on a successor run the job created


@dataclass
class Job:
    name: str
    directory: Path
    corrupted_run: str | None = None
    corrupted_at: datetime | None = None
    unloadable: str | None = None

    def runs(self) -> list[str]:
        path = self.directory / "runs.txt"
        return path.read_text().split() if path.exists() else []

    def saves(self) -> int:
        path = self.directory / "checkpoints.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0


def run(*, workdir: Path, jobs: int) -> int:
    examples = Path(__file__).resolve().parents[2] / "examples"
    if not (examples / "launch_job.py").exists():
        sys.stderr.write("the demo needs a source checkout (examples/ next to daemon/)\n")
        return 1
    workdir = workdir.resolve()
    if workdir.exists():
        for leftover in sorted(workdir.rglob("*"), reverse=True):
            leftover.rmdir() if leftover.is_dir() else leftover.unlink()
    (workdir / "jobs").mkdir(parents=True)
    say(f"work directory {workdir}")
    with EmulatorServer(EmulatorConfig(runs=24, seed=7, page_max=100)) as emulator:
        say(f"emulator serving 24 seeded runs at {emulator.base_url}")
        return _Demo(emulator.base_url, workdir, examples, max(jobs, _CORRUPTED_JOBS)).play()


def say(text: str) -> None:
    sys.stdout.write(f"{time.strftime('%H:%M:%S')}  {text}\n")
    sys.stdout.flush()


class _Demo:
    def __init__(self, base_url: str, workdir: Path, examples: Path, jobs: int) -> None:
        self.base_url = base_url
        self.workdir = workdir
        self.examples = examples
        self.api = httpx.Client(base_url=base_url, headers={"X-API-Key": _JOB_KEY}, timeout=10)
        self.jobs = [Job(f"job-{i + 1}", workdir / "jobs" / f"job-{i + 1}") for i in range(jobs)]
        self.port = _free_port()
        self.daemon: subprocess.Popen[bytes] | None = None

    def play(self) -> int:
        try:
            self._start_daemon()
            self._start_jobs()
            self._incident()
            recovered = self._watch()
            self._report()
            code = self._stop_daemon()
            if not recovered:
                say("not every corrupted run was recovered in time: see .demo/daemon.log")
                return 1
            return code
        finally:
            self._stop_jobs()
            if self.daemon is not None and self.daemon.poll() is None:
                self.daemon.kill()
            self.api.close()

    # set-up ---------------------------------------------------------------------------------
    def _write_config(self) -> Path:
        launcher = [sys.executable, str(self.examples / "launch_job.py")]
        config = {
            "tinker": {"base_url": self.base_url, "request_timeout": "5s"},
            "poll": {"interval": "1s", "cycle_timeout": "20s"},
            "state": {"url": f"sqlite:///{self.workdir / 'state.db'}"},
            "policy": {
                "confirmations": 2,
                "max_concurrent": 8,
                "rules": [
                    {
                        "name": "demo-jobs",
                        "match": {"labels": {"job": "job-*"}},
                        "action": "recover",
                        "max_attempts": 3,
                        "backoff": {"base": "2s", "cap": "10s"},
                        "max_idle": "1h",
                        "checkpoint": {"min_ttl": "1m", "protect_ttl": "1d"},
                        "restore": "sdk",
                        "handoff": "restart-job",
                        "confirm_deadline": "60s",
                    },
                    {"name": "everything-else", "action": "alert"},
                ],
            },
            "handoffs": {
                "restart-job": {
                    "type": "command",
                    "argv": [
                        *launcher,
                        "restart",
                        "--jobs-dir",
                        str(self.workdir / "jobs"),
                        "--run",
                        "{corrupted_run}",
                    ],
                    "timeout": "30s",
                }
            },
            "http": {"host": "127.0.0.1", "port": self.port},
            "log": {"format": "json", "level": "info"},
        }
        path = self.workdir / "config.yaml"
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        return path

    def _start_daemon(self) -> None:
        config = self._write_config()
        env = {**os.environ, "TINKER_API_KEY": _DAEMON_KEY, "TINKER_TELEMETRY": "0"}
        log = (self.workdir / "daemon.log").open("wb")
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "tinker_recovery", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        say(f"daemon started (pid {self.daemon.pid}), logs in {self.workdir / 'daemon.log'}")
        self._wait(lambda: self._get("/readyz") is not None, 30, "the daemon to be ready")
        say(f"daemon ready: http://127.0.0.1:{self.port}/status")

    def _start_jobs(self) -> None:
        for job in self.jobs:
            base = self.api.post(
                "/_emulator/runs",
                json={"kind": "idle", "checkpoints": 1, "user_metadata": {"purpose": "base"}},
            ).json()["run_id"]
            checkpoints = self.api.get(f"/api/v1/training_runs/{base}/checkpoints").json()
            init = next(
                c["tinker_path"]
                for c in checkpoints["checkpoints"]
                if c["checkpoint_type"] == "training"
            )
            subprocess.run(
                [
                    sys.executable,
                    str(self.examples / "launch_job.py"),
                    "start",
                    "--jobs-dir",
                    str(self.workdir / "jobs"),
                    "--name",
                    job.name,
                    "--env",
                    f"TINKER_BASE_URL={self.base_url}",
                    "--env",
                    f"TINKER_API_KEY={_JOB_KEY}",
                    "--env",
                    "TINKER_TELEMETRY=0",
                    "--",
                    "--init-checkpoint",
                    init,
                    "--save-every",
                    "2",
                    "--step-seconds",
                    "0.5",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        say(f"started {len(self.jobs)} training jobs (save_state every second)")
        self._wait(lambda: all(j.saves() >= 3 for j in self.jobs), 60, "every job to checkpoint")
        for job in self.jobs:
            say(f"  {job.name}: run {job.runs()[-1]}, {job.saves()} checkpoints saved")

    def _incident(self) -> None:
        victims = self.jobs[:_CORRUPTED_JOBS]
        say(f"INCIDENT: the backend corrupts {len(victims)} runs")
        for job in victims:
            job.corrupted_run = job.runs()[-1]
            answer = self.api.post(f"/_emulator/runs/{job.corrupted_run}/corrupt").json()
            job.corrupted_at = datetime.fromisoformat(answer["corrupted_at"])
        bad = victims[1]
        newest = self._newest_training_checkpoint(str(bad.corrupted_run))
        self.api.post(
            "/_emulator/checkpoints/unloadable",
            json={"tinker_path": newest, "error": "checkpoint shards are incomplete"},
        ).raise_for_status()
        bad.unloadable = newest
        say(f"  and {bad.name}'s newest checkpoint {newest} cannot be loaded")

    def _newest_training_checkpoint(self, run_id: str) -> str:
        listed = self.api.get(f"/api/v1/training_runs/{run_id}/checkpoints").json()
        training = [c for c in listed["checkpoints"] if c["checkpoint_type"] == "training"]
        return str(max(training, key=lambda c: str(c["time"]))["tinker_path"])

    # the live view ----------------------------------------------------------------------------
    def _watch(self) -> bool:
        victims = {str(j.corrupted_run): j for j in self.jobs if j.corrupted_run}
        started = time.monotonic()
        last_line = ""
        while time.monotonic() - started < _DEADLINE_S:
            status = self._get("/status") or {}
            states = self._states(status, victims)
            line = "  ".join(f"{name}: {state}" for name, state in sorted(states.items()))
            if line != last_line:
                say(f"[t+{time.monotonic() - started:5.1f}s] {line}")
                last_line = line
            if all(state == _DONE for state in states.values()):
                return True
            time.sleep(0.5)
        return False

    def _states(self, status: dict[str, Any], victims: dict[str, Job]) -> dict[str, str]:
        by_root = {lin["root_run_id"]: lin for lin in status.get("lineages", [])}
        flights = {f.get("lineage_id"): f for f in status.get("in_flight", [])}
        states: dict[str, str] = {}
        for run_id, job in victims.items():
            lineage = by_root.get(run_id) or next(
                (lin for lin in by_root.values() if lin["current_run_id"] == run_id), None
            )
            if lineage is None:
                states[job.name] = "healthy?"  # not detected yet
                continue
            flight = flights.get(lineage["lineage_id"])
            if lineage["state"] == "healthy" and lineage["current_run_id"] in job.runs()[1:]:
                states[job.name] = _DONE
            elif flight is not None:
                states[job.name] = f"{lineage['state']}/{flight.get('step', '?')}"
            else:
                states[job.name] = lineage["state"]
        return states

    # the report --------------------------------------------------------------------------------
    def _report(self) -> None:
        rows = asyncio.run(self._rows())
        header = (
            "JOB",
            "LINEAGE",
            "CORRUPTED RUN",
            "CHECKPOINT USED",
            "SUCCESSOR RUN",
            "TTR",
            "WORK LOST",
        )
        table = [header, *rows]
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        say("recoveries:")
        for row in table:
            sys.stdout.write("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
            sys.stdout.write("\n")
        sys.stdout.flush()

    async def _rows(self) -> list[tuple[str, ...]]:
        store = open_store(
            f"sqlite:///{self.workdir / 'state.db'}", clock=SystemClock(), state_directory=None
        )
        await store.open()
        rows: list[tuple[str, ...]] = []
        try:
            for job in self.jobs:
                if job.corrupted_run is None:
                    continue
                lineage = await store.lineage_for_run(job.corrupted_run)
                if lineage is None:
                    rows.append((job.name, "-", job.corrupted_run, "-", "-", "-", "-"))
                    continue
                attempts = await store.attempts(lineage.lineage_id)
                done = [a for a in attempts if a.outcome is AttemptOutcome.SUCCEEDED]
                if not done:
                    rows.append(
                        (job.name, lineage.lineage_id, job.corrupted_run, "-", "-", "-", "-")
                    )
                    continue
                attempt = done[-1]
                events = await store.events(lineage_id=lineage.lineage_id, limit=500)
                # The read that confirmed the corruption: its decision was to confirm, or
                # (usually) to recover at once.
                confirmed = next(
                    (e.at for e in events if e.data.get("decision") in ("confirm", "recover")),
                    None,
                )
                ttr = (
                    f"{(attempt.finished_at - confirmed).total_seconds():.1f}s"
                    if attempt.finished_at and confirmed
                    else "-"
                )
                lost = (
                    f"{(job.corrupted_at - attempt.checkpoint_time).total_seconds():.1f}s"
                    if job.corrupted_at and attempt.checkpoint_time
                    else "-"
                )
                used = str(attempt.checkpoint_path)
                if job.unloadable:
                    used += " (newest was unloadable)"
                rows.append(
                    (
                        job.name,
                        lineage.lineage_id,
                        job.corrupted_run,
                        used,
                        str(attempt.successor_run_id),
                        ttr,
                        lost,
                    )
                )
        finally:
            await store.close()
        return rows

    # plumbing ----------------------------------------------------------------------------------
    def _get(self, path: str) -> dict[str, Any] | None:
        try:
            answer = httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=2)
        except httpx.HTTPError:
            return None
        if answer.status_code != 200:
            return None
        body: dict[str, Any] = answer.json()
        return body

    def _wait(self, done: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if self.daemon is not None and self.daemon.poll() is not None:
                raise SystemExit(f"the daemon exited ({self.daemon.returncode}) waiting for {what}")
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}")
            time.sleep(0.2)

    def _stop_daemon(self) -> int:
        assert self.daemon is not None
        self.daemon.send_signal(signal.SIGTERM)
        try:
            code = self.daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            return 1
        say(f"daemon stopped on SIGTERM with exit code {code}")
        return code

    def _stop_jobs(self) -> None:
        for job in self.jobs:
            pid_file = job.directory / "job.pid"
            if pid_file.exists():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_file.read_text()), signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
