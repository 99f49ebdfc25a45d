"""Failover figures for issue 6: SIGKILL the leading daemon mid-attempt, time the standby.

Two `tinker-recovery run` replicas share one PostgreSQL schema and the emulator. Each trial
corrupts a fresh run, waits until the leader has launched its handoff job (the job then takes
0.5 s before it creates the successor), SIGKILLs the leader and reads the new leader's JSON log:

- failover = kill -> the new leader's first completed poll cycle (`poll_cycle`, logged at debug
  level after the cycle's listing, the takeover reconcile, confirmation and decisions): the first
  moment the new leader has acted on the fleet;
- also reported: kill -> `leadership_gained` (the lease changed hands).

The killed replica is restarted as a standby before the next trial. At the end every corrupted
run must be recovered; duplicates are idempotency keys handed off more than once plus corrupted
runs with more than one handoff or more than one successor in the emulator.

    cd tests && ../.venv/bin/python -m ha.measure_failover --trials 20

`test_measure_failover.py` runs three trials in `make test` and asserts no duplicates.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from e2e.harness import emulator, wait_until
from ha.cluster import LEASE_TTL_S, RENEW_S, Cluster, cluster

HANDOFF_DELAY_S = 0.5


@dataclass
class Figures:
    failover_s: list[float] = field(default_factory=list)  # kill -> first poll as leader
    lease_s: list[float] = field(default_factory=list)  # kill -> leadership_gained
    duplicates: int = 0
    handoffs: int = 0
    corrupted: int = 0

    def summary(self) -> str:
        def stats(values: list[float]) -> str:
            return (
                f"median {statistics.median(values):.2f} s, min {min(values):.2f} s,"
                f" max {max(values):.2f} s"
            )

        return (
            f"{len(self.failover_s)} trials, lease_ttl {LEASE_TTL_S:g} s,"
            f" lease_renew_interval {RENEW_S:g} s\n"
            f"  kill -> first poll cycle by the new leader: {stats(self.failover_s)}\n"
            f"  kill -> leadership_gained:                  {stats(self.lease_s)}\n"
            f"  corrupted runs {self.corrupted}, handoffs {self.handoffs},"
            f" duplicate handoffs {self.duplicates}"
        )


def _at(event: dict[str, object]) -> float:
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


def _first_after(ha: Cluster, name: str, event: str, after: float) -> float:
    def find() -> float | None:
        times = [_at(e) for e in ha.replicas[name].events(event) if _at(e) > after]
        return min(times) if times else None

    found: float = wait_until(find, f"{name}'s first {event} after the kill", 20, ha.tails())
    return found


def trial(ha: Cluster, leader: str, figures: Figures) -> str:
    """One kill of `leader` in the middle of an attempt; returns the new leader."""
    run_id = ha.corrupt_new_run()
    ha.replicas[leader].wait_polls(1)  # seen healthy first, so its corruption is news
    ha.corrupt(run_id)
    wait_until(
        lambda: any(row["run"] == run_id for row in ha.begun()),
        f"{leader} to launch the handoff for {run_id}",
        20,
        ha.tails(),
    )
    killed_at = ha.kill(leader)
    new = ha.wait_leader(not_=leader)
    figures.failover_s.append(_first_after(ha, new, "poll_cycle", killed_at) - killed_at)
    figures.lease_s.append(_first_after(ha, new, "leadership_gained", killed_at) - killed_at)
    ha.start(leader)  # back as a standby for the next trial
    return new


def measure(trials: int, workdir: Path) -> Figures:
    figures = Figures()
    knobs = {"handoff_delay_s": HANDOFF_DELAY_S, "debug": True}
    with emulator() as emu, cluster(emu, workdir, **knobs) as ha:
        ha.start("a")
        leader = ha.wait_leader()
        ha.start("b")
        for number in range(trials):
            leader = trial(ha, leader, figures)
            sys.stderr.write(
                f"trial {number + 1}/{trials}: {figures.failover_s[-1]:.2f} s"
                f" (lease {figures.lease_s[-1]:.2f} s)\n"
            )
        ha.wait_recovered(60)
        ha.replicas[ha.wait_leader()].wait_polls(2)  # a duplicate would have started by now
        begun = ha.begun()
        keys = Counter(row["key"] for row in begun)
        runs = Counter(row["run"] for row in begun)
        emulated = ha.emu.all_runs()
        successors = Counter(r.get("recovered_from") for r in emulated if r.get("recovered_from"))
        figures.handoffs = len(begun)
        figures.corrupted = len(ha.corrupted)
        figures.duplicates = (
            sum(n - 1 for n in keys.values())
            + sum(max(runs[r] - 1, 0) for r in ha.corrupted)
            + sum(max(successors[r] - 1, 0) for r in ha.corrupted)
        )
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ha-failover-") as tmp:
        figures = measure(args.trials, Path(tmp))
    print(figures.summary())  # noqa: T201 - the figures are this script's output
    print(f"  wall {time.monotonic() - started:.0f} s")  # noqa: T201 - as above
    return 1 if figures.duplicates else 0


if __name__ == "__main__":
    raise SystemExit(main())
