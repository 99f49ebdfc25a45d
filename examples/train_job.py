"""A training job written the way a tinker-cookbook script is, for the demo and for rehearsals.

It drives one run through the official SDK and keeps a cookbook-style `checkpoints.jsonl`:
- restarted by tinker-recovery, it resumes from `TINKER_RECOVERY_CHECKPOINT` with its optimizer
  state and passes `TINKER_RECOVERY_USER_METADATA` on, so the daemon can find the successor run;
- restarted by hand, it resumes from the last `state_path` in its own log, as the cookbook does;
- first start: from `--init-checkpoint`.
The "training step" is a sleep (the emulator does no maths); every `--save-every` steps it calls
`save_state`, which is what makes a run's progress visible. When its run is corrupted, the
service fails its requests and the job exits 1, as a real one would.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

import tinker


def last_state_path(log_path: Path) -> dict[str, Any] | None:
    """The last record of checkpoints.jsonl that has a state_path (cookbook's rule)."""
    records = log_path / "checkpoints.jsonl"
    if not records.exists():
        return None
    last = None
    for line in records.read_text().splitlines():
        record = json.loads(line)
        if "state_path" in record:
            last = record
    return last


def start_client(
    service: tinker.ServiceClient, args: argparse.Namespace
) -> tuple[tinker.TrainingClient, int]:
    """Pick where to resume from and create the training client; returns it and the next step."""
    recovery_path = os.environ.get("TINKER_RECOVERY_CHECKPOINT")
    metadata = json.loads(os.environ.get("TINKER_RECOVERY_USER_METADATA") or "{}")
    metadata.setdefault("job", args.name)
    record = last_state_path(args.log_path)
    step = int(record["batch"]) if record else 0
    path = recovery_path or (record["state_path"] if record else args.init_checkpoint)
    if recovery_path and record and record["state_path"] != recovery_path:
        # The daemon chose an older checkpoint than our log's last one (the newest was bad):
        # continue from the step that checkpoint recorded, if we know it.
        step = _step_of(args.log_path, recovery_path, default=step)
    restore_optimizer = os.environ.get("TINKER_RECOVERY_RESTORE_OPTIMIZER", "1") == "1"
    if restore_optimizer:
        client = service.create_training_client_from_state_with_optimizer(
            path, user_metadata=metadata
        ).result()
    else:
        client = service.create_training_client_from_state(path, user_metadata=metadata).result()
    with (args.log_path / "runs.txt").open("a") as runs:
        runs.write(f"{client.model_id}\n")  # lets a launcher find the job by its run id
    print(f"[{args.name}] resumed from {path} at step {step} as {client.model_id}", flush=True)
    return client, step


def _step_of(log_path: Path, state_path: str, *, default: int) -> int:
    # A copy tinker-recovery proved by restoring it is named "<source name>-recovery-<n>".
    name = state_path.rsplit("/", 1)[-1].split("-recovery-")[0]
    if name.isdigit():
        return int(name)
    for line in (log_path / "checkpoints.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("state_path") == state_path:
            return int(record["batch"])
    return default


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--log-path", type=Path, required=True)
    parser.add_argument("--init-checkpoint", required=True)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--step-seconds", type=float, default=0.5)
    args = parser.parse_args()
    args.log_path.mkdir(parents=True, exist_ok=True)
    service = tinker.ServiceClient()
    client, step = start_client(service, args)
    try:
        while step < args.steps:
            time.sleep(args.step_seconds)  # one "training step"
            step += 1
            if step % args.save_every == 0:
                saved = client.save_state(f"{step:06d}").result()
                with (args.log_path / "checkpoints.jsonl").open("a") as out:
                    out.write(
                        json.dumps({"name": f"{step:06d}", "batch": step, "state_path": saved.path})
                        + "\n"
                    )
    except tinker.TinkerError as exc:
        print(f"[{args.name}] training failed at step {step}: {exc}", file=sys.stderr, flush=True)
        finish(service, "errored")
        return 1
    finish(service, "success")
    return 0


def finish(service: tinker.ServiceClient, status: Literal["success", "errored"]) -> None:
    """End the session and wait for it: `close` returns a future. Leaving with the SDK's
    requests still in flight can abort the interpreter at exit (SIGABRT from its Rust HTTP
    transport), which a supervisor reads as a crash after all the work was done."""
    try:
        service.close(status).result(timeout=30)
    except (tinker.TinkerError, TimeoutError) as exc:
        print(f"closing the session failed: {exc}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    exit_code = main()
    # Leave without interpreter finalisation: on Python 3.11 a thread of the SDK's Rust HTTP
    # transport that is still handing over the last response when the interpreter shuts down
    # aborts the process (SIGABRT), even after close() was waited for, and a supervisor would
    # see a crash. Everything is written and the session closed by now; flush and go.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
