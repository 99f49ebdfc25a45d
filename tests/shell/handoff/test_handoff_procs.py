"""SubprocessRunner: exit codes, bounded output, whole-group kill on timeout, exact env.

These start real (tiny) Python children; the only waits are for processes to exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from tinker_recovery.shell.procs import TAIL_BYTES, SubprocessRunner

PY = sys.executable


def is_gone(pid: int) -> bool:
    """True once `pid` no longer runs (a zombie nobody reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in {"Z", "X"}


async def wait_until_gone(pid: int) -> bool:
    for _ in range(500):  # SIGKILL is sent already; the kernel needs a moment to finish it
        if is_gone(pid):
            return True
        await asyncio.sleep(0.01)
    return False


async def test_exit_code_and_output_tails() -> None:
    code = "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"
    result = await SubprocessRunner().run([PY, "-c", code], timeout_s=30, env={})
    assert (result.exit_code, result.timed_out) == (3, False)
    assert result.stdout_tail == "out\n"
    assert result.stderr_tail == "err\n"


async def test_chatty_child_keeps_only_the_last_bytes() -> None:
    code = "import sys; sys.stdout.write('x' * 2_000_000 + 'THE-END'); sys.stdout.flush()"
    result = await SubprocessRunner().run([PY, "-c", code], timeout_s=30, env={})
    assert result.exit_code == 0
    assert len(result.stdout_tail) == TAIL_BYTES
    assert result.stdout_tail.endswith("THE-END")


async def test_child_sees_exactly_the_given_environment(tmp_path: Path) -> None:
    out = tmp_path / "env.json"
    code = f"import json, os; open({str(out)!r}, 'w').write(json.dumps(dict(os.environ)))"
    env = {"ONLY": "this", "LC_CTYPE": "C.UTF-8"}
    result = await SubprocessRunner().run([PY, "-c", code], timeout_s=30, env=env, cwd=tmp_path)
    assert result.exit_code == 0
    assert json.loads(out.read_text()) == env


SPAWNER = """
import os, signal, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
open(sys.argv[1], "w").write(f"{os.getpid()} {grandchild.pid}")
signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(120)
"""


async def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    runner = SubprocessRunner(kill_grace_s=0.2)
    result = await runner.run(
        [PY, "-c", SPAWNER, str(pids)], timeout_s=1.5, env={"PATH": os.environ["PATH"]}
    )
    assert result.timed_out is True
    assert result.exit_code is None
    child, grandchild = (int(p) for p in pids.read_text().split())
    # Both ignore SIGTERM, so this also proves the SIGKILL escalation.
    assert await wait_until_gone(child)
    assert await wait_until_gone(grandchild)


async def test_cancellation_kills_the_group_too(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    runner = SubprocessRunner(kill_grace_s=0.2)
    task = asyncio.create_task(runner.run([PY, "-c", SPAWNER, str(pids)], timeout_s=60, env={}))
    for _ in range(1000):
        if pids.exists() and pids.read_text():
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    child, grandchild = (int(p) for p in pids.read_text().split())
    assert await wait_until_gone(child)
    assert await wait_until_gone(grandchild)


async def test_background_grandchild_holding_stdout_does_not_hold_the_command(
    tmp_path: Path,
) -> None:
    """`nohup job &`-style handoffs: the command is done when its leader exits."""
    pid_file = tmp_path / "bg"
    code = (
        "import subprocess, sys; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started')"
    )
    result = await SubprocessRunner(drain_grace_s=0.1).run([PY, "-c", code], timeout_s=30, env={})
    background = int(pid_file.read_text())
    try:
        assert result.exit_code == 0
        assert result.timed_out is False
        assert result.stdout_tail == "started\n"
        assert not is_gone(background)  # a job the command launched is left alone
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(background, signal.SIGKILL)


async def test_missing_program_raises_oserror() -> None:
    with pytest.raises(FileNotFoundError):
        await SubprocessRunner().run(["/nonexistent/prog"], timeout_s=5, env={})
