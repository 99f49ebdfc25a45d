"""Fixtures for the HA tests: one emulator per test; replicas are always reaped."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from e2e.harness import Emu, emulator


@pytest.fixture
def emu() -> Iterator[Emu]:
    with emulator() as running:
        yield running
