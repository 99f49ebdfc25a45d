"""What the benchmark measures: the daemon's watch loop, detection latency, idle cost, baseline.

Each function drives processes from bench_procs.py and returns plain JSON-able dicts; nothing
here formats a report. Cycle boundaries come from the daemon's own `poll_cycle` log line
(written after every cycle, debug level): right after it, the daemon sleeps until the next
interval, so the emulator's request counters and /proc CPU time read then belong to exactly one
cycle each.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import bench_procs as procs

Figures = dict[str, Any]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(values: list[float], q: int) -> float:
    """Inclusive percentile (q in 1..99) of a small sample; nan when empty."""
    if len(values) < 2:
        return values[0] if values else math.nan
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _total(counts: dict[str, int]) -> int:
    return sum(counts.values())


def _at(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


def measure_watch(
    emu: procs.Emulator,
    *,
    workdir: Path,
    name: str,
    interval_s: float,
    cycles: int,
    corruptions: int = 0,
    rng: random.Random | None = None,
    gc_tuned: bool = False,
) -> Figures:
    """One daemon process: `cycles` steady cycles, then (optionally) detection latency."""
    probe = workdir / f"{name}.probe.jsonl"
    config = procs.daemon_config(
        base_url=emu.base_url, workdir=workdir, name=name, interval_s=interval_s, probe_file=probe
    )
    daemon = procs.Daemon(config=config, workdir=workdir, name=name, gc_tuned=gc_tuned)
    wait_s = interval_s * 3 + 120
    figures: Figures = {
        "n": emu.runs,
        "interval_s": interval_s,
        "command": daemon.command,
        "config": config,
        "gc_tuned": gc_tuned,
    }
    try:
        for _ in range(2):  # warm-up: the first cycles render cold pages and create the store
            daemon.wait_event("poll_cycle", wait_s)
        counts, cpu, emu_cpu = emu.requests(), daemon.cpu_s(), emu.cpu_s()
        per_cycle: list[dict[str, float]] = []
        for _ in range(cycles):
            line = daemon.wait_event("poll_cycle", wait_s)
            now_counts, now_cpu, now_emu_cpu = emu.requests(), daemon.cpu_s(), emu.cpu_s()
            per_cycle.append(
                {
                    "requests": _total(now_counts) - _total(counts),
                    "list_requests": now_counts.get("list_training_runs", 0)
                    - counts.get("list_training_runs", 0),
                    "wall_s": float(line["duration_s"]),
                    "cpu_s": now_cpu - cpu,
                    "emulator_cpu_s": now_emu_cpu - emu_cpu,
                }
            )
            counts, cpu, emu_cpu = now_counts, now_cpu, now_emu_cpu
        figures["cycles"] = per_cycle
        figures["requests_per_cycle"] = [c["requests"] for c in per_cycle]
        figures["wall_s_median"] = median([c["wall_s"] for c in per_cycle])
        figures["wall_s_max"] = max(c["wall_s"] for c in per_cycle)
        # /proc has 10 ms resolution: the mean over the window is the figure, as specified.
        figures["cpu_s_per_cycle"] = sum(c["cpu_s"] for c in per_cycle) / cycles
        figures["emulator_cpu_s_per_cycle"] = sum(c["emulator_cpu_s"] for c in per_cycle) / cycles
        if corruptions:
            figures["detection"] = _detection(emu, daemon, probe, corruptions, rng, interval_s)
    finally:
        figures["peak_rss_mb"] = daemon.stop()
    return figures


@dataclass
class _Sightings:
    """When the daemon first logged each run as suspect and as confirmed, and when the probe
    handoff ran for it (all wall-clock seconds)."""

    daemon: procs.Daemon
    probe: Path
    suspect_at: dict[str, float] = field(default_factory=dict)
    confirm_at: dict[str, float] = field(default_factory=dict)
    handed_at: dict[str, float] = field(default_factory=dict)

    def collect(self) -> None:
        for event in self.daemon.tail.read():
            if event.get("event") != "lineage_transition":
                continue
            run_id, decision = str(event.get("run_id")), event.get("decision")
            if decision == "suspect":
                self.suspect_at.setdefault(run_id, _at(event))
            elif decision in ("confirm", "recover"):  # "recover" = confirmed + attempt started
                self.confirm_at.setdefault(run_id, _at(event))

    def collect_handoffs(self) -> None:
        if self.probe.exists():
            for line in self.probe.read_text().splitlines():
                row = json.loads(line)
                self.handed_at.setdefault(str(row["corrupted_run"]), float(row["time"]))


def _detection(
    emu: procs.Emulator,
    daemon: procs.Daemon,
    probe: Path,
    corruptions: int,
    rng: random.Random | None,
    interval_s: float,
) -> Figures:
    """Corrupt runs one at a time at a random phase of the poll interval; time each suspect
    event (first read of corrupted=true) and each confirm -> handoff."""
    rng = rng or random.Random(7)
    victims = emu.driven_runs(corruptions)
    if len(victims) < corruptions:
        raise RuntimeError(f"only {len(victims)} driven runs to corrupt, wanted {corruptions}")
    seen = _Sightings(daemon, probe)
    corrupted_at: dict[str, float] = {}
    for run_id in victims:
        time.sleep(rng.uniform(0.0, interval_s))  # a random phase against the poll clock
        seen.collect()
        corrupted_at[run_id] = time.time()  # taken before the call: latency is not flattered
        emu.corrupt(run_id)
        deadline = time.monotonic() + interval_s * 3 + 30
        while run_id not in seen.suspect_at and time.monotonic() < deadline:
            time.sleep(0.01)
            seen.collect()
    deadline = time.monotonic() + interval_s * 4 + 30
    while time.monotonic() < deadline and len(seen.handed_at) < len(victims):
        time.sleep(0.1)
        seen.collect()
        seen.collect_handoffs()
    first = min(corrupted_at.values())
    # Attempts run alongside the poll loop (store writes, the handoff's fork/exec): the cycles
    # of this phase are slower than the steady ones, and the report shows by how much.
    busy_cycles = [
        float(e["duration_s"])
        for e in daemon.tail.seen
        if e.get("event") == "poll_cycle" and _at(e) >= first
    ]
    latency = [seen.suspect_at[r] - corrupted_at[r] for r in victims if r in seen.suspect_at]
    handoff = [
        seen.handed_at[r] - seen.confirm_at[r]
        for r in victims
        if r in seen.handed_at and r in seen.confirm_at
    ]
    return {
        "corruptions": len(victims),
        "detected": len(latency),
        "handed_off": len(handoff),
        "latency_s": latency,
        "latency_p50_s": percentile(latency, 50),
        "latency_p99_s": percentile(latency, 99),
        "confirm_to_handoff_s": handoff,
        "confirm_to_handoff_p50_s": percentile(handoff, 50),
        "confirm_to_handoff_p99_s": percentile(handoff, 99),
        "cycle_wall_s_median": median(busy_cycles),
        "cycle_wall_s_max": max(busy_cycles, default=math.nan),
    }


def measure_idle(
    emu: procs.Emulator, *, workdir: Path, interval_s: float, idle_s: float
) -> Figures:
    """CPU share of one core over `idle_s`, after the first cycle (start-up excluded)."""
    config = procs.daemon_config(
        base_url=emu.base_url,
        workdir=workdir,
        name="idle",
        interval_s=interval_s,
        probe_file=workdir / "idle.probe.jsonl",
    )
    daemon = procs.Daemon(config=config, workdir=workdir, name="idle")
    try:
        daemon.wait_event("poll_cycle", interval_s + 120)
        cpu0, wall0 = daemon.cpu_s(), time.monotonic()
        time.sleep(idle_s)
        cpu, wall = daemon.cpu_s() - cpu0, time.monotonic() - wall0
    finally:
        rss = daemon.stop()
    cycles = sum(1 for e in daemon.tail.seen if e.get("event") == "poll_cycle")
    return {
        "n": emu.runs,
        "interval_s": interval_s,
        "wall_s": wall,
        "cpu_s": cpu,
        "cpu_share": cpu / wall,
        "cycles_seen": cycles,
        "peak_rss_mb": rss,
        "command": daemon.command,
    }


def measure_baseline(
    emu: procs.Emulator, *, workdir: Path, cycles: int, sample: int, concurrency: int
) -> Figures:
    """The per-run SDK watcher in its own process; figures are per full cycle of N runs
    (scaled from the sample when `sample` < N, and marked so)."""
    time_path = workdir / f"baseline-{emu.runs}.time.txt"
    command = [
        "/usr/bin/time",
        "-v",
        "-o",
        str(time_path),
        sys.executable,
        str(Path(__file__).with_name("bench_baseline.py")),
        "--base-url",
        emu.base_url,
        "--cycles",
        str(cycles),
        "--concurrency",
        str(concurrency),
        "--sample",
        str(sample if 0 < sample < emu.runs else 0),
    ]
    proc = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=(workdir / f"baseline-{emu.runs}.log").open("wb"),
        text=True,
        env={**os.environ, "TINKER_TELEMETRY": "0"},
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    ready = json.loads(proc.stdout.readline() or "{}")
    if ready.get("event") != "ready":
        proc.kill()
        raise RuntimeError(f"the baseline did not start; see {workdir}/baseline-{emu.runs}.log")
    emu.reset_requests()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    rows = [json.loads(line) for line in proc.stdout if line.startswith("{")]
    proc.wait(60)
    counts = emu.requests()
    polled = int(ready["polled"])
    scale = emu.runs / polled
    per_cycle = [r for r in rows if r.get("event") == "cycle"]
    return {
        "n": emu.runs,
        "polled_per_cycle": polled,
        "extrapolated": polled < emu.runs,
        "cycles": per_cycle,
        "requests_per_cycle_measured": _total(counts) / max(1, len(per_cycle)),
        "requests_per_cycle": _total(counts) / max(1, len(per_cycle)) * scale,
        "wall_s_median": median([r["wall_s"] * scale for r in per_cycle]),
        "cpu_s_per_cycle": median([r["cpu_s"] * scale for r in per_cycle]),
        "peak_rss_mb": procs.peak_rss_mb(time_path),
        "command": command,
    }
