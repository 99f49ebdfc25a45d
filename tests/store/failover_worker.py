"""A stand-in replica for the store-level failover tests: a LeaderGuard plus a busy "actor".

Run as `python failover_worker.py URL REPLICA_ID TTL_S RENEW_S`. While the guard says it leads,
the actor appends an `action` event every 20 ms recording the epoch it believes it has and the
wall time, through the fenced store; refused writes are reported on stdout. SIGTERM stops it
cleanly (releasing the lease). This is the store's half of issue 6's failover tests; the whole
daemon's version (handoffs against the emulator) belongs with the app.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time

from tinker_recovery.errors import FencedOut, StoreUnavailable
from tinker_recovery.shell.clock import SystemClock
from tinker_recovery.shell.store.base import Event
from tinker_recovery.shell.store.lease import LeaderGuard
from tinker_recovery.shell.store.postgres import PostgresStore

ACT_EVERY_S = 0.02
CALL_TIMEOUT_S = 1.0


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def act(store: PostgresStore, guard: LeaderGuard, stop: asyncio.Event) -> None:
    clock = SystemClock()
    while not stop.is_set():
        epoch = guard.epoch
        if guard.is_leader and epoch is not None:
            event = Event(
                at=clock.now(),
                kind="action",
                reason=guard.replica_id,
                data={"epoch": epoch, "wall": time.time()},
            )
            try:
                async with asyncio.timeout(CALL_TIMEOUT_S):
                    await store.append_event(event)
            except (FencedOut, StoreUnavailable, TimeoutError) as exc:
                say(f"REFUSED {guard.replica_id} epoch={epoch} {type(exc).__name__}")
        await clock.sleep(ACT_EVERY_S, wakeup=stop)


async def main(url: str, replica_id: str, ttl_s: float, renew_s: float) -> None:
    clock = SystemClock()
    store = PostgresStore(
        url,
        clock=clock,
        acquire_timeout_s=2.0,
        statement_timeout_s=2.0,
        idle_in_transaction_timeout_s=0.5,
    )
    await store.open()
    guard = LeaderGuard(store, replica_id, ttl_s, renew_s, clock)
    guard.add_listener(lambda leading: say(f"{'GAIN' if leading else 'LOSS'} {replica_id}"))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    say(f"READY {replica_id}")
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(guard.run(stop), name="leader")
            tg.create_task(act(store, guard, stop), name="actor")
    finally:
        await store.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])))
