"""exec --log-path: a cookbook job resumes from the daemon's checkpoint with that checkpoint's
loop state, through its own checkpoints.jsonl; the user's history is only ever appended to."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from e2e.harness import Emu
from jobside.conftest import base_env, handoff_for, run_exec
from tinker_recovery.jobside import attempt, resume
from tinker_recovery.shell.handoff import HandoffRequest

PATHS = [f"tinker://run-a:train:0/weights/{n:06d}" for n in (10, 20, 30)]


def history(log_path: Path) -> list[dict[str, Any]]:
    """What the cookbook wrote: one record per save, state and sampler paths, loop state."""
    records = [
        {
            "name": f"{n:06d}",
            "batch": n,
            "epoch": 0,
            "elapsed_tokens": n * 512,
            "state_path": path,
            "sampler_path": path.replace("/weights/", "/sampler_weights/"),
        }
        for n, path in zip((10, 20, 30), PATHS, strict=True)
    ]
    records.insert(1, {"name": "000015", "batch": 15, "sampler_path": "tinker://s/15"})
    log_path.mkdir(exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    (log_path / "checkpoints.jsonl").write_text(text)
    return records


def last_checkpoint(log_path: Path) -> dict[str, Any]:
    """What tinker_cookbook.checkpoint_utils.get_last_checkpoint(log_path) resumes from: the
    last record with a state_path (the cookbook's own function when it is installed)."""
    try:
        checkpoint_utils: Any = importlib.import_module("tinker_cookbook.checkpoint_utils")
    except ImportError:
        lines = (log_path / "checkpoints.jsonl").read_text().splitlines()
        with_state: list[dict[str, Any]] = [
            r for r in map(json.loads, lines) if r.get("state_path")
        ]
        return with_state[-1]
    record = checkpoint_utils.get_last_checkpoint(str(log_path))
    as_dict: dict[str, Any] = record.to_dict()
    return as_dict


def exec_with(emu: Emu, log_path: Path, env_handoff: dict[str, str], marker: Path) -> Any:
    started = f"open({str(marker)!r}, 'w').write('started')"
    return run_exec(
        "--log-path",
        str(log_path),
        "--",
        sys.executable,
        "-c",
        started,
        env=base_env(emu, **env_handoff),
    )


def test_resumes_from_the_chosen_checkpoint_not_the_last_line(emu: Emu, tmp_path: Path) -> None:
    log_path, marker = tmp_path / "run", tmp_path / "started"
    before = history(log_path)
    done = exec_with(emu, log_path, handoff_for(PATHS[1]).environment(), marker)
    assert done.returncode == 0, done.stderr
    assert marker.exists()
    resumed = last_checkpoint(log_path)
    assert resumed["state_path"] == PATHS[1]
    assert (resumed["batch"], resumed["epoch"], resumed["elapsed_tokens"]) == (20, 0, 20 * 512)
    lines = (log_path / "checkpoints.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines[:-1]] == before  # history untouched


def test_a_restore_sdk_copy_resumes_with_the_originals_loop_state(emu: Emu, tmp_path: Path) -> None:
    log_path, marker = tmp_path / "run", tmp_path / "started"
    history(log_path)
    copy = "tinker://restored:train:0/weights/tinker-recovery-2"
    done = exec_with(emu, log_path, handoff_for(copy, source=PATHS[1]).environment(), marker)
    assert done.returncode == 0, done.stderr
    resumed = last_checkpoint(log_path)
    assert resumed["state_path"] == copy
    assert resumed["batch"] == 20
    assert resumed["tinker_recovery"]["resumed_from"] == PATHS[1]


def test_a_checkpoint_not_in_the_file_is_refused_and_the_job_not_started(
    emu: Emu, tmp_path: Path
) -> None:
    log_path, marker = tmp_path / "run", tmp_path / "started"
    history(log_path)
    original = (log_path / "checkpoints.jsonl").read_bytes()
    # A restore: sdk copy without its source cannot be looked up either: never guessed.
    for handoff in (handoff_for("tinker://other/weights/9"), handoff_for("tinker://copy/w/1")):
        done = exec_with(emu, log_path, handoff.environment(), marker)
        assert done.returncode == 1
        assert "refusing to guess" in done.stderr
    assert not marker.exists()
    assert (log_path / "checkpoints.jsonl").read_bytes() == original


def test_the_same_attempt_is_appended_once(emu: Emu, tmp_path: Path) -> None:
    log_path = tmp_path / "run"
    history(log_path)
    env = handoff_for(PATHS[0]).environment()
    for _ in range(2):  # the launcher restarted the job before it made progress
        assert exec_with(emu, log_path, env, tmp_path / "m").returncode == 0
    lines = (log_path / "checkpoints.jsonl").read_text().splitlines()
    assert len(lines) == 5
    assert last_checkpoint(log_path)["state_path"] == PATHS[0]


def test_the_newest_checkpoint_needs_no_record(emu: Emu, tmp_path: Path) -> None:
    log_path = tmp_path / "run"
    history(log_path)
    original = (log_path / "checkpoints.jsonl").read_bytes()
    assert (
        exec_with(emu, log_path, handoff_for(PATHS[2]).environment(), tmp_path / "m").returncode
        == 0
    )
    assert (log_path / "checkpoints.jsonl").read_bytes() == original


@pytest.mark.parametrize(
    "text",
    [
        pytest.param('{"name": "a", "state_path": "tinker://r/weights/1"}\n{"name": ', id="torn"),
        pytest.param('{"name": "a"}\nnot json\n', id="not-json"),
    ],
)
def test_a_damaged_file_is_refused(tmp_path: Path, text: str) -> None:
    (tmp_path / "checkpoints.jsonl").write_text(text)
    with pytest.raises(resume.ResumeRefused, match="fix"):
        resume.apply(tmp_path, handoff_for("tinker://r/weights/1"))
    assert (tmp_path / "checkpoints.jsonl").read_text() == text


@pytest.mark.parametrize("source", [PATHS[1], None], ids=["restore-sdk", "restore-none"])
def test_the_daemons_handoff_reads_back_the_same_on_the_job_side(source: str | None) -> None:
    """shell/handoff.py sends, jobside/attempt.py reads: the two must agree, field by field."""
    request = HandoffRequest(
        lineage_id="lin-7",
        corrupted_run_id="sess-0:train:0",
        checkpoint_path="tinker://copy/weights/r",
        attempt=2,
        idempotency_key="key-abc",
        restore_optimizer=False,
        user_metadata={"tinker_recovery.lineage": "lin-7"},
        source_checkpoint_path=source,
    )
    expected = attempt.Handoff(
        lineage_id="lin-7",
        corrupted_run_id="sess-0:train:0",
        checkpoint_path="tinker://copy/weights/r",
        attempt=2,
        idempotency_key="key-abc",
        restore_optimizer=False,
        user_metadata={"tinker_recovery.lineage": "lin-7"},
        source_checkpoint_path=source,
    )
    env = request.environment()
    assert ("TINKER_RECOVERY_SOURCE_CHECKPOINT" in env) is (source is not None)
    assert ("source_checkpoint_path" in request.as_json()) is (source is not None)
    assert attempt.from_environment(env) == expected
    assert attempt.from_json(request.as_json()) == expected
    assert expected.environment() == env
    assert expected.as_json() == request.as_json()
