"""Every Prometheus instrument the daemon exports, in one class.

Names follow the metrics contract in DESIGN.md: prefix `tinker_recovery_`, base units, small
closed label sets, never run ids. Label values that are known up front are pre-created so each
series exists (at zero) from the first scrape; `rate()` and alerts then work without waiting
for the first event.

`*_created` series: disabled for the whole process when this module is imported. The switch in
prometheus_client is global, not per registry, so it cannot be scoped to our `Metrics`; every
registry in the daemon is ours, the series double the scrape size, and Prometheus ignores them
in the text format anyway. Set PROMETHEUS_DISABLE_CREATED_SERIES yourself if you embed this
package and need to know; importing it has this side effect on purpose.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

import tinker_recovery
from tinker_recovery.core.model import AttemptOutcome, DecisionKind, LineageState
from tinker_recovery.core.ranking import RejectionReason

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated upstream

PREFIX: Final = "tinker_recovery"

# "store": the cycle lost its store (read or fenced write); "inconsistent": the listing never
# settled (duplicate ids or a total that moved) within the cycle's budget.
PollErrorReason = Literal[
    "timeout",
    "connection",
    "http_5xx",
    "rate_limited",
    "rejected",
    "malformed",
    "store",
    "inconsistent",
    "fenced",  # the lease moved to another epoch during the cycle: its writes were refused
    "other",
]
POLL_ERROR_REASONS: Final[tuple[str, ...]] = get_args(PollErrorReason)

HandoffType = Literal["command", "webhook", "python"]
HANDOFF_TYPES: Final[tuple[str, ...]] = get_args(HandoffType)
# Pre-created outcomes only; callers may add others (e.g. "timeout") as the executor defines them.
HANDOFF_OUTCOMES: Final[tuple[str, ...]] = ("succeeded", "failed")

# The gateway's endpoint templates: the `endpoint` label of the API latency histogram.
ApiEndpoint = Literal[
    "client_config",
    "auth_token",
    "list_runs",
    "get_run",
    "list_checkpoints",
    "weights_info",
    "set_checkpoint_ttl",
]
API_ENDPOINTS: Final[tuple[str, ...]] = get_args(ApiEndpoint)

# What the checkpoint guard did with a checkpoint that needed an extension this cycle.
GuardOutcome = Literal["extended", "failed", "dry_run", "held", "deferred"]
GUARD_OUTCOMES: Final[tuple[str, ...]] = get_args(GuardOutcome)
# The `rank` label of work_at_risk_seconds: a quantile, 1 the worst run (promtool reserves
# `quantile` for summaries); see core/guard.QUANTILES.
WORK_AT_RISK_QUANTILES: Final[tuple[str, ...]] = ("0.5", "0.9", "0.99", "1")

ReloadOutcome = Literal["success", "failure"]
RELOAD_OUTCOMES: Final[tuple[str, ...]] = get_args(ReloadOutcome)

# Buckets, in seconds, sized to what each measures.
# A poll is one HTTP page (milliseconds) up to a whole cycle with retries (a minute or two).
POLL_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# One Tinker API request: milliseconds when healthy, up to request_timeout (seconds) when not.
API_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# One attempt: select + validate + protect + optional SDK restore + handoff + confirm.
ATTEMPT_BUCKETS: Final = (1, 5, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200)
# Detected -> confirmed: seconds when the job restarts at once, hours with backoff and retries.
RECOVERY_BUCKETS: Final = (5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800)
# Training time thrown away: from minutes (frequent checkpoints) to days.
WORK_LOST_BUCKETS: Final = (60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, 172800, 604800)


class Metrics:
    """All instruments, registered on `registry` (the process default when None).

    Tests pass a fresh `CollectorRegistry()` each so counts never leak between them.
    Usage: `metrics.attempts.labels(outcome="succeeded").inc()`.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = prometheus_client.REGISTRY if registry is None else registry
        self.registry = reg

        self.build_info = Info(
            "build", "Version of the running daemon.", namespace=PREFIX, registry=reg
        )
        self.build_info.info({"version": tinker_recovery.__version__})

        self.runs_watched = Gauge(
            "runs_watched",
            "Training runs seen in the last successful poll.",
            namespace=PREFIX,
            registry=reg,
        )
        self.lineages = Gauge(
            "lineages", "Lineages by state.", ["state"], namespace=PREFIX, registry=reg
        )
        self.corruptions_detected = Counter(
            "corruptions_detected",
            "Corruptions confirmed (after the required consecutive corrupted reads).",
            namespace=PREFIX,
            registry=reg,
        )
        self.decisions = Counter(
            "decisions",
            "Policy decisions, one per lineage per cycle.",
            ["decision"],
            namespace=PREFIX,
            registry=reg,
        )
        self.attempts = Counter(
            "attempts",
            "Recovery attempts finished, by outcome.",
            ["outcome"],
            namespace=PREFIX,
            registry=reg,
        )
        self.attempt_duration = Histogram(
            "attempt_duration_seconds",
            "Wall time of one recovery attempt, start to outcome.",
            namespace=PREFIX,
            registry=reg,
            buckets=ATTEMPT_BUCKETS,
        )
        self.time_to_recovery = Histogram(
            "time_to_recovery_seconds",
            "From confirmed corruption to a confirmed successor.",
            namespace=PREFIX,
            registry=reg,
            buckets=RECOVERY_BUCKETS,
        )
        self.work_lost = Histogram(
            "work_lost_seconds",
            "Corruption time minus the restored checkpoint's time.",
            namespace=PREFIX,
            registry=reg,
            buckets=WORK_LOST_BUCKETS,
        )
        self.poll_duration = Histogram(
            "poll_duration_seconds",
            "Duration of one poll cycle.",
            namespace=PREFIX,
            registry=reg,
            buckets=POLL_BUCKETS,
        )
        self.poll_errors = Counter(
            "poll_errors",
            "Poll cycles that failed, by reason.",
            ["reason"],
            namespace=PREFIX,
            registry=reg,
        )
        self.last_successful_poll = Gauge(
            "last_successful_poll_timestamp_seconds",
            "Unix time of the last poll cycle that read the whole fleet.",
            namespace=PREFIX,
            registry=reg,
        )
        self.api_requests = Counter(
            "api_requests",
            "Requests to the Tinker API, by endpoint template and status code.",
            ["endpoint", "code"],
            namespace=PREFIX,
            registry=reg,
        )
        self.incident_breaker_open = Gauge(
            "incident_breaker_open",
            "1 while the fleet incident breaker is open.",
            namespace=PREFIX,
            registry=reg,
        )
        self.leader = Gauge(
            "leader",
            "1 while this replica holds the leader lease.",
            namespace=PREFIX,
            registry=reg,
        )
        self.handoffs = Counter(
            "handoffs",
            "Handoffs to the user's job, by type and outcome.",
            ["type", "outcome"],
            namespace=PREFIX,
            registry=reg,
        )
        self.checkpoints_rejected = Counter(
            "checkpoints_rejected",
            "Candidate checkpoints skipped or marked bad, by reason.",
            ["reason"],
            namespace=PREFIX,
            registry=reg,
        )
        self.api_request_duration = Histogram(
            "api_request_duration_seconds",
            "Latency of one Tinker API request (answered or not), by endpoint template.",
            ["endpoint"],
            namespace=PREFIX,
            registry=reg,
            buckets=API_BUCKETS,
        )
        self.fleet_paused = Gauge(
            "fleet_paused",
            "1 while an operator (or the breaker in hold mode) holds the whole fleet.",
            namespace=PREFIX,
            registry=reg,
        )
        self.dry_run = Gauge(
            "dry_run",
            "1 while the policy runs in dry-run mode (decides, logs, hands nothing off).",
            namespace=PREFIX,
            registry=reg,
        )
        self.config_reloads = Counter(
            "config_reloads",
            "Configuration reloads (SIGHUP), by outcome.",
            ["outcome"],
            namespace=PREFIX,
            registry=reg,
        )
        self.config_last_reload_successful = Gauge(
            "config_last_reload_successful",
            "1 if the last configuration load (start or reload) applied, 0 if it was refused.",
            namespace=PREFIX,
            registry=reg,
        )
        self.config_last_reload_success_timestamp = Gauge(
            "config_last_reload_success_timestamp_seconds",
            "Unix time of the last configuration load (start or reload) that applied.",
            namespace=PREFIX,
            registry=reg,
        )
        self.work_at_risk = Gauge(
            "work_at_risk_seconds",
            "Work at risk over driven runs as of the last cycle (last request minus the newest "
            "usable checkpoint), by rank (a quantile: 1 is the worst run).",
            ["rank"],
            namespace=PREFIX,
            registry=reg,
        )
        self.driven_runs = Gauge(
            "driven_runs",
            "Runs a recover rule matches that sent a request within the rule's driven window.",
            namespace=PREFIX,
            registry=reg,
        )
        self.runs_without_usable_checkpoint = Gauge(
            "runs_without_usable_checkpoint",
            "Driven runs whose listing shows no usable training checkpoint.",
            namespace=PREFIX,
            registry=reg,
        )
        self.checkpoint_guard = Counter(
            "checkpoint_guard",
            "Checkpoints the guard found expiring within min_remaining, by what it did.",
            ["outcome"],
            namespace=PREFIX,
            registry=reg,
        )
        self.lineages_stalled = Gauge(
            "lineages_stalled",
            "Runs (recovered lineages or rule-selected runs) quiet for stall_after without a "
            "final checkpoint.",
            namespace=PREFIX,
            registry=reg,
        )
        self._precreate()
        self._precreate_guard()

    def _precreate_guard(self) -> None:
        for guard_outcome in GUARD_OUTCOMES:
            self.checkpoint_guard.labels(outcome=guard_outcome)
        for quantile in WORK_AT_RISK_QUANTILES:
            self.work_at_risk.labels(rank=quantile)

    def _precreate(self) -> None:
        # Touch every known label value so the series are exported at 0 from the start.
        for state in LineageState:
            self.lineages.labels(state=state.value)
        for kind in DecisionKind:
            self.decisions.labels(decision=kind.value)
        for outcome in AttemptOutcome:
            self.attempts.labels(outcome=outcome.value)
        for reason in POLL_ERROR_REASONS:
            self.poll_errors.labels(reason=reason)
        for handoff_type in HANDOFF_TYPES:
            for handoff_outcome in HANDOFF_OUTCOMES:
                self.handoffs.labels(type=handoff_type, outcome=handoff_outcome)
        for rejection in RejectionReason:
            self.checkpoints_rejected.labels(reason=rejection.value)
        for endpoint in API_ENDPOINTS:
            self.api_request_duration.labels(endpoint=endpoint)
        for reload_outcome in RELOAD_OUTCOMES:
            self.config_reloads.labels(outcome=reload_outcome)

    def observe_api_latency(self, endpoint: str, seconds: float) -> None:
        """Record one Tinker API request's latency (call once per HTTP attempt, answered or not)."""
        self.api_request_duration.labels(endpoint=endpoint).observe(max(0.0, seconds))

    def set_fleet_paused(self, paused: bool) -> None:
        """`fleet_paused` follows the fleet-wide hold (`*`), which `lineages{state}` cannot show."""
        self.fleet_paused.set(1 if paused else 0)

    def set_dry_run(self, dry_run: bool) -> None:
        self.dry_run.set(1 if dry_run else 0)

    def config_loaded(self, *, at_unix_s: float, dry_run: bool) -> None:
        """The configuration (at start, or a reload) applied: success series, dry-run gauge.

        The start counts as a successful load, as in Prometheus, so the timestamp is never 0
        on a healthy daemon; only reloads count in `config_reloads_total`.
        """
        self.config_last_reload_successful.set(1)
        self.config_last_reload_success_timestamp.set(at_unix_s)
        self.set_dry_run(dry_run)

    def config_reloaded(self, *, at_unix_s: float, dry_run: bool) -> None:
        """A SIGHUP reload applied the fresh file."""
        self.config_reloads.labels(outcome="success").inc()
        self.config_loaded(at_unix_s=at_unix_s, dry_run=dry_run)

    def config_reload_failed(self) -> None:
        """A SIGHUP reload was refused; the previous configuration (and its timestamp) stays."""
        self.config_reloads.labels(outcome="failure").inc()
        self.config_last_reload_successful.set(0)

    def set_lineage_counts(self, counts: dict[LineageState, int]) -> None:
        """Set `lineages{state}` for every state at once (states absent from `counts` -> 0)."""
        for state in LineageState:
            self.lineages.labels(state=state.value).set(counts.get(state, 0))
