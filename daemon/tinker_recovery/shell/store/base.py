"""The Store protocol every backend (SQLite, PostgreSQL) implements, and its records.

Fencing: a store instance that holds the leader lease stamps every write with its epoch; a write
made with a stale epoch raises `errors.FencedOut` and changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from tinker_recovery.core.model import Attempt, Lineage, LineageState


@dataclass(frozen=True, slots=True)
class Event:
    """One line of the append-only log. `data` keeps the raw run payload behind a decision."""

    at: datetime
    kind: str  # stable snake_case: "lineage_transition", "attempt_step", "checkpoint_rejected"...
    reason: str
    lineage_id: str | None = None
    attempt_id: str | None = None
    run_id: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    seq: int | None = None  # assigned by the store


@dataclass(frozen=True, slots=True)
class Lease:
    replica_id: str
    epoch: int
    expires_at: datetime  # on the database clock


@dataclass(frozen=True, slots=True)
class ManualRequest:
    """An operator's `recover RUN [--checkpoint PATH]`, queued until the leader takes it."""

    request_id: int
    run_id: str
    checkpoint_path: str | None
    requested_at: datetime
    requested_by: str


class Store(Protocol):
    async def open(self) -> None:
        """Connect and apply pending migrations."""
        ...

    async def close(self) -> None: ...

    async def watch_started_at(self) -> datetime:
        """When this store first watched a fleet (set once, on first open)."""
        ...

    # leadership ---------------------------------------------------------------------------
    async def acquire_or_renew(self, replica_id: str, ttl_s: float) -> Lease | None:
        """Renew our lease, or take it over if free or expired (epoch + 1). None: standby."""
        ...

    async def release(self, lease: Lease) -> None: ...

    async def leader(self) -> Lease | None: ...

    # lineages -------------------------------------------------------------------------------
    async def save_lineage(self, lineage: Lineage, event: Event) -> None:
        """Upsert the lineage and append the event, in one transaction. Fenced."""
        ...

    async def get_lineage(self, lineage_id: str) -> Lineage | None: ...

    async def lineage_for_run(self, run_id: str) -> Lineage | None:
        """The lineage whose root, current or any attempt's successor/corrupted run is run_id."""
        ...

    async def list_lineages(
        self, states: Sequence[LineageState] | None = None
    ) -> list[Lineage]: ...

    # attempts -------------------------------------------------------------------------------
    async def save_attempt(self, attempt: Attempt, event: Event) -> None:
        """Insert or update the attempt and append the event, in one transaction. Fenced."""
        ...

    async def get_attempt(self, attempt_id: str) -> Attempt | None: ...

    async def attempts(self, lineage_id: str) -> list[Attempt]: ...

    async def unfinished_attempts(self) -> list[Attempt]:
        """Attempts with no outcome yet, oldest first: reconciled before anything new."""
        ...

    # checkpoints ----------------------------------------------------------------------------
    async def mark_checkpoint_bad(self, tinker_path: str, reason: str, at: datetime) -> None: ...

    async def bad_checkpoints(self, tinker_paths: Sequence[str]) -> set[str]: ...

    # events ---------------------------------------------------------------------------------
    async def append_event(self, event: Event) -> None: ...

    async def events(
        self, *, lineage_id: str | None = None, run_id: str | None = None, limit: int = 100
    ) -> list[Event]:
        """Newest last."""
        ...

    # operator -------------------------------------------------------------------------------
    async def set_hold(self, lineage_id: str | None, held: bool, by: str, at: datetime) -> None:
        """Pause (held=True) or resume one lineage, or the whole fleet when lineage_id is None.
        Not fenced: operators may act from any replica or the CLI."""
        ...

    async def holds(self) -> set[str | None]:
        """Held lineage ids; None in the set means the whole fleet is paused."""
        ...

    async def request_recovery(
        self, run_id: str, checkpoint_path: str | None, by: str, at: datetime
    ) -> int: ...

    async def take_manual_requests(self) -> list[ManualRequest]:
        """Pop queued requests (leader only; fenced)."""
        ...
