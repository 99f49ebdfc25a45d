"""A small launcher for the cookbook recovery tests: what `systemctl restart` does for a unit.

A "unit" is a JSON file naming one or more jobs (a unit of two workers restarts both):

    {"jobs": [{"name": "a", "argv": [...], "cwd": "...", "output": "...", "pidfile": "..."}],
     "log": ".../launcher.jsonl", "ready_marker": "SLJOB ", "ready_timeout_s": 240}

    python relaunch.py start UNIT      start every job that is not running
    python relaunch.py restart UNIT    stop every running job (SIGTERM to its process group,
                                       SIGKILL after --stop-grace), then start all of them

Each job starts with this process's environment (the daemon's `command` handoff passes the
attempt as TINKER_RECOVERY_* variables; the job may use them or not), in its own session, its
stdout and stderr appended to `output`, stdin /dev/null; its pid goes to `pidfile`. The launcher
then waits, like systemd for a Type=notify unit, until each job it started printed a line that
starts with `ready_marker` after it started (sl_job.py prints `SLJOB {"event": "batch", ...}`
when it asks for a batch, i.e. after its training client exists) and leaves the jobs
running. Exit status: 0 when every job came up; 1 when one exited first or did not come up
within `ready_timeout_s` (the daemon then sees a failed handoff, with the message on stderr).

Every stop and start is one JSON line in `log` (`{"event": "stop", "job", "pid", "alive",
"signal"}`, `{"event": "start", "job", "pid", "attempt"}`), so a test can count restarts and
which processes were alive when they were stopped. Standard library only: it runs under any
interpreter.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

POLL_S = 0.05


def note(log: Path, **fields: Any) -> None:
    fields["at"] = time.time()
    with log.open("a") as out:
        out.write(json.dumps(fields) + "\n")
        out.flush()
        os.fsync(out.fileno())


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie of ours is reaped and counts as gone)."""
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def stop(job: dict[str, Any], log: Path, grace_s: float) -> None:
    pidfile = Path(job["pidfile"])
    pid = read_pid(pidfile)
    if pid is None:
        return
    was_alive = alive(pid)
    sent = None
    if was_alive:
        sent = "SIGTERM"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        if alive(pid):
            sent = "SIGKILL"
        # The group may hold more than the leader (exec's job): always finish it off.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        while alive(pid):
            time.sleep(POLL_S)
    note(log, event="stop", job=job["name"], pid=pid, alive=was_alive, signal=sent)
    pidfile.unlink(missing_ok=True)


def start(job: dict[str, Any], log: Path) -> tuple[int, int]:
    """Start the job; its pid and the size its output file had before it started."""
    with Path(job["output"]).open("ab") as out:
        offset = out.tell()
        proc = subprocess.Popen(
            job["argv"],
            cwd=job.get("cwd"),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    Path(job["pidfile"]).write_text(f"{proc.pid}\n")
    attempt = os.environ.get("TINKER_RECOVERY_ATTEMPT")
    note(log, event="start", job=job["name"], pid=proc.pid, attempt=attempt, offset=offset)
    return proc.pid, offset


def came_up(job: dict[str, Any], offset: int, marker: str) -> bool:
    """A line starting with `marker` was written to the job's output after `offset` (the job
    may run under a wrapper such as `tinker-recovery exec`, so its pid is not ours)."""
    with Path(job["output"]).open("rb") as out:
        out.seek(offset)
        text = out.read().decode(errors="replace")
    return any(line.startswith(marker) for line in text.splitlines())


def wait_ready(unit: dict[str, Any], started: dict[str, tuple[int, int]]) -> int:
    marker = str(unit.get("ready_marker", "SLJOB "))
    deadline = time.monotonic() + float(unit.get("ready_timeout_s", 240))
    jobs = {job["name"]: job for job in unit["jobs"]}
    waiting = dict(started)
    while waiting:
        for name, (pid, offset) in list(waiting.items()):
            if came_up(jobs[name], offset, marker):
                del waiting[name]
            elif not alive(pid):
                sys.stderr.write(f"relaunch: job {name} (pid {pid}) exited before it came up\n")
                return 1
        if waiting and time.monotonic() > deadline:
            sys.stderr.write(f"relaunch: jobs {sorted(waiting)} did not come up in time\n")
            return 1
        time.sleep(POLL_S)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("action", choices=["start", "restart"])
    parser.add_argument("unit", type=Path)
    parser.add_argument("--stop-grace", type=float, default=10.0)
    args = parser.parse_args(argv)
    unit = json.loads(args.unit.read_text())
    log = Path(unit["log"])
    started: dict[str, tuple[int, int]] = {}
    for job in unit["jobs"]:
        pid = read_pid(Path(job["pidfile"]))
        if args.action == "restart":
            stop(job, log, args.stop_grace)
        elif pid is not None and alive(pid):
            continue
        started[job["name"]] = start(job, log)
    return wait_ready(unit, started)


if __name__ == "__main__":
    sys.exit(main())
