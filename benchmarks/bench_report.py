"""Turns the benchmark's raw figures into benchmarks/RESULTS.md.

Owns the targets (issue 5) and the verdict on each. The hand-written analysis (profiles,
fixes, what remains) lives in benchmarks/analysis.md and is appended verbatim, so a fresh
`make bench` regenerates every figure without losing the explanation.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

PAGE_SIZE = 100
ANALYSIS = Path(__file__).with_name("analysis.md")


def machine_facts() -> dict[str, str]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next(
        (line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line),
        platform.processor() or "unknown",
    )
    mem_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    facts = {
        "CPU": model,
        "cores": str(len(__import__("os").sched_getaffinity(0))),
        "RAM": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "Python": platform.python_version(),
    }
    for dist in ("tinker-recovery", "tinker", "httpx", "pydantic", "uvicorn"):
        try:
            facts[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            facts[dist] = "not installed"
    return facts


def _f(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def daemon_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repeated daemon runs (each run's own figure is a median or a mean)."""
    requests = sorted({r for run in runs for r in run["requests_per_cycle"]})
    return {
        "requests": requests,
        "wall_s": _med([run["wall_s_median"] for run in runs]),
        "wall_s_max": max(run["wall_s_max"] for run in runs),
        "cpu_s": _med([run["cpu_s_per_cycle"] for run in runs]),
        "emulator_cpu_s": _med([run.get("emulator_cpu_s_per_cycle", math.nan) for run in runs]),
        "rss_mb": _med([run["peak_rss_mb"] for run in runs]),
        "rss_mb_max": max(run["peak_rss_mb"] for run in runs),
        "runs": len(runs),
        "cycles": sum(len(run["requests_per_cycle"]) for run in runs),
    }


def _size_section(size: dict[str, Any], targets: list[tuple[str, str, bool]]) -> list[str]:
    n = size["n"]
    want = math.ceil(n / PAGE_SIZE)
    d = daemon_summary(size["daemon"])
    b = size.get("baseline")
    req = d["requests"][0] if len(d["requests"]) == 1 else math.nan
    lines = [
        f"### N = {n:,} runs (poll interval {size['daemon'][0]['interval_s']:g} s)",
        "",
        f"Daemon: {d['runs']} runs of the daemon process, {d['cycles']} measured cycles in all.",
    ]
    if b is not None:
        sampled = (
            f" Baseline figures are **extrapolated**: it polled {b['polled_per_cycle']:,} of "
            f"{n:,} runs per cycle and the per-run cost was scaled by "
            f"{n / b['polled_per_cycle']:g}."
            if b["extrapolated"]
            else ""
        )
        lines.append(
            f"Baseline: one process, {len(b['cycles'])} cycles, median per cycle.{sampled}"
        )
    lines += ["", "| per poll cycle | daemon | baseline | baseline / daemon |", "|---|---|---|---|"]

    def row(name: str, ours: float, theirs: float | None, digits: int) -> None:
        ratio = theirs / ours if theirs is not None and ours else math.nan
        lines.append(f"| {name} | {_f(ours, digits)} | {_f(theirs, digits)} | {_f(ratio, 1)}x |")

    requests_text = ", ".join(str(r) for r in d["requests"])
    base_req = b["requests_per_cycle"] if b else None
    ratio_req = base_req / req if base_req and req else math.nan
    lines.append(f"| requests | {requests_text} | {_f(base_req, 0)} | {_f(ratio_req, 1)}x |")
    row("wall time, s (median)", d["wall_s"], b["wall_s_median"] if b else None, 3)
    row("CPU time, s", d["cpu_s"], b["cpu_s_per_cycle"] if b else None, 3)
    row("peak RSS, MB (10^6 B; whole process)", d["rss_mb"], b["peak_rss_mb"] if b else None, 0)
    lines.append(f"| emulator CPU while serving the daemon, s | {_f(d['emulator_cpu_s'], 3)} | | |")
    lines.append("")
    tuned = size.get("daemon_gc")
    if tuned is not None:
        lines.append(
            "With the GC tuning proposed for app.py (benchmarks/bench_gc_daemon.py, one run): "
            f"requests {sorted(set(tuned['requests_per_cycle']))}, wall "
            f"{tuned['wall_s_median']:.3f} s, CPU {tuned['cpu_s_per_cycle']:.3f} s per cycle, "
            f"peak RSS {tuned['peak_rss_mb']:.0f} MB."
        )
        lines.append("")
    lines.append(
        "Per daemon run (wall median / max, CPU per cycle, peak RSS): "
        + "; ".join(
            f"{r['wall_s_median']:.3f} / {r['wall_s_max']:.3f} s, {r['cpu_s_per_cycle']:.3f} s, "
            f"{r['peak_rss_mb']:.0f} MB"
            for r in size["daemon"]
        )
    )
    lines.append("")
    targets.append(
        (
            f"N={n:,}: requests per cycle == ceil(N/100) = {want}",
            requests_text,
            d["requests"] == [want],
        )
    )
    if n >= 100000:
        targets.append((f"N={n:,}: cycle wall <= 2 s", f"{d['wall_s']:.3f} s", d["wall_s"] <= 2))
        targets.append((f"N={n:,}: CPU <= 1 s per cycle", f"{d['cpu_s']:.3f} s", d["cpu_s"] <= 1))
        targets.append(
            (f"N={n:,}: peak RSS <= 200 MB", f"{d['rss_mb']:.0f} MB", d["rss_mb"] <= 200)
        )
    if n == 10000 and b is not None:
        cpu_ratio = b["cpu_s_per_cycle"] / d["cpu_s"] if d["cpu_s"] else math.inf
        targets.append((f"N={n:,}: >= 50x fewer requests", f"{ratio_req:.1f}x", ratio_req >= 50))
        targets.append((f"N={n:,}: >= 10x less CPU", f"{cpu_ratio:.1f}x", cpu_ratio >= 10))
    return lines


def _detection_section(
    sizes: list[dict[str, Any]], targets: list[tuple[str, str, bool]]
) -> list[str]:
    lines = [
        "## Detection latency",
        "",
        "Runs corrupted one at a time through `POST /_emulator/runs/{id}/corrupt`, each after a "
        "random pause within one interval (so corruptions land at every phase of the poll clock). "
        "Latency = timestamp of the daemon's first `lineage_transition` with `decision=suspect` "
        "for that run minus the wall time taken just before the control call. Confirm -> handoff "
        "= the handoff script's `time.time()` minus the timestamp of the event that confirmed the "
        "corruption (`decision=recover`: confirmed and attempt started in one decision).",
        "",
        "A separate daemon process per N, at this interval; the target bound uses the median "
        "wall of its own steady cycles, measured before the first corruption. "
        "The last column shows the cycles of the detection phase itself, which run alongside "
        "the recovery attempts the corruptions start.",
        "",
        "| N | interval | corruptions | detected | p50 | p99 | target p99 "
        "| confirm -> handoff p50 | p99 | cycle wall meanwhile, median / max |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in sizes:
        for run in [size["detection_run"]] if "detection_run" in size else []:
            det = run["detection"]
            cycle = run["wall_s_median"]  # its own steady cycles, before the first corruption
            bound = run["interval_s"] + cycle + 0.5
            lines.append(
                f"| {size['n']:,} | {run['interval_s']:g} s | {det['corruptions']} | "
                f"{det['detected']} | {_f(det['latency_p50_s'])} s | {_f(det['latency_p99_s'])} s"
                f" | {bound:.3f} s | {_f(det['confirm_to_handoff_p50_s'])} s | "
                f"{_f(det['confirm_to_handoff_p99_s'])} s | "
                f"{_f(det.get('cycle_wall_s_median'))} / {_f(det.get('cycle_wall_s_max'))} s |"
            )
            ok = det["detected"] == det["corruptions"] and det["latency_p99_s"] <= bound
            targets.append(
                (
                    f"N={size['n']:,}: detection p99 <= interval + cycle + 0.5 s ({bound:.2f} s)",
                    f"{_f(det['latency_p99_s'])} s",
                    ok,
                )
            )
    return [*lines, ""]


def _commands(results: dict[str, Any]) -> list[str]:
    sizes = results["sizes"]
    if not sizes:
        return []
    first = sizes[0]
    daemon = first["daemon"][0]
    lines = [
        "```sh",
        f"# this report: {results['command']}  (make bench: the same without --workdir)",
        "# per N: the emulator, its own process",
        " ".join(["tinker-recovery", *first["emulator_command"][1:]]).replace(
            f"--runs {first['n']}", "--runs N"
        ),
        "# per daemon run: the daemon under /usr/bin/time, its own process",
        "TINKER_API_KEY=tml-bench-daemon TINKER_TELEMETRY=0 /usr/bin/time -v -o daemon.time.txt "
        "tinker-recovery run --config daemon.config.yaml",
    ]
    if "baseline" in first:
        args = first["baseline"]["command"][6:]
        lines += [
            "# the baseline, its own process",
            "/usr/bin/time -v -o baseline.time.txt python benchmarks/bench_baseline.py "
            + " ".join(args),
        ]
    lines += [
        "```",
        "",
        f"The daemon's config for N = {first['n']:,} (the others differ in interval, paths, port):",
        "",
        "```json",
        json.dumps(daemon.get("config", {}), indent=2),
        "```",
    ]
    return lines


def render(results: dict[str, Any]) -> str:
    targets: list[tuple[str, str, bool]] = []
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(results["started"]))
    lines = [
        "# Benchmark results: the watch loop from 1,000 to 100,000 runs",
        "",
        f"Generated by `make bench` ({results['command']}) on {when}; "
        f"the whole run took {results['duration_s'] / 60:.1f} min. Raw figures: RESULTS.json.",
        "Everything (emulator, daemon, baseline) ran on this one machine, on 127.0.0.1, each in "
        "its own process; the emulator shares the cores with whichever client is measured.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in results["machine"].items()),
        "| load average (1/5/15 min) at start, end | "
        + " / ".join(f"{x:.2f}" for x in results.get("loadavg_start", ()))
        + ", "
        + " / ".join(f"{x:.2f}" for x in results.get("loadavg_end", ()))
        + " |",
        "",
        "## Commands",
        "",
        *_commands(results),
        "",
        "The emulator is started once per N with `--runs N --seed 7 --page-max 100`. The daemon "
        "config (written per run) polls at the interval shown, logs JSON at debug level (for the "
        "`poll_cycle` line that marks each cycle's end), and has one `recover` rule with a "
        "command handoff to `benchmarks/bench_probe.py`. Per cycle: requests = delta of "
        "`GET /_emulator/requests` between two `poll_cycle` lines (all Tinker endpoints); wall = "
        "the cycle's `duration_s` (list + decide + record); CPU = utime+stime delta of the "
        "daemon process from /proc/PID/stat over the measured cycles divided by their number; "
        "peak RSS = `/usr/bin/time -v` maximum resident set size of the whole process.",
        "",
        "## Watch loop, per N",
        "",
    ]
    for size in results["sizes"]:
        lines += _size_section(size, targets)
    lines += _detection_section(results["sizes"], targets)
    idle = results.get("idle")
    if idle:
        lines += [
            "## Idle cost",
            "",
            f"{idle['n']:,} runs at a {idle['interval_s']:g} s interval, measured over "
            f"{idle['wall_s']:.0f} s after the first cycle: {idle['cpu_s']:.2f} s CPU = "
            f"**{idle['cpu_share'] * 100:.3f} % of one core** "
            f"(peak RSS {idle['peak_rss_mb']:.0f} MB).",
            "",
        ]
        targets.append(
            ("idle < 1 % of one core", f"{idle['cpu_share'] * 100:.3f} %", idle["cpu_share"] < 0.01)
        )
    lines += ["## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {_verdict(ok)} |" for name, value, ok in targets]
    lines.append("")
    if ANALYSIS.exists():
        lines += ["", ANALYSIS.read_text().rstrip(), ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # re-render from saved figures: python bench_report.py RESULTS.json
    sys.stdout.write(render(json.loads(Path(sys.argv[1]).read_text())))
