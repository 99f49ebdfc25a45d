"""exec --detach as the daemon's handoff command: a job that dies before progress fails the
handoff with its status; a job that progresses is left running and the handoff succeeds."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from e2e.harness import Emu
from jobside.conftest import (
    base_env,
    handoff_for,
    is_running,
    job,
    run_exec,
    run_metadata,
    trained,
    wait_for_exit,
)


@pytest.mark.parametrize(
    ("mode", "status", "reason"),
    [
        pytest.param("exit3", 3, "exited with status 3 before making progress", id="exit-3"),
        pytest.param("sigkill", 137, "was killed by SIGKILL before making progress", id="sigkill"),
    ],
)
def test_job_dying_before_progress_fails_with_its_status(
    emu: Emu, tmp_path: Path, mode: str, status: int, reason: str
) -> None:
    done = run_exec(
        "--detach",
        "--output",
        str(tmp_path / "job.log"),
        "--",
        *job(tmp_path / "o", mode),
        env=base_env(emu),
    )
    assert done.returncode == status
    assert reason in done.stderr


def test_unloadable_checkpoint_fails_with_the_sdk_error(emu: Emu, tmp_path: Path) -> None:
    source = emu.create_run(checkpoints=2)
    checkpoint = emu.training_checkpoints(source)[-1]
    emu.unloadable(checkpoint)
    env = base_env(emu, **handoff_for(checkpoint).environment())
    done = run_exec(
        "--detach",
        "--output",
        str(tmp_path / "job.log"),
        "--",
        *job(tmp_path / "o", "train", "--from", checkpoint),
        env=env,
    )
    assert done.returncode == 1
    assert "exited with status 1 before making progress" in done.stderr
    # The SDK's error reaches exec from the SDK's own thread (a future's callback), which can
    # lose the race against the job's exit on a busy machine: when it arrives, it is named.
    if "(last error:" in done.stderr:
        assert "unloadable" in done.stderr.lower() or "checkpoint" in done.stderr.lower()


def test_job_exiting_0_without_progress_is_still_a_failure(emu: Emu, tmp_path: Path) -> None:
    """Loading a checkpoint and leaving is not progress: no optim_step, no save."""
    source = emu.create_run(checkpoints=2)
    checkpoint = emu.training_checkpoints(source)[-1]
    done = run_exec(
        "--detach",
        "--output",
        str(tmp_path / "job.log"),
        "--",
        *job(tmp_path / "o", "load", "--from", checkpoint),
        env=base_env(emu),
    )
    assert done.returncode == 1
    assert "exited with status 0 before making progress" in done.stderr


def test_job_that_progresses_is_left_running(emu: Emu, tmp_path: Path, reap: list[int]) -> None:
    source = emu.create_run(checkpoints=2)
    checkpoint = emu.training_checkpoints(source)[-1]
    out, log = tmp_path / "out.json", tmp_path / "job.log"
    env = base_env(emu, **handoff_for(checkpoint).environment())
    done = run_exec(
        "--detach",
        "--output",
        str(log),
        "--",
        *job(out, "train-wait", "--from", checkpoint),
        env=env,
    )
    assert done.returncode == 0, done.stderr
    match = re.search(
        r"job (\d+) made progress \((optim_step|save_state) on ([^)]+)\)", done.stderr
    )
    assert match is not None, done.stderr
    pid = int(match.group(1))
    reap.append(pid)
    assert is_running(pid)
    # It is in its own session: the daemon's kill of the handoff's process group misses it.
    assert os.getsid(pid) == pid
    assert wait_for_exit(pid, 0) is False
    os.kill(pid, signal.SIGTERM)
    assert wait_for_exit(pid, 30), "the detached job did not stop on SIGTERM"
    result = trained(out)
    assert match.group(3) == result["model_id"]
    assert run_metadata(emu, result["model_id"])["tinker_recovery.idempotency_key"] == "key-abc"


def test_no_progress_within_the_timeout_stops_the_job(emu: Emu, tmp_path: Path) -> None:
    script = "import signal; signal.pause()"  # never creates a client, never progresses
    done = run_exec(
        "--detach",
        "--progress-timeout",
        "1s",
        "--output",
        str(tmp_path / "job.log"),
        "--",
        "python3",
        "-c",
        script,
        env=base_env(emu),
    )
    assert done.returncode == 1
    assert re.search(r"job (\d+) made no progress within 1s; stopped it", done.stderr)
    pid = int(re.findall(r"job (\d+)", done.stderr)[0])
    assert wait_for_exit(pid, 10)
