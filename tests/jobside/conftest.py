"""Fixtures for the exec tests: an emulator, and `tinker-recovery exec` run as a real process.

Jobs are tests/jobside/sdk_job.py (the official SDK, no recovery code) talking to the emulator
over 127.0.0.1. Every exec and job process is bounded by a timeout; detached jobs a test leaves
running are SIGKILLed at teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from e2e.harness import JOB_KEY, Emu, emulator
from tinker_recovery.jobside.attempt import Handoff

SDK_JOB = Path(__file__).with_name("sdk_job.py")
EXEC_TIMEOUT_S = 60.0

TAGS = {
    "tinker_recovery.lineage": "lin-7",
    "tinker_recovery.recovered_from": "sess-0:train:0",
    "tinker_recovery.attempt": "2",
    "tinker_recovery.idempotency_key": "key-abc",
}


@pytest.fixture
def emu() -> Iterator[Emu]:
    with emulator(runs=2) as running:
        yield running


def base_env(emu: Emu, **extra: str) -> dict[str, str]:
    """A job's environment: the emulator's address and a key, nothing of tinker-recovery."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TINKER_", "PYTHONPATH"))}
    env.update(
        {
            "TINKER_BASE_URL": emu.base_url,
            "TINKER_API_KEY": JOB_KEY,
            "TINKER_TELEMETRY": "0",
            "NO_PROXY": "127.0.0.1,localhost",
            **extra,
        }
    )
    return env


def handoff_for(checkpoint: str, source: str | None = None, key: str = "key-abc") -> Handoff:
    return Handoff(
        lineage_id="lin-7",
        corrupted_run_id="sess-0:train:0",
        checkpoint_path=checkpoint,
        attempt=2,
        idempotency_key=key,
        restore_optimizer=True,
        user_metadata={**TAGS, "tinker_recovery.idempotency_key": key},
        source_checkpoint_path=source,
    )


def job(out: Path, mode: str, *options: str) -> list[str]:
    return [sys.executable, str(SDK_JOB), str(out), mode, *options]


def run_exec(
    *args: str, env: Mapping[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tinker_recovery", "exec", *args],
        capture_output=True,
        text=True,
        env=dict(env),
        cwd=cwd,
        timeout=EXEC_TIMEOUT_S,
        check=False,
    )


def run_metadata(emu: Emu, run_id: str) -> dict[str, str]:
    row = emu._json("GET", f"/api/v1/training_runs/{run_id}")
    metadata: dict[str, str] = row.get("user_metadata") or {}
    return metadata


def trained(out: Path) -> dict[str, Any]:
    assert out.exists(), "the job did not train"
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def wait_for_exit(pid: int, timeout_s: float) -> bool:
    """True once process `pid` (not our child) is gone: its pidfd turns readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout_s)
        return bool(readable)
    finally:
        os.close(fd)


def is_running(pid: int) -> bool:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        readable, _, _ = select.select([fd], [], [], 0)
        return not readable
    finally:
        os.close(fd)


@pytest.fixture
def reap() -> Iterator[list[int]]:
    """Pids of detached jobs; any still alive at teardown is SIGKILLed with its group."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
