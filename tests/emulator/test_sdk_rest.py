"""The official SDK's RestClient against the emulator, over real HTTP."""

from __future__ import annotations

import time
from typing import Literal

import httpx
import pytest
import tinker

from tinker_recovery.emulator import EmulatorServer


def _all_runs(
    rest: tinker.RestClient, scope: Literal["owned", "accessible"], limit: int
) -> list[tinker.types.TrainingRun]:
    runs: list[tinker.types.TrainingRun] = []
    while True:
        page = rest.list_training_runs(limit=limit, offset=len(runs), access_scope=scope).result()
        runs.extend(page.training_runs)
        if len(runs) >= page.cursor.total_count or not page.training_runs:
            return runs


def test_list_training_runs_pages_by_offset_with_total_count(rest: tinker.RestClient) -> None:
    first = rest.list_training_runs(limit=7, offset=0).result()
    second = rest.list_training_runs(limit=7, offset=7).result()
    assert first.cursor.total_count == 30
    assert (first.cursor.offset, first.cursor.limit) == (0, 7)
    assert len(first.training_runs) == len(second.training_runs) == 7
    ids = {r.training_run_id for r in first.training_runs + second.training_runs}
    assert len(ids) == 14
    everything = _all_runs(rest, "owned", 7)
    assert len({r.training_run_id for r in everything}) == 30
    assert all(":train:" in r.training_run_id for r in everything)


def test_list_training_runs_caps_page_size_at_page_max(rest: tinker.RestClient) -> None:
    page = rest.list_training_runs(limit=25).result()
    assert len(page.training_runs) == 10
    assert page.cursor.limit == 10


def test_accessible_scope_adds_runs_shared_by_others(rest: tinker.RestClient) -> None:
    owned = _all_runs(rest, "owned", 10)
    accessible = _all_runs(rest, "accessible", 10)
    assert len(owned) == 30
    assert len(accessible) == 34
    foreign = {r.model_owner for r in accessible} - {r.model_owner for r in owned}
    assert foreign
    assert all(o.endswith("@partner.example") for o in foreign)


def test_fleet_has_realistic_runs(rest: tinker.RestClient) -> None:
    runs = _all_runs(rest, "owned", 10)
    assert len({r.base_model for r in runs}) > 2
    assert all(r.is_lora and r.lora_rank for r in runs)
    assert any(r.user_metadata and "renderer_name" in r.user_metadata for r in runs)
    assert any(r.last_checkpoint and r.last_checkpoint.expires_at for r in runs)
    assert any(r.last_sampler_checkpoint is not None for r in runs)
    assert not any(r.corrupted for r in runs)


def test_get_training_run_and_by_tinker_path(rest: tinker.RestClient) -> None:
    listed = next(
        r for r in rest.list_training_runs(limit=10).result().training_runs if r.last_checkpoint
    )
    assert listed.last_checkpoint is not None
    fetched = rest.get_training_run(listed.training_run_id).result()
    by_path = rest.get_training_run_by_tinker_path(listed.last_checkpoint.tinker_path).result()
    assert fetched == by_path
    assert fetched.training_run_id == listed.training_run_id
    assert fetched.base_model == listed.base_model


def test_unknown_run_is_a_fast_not_found(rest: tinker.RestClient) -> None:
    with pytest.raises(tinker.NotFoundError) as caught:
        rest.get_training_run("no-such-session:train:0").result()
    assert caught.value.status_code == 404
    assert isinstance(caught.value.body, dict)
    assert "detail" in caught.value.body


def _run_with_checkpoints(rest: tinker.RestClient) -> tinker.types.TrainingRun:
    runs = rest.list_training_runs(limit=10).result().training_runs
    return next(r for r in runs if r.last_checkpoint and r.last_sampler_checkpoint)


def test_list_checkpoints_has_both_types_oldest_first(rest: tinker.RestClient) -> None:
    run = _run_with_checkpoints(rest)
    listed = rest.list_checkpoints(run.training_run_id).result().checkpoints
    types = {c.checkpoint_type for c in listed}
    assert types == {"training", "sampler"}
    assert [c.time for c in listed] == sorted(c.time for c in listed)
    newest_training = [c for c in listed if c.checkpoint_type == "training"][-1]
    assert run.last_checkpoint is not None
    assert newest_training.tinker_path == run.last_checkpoint.tinker_path
    assert all(c.tinker_path.startswith(f"tinker://{run.training_run_id}/") for c in listed)


def test_list_user_checkpoints_newest_first_with_cursor(rest: tinker.RestClient) -> None:
    first = rest.list_user_checkpoints(limit=5, offset=0).result()
    second = rest.list_user_checkpoints(limit=5, offset=5).result()
    assert first.cursor is not None
    assert first.cursor.total_count > 10
    times = [c.time for c in first.checkpoints + second.checkpoints]
    assert times == sorted(times, reverse=True)
    capped = rest.list_user_checkpoints(limit=50).result()
    assert len(capped.checkpoints) == 10


def test_weights_info_reflects_run_and_optimizer_state(
    rest: tinker.RestClient, server: EmulatorServer
) -> None:
    run = _run_with_checkpoints(rest)
    assert run.last_checkpoint is not None
    assert run.last_sampler_checkpoint is not None
    info = rest.get_weights_info_by_tinker_path(run.last_checkpoint.tinker_path).result()
    assert (info.base_model, info.is_lora, info.lora_rank) == (
        run.base_model,
        True,
        run.lora_rank,
    )
    # The SDK model defaults optimizer_config, so read the wire to see which one carries it.
    raw = {
        kind: httpx.post(
            f"{server.base_url}/api/v1/weights_info",
            json={"tinker_path": path},
            headers={"X-API-Key": "tml-raw"},
        ).json()
        for kind, path in (
            ("training", run.last_checkpoint.tinker_path),
            ("sampler", run.last_sampler_checkpoint.tinker_path),
        )
    }
    assert raw["training"]["optimizer_config"] == {"type": "adamw"}
    assert "optimizer_config" not in raw["sampler"]


def test_set_checkpoint_ttl_then_clear_it(rest: tinker.RestClient) -> None:
    run = _run_with_checkpoints(rest)
    assert run.last_checkpoint is not None
    path = run.last_checkpoint.tinker_path
    before = time.time()
    rest.set_checkpoint_ttl_from_tinker_path(path, 3600).result()
    ckpt = rest.get_training_run(run.training_run_id).result().last_checkpoint
    assert ckpt is not None
    assert ckpt.expires_at is not None
    assert ckpt.expires_at.timestamp() >= before + 3600 - 5
    rest.set_checkpoint_ttl_from_tinker_path(path, None).result()
    ckpt = rest.get_training_run(run.training_run_id).result().last_checkpoint
    assert ckpt is not None
    assert ckpt.expires_at is None


def test_delete_checkpoint_removes_it_everywhere(rest: tinker.RestClient) -> None:
    run = _run_with_checkpoints(rest)
    assert run.last_checkpoint is not None
    doomed = run.last_checkpoint
    rest.delete_checkpoint_from_tinker_path(doomed.tinker_path).result()
    listed = rest.list_checkpoints(run.training_run_id).result().checkpoints
    assert doomed.checkpoint_id not in {c.checkpoint_id for c in listed}
    after = rest.get_training_run(run.training_run_id).result().last_checkpoint
    assert after is None or after.time < doomed.time
    with pytest.raises(tinker.NotFoundError):
        rest.get_weights_info_by_tinker_path(doomed.tinker_path).result()
