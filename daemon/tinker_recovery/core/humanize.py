"""Short human wording for numbers that appear in decision reasons ("3 attempts in 24h")."""

from __future__ import annotations

from datetime import datetime


def duration(seconds: float) -> str:
    """90 -> "1m30s", 86400 -> "24h", 2.5 -> "2.5s", 0.25 -> "250ms"."""
    if seconds < 0:
        return "-" + duration(-seconds)
    if seconds < 1 and seconds != 0:
        return f"{round(seconds * 1000)}ms"
    if seconds < 10 and seconds != int(seconds):
        return f"{seconds:.1f}s"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h"] if hours else []
    if minutes:
        parts.append(f"{minutes}m")
    if secs or not parts:
        parts.append(f"{secs}s")
    return "".join(parts)


def instant(at: datetime) -> str:
    """An aware datetime as ISO 8601 to the second, e.g. 2026-01-01T12:00:00+00:00."""
    return at.isoformat(timespec="seconds")
