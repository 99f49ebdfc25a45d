"""systemd's sd_notify protocol in a few lines of stdlib, plus the watchdog loop.

One datagram per message to `$NOTIFY_SOCKET` (a leading `@` means Linux's abstract namespace);
without that variable every call is a no-op, so the daemon runs the same outside systemd.
The socket is non-blocking: a full receive queue drops the message rather than stalling the
event loop. Text is sent as UTF-8 (the `sdnotify` package drops non-Latin-1 STATUS text).

The watchdog is fed from the event loop, and only while the poll loop makes progress, so a
wedged loop (or a poll cycle stuck forever) lets systemd restart the service.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping

import structlog

from tinker_recovery.shell.clock import Clock

log = structlog.get_logger(__name__)


def _one_line(value: object) -> str:
    # A newline would start a new KEY=VALUE field; keep each value on one line.
    return str(value).replace("\r", " ").replace("\n", " ")


class Notifier:
    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        self._address = env.get("NOTIFY_SOCKET") or None
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, text: str) -> bool:
        """Send one raw message. False when disabled or the send failed (logged once)."""
        if self._address is None:
            return False
        address = self._address
        if address.startswith("@"):
            address = "\0" + address[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.connect(address)
                sock.send(text.encode("utf-8"))
        except OSError as exc:
            if not self._warned:  # a missing socket would otherwise log on every watchdog tick
                log.warning("sd_notify_failed", socket=self._address, error=str(exc))
                self._warned = True
            return False
        return True

    def notify(self, **fields: object) -> bool:
        """Send `KEY=value` lines, e.g. `notify(READY=1, STATUS="polling")`."""
        return self.send("\n".join(f"{key}={_one_line(value)}" for key, value in fields.items()))

    def ready(self, status: str | None = None) -> bool:
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def reloading(self) -> bool:
        # systemd matches RELOADING=1 to the reload by this CLOCK_MONOTONIC timestamp.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=usec)

    def stopping(self) -> bool:
        return self.notify(STOPPING=1)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def watchdog_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1 (half of WATCHDOG_USEC), or None if not asked to."""
        if self._address is None or not self._watchdog_usec:
            return None
        if self._watchdog_pid and self._watchdog_pid.strip() != str(os.getpid()):
            return None  # the watchdog is meant for another process (e.g. our parent)
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2 / 1_000_000

    async def watchdog_loop(
        self, stop: asyncio.Event, is_progressing: Callable[[], bool], clock: Clock
    ) -> None:
        """Send WATCHDOG=1 every interval while `is_progressing()`; return when `stop` is set.

        Returns at once when systemd asked for no watchdog.
        """
        interval_s = self.watchdog_interval_s()
        if interval_s is None:
            return
        withheld = False
        while not stop.is_set():
            if is_progressing():
                if withheld:
                    log.info("watchdog_resumed")
                    withheld = False
                self.watchdog()
            elif not withheld:
                log.warning("watchdog_withheld", reason="poll loop made no recent progress")
                withheld = True
            await clock.sleep(interval_s, wakeup=stop)
