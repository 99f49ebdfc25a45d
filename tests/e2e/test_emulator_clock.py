"""The emulator's clock agrees with the wall clock of the processes that talk to it.

The daemon compares the service's timestamps (checkpoint times, last requests) with its own
clock; an emulator running up to a second behind made confirmations fail at random.
"""

from __future__ import annotations

import pytest

from tinker_recovery.emulator import Emulator, EmulatorConfig


@pytest.mark.parametrize("scale", [1.0, 60.0])
def test_emulated_now_starts_at_the_wall_clock_not_the_whole_second(scale: float) -> None:
    ticks = [500.0]
    emu = Emulator(
        EmulatorConfig(runs=1, time_scale=scale),
        monotonic=lambda: ticks[0],
        wall=lambda: 1_800_000_000.75,
    )
    assert emu.now() == pytest.approx(1_800_000_000.75)
    ticks[0] += 2.0
    assert emu.now() == pytest.approx(1_800_000_000.75 + 2.0 * scale)


def test_an_explicit_start_time_is_kept_exactly() -> None:
    emu = Emulator(
        EmulatorConfig(runs=1, start_time=1_800_000_000.0),
        monotonic=lambda: 7.0,
        wall=lambda: 1_900_000_000.5,
    )
    assert emu.now() == 1_800_000_000.0
