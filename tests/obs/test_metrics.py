"""The metrics contract: names, label sets and pre-created series as a scrape shows them."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import tinker_recovery
from tinker_recovery.core.model import AttemptOutcome, DecisionKind, LineageState
from tinker_recovery.core.ranking import RejectionReason
from tinker_recovery.obs.metrics import API_ENDPOINTS, HANDOFF_TYPES, POLL_ERROR_REASONS, Metrics


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def _scrape(registry: CollectorRegistry) -> dict[str, set[tuple[tuple[str, str], ...]]]:
    """sample name -> label sets seen in the text exposition."""
    seen: dict[str, set[tuple[tuple[str, str], ...]]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            seen.setdefault(sample.name, set()).add(tuple(sorted(sample.labels.items())))
    return seen


def test_every_contract_metric_is_exposed_with_prefix(registry: CollectorRegistry) -> None:
    Metrics(registry)
    names = set(_scrape(registry))
    expected = {
        "tinker_recovery_build_info",
        "tinker_recovery_runs_watched",
        "tinker_recovery_lineages",
        "tinker_recovery_corruptions_detected_total",
        "tinker_recovery_decisions_total",
        "tinker_recovery_attempts_total",
        "tinker_recovery_attempt_duration_seconds_bucket",
        "tinker_recovery_time_to_recovery_seconds_count",
        "tinker_recovery_work_lost_seconds_sum",
        "tinker_recovery_poll_duration_seconds_bucket",
        "tinker_recovery_poll_errors_total",
        "tinker_recovery_last_successful_poll_timestamp_seconds",
        "tinker_recovery_incident_breaker_open",
        "tinker_recovery_leader",
        "tinker_recovery_handoffs_total",
    }
    assert expected <= names
    assert all(name.startswith("tinker_recovery_") for name in names)


def test_created_series_are_disabled(registry: CollectorRegistry) -> None:
    Metrics(registry)
    assert not [name for name in _scrape(registry) if name.endswith("_created")]


def test_known_label_values_exist_at_zero_before_any_event(registry: CollectorRegistry) -> None:
    Metrics(registry)
    for state in LineageState:
        assert registry.get_sample_value("tinker_recovery_lineages", {"state": state}) == 0
    for kind in DecisionKind:
        value = registry.get_sample_value("tinker_recovery_decisions_total", {"decision": kind})
        assert value == 0
    for outcome in AttemptOutcome:
        value = registry.get_sample_value("tinker_recovery_attempts_total", {"outcome": outcome})
        assert value == 0
    assert len(POLL_ERROR_REASONS) == 10  # ... store, inconsistent, fenced, other
    for reason in POLL_ERROR_REASONS:
        value = registry.get_sample_value("tinker_recovery_poll_errors_total", {"reason": reason})
        assert value == 0


def test_build_info_carries_the_package_version(registry: CollectorRegistry) -> None:
    Metrics(registry)
    labels = {"version": tinker_recovery.__version__}
    assert registry.get_sample_value("tinker_recovery_build_info", labels) == 1


def test_usage_from_the_contract_counts(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    metrics.attempts.labels(outcome="succeeded").inc()
    metrics.api_requests.labels(endpoint="training_runs", code="200").inc(2)
    metrics.checkpoints_rejected.labels(reason="expiring").inc()
    metrics.poll_duration.observe(0.02)
    metrics.time_to_recovery.observe(7200)
    metrics.set_lineage_counts({LineageState.HEALTHY: 3})

    get = registry.get_sample_value
    assert get("tinker_recovery_attempts_total", {"outcome": "succeeded"}) == 1
    labels = {"endpoint": "training_runs", "code": "200"}
    assert get("tinker_recovery_api_requests_total", labels) == 2
    assert get("tinker_recovery_checkpoints_rejected_total", {"reason": "expiring"}) == 1
    assert get("tinker_recovery_poll_duration_seconds_bucket", {"le": "0.025"}) == 1
    assert get("tinker_recovery_poll_duration_seconds_bucket", {"le": "0.01"}) == 0
    assert get("tinker_recovery_time_to_recovery_seconds_bucket", {"le": "7200.0"}) == 1
    assert get("tinker_recovery_lineages", {"state": "healthy"}) == 3
    assert get("tinker_recovery_lineages", {"state": "held"}) == 0


def test_separate_registries_do_not_share_counts() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    Metrics(first).corruptions_detected.inc()
    Metrics(second)
    assert first.get_sample_value("tinker_recovery_corruptions_detected_total") == 1
    assert second.get_sample_value("tinker_recovery_corruptions_detected_total") == 0


def test_first_rejection_burst_is_visible_because_every_reason_starts_at_zero(
    registry: CollectorRegistry,
) -> None:
    # increase() needs a sample before the first event: an unseen series that appears at 5
    # reads as no increase at all.
    Metrics(registry)
    for reason in RejectionReason:
        labels = {"reason": reason.value}
        assert registry.get_sample_value("tinker_recovery_checkpoints_rejected_total", labels) == 0


def test_reasons_other_components_count_are_pre_created(registry: CollectorRegistry) -> None:
    Metrics(registry)
    for reason in ("store", "inconsistent"):
        labels = {"reason": reason}
        assert registry.get_sample_value("tinker_recovery_poll_errors_total", labels) == 0
    for handoff_type in HANDOFF_TYPES:
        for outcome in ("succeeded", "failed"):
            labels = {"type": handoff_type, "outcome": outcome}
            assert registry.get_sample_value("tinker_recovery_handoffs_total", labels) == 0
    for outcome in ("success", "failure"):
        labels = {"outcome": outcome}
        assert registry.get_sample_value("tinker_recovery_config_reloads_total", labels) == 0


def test_api_latency_is_a_histogram_per_endpoint(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    for endpoint in API_ENDPOINTS:
        labels = {"endpoint": endpoint}
        assert (
            registry.get_sample_value("tinker_recovery_api_request_duration_seconds_count", labels)
            == 0
        )
    metrics.observe_api_latency("list_runs", 0.04)
    metrics.observe_api_latency("list_runs", 3.0)
    get = registry.get_sample_value
    name = "tinker_recovery_api_request_duration_seconds"
    assert get(f"{name}_count", {"endpoint": "list_runs"}) == 2
    assert get(f"{name}_bucket", {"endpoint": "list_runs", "le": "0.05"}) == 1
    assert get(f"{name}_bucket", {"endpoint": "list_runs", "le": "5.0"}) == 2
    assert get(f"{name}_count", {"endpoint": "get_run"}) == 0


def test_fleet_pause_and_dry_run_are_gauges(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    get = registry.get_sample_value
    assert get("tinker_recovery_fleet_paused") == 0
    assert get("tinker_recovery_dry_run") == 0
    metrics.set_fleet_paused(True)
    metrics.set_dry_run(True)
    assert get("tinker_recovery_fleet_paused") == 1
    assert get("tinker_recovery_dry_run") == 1
    metrics.set_fleet_paused(False)
    assert get("tinker_recovery_fleet_paused") == 0


def test_config_reloads_follow_prometheus_own_series(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    get = registry.get_sample_value
    metrics.config_loaded(at_unix_s=1000.0, dry_run=False)
    assert get("tinker_recovery_config_last_reload_successful") == 1
    assert get("tinker_recovery_config_last_reload_success_timestamp_seconds") == 1000.0
    # The start is a load, not a reload.
    assert get("tinker_recovery_config_reloads_total", {"outcome": "success"}) == 0

    metrics.config_reload_failed()
    assert get("tinker_recovery_config_last_reload_successful") == 0
    assert get("tinker_recovery_config_reloads_total", {"outcome": "failure"}) == 1
    # The time of the configuration still running does not move on a refusal.
    assert get("tinker_recovery_config_last_reload_success_timestamp_seconds") == 1000.0

    metrics.config_reloaded(at_unix_s=2000.0, dry_run=True)
    assert get("tinker_recovery_config_last_reload_successful") == 1
    assert get("tinker_recovery_config_last_reload_success_timestamp_seconds") == 2000.0
    assert get("tinker_recovery_config_reloads_total", {"outcome": "success"}) == 1
    assert get("tinker_recovery_dry_run") == 1
