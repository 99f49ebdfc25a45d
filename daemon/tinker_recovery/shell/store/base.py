"""The Store protocol every backend (SQLite, PostgreSQL) implements, and its records.

Fencing is per piece of work, not per store: every fenced write names the lease epoch it was
started under (an attempt's own `epoch`, a poll cycle's epoch) and is refused with
`errors.FencedOut`, changing nothing, unless the lease row still carries this replica and that
very epoch, unexpired, checked in the same transaction. A replica that lost the lease and won it
back (a newer epoch) therefore cannot let work from its old term write. `epoch=None` means "the
epoch this store instance holds now" (single-process tools and tests).

Every step of the daemon is one `Transition`: attempt row, lineage row, a bad-checkpoint mark and
their events, committed together or not at all. An attempt row that already has an outcome is
never updated again (`errors.StaleAttempt`).
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
class BadCheckpoint:
    """A checkpoint that failed validation: never chosen again."""

    tinker_path: str
    reason: str
    at: datetime


@dataclass(frozen=True, slots=True)
class TakenRequest:
    """An operator request settled by this transition: "started" or "refused", and why."""

    request_id: int
    outcome: str
    reason: str
    at: datetime
    by: str


@dataclass(frozen=True, slots=True)
class Transition:
    """One step, all or nothing (see the module docstring)."""

    attempt: Attempt | None = None
    lineage: Lineage | None = None
    bad_checkpoint: BadCheckpoint | None = None
    taken_request: TakenRequest | None = None
    events: tuple[Event, ...] = ()


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


@dataclass(frozen=True, slots=True)
class Hold:
    """One pause: of a lineage, or of the whole fleet (`lineage_id` None), who, when and why."""

    lineage_id: str | None
    held_by: str
    at: datetime
    reason: str | None = None


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

    async def check(self) -> None:
        """Raise `StoreUnavailable` if the store can no longer keep what is written to it (the
        SQLite file was deleted or replaced under us, the database is unreachable)."""
        ...

    # transitions ----------------------------------------------------------------------------
    async def commit(self, transition: Transition, *, epoch: int | None = None) -> None:
        """Write everything in `transition` in one transaction, fenced on `epoch`."""
        ...

    # lineages -------------------------------------------------------------------------------
    async def save_lineage(
        self, lineage: Lineage, event: Event, *, epoch: int | None = None
    ) -> None:
        """Upsert the lineage and append the event, in one transaction. Fenced."""
        ...

    async def get_lineage(self, lineage_id: str) -> Lineage | None: ...

    async def lineage_for_run(self, run_id: str) -> Lineage | None:
        """The lineage whose root, current or any attempt's successor/corrupted run is run_id."""
        ...

    async def list_lineages(
        self, states: Sequence[LineageState] | None = None
    ) -> list[Lineage]: ...

    async def cycle_lineages(self, run_ids: Sequence[str]) -> list[Lineage]:
        """What one poll needs: every active lineage (not healthy, or still charged for
        attempts) plus the lineages whose root or current run is in `run_ids` (the runs the
        listing shows corrupted). A year of healthy history costs nothing here."""
        ...

    async def lineage_counts(self) -> dict[LineageState, int]: ...

    # attempts -------------------------------------------------------------------------------
    async def save_attempt(self, attempt: Attempt, event: Event) -> None:
        """Insert or update the attempt and append the event, in one transaction. Fenced on
        `attempt.epoch`; refused (`StaleAttempt`) if the stored row already has an outcome."""
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

    async def compact(self, *, before: datetime, keep: int, epoch: int | None = None) -> int:
        """Retention: delete events older than `before`, then all but the newest `keep`,
        never those of a lineage still open. Returns how many were deleted. Fenced."""
        ...

    async def events(
        self, *, lineage_id: str | None = None, run_id: str | None = None, limit: int = 100
    ) -> list[Event]:
        """Newest last."""
        ...

    # operator -------------------------------------------------------------------------------
    async def set_hold(
        self,
        lineage_id: str | None,
        held: bool,
        by: str,
        at: datetime,
        reason: str | None = None,
    ) -> None:
        """Pause (held=True) or resume one lineage, or the whole fleet when lineage_id is None.
        `reason` is kept with a pause (why the operator held it). Not fenced: operators may act
        from any replica or the CLI."""
        ...

    async def hold_details(self) -> list[Hold]:
        """Every hold with who set it, when and why; the fleet-wide one (None) first."""
        ...

    async def holds(self) -> set[str | None]:
        """Held lineage ids; None in the set means the whole fleet is paused."""
        ...

    async def request_recovery(
        self, run_id: str, checkpoint_path: str | None, by: str, at: datetime
    ) -> int: ...

    async def pending_manual_requests(self) -> list[ManualRequest]:
        """Requests not settled yet, oldest first. Each is settled by the `Transition` that
        acts on it (`taken_request`), so one failure leaves the others queued."""
        ...

    async def manual_request_outcome(self, request_id: int) -> tuple[str, str] | None:
        """(outcome, reason) once the request was settled; None while it waits."""
        ...
