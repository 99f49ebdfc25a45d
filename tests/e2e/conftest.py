"""Fixtures for the end-to-end tests: an emulator per test and daemons that are always reaped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.harness import DaemonProc, Emu, emulator


@pytest.fixture
def emu() -> Iterator[Emu]:
    with emulator() as running:
        yield running


@pytest.fixture
def daemons() -> Iterator[Callable[[Path, dict[str, Any]], DaemonProc]]:
    """A factory of DaemonProc; every process it made is SIGKILLed at teardown if still alive."""
    made: list[DaemonProc] = []

    def make(workdir: Path, config: dict[str, Any]) -> DaemonProc:
        proc = DaemonProc(workdir, config)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.kill()
