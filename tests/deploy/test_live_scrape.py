"""Scrape a real daemon that just recovered a run, and hold the alerts and dashboard to it.

The daemon runs as a child process against the emulator with `restore: sdk` and a command
handoff that starts the example training job. One run is corrupted and its newest checkpoint
made unloadable, so a single recovery feeds every family: a rejected checkpoint, an attempt, a
handoff, time to recovery and work lost. Then `/metrics` must contain every sample name that
deploy/prometheus/alerts.yaml and deploy/grafana/dashboard.json use, with the contract's type,
and `promtool check metrics` must find nothing to say about it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from daemon_proc import free_port
from deploy_paths import REPO, find_tool
from live_daemon import DAEMON_KEY, LiveDaemon, base_config
from metric_refs import CONTRACT, alert_exprs, family_of, names_in, referenced_metrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tinker_recovery.emulator import EmulatorConfig, EmulatorServer

pytestmark = pytest.mark.slow

# What Prometheus 2.x sends: OpenMetrics preferred, the classic text format as a fallback.
OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
FLEET = 12  # seeded runs besides the one this test corrupts
JOB_KEY = "tml-live-scrape-job"  # what the training job uses; any tml- key works

# How the text format declares each contract type (an Info is a gauge named *_info).
TEXT_TYPE = {"info": "gauge", "gauge": "gauge", "counter": "counter", "histogram": "histogram"}


class Scrape:
    """One /metrics body, parsed: family -> declared type, and every sample."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.openmetrics = ""  # the same registry asked for in OpenMetrics, as Prometheus asks
        self.daemon_log = ""  # everything the daemon logged up to the scrape
        self.types: dict[str, str] = {}
        self.samples: list[Sample] = []
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            self.samples.extend(family.samples)

    def series(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.name == name]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels` (0 when none)."""
        return sum(
            s.value
            for s in self.series(name)
            if all(s.labels.get(k) == v for k, v in labels.items())
        )


@pytest.fixture(scope="module")
def recovered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scrape]:
    """The scrape of a daemon that has confirmed one recovery (module-scoped: ~10 s to make)."""
    workdir = tmp_path_factory.mktemp("live-scrape")
    # Requests every 0.25 s: a run made just after the daemon started must not look idle since
    # before the watch began (the policy would call its corruption pre-existing).
    config = EmulatorConfig(runs=FLEET, seed=5, page_max=100, request_interval_s=0.25)
    with EmulatorServer(config) as emulator:
        control = httpx.Client(
            base_url=emulator.base_url, headers={"X-API-Key": DAEMON_KEY}, timeout=10
        )
        daemon = LiveDaemon(workdir, _config(emulator.base_url, workdir))
        try:
            daemon.wait_until(lambda: _answers(daemon, "/readyz"), "/readyz")
            run_id = control.post(
                "/_emulator/runs",
                json={
                    "kind": "driven",
                    "checkpoints": 3,
                    "checkpoint_interval_s": 600,
                    "user_metadata": {"job": "scrape"},
                },
            ).json()["run_id"]
            # Seen healthy first: a run already corrupted when first seen is not recovered.
            daemon.wait_until(
                lambda: _runs_watched(daemon) >= FLEET + 1, "the new run to be watched"
            )
            control.post(f"/_emulator/runs/{run_id}/corrupt").raise_for_status()
            listed = control.get(f"/api/v1/training_runs/{run_id}/checkpoints").json()
            newest = max(
                (c for c in listed["checkpoints"] if c["checkpoint_type"] == "training"),
                key=lambda c: str(c["time"]),
            )
            control.post(
                "/_emulator/checkpoints/unloadable",
                json={"tinker_path": newest["tinker_path"], "error": "shards are incomplete"},
            ).raise_for_status()
            daemon.wait_until(lambda: _attempts_finished(daemon) >= 1, "a finished attempt", 40)
            if scrape(daemon).value("tinker_recovery_attempts_total", outcome="succeeded") < 1:
                daemon.fail("the recovery attempt did not succeed")
            final = scrape(daemon)
            answer = daemon.get("/metrics", headers={"Accept": OPENMETRICS})
            assert answer.headers["content-type"].startswith("application/openmetrics-text")
            final.openmetrics = answer.text
            final.daemon_log = daemon.log_path.read_text(encoding="utf-8", errors="replace")
            yield final
            assert daemon.stop() == 0
        finally:
            control.close()
            daemon.close()


def _config(base_url: str, workdir: Path) -> dict[str, Any]:
    config = base_config(base_url, workdir, free_port())
    job = [
        sys.executable,
        str(REPO / "examples" / "train_job.py"),
        "--name",
        "scrape",
        "--log-path",
        str(workdir / "job"),
        "--init-checkpoint",
        "{checkpoint}",
        "--steps",
        "6",
        "--save-every",
        "2",
        "--step-seconds",
        "0.2",
    ]
    config["policy"] = {
        "confirmations": 2,
        "rules": [
            {
                "name": "scrape-job",
                "match": {"labels": {"job": "scrape"}},
                "action": "recover",
                "backoff": {"base": "1s", "cap": "2s"},
                "max_idle": "1h",
                "checkpoint": {"min_ttl": "1m", "protect_ttl": "1d"},
                "restore": "sdk",
                "handoff": "train",
                "confirm_deadline": "60s",
            },
            {"name": "everything-else", "action": "alert"},
        ],
    }
    config["handoffs"] = {
        "train": {
            "type": "command",
            "argv": job,
            "timeout": "60s",
            # The daemon passes its environment on minus its own secrets: the job gets its key.
            "env": {
                "TINKER_BASE_URL": base_url,
                "TINKER_API_KEY": JOB_KEY,
                "TINKER_TELEMETRY": "0",
            },
        }
    }
    return config


def _answers(daemon: LiveDaemon, path: str) -> bool:
    try:
        return daemon.get(path).status_code == 200
    except httpx.HTTPError:
        return False


def scrape(daemon: LiveDaemon) -> Scrape:
    answer = daemon.get("/metrics")
    answer.raise_for_status()
    return Scrape(answer.text)


def _attempts_finished(daemon: LiveDaemon) -> float:
    return scrape(daemon).value("tinker_recovery_attempts_total")


def _runs_watched(daemon: LiveDaemon) -> float:
    return scrape(daemon).value("tinker_recovery_runs_watched")


@pytest.mark.parametrize("name", sorted(referenced_metrics()))
def test_every_referenced_metric_is_exported(recovered: Scrape, name: str) -> None:
    family = family_of(name)  # KeyError: alerts or dashboard use a name outside the contract
    assert family in recovered.types, f"{family} missing from the scrape"
    assert recovered.types[family] == TEXT_TYPE[CONTRACT[family]]
    # The exact sample name (e.g. *_bucket for histogram_quantile) has series to compute on.
    assert recovered.series(name), f"no {name} samples in the scrape"


def test_labelled_counters_in_alerts_have_series(recovered: Scrape) -> None:
    in_alerts = set().union(*(names_in(expr) for expr in alert_exprs().values()))
    counters = sorted(n for n in in_alerts if CONTRACT.get(family_of(n)) == "counter")
    assert counters, "the alert rules use no counter: the metric_refs parser may be broken"
    for name in counters:
        assert recovered.series(name), f"{name} has no series: rate()/increase() see nothing"


def test_the_recovery_shows_in_the_metrics(recovered: Scrape) -> None:
    assert recovered.value("tinker_recovery_corruptions_detected_total") >= 1
    assert recovered.value("tinker_recovery_checkpoints_rejected_total", reason="unloadable") >= 1
    assert (
        recovered.value("tinker_recovery_handoffs_total", type="command", outcome="succeeded") >= 1
    )
    assert recovered.value("tinker_recovery_time_to_recovery_seconds_count") >= 1
    assert recovered.value("tinker_recovery_work_lost_seconds_count") >= 1
    assert recovered.value("tinker_recovery_attempt_duration_seconds_count") >= 1
    assert recovered.value("tinker_recovery_leader") == 1
    assert recovered.value("tinker_recovery_last_successful_poll_timestamp_seconds") > 0


def test_no_key_in_metrics_or_logs(recovered: Scrape) -> None:
    for key in (DAEMON_KEY, JOB_KEY):
        assert key not in recovered.text
        assert key not in recovered.openmetrics
        assert key not in recovered.daemon_log
    assert '"event": "attempt_finished"' in recovered.daemon_log  # the log is the real one


def test_promtool_finds_no_problem(recovered: Scrape) -> None:
    result = subprocess.run(
        [find_tool("promtool"), "check", "metrics"],
        input=recovered.text,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_promtool_is_not_a_silent_stub() -> None:
    # The check above passes on empty output, so prove this promtool does complain.
    result = subprocess.run(
        [find_tool("promtool"), "check", "metrics"],
        input="# TYPE tinker_recovery_oops counter\ntinker_recovery_oops 1\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "no help text" in result.stdout + result.stderr


def test_openmetrics_scrape_has_the_same_samples(recovered: Scrape) -> None:
    # Prometheus negotiates OpenMetrics; the names the rules use must not depend on the format.
    families = list(om_parse(recovered.openmetrics))  # type: ignore[no-untyped-call]  # unannotated upstream
    names = {s.name for f in families for s in f.samples if s.name.startswith("tinker_recovery_")}
    classic = {s.name for s in recovered.samples if s.name.startswith("tinker_recovery_")}
    assert names == classic
