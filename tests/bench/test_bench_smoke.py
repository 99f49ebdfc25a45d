"""The benchmark harness at a tiny size, so `make bench` cannot rot between runs.

Runs benchmarks/run.py as `make bench` does (emulator, daemon and baseline each in their own
process) with 300 runs, a few cycles and a handful of corruptions, then checks that every
figure was produced and is well formed. Request counts are exact and asserted; timings are
only checked to be present and finite, never compared with a bound.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNS = 300
PAGES = math.ceil(RUNS / 100)
CYCLES = 3
CORRUPTIONS = 4


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench")
    argv = [
        sys.executable,
        str(ROOT / "benchmarks" / "run.py"),
        f"--out={out / 'RESULTS.md'}",
        f"--workdir={out / 'work'}",
        f"--sizes={RUNS}",
        "--repeats=1",
        f"--cycles={CYCLES}",
        f"--detect-sizes={RUNS}",
        f"--corruptions={CORRUPTIONS}",
        f"--gc-sizes={RUNS}",
        "--baseline-cycles=1",
        f"--idle-runs={RUNS}",
        "--idle-interval=1",
        "--idle-seconds=2",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=150, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    figures: dict[str, Any] = json.loads((out / "RESULTS.json").read_text())
    return figures, (out / "RESULTS.md").read_text()


def _is_duration(value: object) -> bool:
    return isinstance(value, float | int) and math.isfinite(value) and value >= 0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_daemon_cycles_cost_one_request_per_page_and_nothing_per_run(
    bench: tuple[dict[str, Any], str],
) -> None:
    figures, _ = bench
    (size,) = figures["sizes"]
    for run in [*size["daemon"], size["daemon_gc"]]:
        assert run["requests_per_cycle"] == [PAGES] * CYCLES
        assert [c["list_requests"] for c in run["cycles"]] == [PAGES] * CYCLES
        assert all(_is_duration(c["wall_s"]) and _is_duration(c["cpu_s"]) for c in run["cycles"])
        assert _is_duration(run["cpu_s_per_cycle"])
        assert run["peak_rss_mb"] > 0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_every_corruption_is_detected_and_handed_off_once(
    bench: tuple[dict[str, Any], str],
) -> None:
    figures, _ = bench
    run = figures["sizes"][0]["detection_run"]
    assert run["requests_per_cycle"] == [PAGES] * CYCLES  # steady cycles, before corrupting
    detection = run["detection"]
    assert detection["corruptions"] == detection["detected"] == CORRUPTIONS
    assert detection["handed_off"] == CORRUPTIONS
    assert all(_is_duration(x) for x in detection["latency_s"])
    assert all(_is_duration(x) for x in detection["confirm_to_handoff_s"])
    assert _is_duration(detection["latency_p99_s"])


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_baseline_sends_one_request_per_run_per_cycle(
    bench: tuple[dict[str, Any], str],
) -> None:
    figures, _ = bench
    baseline = figures["sizes"][0]["baseline"]
    assert baseline["extrapolated"] is False
    assert baseline["requests_per_cycle"] == RUNS
    assert _is_duration(baseline["cpu_s_per_cycle"])
    assert baseline["peak_rss_mb"] > 0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_report_has_tables_idle_cost_and_verdicts(bench: tuple[dict[str, Any], str]) -> None:
    figures, report = bench
    assert 0 <= figures["idle"]["cpu_share"] < 1
    assert figures["idle"]["cycles_seen"] >= 1
    assert f"| requests | {PAGES} | {RUNS} | 100.0x |" in report
    assert f"N={RUNS}: requests per cycle == ceil(N/100) = {PAGES} | {PAGES} | met |" in report
    assert "## Detection latency" in report
    assert "## Idle cost" in report
    assert "| Python |" in report
