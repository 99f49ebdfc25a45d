"""Run tinker-cookbook jobs (sl_job.py, rl_sample_job.py) against an emulator.

The jobs run under .venv-cookbook's interpreter (`make cookbook`); this module and the
tests run in the project's .venv and never import the cookbook. See conftest.py for the
entry points.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SL_JOB = Path(__file__).with_name("sl_job.py")
RL_SAMPLE_JOB = Path(__file__).with_name("rl_sample_job.py")
COOKBOOK_VENV_PYTHON = REPO / ".venv-cookbook" / "bin" / "python"
EVENT_WAIT_S = 150.0
"""A job's first event comes after the cookbook's imports: about 10 s of CPU (torch)."""
MARKERS = ("SLJOB ", "RLJOB ")


def cookbook_python() -> Path:
    """The interpreter that has tinker-cookbook: $TINKER_RECOVERY_COOKBOOK_PYTHON, else
    .venv-cookbook/bin/python. Raises with the fix when neither exists."""
    path = Path(os.environ.get("TINKER_RECOVERY_COOKBOOK_PYTHON", COOKBOOK_VENV_PYTHON))
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `make cookbook` first")
    return path


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (connections to it are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def job_env(base_url: str, api_key: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a cookbook job pointed at `base_url`, kept off the network: the
    cookbook's start-up pricing download goes to a closed loopback proxy and fails at once."""
    proxy = f"http://127.0.0.1:{closed_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TINKER_")}
    env.update(
        TINKER_BASE_URL=base_url,
        TINKER_API_KEY=api_key,
        TINKER_TELEMETRY="0",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        HTTPS_PROXY=proxy,
        https_proxy=proxy,
        HTTP_PROXY=proxy,
        http_proxy=proxy,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


def sl_job_command(
    log_path: Path,
    *,
    batches: int = 10,
    save_every: int = 2,
    hold_at_batch: int | None = None,
    rolling_save_every: int = 0,
    extra: Sequence[str] = (),
) -> list[str]:
    """argv of the supervised job; usable as a daemon `command` handoff as it is."""
    argv = [
        str(cookbook_python()),
        str(SL_JOB),
        "--log-path",
        str(log_path),
        "--batches",
        str(batches),
        "--save-every",
        str(save_every),
        "--rolling-save-every",
        str(rolling_save_every),
    ]
    if hold_at_batch is not None:
        argv += ["--hold-at-batch", str(hold_at_batch)]
    return [*argv, *extra]


def read_records(log_path: Path) -> list[dict[str, Any]]:
    """The cookbook's `<log_path>/checkpoints.jsonl`, one dict per line ([] if absent)."""
    path = log_path / "checkpoints.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_id_of(tinker_path: str) -> str:
    return tinker_path.removeprefix("tinker://").split("/", 1)[0]


class JobProc:
    """A job process. A thread reads its stdout: marker lines become events on a queue (so
    waiting for one blocks on the pipe, no polling); every line is kept for failure messages."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], cwd: Path = REPO) -> None:
        self.argv = list(argv)
        self.lines: list[str] = []
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.proc = subprocess.Popen(
            self.argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            for marker in MARKERS:
                if line.startswith(marker):
                    self.events.put(json.loads(line[len(marker) :]))
        self.proc.stdout.close()
        self.events.put(None)  # end of output

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    def wait_event(self, event: str, timeout_s: float = EVENT_WAIT_S) -> dict[str, Any]:
        """The next event named `event` (earlier ones of other names are dropped)."""
        while True:
            try:
                got = self.events.get(timeout=timeout_s)
            except queue.Empty:
                msg = f"no {event!r} event in {timeout_s:g} s:\n{self.tail()}"
                raise AssertionError(msg) from None
            if got is None:
                raise AssertionError(
                    f"job exited ({self.proc.wait()}) before {event!r}:\n{self.tail()}"
                )
            if got["event"] == event:
                return got

    def wait(self, timeout_s: float = EVENT_WAIT_S) -> int:
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            msg = f"job still running after {timeout_s:g} s:\n{self.tail()}"
            raise AssertionError(msg) from None
        self._reader.join(timeout_s)
        return code

    def kill(self) -> None:
        """SIGKILL the job's process group (a crash: no clean session close)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._reader.join(10)
