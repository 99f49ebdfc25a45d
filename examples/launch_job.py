"""Start `train_job.py` in the background and return at once, like `systemctl restart` does.

tinker-recovery's `command` handoff runs this with the `TINKER_RECOVERY_*` environment; the job
inherits it. The job's output goes to `<log-path>/job.log`; its pid to `<log-path>/job.pid`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main() -> int:
    if "--log-path" not in sys.argv:
        print("usage: launch_job.py --log-path DIR [train_job.py args...]", file=sys.stderr)
        return 2
    job_args = sys.argv[1:]
    log_path = Path(job_args[job_args.index("--log-path") + 1])
    log_path.mkdir(parents=True, exist_ok=True)
    script = Path(__file__).with_name("train_job.py")
    with (log_path / "job.log").open("ab") as out:
        child = subprocess.Popen(
            [sys.executable, str(script), *job_args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives this launcher and the daemon's process group
        )
    (log_path / "job.pid").write_text(f"{child.pid}\n")
    print(f"started job pid {child.pid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
