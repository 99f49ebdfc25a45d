"""exec tags every training client an unmodified job creates, merged with the job's own metadata."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from e2e.harness import Emu, wait_until
from jobside.conftest import (
    EXEC_TIMEOUT_S,
    TAGS,
    base_env,
    handoff_for,
    job,
    run_exec,
    run_metadata,
    trained,
)


def test_job_with_its_own_metadata_gets_both_its_keys_and_ours(emu: Emu, tmp_path: Path) -> None:
    source = emu.create_run(checkpoints=2)
    checkpoint = emu.training_checkpoints(source)[-1]
    out = tmp_path / "out.json"
    # The job passes its own keys, one of them clashing with ours: ours win on tinker_recovery.*.
    own = {"renderer_name": "llama3", "wandb_link": "w/1", "tinker_recovery.lineage": "stale"}
    env = base_env(emu, **handoff_for(checkpoint).environment())
    done = run_exec(
        "--", *job(out, "train", "--from", checkpoint, "--metadata", json.dumps(own)), env=env
    )
    assert done.returncode == 0, done.stderr
    metadata = run_metadata(emu, trained(out)["model_id"])
    assert metadata == {"renderer_name": "llama3", "wandb_link": "w/1", **TAGS}


def test_job_that_clears_its_environment_is_still_tagged(emu: Emu, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    env = base_env(emu, **handoff_for("tinker://x/weights/1").environment())
    # A fresh LoRA run with no metadata of its own, and no TINKER_RECOVERY_* left by the time
    # it creates its client: the hook read the attempt at interpreter start-up.
    done = run_exec("--", *job(out, "train", "--scrub-env"), env=env)
    assert done.returncode == 0, done.stderr
    assert run_metadata(emu, trained(out)["model_id"]) == TAGS


def test_without_exec_the_same_job_is_not_tagged(emu: Emu, tmp_path: Path) -> None:
    """The control for the two tests above: the job itself passes nothing of ours on."""
    out = tmp_path / "out.json"
    env = base_env(emu, **handoff_for("tinker://x/weights/1").environment())
    done = subprocess.run(
        job(out, "train", "--metadata", '{"team": "nlp"}'),
        env=env,
        capture_output=True,
        text=True,
        timeout=EXEC_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert run_metadata(emu, trained(out)["model_id"]) == {"team": "nlp"}


def test_async_creators_are_tagged_too(emu: Emu, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    script = (
        "import asyncio, json, sys, warnings, tinker\n"
        "warnings.simplefilter('ignore')\n"
        "async def main():\n"
        "    service = tinker.ServiceClient()\n"
        "    client = await service.create_lora_training_client_async(\n"
        "        'Qwen/Qwen3-8B', 8, None, True, True, True, {'team': 'nlp'})\n"
        "    json.dump({'model_id': client.model_id}, open(sys.argv[1], 'w'))\n"
        "    await service.close('success')\n"
        "asyncio.run(main())\n"
        "import os; os._exit(0)\n"
    )
    env = base_env(emu, **handoff_for("tinker://x/weights/1").environment())
    done = run_exec("--", sys.executable, "-c", script, str(out), env=env)
    assert done.returncode == 0, done.stderr
    assert run_metadata(emu, trained(out)["model_id"]) == {"team": "nlp", **TAGS}


def test_the_jobs_own_sitecustomize_still_runs(emu: Emu, tmp_path: Path) -> None:
    own = tmp_path / "site"
    own.mkdir()
    marker = tmp_path / "marker"
    (own / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    env = base_env(emu, PYTHONPATH=str(own))
    done = run_exec("--", sys.executable, "-c", "import tinker", env=env)
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "ran"


def test_foreground_exec_returns_the_jobs_status(emu: Emu, tmp_path: Path) -> None:
    done = run_exec("--", *job(tmp_path / "out.json", "exit3"), env=base_env(emu))
    assert done.returncode == 3
    killed = run_exec("--", *job(tmp_path / "out.json", "sigkill"), env=base_env(emu))
    assert killed.returncode == 128 + signal.SIGKILL


def test_foreground_exec_forwards_sigterm_to_the_job(emu: Emu, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tinker_recovery", "exec", "--", *job(out, "train-wait")],
        env=base_env(emu),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(out.exists, "the job to train", timeout_s=EXEC_TIMEOUT_S)
        proc.send_signal(signal.SIGTERM)
        # The job's SIGTERM handler ends it cleanly with status 0: it got the signal from exec
        # (it runs in its own process group, so nothing else sent it one).
        assert proc.wait(timeout=EXEC_TIMEOUT_S) == 0
    finally:
        proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
