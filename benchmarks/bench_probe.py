"""The benchmark's handoff: record when the daemon handed off, and for which attempt.

Appends one JSON line (wall time, idempotency key, corrupted run) to $BENCH_PROBE_FILE and
exits 0. It does nothing else, so the time it records is the time the handoff reached the job.
"""

from __future__ import annotations

import json
import os
import time


def main() -> None:
    line = {
        "time": time.time(),
        "idempotency_key": os.environ.get("TINKER_RECOVERY_IDEMPOTENCY_KEY"),
        "corrupted_run": os.environ.get("TINKER_RECOVERY_CORRUPTED_RUN"),
    }
    with open(os.environ["BENCH_PROBE_FILE"], "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
