"""sd_notify against real AF_UNIX datagram sockets (a path and an abstract name)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tinker_recovery.shell.sdnotify import Notifier


class _FakeClock:
    """Virtual time: sleep returns at once; stop is set after a given number of sleeps."""

    def __init__(self, stop: asyncio.Event, sleeps_before_stop: int) -> None:
        self._stop = stop
        self._left = sleeps_before_stop
        self.slept: list[float] = []
        self.t = 0.0

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.t, UTC)

    def monotonic(self) -> float:
        return self.t

    async def sleep(self, delay_s: float, *, wakeup: asyncio.Event | None = None) -> None:
        self.slept.append(delay_s)
        self.t += delay_s
        self._left -= 1
        if self._left <= 0:
            self._stop.set()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, str(path)
    sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[tuple[socket.socket, str]]:
    name = f"tinker-recovery-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    yield sock, "@" + name
    sock.close()


def _pending(sock: socket.socket) -> list[str]:
    messages = []
    sock.setblocking(False)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(5)
    return messages


def test_ready_and_status_reach_a_path_socket(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.ready("watching 3 runs")
    assert sock.recv(4096).decode() == "READY=1\nSTATUS=watching 3 runs"
    assert notifier.status("Überwachung läuft\nline two")
    assert sock.recv(4096).decode() == "STATUS=Überwachung läuft line two"
    assert notifier.stopping()
    assert sock.recv(4096).decode() == "STOPPING=1"


def test_abstract_socket_address(abstract_receiver: tuple[socket.socket, str]) -> None:
    sock, address = abstract_receiver
    assert Notifier({"NOTIFY_SOCKET": address}).notify(READY=1)
    assert sock.recv(4096) == b"READY=1"


def test_reloading_carries_monotonic_usec(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert Notifier({"NOTIFY_SOCKET": path}).reloading()
    fields = dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())
    assert fields["RELOADING"] == "1"
    assert int(fields["MONOTONIC_USEC"]) >= before


def test_no_socket_means_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert notifier.watchdog_interval_s() is None


def test_unreachable_socket_reports_failure(tmp_path: Path) -> None:
    assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).ready()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({"WATCHDOG_USEC": "20000000"}, 10.0, id="half-of-usec"),
        pytest.param({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}, None, id="other-pid"),
        pytest.param({"WATCHDOG_USEC": "junk"}, None, id="unparsable"),
        pytest.param({"WATCHDOG_USEC": "0"}, None, id="zero"),
        pytest.param({}, None, id="unset"),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": "@unused", **env})
    assert notifier.watchdog_interval_s() == expected


def test_watchdog_interval_honours_our_pid() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(env).watchdog_interval_s() == 1.5


async def test_watchdog_pings_only_while_progressing(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
    stop = asyncio.Event()
    clock = _FakeClock(stop, sleeps_before_stop=5)
    progress = iter([True, True, False, False, True])
    await notifier.watchdog_loop(stop, lambda: next(progress), clock)
    assert clock.slept == [2.0] * 5
    assert _pending(sock) == ["WATCHDOG=1"] * 3


async def test_watchdog_loop_returns_when_not_requested() -> None:
    stop = asyncio.Event()
    clock = _FakeClock(stop, sleeps_before_stop=1)
    await Notifier({}).watchdog_loop(stop, lambda: True, clock)
    assert clock.slept == []
