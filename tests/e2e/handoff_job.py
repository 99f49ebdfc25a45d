"""The `command` handoff of the end-to-end tests: log the call, and act like a job if asked.

    handoff_job.py LOG_PATH MODE [ARGS...]

Appends one JSON line to LOG_PATH (time, mode, argv, every TINKER_RECOVERY_* variable). MODE
`job` first resumes from TINKER_RECOVERY_CHECKPOINT with the official SDK, passing
TINKER_RECOVERY_USER_METADATA, saves state once and closes, the way a training job restarts;
`log` only records; `fail` records and exits 1; `crash` does what `job` does, then dies of
SIGABRT, the way an SDK script on Python 3.11 can at interpreter exit.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any


def main() -> int:
    log_path, mode = sys.argv[1], sys.argv[2]
    row: dict[str, Any] = {"time": time.time(), "mode": mode, "argv": sys.argv[3:]}
    row.update({k: v for k, v in os.environ.items() if k.startswith("TINKER_RECOVERY_")})
    if mode in ("job", "crash"):
        import tinker  # only the job mode pays for the SDK import

        service = tinker.ServiceClient()
        client = service.create_training_client_from_state_with_optimizer(
            os.environ["TINKER_RECOVERY_CHECKPOINT"],
            user_metadata=json.loads(os.environ["TINKER_RECOVERY_USER_METADATA"]),
        ).result()
        row["successor"] = client.model_id
        row["saved"] = client.save_state("e2e-resumed").result().path
        service.close("success").result()
    with open(log_path, "a") as out:
        out.write(json.dumps(row) + "\n")
    if mode == "crash":
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGABRT)
    return 1 if mode == "fail" else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    # os._exit: the SDK's threads now and then abort the interpreter's finalisation (SIGABRT
    # after all the work is done), which the daemon would read as a failed handoff.
    os._exit(code)
