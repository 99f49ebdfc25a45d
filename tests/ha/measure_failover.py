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

`--lease-flap` (issue 9) freezes the leader instead (SIGSTOP) while an attempt of its is in
flight, for longer than the lease TTL, alternating two moments: during a slow checkpoint
validation (`weights_info` delayed by the emulator: before the handoff) and during its handoff
job's start-up delay (after it). The standby takes the lease and settles the attempt (abandons
and redoes it, or confirms the job's successor); then the frozen replica is resumed (SIGCONT)
with its tasks still running, and later regains the lease when the other one stops (SIGTERM).
The same duplicate count applies: it must stay 0.

    cd tests && ../.venv/bin/python -m ha.measure_failover --trials 20
    cd tests && ../.venv/bin/python -m ha.measure_failover --lease-flap --trials 20

`test_measure_failover.py` runs a few trials of each in `make test` and asserts no duplicates.
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
# Lease flap: a freeze longer than the TTL, and a validation slow enough to be frozen in.
FREEZE_S = LEASE_TTL_S * 2 + 1.0
SLOW_VALIDATION_S = 2.0
# Log events by which a replica's work from a lapsed term ends without acting.
OLD_EPOCH_EVENTS = (
    "leadership_lost",
    "handoff_withheld",
    "stale_attempts_cancelled",
    "attempt_crashed",
    "attempt_finish_failed",
    "attempts_cancelled",
)


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
        count_handoffs(ha, figures)
    return figures


def count_handoffs(ha: Cluster, figures: Figures) -> None:
    """Once every corrupted run recovered (and a duplicate would have begun): handoffs and
    duplicates, per the job's log and per the emulator's successor runs."""
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


@dataclass
class FlapFigures:
    takeover_s: list[float] = field(default_factory=list)  # freeze -> standby leads
    lost_s: list[float] = field(default_factory=list)  # thaw -> thawed replica is a standby
    regain_s: list[float] = field(default_factory=list)  # other stopped -> thawed one leads
    phases: Counter[str] = field(default_factory=Counter)
    # What became of the thawed replicas' old-epoch work, from their logs (event -> count).
    stopped: Counter[str] = field(default_factory=Counter)
    counts: Figures = field(default_factory=Figures)

    def summary(self) -> str:
        def stats(values: list[float]) -> str:
            return (
                f"median {statistics.median(values):.2f} s, min {min(values):.2f} s,"
                f" max {max(values):.2f} s"
            )

        c = self.counts
        stopped = ", ".join(f"{k} {v}" for k, v in sorted(self.stopped.items()))
        phases = ", ".join(f"{k} {v}" for k, v in sorted(self.phases.items()))
        return (
            f"{len(self.takeover_s)} lease-flap trials ({phases}), lease_ttl {LEASE_TTL_S:g} s,"
            f" frozen {FREEZE_S:g} s\n"
            f"  freeze -> the standby leads:                 {stats(self.takeover_s)}\n"
            f"  thaw -> the thawed replica is a standby:     {stats(self.lost_s)}\n"
            f"  other stopped -> the thawed replica leads:   {stats(self.regain_s)}\n"
            f"  old-epoch work stopped: {stopped or 'nothing logged'}\n"
            f"  corrupted runs {c.corrupted}, handoffs {c.handoffs},"
            f" duplicate handoffs {c.duplicates}"
        )


def _healthy(ha: Cluster, run_id: str) -> bool:
    lineage = ha.lineage(run_id)
    return lineage is not None and lineage.state.value == "healthy"


def flap_trial(ha: Cluster, leader: str, standby: str, phase: str, figures: FlapFigures) -> None:
    """Freeze `leader` mid-attempt past the TTL, let `standby` settle it, thaw `leader` with its
    tasks still running, then stop `standby` so that `leader` regains the lease."""
    run_id = ha.corrupt_new_run()
    ha.replicas[leader].wait_polls(1)  # seen healthy first, so its corruption is news
    validations = ha.emu.count("weights_info")
    if phase == "validating":
        ha.emu.add_fault(
            kind="latency", endpoints=["weights_info"], latency_s=SLOW_VALIDATION_S, times=1
        )
    ha.corrupt(run_id)
    if phase == "validating":
        in_flight = lambda: ha.emu.count("weights_info") > validations  # noqa: E731
    else:
        in_flight = lambda: any(row["run"] == run_id for row in ha.begun())  # noqa: E731
    wait_until(in_flight, f"{leader}'s attempt for {run_id} to be {phase}", 20, ha.tails())
    frozen_at = ha.freeze(leader)
    ha.wait_role(standby, "leader")
    figures.takeover_s.append(time.time() - frozen_at)
    # The standby settles the attempt: the run recovers while the old leader is still frozen.
    wait_until(lambda: _healthy(ha, run_id), f"{standby} to recover {run_id}", 30, ha.tails())
    remaining = FREEZE_S - (time.time() - frozen_at)
    if remaining > 0:
        time.sleep(remaining)  # a frozen process: only wall time passes
    thawed_at = ha.thaw(leader)
    # The thawed replica must stop acting as leader (its /status role); whether its guard also
    # logged `leadership_lost` is counted separately.
    ha.wait_role(leader, "standby")
    figures.lost_s.append(time.time() - thawed_at)
    ha.replicas[standby].wait_polls(1)  # the thawed replica's tasks have had their chance
    stopped_at = time.time()
    ha.replicas[standby].stop()
    ha.wait_role(leader, "leader")
    figures.regain_s.append(time.time() - stopped_at)
    ha.replicas[leader].wait_polls(2)  # it reconciled under its new epoch and looked again
    ha.start(standby)  # back as a standby for the next trial
    figures.phases[phase] += 1


def measure_flap(trials: int, workdir: Path) -> FlapFigures:
    figures = FlapFigures()
    knobs = {"handoff_delay_s": HANDOFF_DELAY_S, "debug": True}
    with emulator() as emu, cluster(emu, workdir, **knobs) as ha:
        ha.start("a")
        leader = ha.wait_leader()
        ha.start("b")
        for number in range(trials):
            standby = "b" if leader == "a" else "a"
            phase = ("validating", "handing_off")[number % 2]
            flap_trial(ha, leader, standby, phase, figures)
            sys.stderr.write(
                f"flap {number + 1}/{trials} ({phase}): takeover {figures.takeover_s[-1]:.2f} s,"
                f" regain {figures.regain_s[-1]:.2f} s\n"
            )
        for replica in ha.replicas.values():
            for event in OLD_EPOCH_EVENTS:
                figures.stopped[event] += len(replica.events(event))
        count_handoffs(ha, figures.counts)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument(
        "--lease-flap",
        action="store_true",
        help="freeze the leader mid-attempt past the TTL, resume it, let it regain the lease",
    )
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ha-failover-") as tmp:
        if args.lease_flap:
            flap = measure_flap(args.trials, Path(tmp))
            summary, duplicates = flap.summary(), flap.counts.duplicates
        else:
            figures = measure(args.trials, Path(tmp))
            summary, duplicates = figures.summary(), figures.duplicates
    print(summary)  # noqa: T201 - the figures are this script's output
    print(f"  wall {time.monotonic() - started:.0f} s")  # noqa: T201 - as above
    return 1 if duplicates else 0


if __name__ == "__main__":
    raise SystemExit(main())
