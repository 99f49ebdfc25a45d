"""tinker-cookbook 0.6.1's own loops, unmodified, against the emulator: the supervised loop
saves, is killed, and resumes through the cookbook's resume path; the RL sampling path
samples and trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cookbook.conftest import StartJob
from cookbook.harness import RL_SAMPLE_JOB, cookbook_python, read_records, run_id_of, sl_job_command
from tinker_recovery.emulator import EmulatorServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_supervised_job_checkpoints_is_killed_and_resumes_from_its_last_record(
    tmp_path: Path, cookbook_emulator: EmulatorServer, start_job: StartJob
) -> None:
    emu = cookbook_emulator.emulator
    log_path = tmp_path / "sft"

    first = start_job(sl_job_command(log_path, batches=10, save_every=2, hold_at_batch=7))
    first.wait_event("hold")
    records = read_records(log_path)
    # Batches 0-5 finished (batch 6 is submitted, 7 blocks); the cookbook saved at 2 and 4.
    assert [r["batch"] for r in records] == [2, 4], first.tail()
    [run_id] = {run_id_of(r["state_path"]) for r in records}
    run = emu.runs[run_id]
    assert run.kind == "session"
    assert run.user_metadata == {"renderer_name": "role_colon"}
    assert run.steps >= 6  # six optimizer steps reached the service before the hold
    saved = {c.checkpoint_id for c in run.checkpoints(emu.now())}
    assert {"weights/000002", "sampler_weights/000002", "weights/000004"} <= saved
    metrics = [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]
    nll = [m["train_mean_nll"] for m in metrics]
    assert len(nll) == 6
    assert nll[-1] < nll[0]  # per-datum logprobs from forward_backward, falling with the steps

    first.kill()
    second = start_job(sl_job_command(log_path, batches=10, save_every=2))
    resumed_at = second.wait_event("batch")
    assert second.wait() == 0, second.tail()

    assert resumed_at["batch"] == records[-1]["batch"] == 4
    after = read_records(log_path)
    assert after[: len(records)] == records
    new = after[len(records) :]
    assert [r["name"] for r in new] == ["000004", "000006", "000008", "final"]
    [successor_id] = {run_id_of(r["state_path"]) for r in new}
    assert successor_id != run_id
    successor = emu.runs[successor_id]
    assert successor.loaded_from == records[-1]["state_path"]
    assert successor.user_metadata == {"renderer_name": "role_colon"}
    assert successor.steps >= 10 - 4  # continued from the checkpoint's step count
    counts = emu.request_counts()["requests"]
    assert counts["load_weights"] == 1  # only the resume restored
    assert counts["create_model"] == 1  # only the first run started fresh


def test_rolling_saves_delete_the_previous_rolling_checkpoint(
    tmp_path: Path, cookbook_emulator: EmulatorServer, start_job: StartJob
) -> None:
    emu = cookbook_emulator.emulator
    log_path = tmp_path / "rolling"

    job = start_job(
        sl_job_command(log_path, batches=8, save_every=100, rolling_save_every=2, hold_at_batch=7)
    )
    job.wait_event("hold")

    records = read_records(log_path)
    rolling = [r for r in records if r.get("rolling")]
    assert [r["batch"] for r in rolling] == [2, 4], job.tail()
    [run_id] = {run_id_of(r["state_path"]) for r in records}
    listed = [c for c in emu.runs[run_id].checkpoints(emu.now()) if c.checkpoint_type == "training"]
    # The cookbook deleted the rolling save at 2 when it made the one at 4.
    assert [c.tinker_path for c in listed] == [rolling[-1]["state_path"]]
    [ckpt] = listed
    assert ckpt.expires_at is not None
    assert round(ckpt.expires_at - ckpt.time) == 7200
    assert emu.request_counts()["requests"]["delete_checkpoint"] == 1


def test_rl_sampling_path_samples_and_trains_through_the_cookbook(
    cookbook_emulator: EmulatorServer, start_job: StartJob
) -> None:
    job = start_job([str(cookbook_python()), str(RL_SAMPLE_JOB), "--max-tokens", "6"])
    completions = [job.wait_event("completion") for _ in range(8)]
    trained = job.wait_event("trained")
    assert job.wait() == 0, job.tail()

    assert {c["kind"] for c in completions} == {"snapshot", "sampler_path"}
    for c in completions:
        assert 1 <= len(c["tokens"]) <= 6
        assert c["logprobs"] == len(c["tokens"])
        if c["stop_reason"] == "stop":
            assert c["tokens"][-1] == 2
        else:
            assert c["stop_reason"] == "length"
            assert len(c["tokens"]) == 6
    assert trained["outputs"] == trained["targets"]
    counts = cookbook_emulator.emulator.request_counts()["requests"]
    assert counts["asample"] == 8
    assert counts["create_sampling_session"] == 1
    assert counts["save_weights_for_sampler"] == 2
