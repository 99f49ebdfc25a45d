"""The per-run wire cache: always the bytes `to_wire` would dump, at a cost that does not grow
with the time since a run was last read (what kept the 300k listing super-linear)."""

from __future__ import annotations

import json
import random

import pytest

from tinker_recovery.emulator import EmulatorConfig
from tinker_recovery.emulator.fleet import Checkpoint, Run, generate

T0 = 1_800_000_000.0


def _fresh(run: Run, now: float) -> bytes:
    return json.dumps(run.to_wire(now), separators=(",", ":")).encode()


def test_cached_bytes_equal_a_fresh_dump_as_time_passes_and_runs_change() -> None:
    cfg = EmulatorConfig(runs=400, driven_fraction=0.6, checkpoint_interval_s=300.0)
    runs = generate(cfg, T0)
    rng = random.Random(3)
    now = T0
    for step in range(120):
        # Steps from under a request tick to past a checkpoint interval and a TTL.
        now += rng.choice((0.0, 1.0, 7.0, 29.0, 31.0, 299.0, 301.0, 3600.0, 8 * 86400.0))
        for run in rng.sample(runs, 60):
            assert run.wire_bytes(now) == _fresh(run, now), (step, run.run_id)
        victim = rng.choice(runs)
        change = step % 4
        if change == 0:
            victim.corrupted_at = now
            victim.touch()
        elif change == 1:
            victim.add_checkpoint(
                Checkpoint(victim.run_id, f"weights/s{step}", now, 10, expires_at=now + 50.0)
            )
        elif change == 2 and (latest := victim.to_wire(now)["last_checkpoint"]) is not None:
            victim.deleted.add(latest["checkpoint_id"])
            victim.touch()
        assert victim.wire_bytes(now) == _fresh(victim, now)


def test_a_driven_run_read_at_each_request_tick_is_not_rebuilt_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Between two periodic checkpoints only `last_request_time` moves: re-reading the run
    each tick re-renders that value, not the checkpoints (before: a whole rebuild per tick,
    so a slow listing cycle of a big fleet rebuilt ever more runs per cycle)."""
    run = Run(
        run_id="s:train:0",
        session_id="s",
        base_model="Qwen/Qwen3-8B",
        model_owner="alice@acme.example",
        lora_rank=32,
        user_metadata={"team": "evals"},
        kind="driven",
        created_at=T0 - 60,
        origin=T0,
        checkpoint_interval_s=1800.0,
        request_interval_s=30.0,
        periodic_ttl_s=7 * 86400.0,
    )
    full_builds = 0
    latest = Run._latest

    def counting(self: Run, now: float) -> tuple[Checkpoint | None, Checkpoint | None]:
        nonlocal full_builds
        full_builds += 1
        return latest(self, now)

    monkeypatch.setattr(Run, "_latest", counting)
    start = T0 + 3 * 1800.0 + 5.0  # just after the third checkpoint
    seen = set()
    for tick in range(50):  # 25 minutes: 50 new timestamps, no new checkpoint
        now = start + tick * 30.0
        body = run.wire_bytes(now)
        seen.add(json.loads(body)["last_request_time"])
        monkeypatch.setattr(Run, "_latest", latest)
        assert body == _fresh(run, now)
        monkeypatch.setattr(Run, "_latest", counting)
    assert len(seen) == 50
    assert full_builds == 1
    run.wire_bytes(T0 + 4 * 1800.0 + 5.0)  # the fourth checkpoint appears: rebuilt whole
    assert full_builds == 2
