"""Explore the exactly-once protocol for a long budget and print what was covered.

Runs the rule-based state machine of tests/shell/executor/test_protocol_state_machine.py (two
replicas, one SQLite file, the real Poller/Executor/LeaderGuard, gated attempt steps, lease
lapses and regains, crashes, failed writes, failing handoffs, time jumps) with random seeds and
prints the interleavings (examples) and steps explored, how each kind of step was exercised, and
the number of violations found (0 expected). Exit status 1 if any invariant broke.

    .venv/bin/python benchmarks/explore_protocol.py --examples 2000 --steps 60
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import structlog

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "shell" / "executor"))

import test_protocol_state_machine as machine  # noqa: E402  (the test module is the model)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000, help="interleavings to try")
    parser.add_argument("--steps", type=int, default=50, help="most steps per interleaving")
    args = parser.parse_args()
    # The daemon logs every step; at this volume that is all the run would do.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))

    began = time.monotonic()
    violations = 0
    failure = ""
    try:
        machine.explore(args.examples, args.steps, derandomize=False)
    except Exception as exc:  # noqa: BLE001 - a falsified invariant: report it, do not crash
        violations = 1
        failure = f"{type(exc).__name__}: {exc}"
    elapsed = time.monotonic() - began

    stats = machine.STATS
    print(
        f"interleavings explored: {stats.examples} (budget {args.examples}, <= {args.steps} steps)"
    )
    print(f"steps executed:         {stats.steps}")
    print(f"handoffs:               {stats.handoffs}")
    print(f"leader cycles (full):   {stats.leader_cycles}")
    print(f"lease lapses/takeovers: {stats.takeovers}")
    print(f"regains, tasks running: {stats.regains_with_tasks}")
    print(f"crashes + restarts:     {stats.crashes}")
    print(f"injected write failures:{stats.failed_writes:>6}")
    print(
        "steps by kind:          " + ", ".join(f"{k}={v}" for k, v in sorted(stats.rules.items()))
    )
    print(f"violations:             {violations}")
    if failure:
        print(failure)
    print(f"elapsed:                {elapsed:.1f}s")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
