"""Start or restart a `train_job.py` in the background and return at once, like `systemctl`.

    launch_job.py start --jobs-dir DIR --name NAME [--env K=V ...] -- TRAIN_JOB_ARGS...
    launch_job.py restart --jobs-dir DIR --run CORRUPTED_RUN_ID

`start` records the job under DIR/NAME (job.json) and launches it. `restart` is what
tinker-recovery's `command` handoff calls: it finds the job whose run was corrupted (each job
appends its run ids to runs.txt), stops what is left of it and launches it again; the job
inherits the handoff's `TINKER_RECOVERY_*` environment and resumes from that checkpoint.
Output goes to DIR/NAME/job.log, the pid to DIR/NAME/job.pid.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path


def launch(job_dir: Path) -> int:
    spec = json.loads((job_dir / "job.json").read_text())
    env = {**os.environ, **spec["env"]}
    script = Path(__file__).with_name("train_job.py")
    argv = [sys.executable, str(script), "--name", spec["name"], "--log-path", str(job_dir)]
    with (job_dir / "job.log").open("ab") as out:
        child = subprocess.Popen(
            [*argv, *spec["args"]],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # outlives this launcher and the daemon's process group
        )
    (job_dir / "job.pid").write_text(f"{child.pid}\n")
    print(f"started {spec['name']} as pid {child.pid}")
    return 0


def find_job(jobs_dir: Path, run_id: str) -> Path | None:
    for runs in sorted(jobs_dir.glob("*/runs.txt")):
        if run_id in runs.read_text().split():
            return runs.parent
    return None


def stop_previous(job_dir: Path) -> None:
    pid_file = job_dir / "job.pid"
    if not pid_file.exists():
        return
    with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
        os.kill(int(pid_file.read_text()), signal.SIGTERM)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    start = sub.add_parser("start")
    start.add_argument("--jobs-dir", type=Path, required=True)
    start.add_argument("--name", required=True)
    start.add_argument("--env", action="append", default=[], metavar="K=V")
    start.add_argument("job_args", nargs=argparse.REMAINDER)
    restart = sub.add_parser("restart")
    restart.add_argument("--jobs-dir", type=Path, required=True)
    restart.add_argument("--run", required=True)
    args = parser.parse_args()

    if args.mode == "start":
        job_dir = args.jobs_dir / args.name
        job_dir.mkdir(parents=True, exist_ok=True)
        job_args = [a for a in args.job_args if a != "--"]
        env = dict(item.split("=", 1) for item in args.env)
        spec = {"name": args.name, "args": job_args, "env": env}
        (job_dir / "job.json").write_text(json.dumps(spec))
        return launch(job_dir)
    found = find_job(args.jobs_dir, args.run)
    if found is None:
        print(f"no job under {args.jobs_dir} ran {args.run}", file=sys.stderr)
        return 3
    stop_previous(found)
    return launch(found)


if __name__ == "__main__":
    raise SystemExit(main())
