"""CommandRunner: run a child process with a deadline, in its own process group.

The one place a timeout is a parameter (STYLE.md section 5): the runner itself must kill what it
started. A child is never run through a shell, gets its own session (so `killpg` reaches its
grandchildren too), is killed whole on timeout (SIGTERM, then SIGKILL after a short grace) and
always reaped. Only the last few KiB of its output are kept, so a chatty child cannot eat memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

log = structlog.get_logger(__name__)

TAIL_BYTES = 4096
_READ_CHUNK = 65536


@dataclass(frozen=True, slots=True)
class CommandResult:
    exit_code: int | None  # None when killed on timeout; negative: killed by that signal
    stdout_tail: str
    stderr_tail: str
    timed_out: bool
    duration_s: float


class CommandRunner(Protocol):
    async def run(
        self,
        argv: Sequence[str],
        *,
        timeout_s: float,
        env: Mapping[str, str],
        cwd: Path | None = None,
    ) -> CommandResult:
        """Run `argv` with exactly `env` as its environment; kill it after `timeout_s`."""
        ...


class _PipeTail:
    """Reads one pipe without blocking the loop, keeping only its last `limit` bytes.

    Our own pipe, not asyncio's: asyncio's Process.wait() also waits for its pipes to close,
    so a background grandchild that inherited stdout would hold the handoff until its timeout.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buf = bytearray()
        self._loop = asyncio.get_running_loop()
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self.eof = asyncio.Event()
        self._open = True
        self._loop.add_reader(self.read_fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            chunk = os.read(self.read_fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.close()
            return
        self._buf += chunk
        if len(self._buf) > self._limit:
            del self._buf[: len(self._buf) - self._limit]

    def close_write_end(self) -> None:
        """The child holds its own copy; ours must go, or EOF never comes."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def close(self) -> None:
        self.close_write_end()
        if self._open:
            self._open = False
            self._loop.remove_reader(self.read_fd)
            os.close(self.read_fd)
        self.eof.set()

    def text(self) -> str:
        return self._buf.decode("utf-8", errors="replace")


class SubprocessRunner:
    """The real CommandRunner, on asyncio.create_subprocess_exec."""

    def __init__(
        self,
        *,
        kill_grace_s: float = 5.0,
        drain_grace_s: float = 1.0,
        tail_bytes: int = TAIL_BYTES,
    ) -> None:
        self._kill_grace_s = kill_grace_s
        self._drain_grace_s = drain_grace_s
        self._tail_bytes = tail_bytes

    async def run(
        self,
        argv: Sequence[str],
        *,
        timeout_s: float,
        env: Mapping[str, str],
        cwd: Path | None = None,
    ) -> CommandResult:
        if not argv:
            raise ValueError("argv must not be empty")
        started = time.monotonic()
        out, err = _PipeTail(self._tail_bytes), _PipeTail(self._tail_bytes)
        try:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out.write_fd,
                    stderr=err.write_fd,
                    env=dict(env),
                    cwd=cwd,
                    start_new_session=True,  # own process group: killpg reaches grandchildren
                )
            finally:
                out.close_write_end()
                err.close_write_end()
            timed_out = await self._wait(proc, argv[0], timeout_s, out, err)
        finally:
            out.close()
            err.close()
        return CommandResult(
            exit_code=None if timed_out else proc.returncode,
            stdout_tail=out.text(),
            stderr_tail=err.text(),
            timed_out=timed_out,
            duration_s=time.monotonic() - started,
        )

    async def _wait(
        self,
        proc: asyncio.subprocess.Process,
        program: str,
        timeout_s: float,
        out: _PipeTail,
        err: _PipeTail,
    ) -> bool:
        """Wait for the leader (and, briefly, its output); True if it had to be killed."""
        try:
            async with asyncio.timeout(timeout_s):
                await proc.wait()
                # Output still in flight when the leader exits is worth a moment; a background
                # process that keeps the pipe open is not waited for (its later writes fail).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._drain_grace_s):
                        await out.eof.wait()
                        await err.eof.wait()
        except TimeoutError:
            log.warning("command_timed_out", program=program, timeout_s=timeout_s, pid=proc.pid)
            await self._kill_group(proc)
            return True
        except asyncio.CancelledError:
            # Shutdown or an outer deadline: leave nothing running behind us, then go on.
            await asyncio.shield(self._kill_group(proc))
            raise
        return False

    async def _kill_group(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM the whole group, SIGKILL it after the grace, and reap the leader."""
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(self._kill_grace_s):
                await proc.wait()
        except TimeoutError:
            pass
        # The leader may have exited on SIGTERM while a grandchild ignores it: always finish
        # with SIGKILL to the group (a no-op when it is already empty).
        _signal_group(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            await proc.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
