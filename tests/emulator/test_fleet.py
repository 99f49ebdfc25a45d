"""Pure checks of the fleet model: arithmetic checkpoints, visibility, caching, ids."""

from __future__ import annotations

import json
import math

import pytest

from tinker_recovery.emulator import Emulator, EmulatorConfig
from tinker_recovery.emulator.fleet import Checkpoint, Run, generate, parse_tinker_path

T0 = 1_800_000_000.0


def _driven(**changes: object) -> Run:
    fields: dict[str, object] = {
        "run_id": "s:train:0",
        "session_id": "s",
        "base_model": "Qwen/Qwen3-8B",
        "model_owner": "alice@acme.example",
        "lora_rank": 32,
        "user_metadata": None,
        "kind": "driven",
        "created_at": T0 - 60,
        "origin": T0,
        "checkpoint_interval_s": 100.0,
        "request_interval_s": 10.0,
        "steps_per_checkpoint": 5,
        "sampler_every": 2,
    }
    fields.update(changes)
    return Run(**fields)  # type: ignore[arg-type]  # test factory over a wide dataclass


def test_driven_run_checkpoints_on_schedule() -> None:
    run = _driven()
    listed = run.checkpoints(T0 + 450)
    ids = [c.checkpoint_id for c in listed]
    assert ids == [
        "weights/000005",
        "weights/000010",
        "sampler_weights/000010",
        "weights/000015",
        "weights/000020",
        "sampler_weights/000020",
    ]
    assert run.last_request(T0 + 455) == T0 + 450
    wire = run.to_wire(T0 + 455)
    assert wire["last_checkpoint"]["checkpoint_id"] == "weights/000020"
    assert wire["last_sampler_checkpoint"]["checkpoint_id"] == "sampler_weights/000020"


def test_corruption_freezes_progress() -> None:
    run = _driven(corrupted_at=T0 + 250)
    assert run.last_request(T0 + 10_000) == T0 + 250
    assert run.to_wire(T0 + 10_000)["last_checkpoint"]["checkpoint_id"] == "weights/000010"


def test_expired_periodic_checkpoints_disappear() -> None:
    run = _driven(periodic_ttl_s=250.0)
    ids = [c.checkpoint_id for c in run.checkpoints(T0 + 460)]
    # Saved at 100..400; with a 250 s TTL only those after 210 are still there.
    assert ids == ["weights/000015", "weights/000020", "sampler_weights/000020"]


def test_deleted_latest_falls_back_to_the_previous_one() -> None:
    run = _driven()
    run.deleted.add("weights/000020")
    run.touch()
    assert run.to_wire(T0 + 455)["last_checkpoint"]["checkpoint_id"] == "weights/000015"


def test_saved_checkpoint_wins_when_newest() -> None:
    run = _driven()
    run.add_checkpoint(Checkpoint(run.run_id, "weights/manual", T0 + 430, 1))
    assert run.to_wire(T0 + 455)["last_checkpoint"]["checkpoint_id"] == "weights/manual"


def test_cache_is_reused_until_a_change_or_the_next_tick() -> None:
    run = _driven()
    first = run.wire_bytes(T0 + 451)
    assert run.wire_bytes(T0 + 455) is first
    assert run.wire_bytes(T0 + 461) is not first
    again = run.wire_bytes(T0 + 462)
    run.user_metadata = {"team": "x"}
    run.touch()
    assert json.loads(run.wire_bytes(T0 + 462))["user_metadata"] == {"team": "x"}
    assert again is not run.cache


@pytest.mark.parametrize(
    "path",
    [
        "s3://run/weights/1",
        "tinker://run/weights",
        "tinker://run/other/1",
        "tinker://run/weights/1/extra",
        "tinker:///weights/1",
    ],
)
def test_bad_tinker_paths_are_rejected(path: str) -> None:
    with pytest.raises(ValueError, match="tinker"):
        parse_tinker_path(path)


def test_tinker_path_parses_to_run_and_checkpoint_id() -> None:
    assert parse_tinker_path("tinker://a-b:train:3/sampler_weights/final") == (
        "a-b:train:3",
        "sampler_weights/final",
    )


def test_generated_fleet_is_deterministic_and_shaped_by_config() -> None:
    config = EmulatorConfig(runs=200, shared_runs=10, corrupted_at_start=3, driven_fraction=0.5)
    first = generate(config, T0)
    second = generate(config, T0)
    assert [r.run_id for r in first] == [r.run_id for r in second]
    assert len({r.run_id for r in first}) == 210
    assert sum(r.shared for r in first) == 10
    assert sum(r.corrupted for r in first) == 3
    driven = sum(r.kind == "driven" for r in first)
    assert 60 < driven < 140
    assert all(r.stopped_at == math.inf for r in first if r.kind == "driven")


def test_emulated_time_follows_the_injected_clock_scaled() -> None:
    ticks = [0.0]
    emu = Emulator(
        EmulatorConfig(runs=1, start_time=T0, time_scale=60.0), monotonic=lambda: ticks[0]
    )
    assert emu.now() == T0
    ticks[0] = 2.0
    assert emu.now() == T0 + 120.0
    emu.advance(30.0)
    assert emu.now() == T0 + 150.0
