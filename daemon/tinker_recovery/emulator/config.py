"""Emulator configuration: one frozen dataclass, every field with a default.

Fleet shape (how many runs, which fraction is driven), progression speed (request and
checkpoint cadence, a time scale for demos) and protocol knobs (page cap, try_again replies)
live here. Nothing in this module does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EmulatorConfig:
    """How the emulated service looks and behaves. The same config and seed give the same fleet."""

    runs: int = 50
    """Runs owned by the caller's organisation (what `access_scope=owned` lists)."""
    seed: int = 7
    """Seeds ids, models, labels, checkpoint history, incident picks and fault dice."""
    page_max: int = 100
    """Largest page the list endpoints serve; bigger `limit` values are capped."""
    driven_fraction: float = 0.3
    """Share of the fleet being driven right now (requests advance, checkpoints appear)."""
    shared_runs: int = 0
    """Extra runs owned by another organisation, visible only with `access_scope=accessible`."""
    corrupted_at_start: int = 0
    """Idle runs that are already corrupted when the emulator starts (pre-existing damage)."""
    checkpoint_interval_s: float = 1800.0
    """Emulated seconds between two periodic checkpoints of a driven run."""
    request_interval_s: float = 30.0
    """Granularity of `last_request_time` for driven runs (emulated seconds)."""
    time_scale: float = 1.0
    """Emulated seconds per wall second (60: a 1800 s checkpoint interval passes in 30 s)."""
    start_time: float | None = None
    """Emulated epoch seconds at start-up; None means the real current time."""
    owner: str = "alice@acme.example"
    """`model_owner` of runs created through the API (the caller)."""
    future_try_again: int = 0
    """How many `try_again` answers each future gives before its result (exercises the protocol)."""
    periodic_ttl_s: float = 7 * 24 * 3600.0
    """TTL of periodic checkpoints for runs that use one (the cookbook default is 7 days)."""

    def __post_init__(self) -> None:
        if self.runs < 0 or self.shared_runs < 0 or self.corrupted_at_start < 0:
            raise ValueError("run counts must not be negative")
        if self.page_max < 1:
            raise ValueError("page_max must be at least 1")
        if not 0.0 <= self.driven_fraction <= 1.0:
            raise ValueError("driven_fraction must be within [0, 1]")
        if self.checkpoint_interval_s <= 0 or self.request_interval_s <= 0:
            raise ValueError("intervals must be positive")
        if self.time_scale <= 0:
            raise ValueError("time_scale must be positive")
        if self.future_try_again < 0:
            raise ValueError("future_try_again must not be negative")
