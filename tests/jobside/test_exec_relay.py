"""The relay for launchers that restart the job with its own command line: the daemon's side
writes the attempt to a file, the job's side applies it once."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

from e2e.harness import Emu
from jobside.conftest import TAGS, base_env, handoff_for, job, run_exec, run_metadata, trained
from tinker_recovery.jobside import attempt


def test_write_handoff_stores_the_attempt_then_runs_the_restart(emu: Emu, tmp_path: Path) -> None:
    relay = tmp_path / "recovery.json"
    handoff = handoff_for("tinker://copy/weights/r1", source="tinker://orig/weights/000020")
    marker = tmp_path / "restarted"
    restart = f"import sys; open({str(marker)!r}, 'w').write('x'); sys.exit(5)"
    done = run_exec(
        "--write-handoff",
        str(relay),
        "--",
        sys.executable,
        "-c",
        restart,
        env=base_env(emu, **handoff.environment()),
    )
    assert done.returncode == 5  # the restart command's status, passed on
    assert marker.exists()
    assert attempt.read_file(relay) == handoff
    assert json.loads(relay.read_text())["source_checkpoint_path"] == "tinker://orig/weights/000020"
    assert stat.S_IMODE(relay.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_write_handoff_refuses_outside_a_handoff(emu: Emu, tmp_path: Path) -> None:
    relay = tmp_path / "recovery.json"
    done = run_exec("--write-handoff", str(relay), "--", "true", env=base_env(emu))
    assert done.returncode == 1
    assert "TINKER_RECOVERY_CHECKPOINT is not set" in done.stderr
    assert not relay.exists()


def test_the_job_applies_the_relay_file_once(emu: Emu, tmp_path: Path) -> None:
    source = emu.create_run(checkpoints=2)
    checkpoint = emu.training_checkpoints(source)[-1]
    relay = tmp_path / "recovery.json"
    attempt.write_file(relay, handoff_for(checkpoint))
    # The launcher's own command line: no TINKER_RECOVERY_* reach it, only the file.
    args = ("--handoff-file", str(relay), "--")

    # 1. It dies before progress: the file stays for the launcher's next restart.
    died = run_exec(*args, *job(tmp_path / "o0", "exit3"), env=base_env(emu))
    assert died.returncode == 3
    assert relay.exists()

    # 2. It resumes and progresses under the attempt: tagged, and the file is consumed.
    first = run_exec(*args, *job(tmp_path / "o1", "train", "--from", checkpoint), env=base_env(emu))
    assert first.returncode == 0, first.stderr
    assert run_metadata(emu, trained(tmp_path / "o1")["model_id"]) == TAGS
    assert not relay.exists()
    assert attempt.read_file(relay.with_name("recovery.json.applied")) == handoff_for(checkpoint)

    # 3. A later, unrelated restart runs as a plain start: no attempt, no tags.
    second = run_exec(*args, *job(tmp_path / "o2", "train"), env=base_env(emu))
    assert second.returncode == 0, second.stderr
    assert run_metadata(emu, trained(tmp_path / "o2")["model_id"]) == {}


def test_a_newer_attempt_written_meanwhile_is_not_consumed(emu: Emu, tmp_path: Path) -> None:
    """The daemon's next attempt lands in the file while the job runs under the previous one."""
    relay = tmp_path / "recovery.json"
    attempt.write_file(relay, handoff_for("tinker://x/weights/1", key="key-old"))
    newer = handoff_for("tinker://x/weights/2", key="key-new")
    script = (
        "import json, os, sys\n"
        "from tinker_recovery.jobside import attempt\n"
        "from jobside.conftest import handoff_for\n"
        f"attempt.write_file(attempt.Path({str(relay)!r}), handoff_for('tinker://x/weights/2', "
        "key='key-new'))\n"
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
    )
    tests_dir = str(Path(__file__).resolve().parents[1])
    env = base_env(emu)
    out = tmp_path / "o"
    done = run_exec(
        "--handoff-file",
        str(relay),
        "--",
        sys.executable,
        "-c",
        script,
        *job(out, "train")[1:],
        env={**env, "PYTHONPATH": tests_dir},
    )
    assert done.returncode == 0, done.stderr
    assert run_metadata(emu, trained(out)["model_id"])["tinker_recovery.idempotency_key"] == (
        "key-old"
    )
    assert attempt.read_file(relay) == newer  # still there for the next start
