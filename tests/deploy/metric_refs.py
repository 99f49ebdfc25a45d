"""The metrics contract, and which metric names the alert rules and the dashboard refer to.

`referenced_metrics()` is shared with the live-scrape check, which compares it with what a
running daemon actually exports. Names are sample names as they appear in a scrape
(`..._total`, `..._bucket`), so they can be looked up directly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboard.json"

MetricType = Literal["info", "gauge", "counter", "histogram"]

# The contract from DESIGN.md / the team brief, as family name -> type (prefix included).
CONTRACT: dict[str, MetricType] = {
    "tinker_recovery_build_info": "info",
    "tinker_recovery_runs_watched": "gauge",
    "tinker_recovery_lineages": "gauge",
    "tinker_recovery_corruptions_detected": "counter",
    "tinker_recovery_decisions": "counter",
    "tinker_recovery_attempts": "counter",
    "tinker_recovery_attempt_duration_seconds": "histogram",
    "tinker_recovery_time_to_recovery_seconds": "histogram",
    "tinker_recovery_work_lost_seconds": "histogram",
    "tinker_recovery_poll_duration_seconds": "histogram",
    "tinker_recovery_poll_errors": "counter",
    "tinker_recovery_last_successful_poll_timestamp_seconds": "gauge",
    "tinker_recovery_api_requests": "counter",
    "tinker_recovery_incident_breaker_open": "gauge",
    "tinker_recovery_leader": "gauge",
    "tinker_recovery_handoffs": "counter",
    "tinker_recovery_checkpoints_rejected": "counter",
    # issue 11: what an on-call engineer needs to see
    "tinker_recovery_api_request_duration_seconds": "histogram",
    "tinker_recovery_fleet_paused": "gauge",
    "tinker_recovery_dry_run": "gauge",
    "tinker_recovery_config_reloads": "counter",
    "tinker_recovery_config_last_reload_successful": "gauge",
    "tinker_recovery_config_last_reload_success_timestamp_seconds": "gauge",
    # issue 13: keeping every active run recoverable
    "tinker_recovery_work_at_risk_seconds": "gauge",
    "tinker_recovery_driven_runs": "gauge",
    "tinker_recovery_runs_without_usable_checkpoint": "gauge",
    "tinker_recovery_checkpoint_guard": "counter",
    "tinker_recovery_lineages_stalled": "gauge",
}

_SUFFIXES: dict[MetricType, tuple[str, ...]] = {
    "info": ("",),  # prometheus_client's Info("build") is exposed as *_build_info
    "gauge": ("",),
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
}

METRIC_NAME = re.compile(r"\btinker_recovery_[a-z_]+")


def exposed_names() -> frozenset[str]:
    """Every sample name the contract allows in a scrape."""
    return frozenset(
        family + suffix for family, kind in CONTRACT.items() for suffix in _SUFFIXES[kind]
    )


def family_of(sample_name: str) -> str:
    """The metric family a sample name belongs to, as a scrape's `# TYPE` line names it.

    A labelled counter with no child yet (checkpoints_rejected_total before the first
    rejection) exports only its `# HELP`/`# TYPE` lines, so a live-scrape check should
    compare families, not samples, for such metrics.
    """
    for family, kind in CONTRACT.items():
        for suffix in _SUFFIXES[kind]:
            if sample_name == family + suffix:
                # The text format names a counter's family without "_total" and a
                # histogram's without "_bucket"; an Info is a gauge ending in "_info".
                return family
    raise KeyError(sample_name)


def alert_exprs(path: Path = ALERTS) -> dict[str, str]:
    """Alert name (or recording rule name) -> PromQL expression."""
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    exprs: dict[str, str] = {}
    for group in doc["groups"]:
        for rule in group["rules"]:
            exprs[rule.get("alert") or rule["record"]] = str(rule["expr"])
    return exprs


def walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))  # collapsed rows nest their panels


def dashboard_exprs(path: Path = DASHBOARD) -> dict[str, str]:
    """ "<panel title> / <refId>" (and "$<variable>") -> PromQL expression."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    exprs: dict[str, str] = {}
    for panel in walk_panels(doc.get("panels", [])):
        for target in panel.get("targets", []):
            exprs[f"{panel['title']} / {target['refId']}"] = target["expr"]
    for variable in doc.get("templating", {}).get("list", []):
        query = variable.get("query")
        if variable.get("type") == "query":
            exprs[f"${variable['name']}"] = query["query"] if isinstance(query, dict) else query
    return exprs


def names_in(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))


def referenced_metrics() -> set[str]:
    """Every tinker_recovery_* sample name used by alerts.yaml and dashboard.json."""
    found: set[str] = set()
    for expr in [*alert_exprs().values(), *dashboard_exprs().values()]:
        found |= names_in(expr)
    return found
