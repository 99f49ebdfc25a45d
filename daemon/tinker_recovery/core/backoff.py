"""Retry delays: exponential growth, a cap, and full jitter.

Why full jitter: one backend incident poisons many runs at the same instant. Without jitter every
lineage would retry on the same schedule and hit the service (and the user's job scheduler) in
synchronised waves. Drawing the whole delay uniformly from [0, ceiling] spreads them out.

Pure: the random draw comes in as an argument so callers (and tests) control it.
"""

from __future__ import annotations

import math

from tinker_recovery.settings import BackoffSettings


def ceiling_s(failures: int, cfg: BackoffSettings) -> float:
    """The largest delay allowed after `failures` consecutive failures (1 -> cfg.base)."""
    if cfg.base <= 0 or cfg.cap <= 0:
        return 0.0
    exponent = max(failures, 1) - 1
    # Compare in log space: base * factor**exponent overflows a float long before the
    # budget logic would stop asking, and the cap makes the exact value irrelevant anyway.
    if cfg.factor > 1 and exponent * math.log(cfg.factor) >= math.log(cfg.cap / cfg.base):
        return float(cfg.cap)
    return float(min(cfg.cap, cfg.base * cfg.factor**exponent))


def next_delay_s(failures: int, cfg: BackoffSettings, rand: float) -> float:
    """Full jitter: uniform in [0, min(cap, base * factor**(failures-1))] using rand in [0,1).

    `failures` below 1 is treated as 1. A `rand` outside [0, 1) (or NaN) is clamped, so a
    misbehaving random source can never produce a negative or over-cap delay.
    """
    if not rand >= 0.0:  # also catches NaN
        rand = 0.0
    rand = min(rand, 1.0)
    return ceiling_s(failures, cfg) * rand
