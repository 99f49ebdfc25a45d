"""Fixtures for running the real tinker-cookbook 0.6.1 against the emulator.

How it fits together:
- tinker-cookbook (and torch) live in .venv-cookbook, built by `make cookbook` (a dependency
  of `make typecheck` and `make unit`; see tools/install-cookbook.sh for the --no-deps
  install). The tests run in .venv and never import the cookbook; the jobs run as child
  processes under `harness.cookbook_python()`.
- `sl_job.py`: `tinker_cookbook.supervised.train.main`, unmodified, on hand-made token ids
  with a tiny registered tokenizer. Options `--log-path`, `--batches`, `--save-every`,
  `--rolling-save-every`, `--hold-at-batch N` (block for good when batch N is asked for, so
  a test can corrupt or kill the job at a known point). It writes
  `<log_path>/checkpoints.jsonl` and, re-run with the same `--log-path`, resumes through the
  cookbook's own resume path as a new run. Stdout carries `SLJOB {"event": ...}` lines:
  `start`, `batch` (with `batch`), `hold`, `done`.
- `rl_sample_job.py`: the RL sampling path (the cookbook's TinkerTokenCompleter on both
  kinds of sampling client, then one importance-sampling step); `RLJOB {...}` lines.

Entry points for other tests (import from `cookbook.harness`, fixtures below):
- `cookbook_emulator` fixture: an `EmulatorServer` on 127.0.0.1 (no fleet runs, so every run
  is one a job made); `.emulator` is the in-process state (runs, sessions, request counts).
- `cookbook_env` fixture: `job_env(base_url, api_key)` for that emulator, the environment a
  job (or a daemon's `command` handoff) needs: TINKER_* pointing at the emulator, telemetry
  off, HF offline, outbound HTTP(S) to a closed 127.0.0.1 proxy.
- `start_job` fixture: `start_job(argv, env=None) -> JobProc`, killed at teardown if alive.
  `JobProc.wait_event(name)`, `.wait()`, `.kill()` (SIGKILL of its process group), `.tail()`.
- `harness.sl_job_command(log_path, batches=, save_every=, hold_at_batch=,
  rolling_save_every=, extra=)`: the job's argv, usable as a daemon `command` handoff.
- `harness.read_records(log_path)`: checkpoints.jsonl as dicts; `harness.run_id_of(path)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cookbook.harness import JobProc, cookbook_python, job_env
from tinker_recovery.emulator import EmulatorConfig, EmulatorServer

COOKBOOK_KEY = "tml-cookbook-job-key"

StartJob = Callable[..., JobProc]


@pytest.fixture(scope="session")
def cookbook_interpreter() -> Path:
    """The cookbook venv's python; fails (does not skip) when it is missing."""
    try:
        return cookbook_python()
    except FileNotFoundError as exc:
        pytest.fail(str(exc))


@pytest.fixture
def cookbook_emulator() -> Iterator[EmulatorServer]:
    with EmulatorServer(EmulatorConfig(runs=0, seed=5)) as server:
        yield server


@pytest.fixture
def cookbook_env(cookbook_emulator: EmulatorServer) -> dict[str, str]:
    return job_env(cookbook_emulator.base_url, COOKBOOK_KEY)


@pytest.fixture
def start_job(cookbook_interpreter: Path, cookbook_env: dict[str, str]) -> Iterator[StartJob]:
    started: list[JobProc] = []

    def start(argv: list[str], env: dict[str, str] | None = None) -> JobProc:
        job = JobProc(argv, env if env is not None else cookbook_env)
        started.append(job)
        return job

    yield start
    for job in started:
        job.kill()
