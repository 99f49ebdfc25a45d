"""Running the real daemon as a child process: a free loopback port, sd_notify messages.

The daemon tells us when it is ready (READY=1) and stopping (STOPPING=1) over $NOTIFY_SOCKET,
so the tests wait on those datagrams instead of sleeping and polling HTTP.
"""

from __future__ import annotations

import socket
import subprocess
import time

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(notify: socket.socket, word: bytes, proc: subprocess.Popen[str]) -> list[bytes]:
    """Datagrams from the daemon until one carries `word`; fail early if the daemon exits."""
    seen: list[bytes] = []
    deadline = time.monotonic() + 30
    notify.settimeout(0.5)  # short, so that a daemon that died is noticed at once
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            message = notify.recv(4096)
        except TimeoutError:
            continue
        seen.append(message)
        if word in message.split(b"\n"):
            return seen
    proc.kill()
    _, err = proc.communicate()
    pytest.fail(f"no {word!r} (exit {proc.returncode}); saw {seen}; stderr: {err[-2000:]}")
