"""SIGKILL a process that is writing to the SQLite store, at many instants, and check the file.

Each `save_attempt` is one transaction with its event, so after any kill the file opens, passes
`PRAGMA integrity_check`, holds every attempt the writer reported as saved, and holds no attempt
without its event (nor an event without its attempt).
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
from store_helpers import FakeClock

from tinker_recovery.shell.store.sqlite import SqliteStore

WRITER = """
import asyncio
import sys
from pathlib import Path
from datetime import UTC, datetime
from tinker_recovery.core.model import Attempt, AttemptStep
from tinker_recovery.shell.clock import SystemClock
from tinker_recovery.shell.store.base import Event
from tinker_recovery.shell.store.sqlite import SqliteStore

async def main() -> None:
    store = SqliteStore(Path(sys.argv[1]), clock=SystemClock())
    await store.open()
    prefix = sys.argv[2]
    for i in range(100_000):
        now = datetime.now(UTC)
        attempt = Attempt(f"{prefix}-{i}", "lin", i + 1, "run", AttemptStep.HANDING_OFF, now, now)
        event = Event(now, "attempt_step", "handing off", attempt_id=attempt.attempt_id)
        await store.save_attempt(attempt, event)
        print(attempt.attempt_id, flush=True)

asyncio.run(main())
"""


def run_and_kill(path: Path, prefix: str, after_lines: int) -> list[str]:
    """Start a writer, SIGKILL it right after it reports `after_lines` saves; return them."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), prefix],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    acknowledged = []
    try:
        for line in proc.stdout:
            if not line.startswith(f"{prefix}-"):
                continue  # a log line (structlog's default output is stdout)
            acknowledged.append(line.strip())
            if len(acknowledged) >= after_lines:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return acknowledged


@pytest.mark.slow
async def test_sigkill_mid_write_leaves_a_consistent_store(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    acknowledged: list[str] = []
    for round_ in range(6):
        # The writer runs in its own process; waiting for it happens off the event loop.
        acknowledged += await asyncio.to_thread(
            run_and_kill, path, f"k{round_}", after_lines=5 + 7 * round_
        )

    store = SqliteStore(path, clock=FakeClock())
    await store.open()  # recovers the WAL left by the killed writer
    try:
        unfinished = {a.attempt_id for a in await store.unfinished_attempts()}
    finally:
        await store.close()

    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        attempts = {r[0] for r in conn.execute("SELECT attempt_id FROM attempts")}
        events = [r[0] for r in conn.execute("SELECT attempt_id FROM events")]
    assert set(acknowledged) <= attempts
    assert sorted(events) == sorted(attempts)  # each attempt with exactly its one event
    assert unfinished == attempts
