"""The emulator's own listing cost, this tree against an earlier revision, side by side.

    .venv/bin/python benchmarks/bench_emulator_listing.py --sizes 100000 300000 \
        --before 9a06f5a~1 [--cycles 3] [--gaps 5 10]

For each size and each code version (the working tree, and `daemon/tinker_recovery` of
`--before` extracted with `git archive` into a temp dir), a fresh process builds the seeded
fleet (`--seed 7`, 100 runs per page, 30 % driven) in-process, lists it once (cold), then runs
`--cycles` full listings (`Emulator.page_runs` for every page), each after moving emulated
time on by the gap (`Emulator.advance`, no sleep). Printed: CPU per cycle (median) and how
many runs had to be re-rendered. The gap stands for the poll interval, or for the cycle
itself when a slow daemon polls back to back; the old cache re-rendered every driven run whose
30 s request tick had passed, so its cost grew with the gap and, through a slow cycle, with N.
Bounded: each child gets --timeout seconds. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def child(n: int, cycles: int, gap: float) -> None:
    from tinker_recovery.emulator import Emulator, EmulatorConfig

    build0 = time.process_time()
    emu = Emulator(EmulatorConfig(runs=n, seed=7, page_max=100, start_time=1_800_000_000.0))
    build = time.process_time() - build0

    def listing() -> None:
        for offset in range(0, n, 100):
            emu.page_runs(scope="owned", limit=100, offset=offset)

    listing()  # cold caches
    cpu, rebuilt = [], []
    for _ in range(cycles):
        emu.advance(gap)
        before = {id(r): r.cache for r in emu._owned}
        c0 = time.process_time()
        listing()
        cpu.append(time.process_time() - c0)
        rebuilt.append(sum(1 for r in emu._owned if r.cache is not before[id(r)]))
    import tinker_recovery.emulator.fleet as fleet_module

    print(
        json.dumps(
            {
                "cpu_s": statistics.median(cpu),
                "cpu_all": cpu,
                "rebuilt": statistics.median(rebuilt),
                "build_s": build,
                "module": fleet_module.__file__,
            }
        )
    )


def run_child(
    pythonpath: str | None, n: int, cycles: int, gap: float, timeout: float
) -> dict[str, Any]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    argv = [sys.executable, __file__, "--child", str(n), "--cycles", str(cycles)]
    argv += ["--gaps", str(gap)]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000])
    ap.add_argument("--before", default="9a06f5a~1", help="git revision of the old emulator")
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--gaps", type=float, nargs="+", default=[5.0, 10.0])
    ap.add_argument("--timeout", type=float, default=240.0, help="per child process, seconds")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.cycles, args.gaps[0])
        return
    with tempfile.TemporaryDirectory(prefix="bench-emu-before-") as old:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", args.before, "daemon/tinker_recovery"],
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
        versions = {f"before ({args.before})": f"{old}/daemon", "after (this tree)": None}
        print(
            f"# emulator listing, in-process; {os.cpu_count()} cores, load "
            f"{os.getloadavg()[0]:.2f}; median of {args.cycles} cycles per cell\n"
        )
        print("| runs | gap s | version | CPU s/cycle | µs/run | runs re-rendered/cycle |")
        print("|---:|---:|---|---:|---:|---:|")
        for n in args.sizes:
            for gap in args.gaps:
                for name, path in versions.items():
                    row = run_child(path, n, args.cycles, gap, args.timeout)
                    if "error" in row:
                        print(f"| {n:,} | {gap:g} | {name} | error: {row['error']} | | |")
                        continue
                    print(
                        f"| {n:,} | {gap:g} | {name} | {row['cpu_s']:.3f} | "
                        f"{row['cpu_s'] / n * 1e6:.2f} | {row['rebuilt']:,.0f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
