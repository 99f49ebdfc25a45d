"""Alert rules and the dashboard only query metrics the daemon promises to export."""

from __future__ import annotations

import re

import metric_refs
import pytest


def test_every_referenced_metric_is_in_the_contract() -> None:
    unknown = metric_refs.referenced_metrics() - metric_refs.exposed_names()
    assert not unknown, f"not in the metrics contract: {sorted(unknown)}"


def test_references_are_found_in_both_files() -> None:
    # Guards the regex and the parsers: if they silently found nothing, the test above would pass.
    alerts = set().union(*map(metric_refs.names_in, metric_refs.alert_exprs().values()))
    dashboard = set().union(*map(metric_refs.names_in, metric_refs.dashboard_exprs().values()))
    assert "tinker_recovery_lineages" in alerts
    assert "tinker_recovery_poll_duration_seconds_bucket" in dashboard


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        pytest.param(
            'rate(tinker_recovery_attempts_total{outcome="failed"}[5m])',
            {"tinker_recovery_attempts_total"},
            id="counter-with-labels",
        ),
        pytest.param(
            "histogram_quantile(0.9, sum by (le) "
            "(rate(tinker_recovery_poll_duration_seconds_bucket[5m])))",
            {"tinker_recovery_poll_duration_seconds_bucket"},
            id="histogram-bucket",
        ),
        pytest.param('up{job="tinker-recovery"}', set(), id="job-label-is-not-a-metric"),
    ],
)
def test_names_in_extracts_metric_names(expr: str, expected: set[str]) -> None:
    assert metric_refs.names_in(expr) == expected


def test_a_misspelled_metric_would_be_caught() -> None:
    assert "tinker_recovery_attempt_total" not in metric_refs.exposed_names()
    assert "tinker_recovery_attempts_total" in metric_refs.exposed_names()


def test_contract_matches_the_daemons_metrics_class() -> None:
    # The contract list here and obs/metrics.py must not drift apart: every family the
    # daemon registers is in the contract and vice versa.
    from prometheus_client import CollectorRegistry

    from tinker_recovery.obs.metrics import Metrics

    registry = CollectorRegistry()
    Metrics(registry=registry)
    families = {m.name for m in registry.collect()}
    # prometheus_client reports Info families without the _info suffix and counters without
    # _total; map back to the names used in the contract.
    exported = {f"{name}_info" if name.endswith("_build") else name for name in families}
    assert exported == set(metric_refs.CONTRACT)


# Closed label sets the rules and panels may filter on, straight from the daemon's enums.
def _closed_labels() -> dict[str, set[str]]:
    from tinker_recovery.core.model import AttemptOutcome, DecisionKind, LineageState
    from tinker_recovery.obs.metrics import GUARD_OUTCOMES, POLL_ERROR_REASONS

    return {
        "state": {s.value for s in LineageState},
        "outcome": {o.value for o in AttemptOutcome} | set(GUARD_OUTCOMES),
        "decision": {d.value for d in DecisionKind},
        "reason": set(POLL_ERROR_REASONS),
    }


_MATCHER = re.compile(r'\b(state|outcome|decision|reason)\s*=\s*"([^"]*)"')


def test_label_values_in_queries_exist() -> None:
    closed = _closed_labels()
    exprs = {**metric_refs.alert_exprs(), **metric_refs.dashboard_exprs()}
    bad = [
        f"{where}: {label}={value!r}"
        for where, expr in exprs.items()
        for label, value in _MATCHER.findall(expr)
        # handoffs_total{outcome} and checkpoints_rejected_total{reason} are open sets
        if "handoffs" not in expr and "checkpoints_rejected" not in expr
        if value not in closed[label]
    ]
    assert not bad


@pytest.mark.parametrize(
    ("sample", "family"),
    [
        ("tinker_recovery_attempts_total", "tinker_recovery_attempts"),
        ("tinker_recovery_poll_duration_seconds_bucket", "tinker_recovery_poll_duration_seconds"),
        ("tinker_recovery_build_info", "tinker_recovery_build_info"),
        ("tinker_recovery_leader", "tinker_recovery_leader"),
    ],
)
def test_family_of_maps_samples_to_scrape_families(sample: str, family: str) -> None:
    assert metric_refs.family_of(sample) == family


def test_family_of_matches_a_real_exposition() -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from tinker_recovery.obs.metrics import Metrics

    registry = CollectorRegistry()
    Metrics(registry=registry)
    text = generate_latest(registry).decode()
    families = {f.name for f in text_string_to_metric_families(text)}
    assert {metric_refs.family_of(n) for n in metric_refs.referenced_metrics()} <= families
