"""`make bench`: the daemon's watch loop against a per-run SDK watcher, 1,000 to 100,000 runs.

For every fleet size: the emulator in its own process, the daemon (repeated runs, each a fresh
process and store), then the baseline watcher against the same emulator; detection latency at a
1 s interval for the sizes in --detect-sizes; idle cost last. Writes the raw figures as JSON
and the report as Markdown (bench_report.py). See docs/performance.md for how to read it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_procs as procs
import bench_report as report
import bench_scenarios as scenarios


def _sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _interval(n: int, table: str) -> float:
    steps = sorted((int(k), float(v)) for k, v in (x.split(":") for x in table.split(",")))
    return next((seconds for size, seconds in steps if n <= size), steps[-1][1])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/RESULTS.md"))
    parser.add_argument("--json", type=Path, help="raw figures (default: --out with .json)")
    parser.add_argument("--workdir", type=Path, help="logs, configs, stores (default: a temp dir)")
    parser.add_argument("--sizes", type=_sizes, default=[1000, 10000, 100000])
    parser.add_argument("--repeats", type=int, default=3, help="daemon runs per size")
    parser.add_argument("--cycles", type=int, default=8, help="measured cycles per daemon run")
    parser.add_argument(
        "--intervals",
        default="1000:1,10000:2,100000:5",
        help="watch-loop poll interval per size, N:seconds; a size uses the first entry >= N. "
        "Each must exceed the cycle wall: an overrunning cycle starts the next at once, and its "
        "requests could no longer be told apart",
    )
    parser.add_argument("--detect-interval", type=float, default=1.0)
    parser.add_argument("--detect-sizes", type=_sizes, default=[1000, 10000])
    parser.add_argument(
        "--gc-sizes",
        type=_sizes,
        default=[10000, 100000],
        help="sizes that also get one daemon run with the GC tuning proposed for app.py",
    )
    parser.add_argument("--corruptions", type=int, default=50)
    parser.add_argument("--baseline-cycles", type=int, default=2)
    parser.add_argument(
        "--baseline-sample",
        type=int,
        default=10000,
        help="above this N the baseline polls only this many runs per cycle and is scaled",
    )
    parser.add_argument("--baseline-sizes", type=_sizes, help="default: every size")
    parser.add_argument("--concurrency", type=int, default=8, help="baseline requests in flight")
    parser.add_argument("--idle-runs", type=int, default=1000)
    parser.add_argument("--idle-interval", type=float, default=30.0)
    parser.add_argument("--idle-seconds", type=float, default=180.0, help="0 skips idle")
    parser.add_argument("--seed", type=int, default=7)
    return parser


def _say(text: str) -> None:
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} bench: {text}\n")
    sys.stderr.flush()


def _one_size(n: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    interval_s = _interval(n, args.intervals)
    emu = procs.Emulator(runs=n, workdir=workdir, seed=args.seed)
    result: dict[str, Any] = {"n": n, "emulator_command": emu.command, "daemon": []}
    try:
        if n in args.gc_sizes:
            _say(f"N={n}: daemon run with the proposed GC tuning")
            result["daemon_gc"] = scenarios.measure_watch(
                emu,
                workdir=workdir,
                name=f"daemon-gc-{n}",
                interval_s=interval_s,
                cycles=args.cycles,
                gc_tuned=True,
            )
        for repeat in range(args.repeats):
            _say(f"N={n}: daemon run {repeat + 1}/{args.repeats} (interval {interval_s:g}s)")
            figures = scenarios.measure_watch(
                emu,
                workdir=workdir,
                name=f"daemon-{n}-{repeat}",
                interval_s=interval_s,
                cycles=args.cycles,
            )
            result["daemon"].append(figures)
            _say(
                f"N={n}: requests/cycle {sorted(set(figures['requests_per_cycle']))}, "
                f"wall {figures['wall_s_median']:.3f}s, cpu {figures['cpu_s_per_cycle']:.3f}s, "
                f"rss {figures['peak_rss_mb']:.0f}MB"
            )
        if n in args.detect_sizes:
            # Last of the daemon runs: it corrupts runs, which any later daemon would recover.
            _say(f"N={n}: detection, {args.corruptions} corruptions at {args.detect_interval:g}s")
            result["detection_run"] = scenarios.measure_watch(
                emu,
                workdir=workdir,
                name=f"detect-{n}",
                interval_s=args.detect_interval,
                cycles=args.cycles,
                corruptions=args.corruptions,
                rng=random.Random(args.seed),
            )
        if args.baseline_sizes is None or n in args.baseline_sizes:
            _say(f"N={n}: baseline ({args.baseline_cycles} cycles)")
            result["baseline"] = scenarios.measure_baseline(
                emu,
                workdir=workdir,
                cycles=args.baseline_cycles,
                sample=args.baseline_sample,
                concurrency=args.concurrency,
            )
            _say(
                f"N={n}: baseline requests/cycle {result['baseline']['requests_per_cycle']:.0f}, "
                f"cpu {result['baseline']['cpu_s_per_cycle']:.2f}s"
            )
    finally:
        emu.close()
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not Path("/usr/bin/time").exists():
        sys.stderr.write("bench: needs GNU time at /usr/bin/time (apt-get install time)\n")
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tinker-recovery-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    _say(f"work directory {workdir}")
    started = time.time()
    results: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": report.machine_facts(),
        "started": started,
        "sizes": [],
        "page_size": 100,
        # Other work on the machine skews wall time (CPU time much less): say how busy it was.
        "loadavg_start": os.getloadavg(),
    }
    for n in args.sizes:
        results["sizes"].append(_one_size(n, args, workdir))
    if args.idle_seconds > 0:
        _say(
            f"idle: {args.idle_runs} runs, {args.idle_interval:g}s interval, {args.idle_seconds:g}s"
        )
        emu = procs.Emulator(runs=args.idle_runs, workdir=workdir, seed=args.seed)
        try:
            results["idle"] = scenarios.measure_idle(
                emu, workdir=workdir, interval_s=args.idle_interval, idle_s=args.idle_seconds
            )
        finally:
            emu.close()
    results["duration_s"] = time.time() - started
    results["loadavg_end"] = os.getloadavg()
    out_json = args.json or args.out.with_suffix(".json")
    out_json.write_text(json.dumps(results, indent=1, default=_no_nan))
    args.out.write_text(report.render(results))
    _say(f"wrote {args.out} and {out_json} in {results['duration_s']:.0f}s")
    return 0


def _no_nan(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else str(value)


if __name__ == "__main__":
    sys.exit(main())
