"""next_delay_s: full jitter between 0 and an exponentially growing, capped ceiling."""

from __future__ import annotations

import math
import random

import pytest

from tinker_recovery.core import backoff
from tinker_recovery.settings import BackoffSettings

CFG = BackoffSettings(base=30, factor=2, cap=600)


@pytest.mark.parametrize(
    ("failures", "ceiling"),
    [
        pytest.param(0, 30.0, id="zero-treated-as-first"),
        pytest.param(1, 30.0, id="first-is-base"),
        pytest.param(2, 60.0, id="doubles"),
        pytest.param(5, 480.0, id="fifth"),
        pytest.param(6, 600.0, id="capped"),
        pytest.param(10_000, 600.0, id="huge-no-overflow"),
    ],
)
def test_ceiling_grows_then_caps(failures: int, ceiling: float) -> None:
    assert backoff.ceiling_s(failures, CFG) == ceiling


@pytest.mark.parametrize(
    ("rand", "delay"),
    [
        pytest.param(0.0, 0.0, id="min-is-zero"),
        pytest.param(0.5, 30.0, id="middle"),
        pytest.param(math.nextafter(1.0, 0.0), 60.0, id="max-approaches-ceiling"),
        pytest.param(-0.5, 0.0, id="negative-rand-clamped"),
        pytest.param(7.0, 60.0, id="large-rand-clamped"),
        pytest.param(math.nan, 0.0, id="nan-rand-clamped"),
    ],
)
def test_delay_is_rand_times_ceiling(rand: float, delay: float) -> None:
    assert backoff.next_delay_s(2, CFG, rand) == pytest.approx(delay)


@pytest.mark.parametrize(
    "cfg",
    [
        pytest.param(BackoffSettings(base=0, factor=2, cap=600), id="zero-base"),
        pytest.param(BackoffSettings(base=30, factor=2, cap=0), id="zero-cap"),
    ],
)
def test_degenerate_settings_give_no_delay(cfg: BackoffSettings) -> None:
    assert backoff.next_delay_s(3, cfg, 0.9) == 0.0


def test_factor_one_is_constant() -> None:
    cfg = BackoffSettings(base=10, factor=1, cap=600)
    assert {backoff.ceiling_s(n, cfg) for n in range(1, 50)} == {10.0}


def test_base_above_cap_is_capped() -> None:
    assert backoff.ceiling_s(1, BackoffSettings(base=900, factor=2, cap=600)) == 600.0


def test_bounds_hold_for_many_seeds() -> None:
    """Property check: for any draw, 0 <= delay <= min(cap, base * factor**(n-1))."""
    for seed in range(300):
        rng = random.Random(seed)
        cfg = BackoffSettings(
            base=rng.uniform(0, 100), factor=rng.uniform(1, 5), cap=rng.uniform(0, 3600)
        )
        failures = rng.randint(1, 200)
        delay = backoff.next_delay_s(failures, cfg, rng.random())
        bound = min(cfg.cap, cfg.base * cfg.factor ** min(failures - 1, 60))
        assert 0.0 <= delay <= bound + 1e-9, (seed, cfg, failures, delay)


def test_delays_spread_across_the_range() -> None:
    """Full jitter really spreads retries: draws fill both halves of [0, ceiling]."""
    rng = random.Random(7)
    delays = [backoff.next_delay_s(3, CFG, rng.random()) for _ in range(1000)]
    assert min(delays) < 12
    assert max(delays) > 108
    assert 40 < sum(delays) / len(delays) < 80  # mean of U(0, 120) is 60
