"""Run the job as a child and watch it: its exit, and the progress its hook reports.

The hook (hook/sitecustomize.py) writes JSON lines to a FIFO that only we read; the child's
exit is a pidfd. One selector waits on both, so nothing here polls. The FIFO is opened
read-write so it never reads as end-of-file while no job process has it open.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tinker_recovery.jobside.hook import sitecustomize as hook

HOOK_DIR = Path(hook.__file__).resolve().parent
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
_PR_SET_PDEATHSIG = 1
_STOP_GRACE_S = 10.0


class Interrupted(BaseException):
    """exec got a signal while a detached job had not made progress yet."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass
class Watch:
    """What the hook told us so far."""

    progress: dict[str, Any] | None = None
    clients: list[str] = field(default_factory=list)
    last_failure: str | None = None


@dataclass(frozen=True, slots=True)
class Ended:
    """How watching ended: the child's exit status (None: still running) and what we saw."""

    returncode: int | None
    watch: Watch
    timed_out: bool = False


def child_environment(base: Mapping[str, str], fifo: Path) -> dict[str, str]:
    """`base` plus the hook: first on PYTHONPATH, and where to report."""
    env = dict(base)
    env[hook.STATUS_ENV] = str(fifo)
    previous = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(HOOK_DIR) + (os.pathsep + previous if previous else "")
    return env


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when exec dies (even of SIGKILL). Linux only."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


class Supervisor:
    """Start `argv` and watch it. `detached`: its own session, output to `output`."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        detached: bool,
        output: Path | None,
        on_progress: Callable[[dict[str, Any]], None],
    ) -> None:
        self._argv = list(argv)
        self._env = env
        self._detached = detached
        self._output = output
        self._on_progress = on_progress
        self._dir = Path(tempfile.mkdtemp(prefix="tinker-recovery-exec-"))
        self._fifo = self._dir / "status"
        os.mkfifo(self._fifo, 0o600)
        self._fifo_fd = os.open(self._fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._buffer = b""
        self.watch = Watch()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        env = child_environment(self._env, self._fifo)
        out: IO[bytes] | None = None
        try:
            if self._detached:
                assert self._output is not None
                out = open(self._output, "ab")  # noqa: SIM115 - closed below; the child keeps its copy
                self.proc = subprocess.Popen(
                    self._argv,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    start_new_session=True,
                )
            else:
                self.proc = subprocess.Popen(
                    self._argv, env=env, process_group=0, preexec_fn=_die_with_parent
                )
        finally:
            if out is not None:
                out.close()
        return self.proc.pid

    def forward_signals(self) -> None:
        """Pass the signals a launcher or terminal sends us on to the job's process group."""

        def forward(signum: int, _frame: object) -> None:
            if self.proc is not None and self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signum)

        for sig in FORWARDED:
            signal.signal(sig, forward)

    def stop_on_signals(self) -> None:
        """Detached, before progress: a signal to us means the handoff was abandoned."""

        def interrupt(signum: int, _frame: object) -> None:
            raise Interrupted(signum)

        for sig in FORWARDED:
            signal.signal(sig, interrupt)

    def wait(self, *, until_progress: bool, timeout_s: float | None) -> Ended:
        """Until the child exits, or (until_progress) it made progress, or the timeout."""
        assert self.proc is not None
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        selector = selectors.DefaultSelector()
        pidfd = _pidfd(self.proc.pid)
        selector.register(self._fifo_fd, selectors.EVENT_READ, "fifo")
        if pidfd is not None:
            selector.register(pidfd, selectors.EVENT_READ, "exit")
        try:
            while True:
                if self.proc.poll() is not None:
                    self._drain()
                    return Ended(self.proc.returncode, self.watch)
                if until_progress and self.watch.progress is not None:
                    return Ended(None, self.watch)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return Ended(None, self.watch, timed_out=True)
                # Without a pidfd (old kernels) look at the child twice a second.
                wait_s = remaining if pidfd is not None else min(remaining or 0.5, 0.5)
                for key, _ in selector.select(wait_s):
                    if key.data == "fifo":
                        self._drain()
        finally:
            selector.close()
            if pidfd is not None:
                os.close(pidfd)

    def stop(self) -> int | None:
        """SIGTERM the job's process group, SIGKILL it after a grace; its exit status."""
        assert self.proc is not None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                return self.proc.wait(_STOP_GRACE_S)
        return self.proc.poll()

    def close(self) -> None:
        """Remove the FIFO first (late hook reports then fail quietly), then our read end."""
        with contextlib.suppress(OSError):
            self._fifo.unlink()
        with contextlib.suppress(OSError):
            os.close(self._fifo_fd)
        shutil.rmtree(self._dir, ignore_errors=True)

    def _drain(self) -> None:
        while True:
            try:
                chunk = os.read(self._fifo_fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self._handle(line)

    def _handle(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        kind = event.get("event")
        if kind == "client":
            self.watch.clients.append(str(event.get("model_id")))
        elif kind == "client_failed":
            self.watch.last_failure = str(event.get("error"))[:300]
        elif kind == "progress" and self.watch.progress is None:
            self.watch.progress = event
            self._on_progress(event)


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def exit_status(returncode: int) -> int:
    """The shell's convention: a child killed by signal N is status 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def how_it_ended(returncode: int) -> str:
    if returncode >= 0:
        return f"exited with status {returncode}"
    return f"was killed by {signal_name(-returncode)}"


def say(message: str) -> None:
    sys.stderr.write(f"tinker-recovery exec: {message}\n")
    sys.stderr.flush()
