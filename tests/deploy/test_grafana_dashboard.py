"""deploy/grafana/dashboard.json: well-formed, covers what an operator looks at, valid PromQL.

Every query is also handed to `promtool check rules` as a recording rule (with Grafana's
variables substituted), so a syntax error in a panel fails here rather than in Grafana.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import metric_refs
import pytest
import yaml
from deploy_paths import find_tool

DASHBOARD: dict[str, Any] = json.loads(metric_refs.DASHBOARD.read_text(encoding="utf-8"))
GRID_WIDTH = 24

# What issue 4 asks the dashboard to show, and a metric that proves each is there.
TOPICS = {
    "fleet health": "tinker_recovery_lineages",
    "runs watched": "tinker_recovery_runs_watched",
    "leadership": "tinker_recovery_leader",
    "detections": "tinker_recovery_corruptions_detected_total",
    "decisions": "tinker_recovery_decisions_total",
    "attempts by outcome": "tinker_recovery_attempts_total",
    "time to recovery": "tinker_recovery_time_to_recovery_seconds_bucket",
    "work lost": "tinker_recovery_work_lost_seconds_bucket",
    "poll latency": "tinker_recovery_poll_duration_seconds_bucket",
    "poll errors": "tinker_recovery_poll_errors_total",
    "poll freshness": "tinker_recovery_last_successful_poll_timestamp_seconds",
    "API requests": "tinker_recovery_api_requests_total",
    "incident breaker": "tinker_recovery_incident_breaker_open",
    "fleet paused": "tinker_recovery_fleet_paused",
    "dry run": "tinker_recovery_dry_run",
    "config reload": "tinker_recovery_config_last_reload_successful",
    "config age": "tinker_recovery_config_last_reload_success_timestamp_seconds",
    "API latency": "tinker_recovery_api_request_duration_seconds_bucket",
}


def _panels() -> list[dict[str, Any]]:
    return list(metric_refs.walk_panels(DASHBOARD["panels"]))


def _query_panels() -> list[dict[str, Any]]:
    return [p for p in _panels() if p["type"] != "row"]


def test_dashboard_identity() -> None:
    assert DASHBOARD["uid"] == "tinker-recovery"
    assert DASHBOARD["title"]
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "job" in variables


def test_panel_ids_are_unique_and_panels_fit_the_grid() -> None:
    ids = [p["id"] for p in _panels()]
    assert len(ids) == len(set(ids))
    for panel in _panels():
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= GRID_WIDTH, panel["title"]


@pytest.mark.parametrize("panel", _query_panels(), ids=lambda p: str(p["title"]))
def test_panel_queries_use_contract_metrics_and_the_variables(panel: dict[str, Any]) -> None:
    assert panel["targets"], "a panel without a query"
    assert panel["datasource"]["uid"] == "${datasource}"
    for target in panel["targets"]:
        names = metric_refs.names_in(target["expr"])
        # Prometheus' own `up` is the one other series worth showing (replicas answering).
        assert names or target["expr"].startswith("sum(up{"), f"{target['refId']}: no metric"
        assert names <= metric_refs.exposed_names(), names - metric_refs.exposed_names()
        assert '$job"' in target["expr"], "filter on the job variable"


@pytest.mark.parametrize(("topic", "metric"), TOPICS.items())
def test_dashboard_covers_topic(topic: str, metric: str) -> None:
    used = {n for e in metric_refs.dashboard_exprs().values() for n in metric_refs.names_in(e)}
    assert metric in used, topic


def test_attempts_are_split_by_outcome() -> None:
    exprs = metric_refs.dashboard_exprs().values()
    assert any("attempts_total" in e and "by (outcome)" in e for e in exprs)


def _as_plain_promql(expr: str) -> str:
    """Replace Grafana's variables with values Prometheus accepts."""
    for variable, value in {
        "$__rate_interval": "2m",
        "$__interval": "1m",
        "$__range": "1h",
        "$job": ".+",
    }.items():
        expr = expr.replace(variable, value)
    return expr


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    exprs = list(metric_refs.dashboard_exprs().items())
    rules = [
        {"record": f"dashboard:query_{i}", "expr": _as_plain_promql(expr)}
        for i, (_, expr) in enumerate(exprs)
        if not expr.startswith("label_values(")  # a Grafana function, not PromQL
    ]
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [find_tool("promtool"), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
