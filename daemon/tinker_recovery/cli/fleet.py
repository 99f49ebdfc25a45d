"""Fleet health for `status`: from the running daemon's /status when it answers, else from the
store and the config, saying which.

Checks, in the order an on-call engineer asks: is the daemon there, who leads, is the fleet
paused, is the incident breaker open, are polls succeeding, is dry run on. Each has a state
(`ok`, `warn`, `FAIL` or `unknown`) and a detail line.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import httpx

from tinker_recovery.settings import Settings, format_duration

DAEMON_TIMEOUT_S = 2.0
# /readyz calls a leader unready after 3 poll intervals without a successful poll.
STALE_POLL_INTERVALS = 3.0


def daemon_url(settings: Settings) -> str | None:
    """Where this config's daemon serves /status, or None (HTTP off, or port 0)."""
    if not settings.http.enabled or settings.http.port == 0:
        return None
    host = settings.http.host
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.http.port}"


async def fetch_daemon_status(url: str | None) -> dict[str, Any]:
    """{"url", "body"} when the daemon answered, else {"url", "error"}."""
    if url is None:
        return {"url": None, "error": "the config has no fixed HTTP port"}
    try:
        async with httpx.AsyncClient(timeout=DAEMON_TIMEOUT_S, trust_env=False) as client:
            answer = await client.get(url.rstrip("/") + "/status")
        answer.raise_for_status()
        body = answer.json()
    except (httpx.HTTPError, ValueError) as exc:
        return {"url": url, "error": _short_error(exc)}
    if not isinstance(body, dict) or "role" not in body:
        return {"url": url, "error": "answered, but not with a tinker-recovery /status"}
    return {"url": url, "body": body}


def _short_error(exc: BaseException) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, httpx.ConnectError):
        return "connection refused"
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within {DAEMON_TIMEOUT_S:g}s"
    return type(exc).__name__


def _check(check: str, state: str, detail: str) -> dict[str, str]:
    return {"check": check, "state": state, "detail": detail}


def health(
    store_data: dict[str, Any], daemon: dict[str, Any], settings: Settings, now: datetime
) -> dict[str, Any]:
    body: dict[str, Any] | None = daemon.get("body")
    checks = []
    if body is not None:
        checks.append(
            _check(
                "daemon",
                "ok",
                f"answering at {daemon['url']}: replica {body.get('replica')}, role "
                f"{body.get('role')}, version {body.get('version')}",
            )
        )
    else:
        where = daemon["url"] or "(no URL)"
        checks.append(
            _check(
                "daemon",
                "unknown",
                f"not answering at {where} ({daemon['error']}): breaker and polls unknown; "
                "the rest is read from the store and the config",
            )
        )
    leader = store_data["leader"]
    if leader is None:
        checks.append(_check("leader", "FAIL", "no daemon holds the lease: nothing acts"))
    else:
        checks.append(
            _check(
                "leader",
                "ok",
                f"{leader['replica']}, epoch {leader['epoch']}, lease until {leader['expires_at']}",
            )
        )
    fleet_hold = next((h for h in store_data["hold_details"] if h["lineage_id"] is None), None)
    if fleet_hold is None:
        checks.append(_check("fleet paused", "ok", "no"))
    else:
        why = fleet_hold["reason"] or "no reason recorded"
        checks.append(
            _check(
                "fleet paused",
                "warn",
                f"yes, by {fleet_hold['by']} since {fleet_hold['at']}: {why} (resume lifts it)",
            )
        )
    checks.append(_breaker(body))
    checks.append(_polls(body, settings, now))
    checks.append(_dry_run(body, settings))
    worst = "ok"
    for state in ("warn", "unknown", "FAIL"):
        if any(c["state"] == state for c in checks):
            worst = state
    return {"state": worst, "daemon_url": daemon["url"], "checks": checks}


def _breaker(body: dict[str, Any] | None) -> dict[str, str]:
    if body is None:
        return _check("incident breaker", "unknown", "only the running daemon knows")
    if body.get("incident_breaker_open"):
        return _check(
            "incident breaker",
            "FAIL",
            "open: many corruptions at once, restarts staggered or held",
        )
    return _check("incident breaker", "ok", "closed")


def _polls(body: dict[str, Any] | None, settings: Settings, now: datetime) -> dict[str, str]:
    if body is None:
        return _check("polls", "unknown", "only the running daemon knows")
    if body.get("role") == "standby":
        return _check("polls", "ok", "this replica is a standby (the leader polls)")
    cycle = body.get("last_cycle") or {}
    at = cycle.get("at")
    if not at:
        return _check("polls", "FAIL", "no successful poll yet")
    try:
        last = datetime.fromisoformat(str(at))
    except ValueError:
        return _check("polls", "unknown", f"unreadable last poll time {at!r}")
    age_s = max((now - last).total_seconds(), 0.0)
    from tinker_recovery import operator

    shown = operator.iso(last)
    limit_s = settings.poll.interval * STALE_POLL_INTERVALS
    if age_s > limit_s:
        return _check(
            "polls",
            "FAIL",
            f"failing: last successful poll at {shown}, {format_duration(round(age_s))} ago "
            f"(more than {STALE_POLL_INTERVALS:g} intervals)",
        )
    return _check(
        "polls",
        "ok",
        f"last successful poll at {shown}: {cycle.get('runs', '?')} runs",
    )


def _dry_run(body: dict[str, Any] | None, settings: Settings) -> dict[str, str]:
    if body is not None:
        on, source = bool(body.get("dry_run")), "the running daemon"
    else:
        on, source = settings.policy.dry_run, "the config (daemon not answering)"
    if on:
        return _check("dry run", "warn", f"on, per {source}: decides and records, acts on nothing")
    return _check("dry run", "ok", f"off, per {source}")
