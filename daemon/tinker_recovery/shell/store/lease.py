"""LeaderGuard: keeps (or waits for) the leader lease and says whether this replica may act.

Owns the renewal loop only; it never acts on runs. Contract for callers:

- `is_leader` is the one question to ask before any side effect. It is true only until a LOCAL
  monotonic deadline, `start of the last successful renewal + ttl - margin`. Measuring from the
  start of the call (before the database stamped its `now()`) and subtracting a margin means a
  replica cut off from the database stops acting before the lease can expire there and a standby
  can take over. The store's fenced writes are the backstop for anything already in flight.
- `lease` / `epoch`: the lease we hold while `is_leader`, else None.
- Signals: `leading` (an asyncio.Event set while we lead), `standing_by` (set while we do not),
  and `add_listener(cb)`, called with True on gain and False on loss (lease refused, renewal
  failed past the deadline, released). A renewal that comes back with a new epoch (our term
  lapsed, so another replica may have acted) is announced as a loss then a gain: treat every
  gain as a takeover and reconcile before acting. Listeners run on the event loop and must not
  block.
- `run(stop)` renews every `renew_interval_s` (sooner after a failure, and it wakes at the local
  deadline so loss is announced on time); on `stop` it releases the lease so a standby takes
  over at once instead of after the TTL. `release()` does the same on demand.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import structlog

from tinker_recovery.errors import ConfigError
from tinker_recovery.shell.clock import Clock

from .base import Lease, Store

log = structlog.get_logger(__name__)


class LeaderGuard:
    def __init__(
        self,
        store: Store,
        replica_id: str,
        ttl_s: float,
        renew_interval_s: float,
        clock: Clock,
        *,
        margin_s: float | None = None,
    ) -> None:
        margin = ttl_s / 5 if margin_s is None else margin_s
        if not 0 < renew_interval_s < ttl_s - margin:
            raise ConfigError(
                f"lease renew interval ({renew_interval_s}s) must be positive and shorter than "
                f"the TTL minus the safety margin ({ttl_s}s - {margin}s)"
            )
        self._store = store
        self.replica_id = replica_id
        self.ttl_s = ttl_s
        self.renew_interval_s = renew_interval_s
        self.margin_s = margin
        self._clock = clock
        self._lease: Lease | None = None
        self._deadline = -math.inf
        self._announced = False
        self._last_failed = False
        self._inflight: asyncio.Task[Lease | None] | None = None
        self._inflight_started = 0.0
        self._listeners: list[Callable[[bool], None]] = []
        self.leading = asyncio.Event()
        self.standing_by = asyncio.Event()
        self.standing_by.set()

    # what callers ask -----------------------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        return self._lease is not None and self._clock.monotonic() < self._deadline

    @property
    def lease(self) -> Lease | None:
        return self._lease if self.is_leader else None

    @property
    def epoch(self) -> int | None:
        lease = self.lease
        return None if lease is None else lease.epoch

    def add_listener(self, callback: Callable[[bool], None]) -> None:
        self._listeners.append(callback)

    # the loop -------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                await self.renew_once()
                await self._clock.sleep(self._next_delay_s(), wakeup=stop)
                self.check_deadline()
        finally:
            await self._drop_inflight()
        try:
            await self.release()
        except Exception as exc:  # noqa: BLE001 - shutting down: the lease expires on its own
            log.warning("lease_release_failed", replica=self.replica_id, error=str(exc))

    async def renew_once(self) -> bool:
        """Wait for one acquire-or-renew call, at most until our local deadline.

        The call runs as its own task: a driver may defer cancellation for seconds (psycopg
        waits for the server to confirm a cancel, which a partition never does), so the loss
        is announced on time by not waiting, never by cancelling. A call still pending is
        waited on again next time rather than duplicated, and abandoned after a whole TTL.
        Returns whether we lead afterwards.
        """
        if self._inflight is None:
            self._inflight_started = self._clock.monotonic()
            self._inflight = asyncio.create_task(
                self._store.acquire_or_renew(self.replica_id, self.ttl_s), name="lease-renew"
            )
        task = self._inflight
        if not task.done():
            finished = asyncio.Event()
            task.add_done_callback(lambda _: finished.set())
            await self._clock.sleep(self._call_timeout_s(), wakeup=finished)
        if not task.done():
            self.check_deadline()
            if self._clock.monotonic() - self._inflight_started >= self.ttl_s:
                log.warning("lease_renew_abandoned", replica=self.replica_id)
                await self._drop_inflight()
            return self.is_leader
        self._inflight = None
        try:
            lease = task.result()
        except Exception as exc:  # noqa: BLE001 - loop boundary: any store failure means "retry"
            self._last_failed = True
            log.warning(
                "lease_renew_failed",
                replica=self.replica_id,
                error=str(exc) or type(exc).__name__,
                error_type=type(exc).__name__,
            )
            self.check_deadline()
            return self.is_leader
        self._last_failed = False
        self._apply(lease, self._inflight_started)
        return self.is_leader

    def check_deadline(self) -> None:
        """Announce the loss if the local deadline passed without a renewal."""
        if self._announced and not self.is_leader:
            self._lease = None
            self._announce(False, "local lease deadline passed without renewal")

    async def release(self) -> None:
        await self._drop_inflight()  # a late renewal must not revive what we give up
        lease, self._lease, self._deadline = self._lease, None, -math.inf
        self._announce(False, "released")
        if lease is not None:
            await self._store.release(lease)
            log.info("lease_released", replica=self.replica_id, epoch=lease.epoch)

    # internals ------------------------------------------------------------------------------
    def _apply(self, lease: Lease | None, started: float) -> None:
        if lease is None:
            self._lease, self._deadline = None, -math.inf
            self._announce(False, "lease held by another replica")
            return
        previous, self._lease = self._lease, lease
        # From the start of the call: the database stamped its expiry no earlier than that.
        self._deadline = started + self.ttl_s - self.margin_s
        if previous is not None and previous.epoch != lease.epoch:
            # Our term lapsed and a new one began: another replica may have acted in between,
            # so listeners must see a loss and a fresh gain (and reconcile again).
            self._announce(False, f"lease lapsed (epoch {previous.epoch} -> {lease.epoch})")
        if self.is_leader:
            self._announce(True, "lease acquired")
        else:
            self.check_deadline()  # the answer came too late to lead on

    async def _drop_inflight(self) -> None:
        task, self._inflight = self._inflight, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait({task})  # unlike `await task`, never swallows our own cancellation
        if not task.cancelled():
            task.exception()  # retrieved on purpose: a failure here is moot

    def _call_timeout_s(self) -> float:
        if not self.is_leader:
            return self.renew_interval_s
        # Come back by the deadline at the latest, so the loss is announced on time.
        remaining = self._deadline - self._clock.monotonic()
        return max(min(self.renew_interval_s, remaining), 0.001)

    def _next_delay_s(self) -> float:
        delay = self.renew_interval_s / 2 if self._last_failed else self.renew_interval_s
        if self.is_leader:
            delay = min(delay, max(self._deadline - self._clock.monotonic(), 0.0))
        return delay

    def _announce(self, leading: bool, reason: str) -> None:
        if leading == self._announced:
            return
        self._announced = leading
        if leading:
            self.standing_by.clear()
            self.leading.set()
            epoch = self._lease.epoch if self._lease else None
            log.info("leadership_gained", replica=self.replica_id, epoch=epoch, reason=reason)
        else:
            self.leading.clear()
            self.standing_by.set()
            log.warning("leadership_lost", replica=self.replica_id, reason=reason)
        for callback in self._listeners:
            callback(leading)
