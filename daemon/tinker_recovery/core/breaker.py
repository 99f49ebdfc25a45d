"""The fleet incident breaker: many corruptions at once mean a backend incident, not bad luck.

When more than `threshold` corruptions are confirmed within `window`, the breaker opens. Then:
- `stagger`: at most `stagger_rate` attempts start per `stagger_interval` (the policy orders the
  candidates); the breaker closes again after `cool_down` without a new confirmation.
- `hold`: nothing starts; the breaker stays open until an operator resumes. The shell then passes
  `opened_at=None` and `resumed_at`, and confirmations up to the resume no longer count, so the
  same incident cannot trip it again the moment it is resumed.

Pure: the caller keeps `opened_at` between cycles and passes the recent history in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from tinker_recovery.core import humanize
from tinker_recovery.settings import BreakerSettings


@dataclass(frozen=True, slots=True)
class BreakerState:
    opened_at: datetime | None  # carry into the next cycle; None: closed
    detections_in_window: int  # confirmations counted within cfg.window
    reason: str  # names the numbers, for logs and decision reasons

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None


def evaluate(
    opened_at: datetime | None,
    detections: Iterable[datetime],
    now: datetime,
    cfg: BreakerSettings,
    resumed_at: datetime | None = None,
) -> BreakerState:
    """Open, keep open or close the breaker given every confirmation time the caller knows.

    `detections` should reach back max(window, cool_down); older entries are harmless.
    """
    counted = [d for d in detections if d <= now and (resumed_at is None or d > resumed_at)]
    window_start = now - timedelta(seconds=cfg.window)
    in_window = sum(1 for d in counted if d > window_start)
    numbers = (
        f"{in_window} corruptions within {humanize.duration(cfg.window)} "
        f"(threshold {cfg.threshold})"
    )
    if in_window > cfg.threshold:
        return BreakerState(opened_at or now, in_window, f"open ({cfg.mode}): {numbers}")
    if opened_at is None:
        return BreakerState(None, in_window, f"closed: {numbers}")
    if cfg.mode == "hold":
        return BreakerState(
            opened_at, in_window, f"open (hold) since {humanize.instant(opened_at)}: {numbers}"
        )
    # Stagger mode closes after a quiet cool_down, measured from the later of the opening and
    # the last confirmation we know about (the caller may have trimmed older ones).
    quiet_since = max([opened_at, *counted])
    quiet_s = (now - quiet_since).total_seconds()
    if quiet_s >= cfg.cool_down:
        return BreakerState(
            None, in_window, f"closed: no corruption for {humanize.duration(quiet_s)}"
        )
    return BreakerState(
        opened_at,
        in_window,
        f"open (stagger): last corruption {humanize.duration(quiet_s)} ago, "
        f"closes after {humanize.duration(cfg.cool_down)} without one",
    )


def stagger_allowance(
    recent_starts: Iterable[datetime], now: datetime, cfg: BreakerSettings
) -> int:
    """How many attempts may still start now under stagger: rate minus starts in the interval."""
    interval_start = now - timedelta(seconds=cfg.stagger_interval)
    used = sum(1 for s in recent_starts if interval_start < s <= now)
    return max(0, cfg.stagger_rate - used)
