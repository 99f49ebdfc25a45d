"""Clock: the one way shell code reads time or sleeps, so tests can run on virtual time."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """Aware UTC wall time, for records and decisions."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin, for measuring intervals."""
        ...

    async def sleep(self, delay_s: float, *, wakeup: asyncio.Event | None = None) -> None:
        """Sleep `delay_s`, or less if `wakeup` is set first."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, delay_s: float, *, wakeup: asyncio.Event | None = None) -> None:
        if wakeup is None:
            await asyncio.sleep(delay_s)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay_s):
                await wakeup.wait()
