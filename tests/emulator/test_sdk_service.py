"""The official SDK's ServiceClient and TrainingClient against the emulator: restores,
saves, the futures protocol, heartbeats and close."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import numpy as np
import pytest
import tinker
import tinker.lib.internal_client_holder as holder_module
from tinker import types

from tinker_recovery.emulator import EmulatorConfig, EmulatorServer

from .conftest import api_key

HEARTBEAT_PERIOD_S = 10  # SESSION_HEARTBEAT_PERIOD_SEC, a local constant in the SDK 0.38 loop
TAGS = {
    "tinker_recovery.lineage": "lin-42",
    "tinker_recovery.recovered_from": "",
    "tinker_recovery.attempt": "1",
    "tinker_recovery.idempotency_key": "idem-42-1",
}


def _checkpointed_run(rest: tinker.RestClient) -> types.TrainingRun:
    runs = rest.list_training_runs(limit=10).result().training_runs
    return next(r for r in runs if r.last_checkpoint and r.last_sampler_checkpoint)


def _session_id(model_id: str) -> str:
    session, _, seq = model_id.rpartition(":train:")
    assert seq.isdigit()
    return session


def test_restore_with_optimizer_creates_tagged_successor_and_saves(
    server: EmulatorServer, rest: tinker.RestClient, service: tinker.ServiceClient
) -> None:
    source = _checkpointed_run(rest)
    assert source.last_checkpoint is not None
    tags = {**TAGS, "tinker_recovery.recovered_from": source.training_run_id}
    path = source.last_checkpoint.tinker_path

    client = service.create_training_client_from_state_with_optimizer(
        path, user_metadata=tags
    ).result()

    assert client.model_id is not None
    assert client.model_id.endswith(":train:0")
    successor = rest.get_training_run(client.model_id).result()
    assert successor.user_metadata == tags
    assert (successor.base_model, successor.lora_rank) == (source.base_model, source.lora_rank)
    assert successor.model_owner == server.config.owner
    assert successor.last_checkpoint is None

    saved = client.save_state("restored-0001").result()
    assert saved.path == f"tinker://{client.model_id}/weights/restored-0001"
    successor = rest.get_training_run(client.model_id).result()
    assert successor.last_checkpoint is not None
    assert successor.last_checkpoint.tinker_path == saved.path
    info = rest.get_weights_info_by_tinker_path(saved.path).result()
    assert info.base_model == source.base_model

    lineage = httpx.get(f"{server.base_url}/_emulator/runs/{client.model_id}").json()
    assert lineage["recovered_from"] == source.training_run_id
    assert lineage["loaded_from"] == path
    assert lineage["lineage"] == "lin-42"
    parent = httpx.get(f"{server.base_url}/_emulator/runs", params={"limit": 500}).json()
    row = next(r for r in parent["runs"] if r["run_id"] == source.training_run_id)
    assert row["successors"] == [client.model_id]


def test_weights_only_restore_gets_next_model_id_in_the_same_session(
    rest: tinker.RestClient, service: tinker.ServiceClient
) -> None:
    source = _checkpointed_run(rest)
    assert source.last_checkpoint is not None
    first = service.create_training_client_from_state_with_optimizer(
        source.last_checkpoint.tinker_path
    ).result()
    second = service.create_training_client_from_state(
        source.last_checkpoint.tinker_path, user_metadata={"team": "evals"}
    ).result()
    assert first.model_id is not None
    assert second.model_id is not None
    assert second.model_id == f"{_session_id(first.model_id)}:train:1"
    assert rest.get_training_run(second.model_id).result().user_metadata == {"team": "evals"}


def test_restore_from_unloadable_checkpoint_fails_as_user_error(
    server: EmulatorServer, rest: tinker.RestClient, service: tinker.ServiceClient
) -> None:
    source = _checkpointed_run(rest)
    assert source.last_checkpoint is not None
    path = source.last_checkpoint.tinker_path
    marked = httpx.post(
        f"{server.base_url}/_emulator/checkpoints/unloadable", json={"tinker_path": path}
    )
    assert marked.status_code == 200

    with pytest.raises(tinker.RequestFailedError) as caught:
        service.create_training_client_from_state_with_optimizer(path).result()
    assert caught.value.category == types.RequestErrorCategory.User
    assert "unreadable" in str(caught.value)


@pytest.mark.parametrize(
    "pick",
    [
        pytest.param(
            lambda r: r.last_sampler_checkpoint.tinker_path, id="sampler-has-no-optimizer"
        ),
        pytest.param(
            lambda r: f"tinker://{r.training_run_id}/weights/nope", id="missing-checkpoint"
        ),
    ],
)
def test_restore_refusals_are_request_failures(
    rest: tinker.RestClient, service: tinker.ServiceClient, pick: Any
) -> None:
    source = _checkpointed_run(rest)
    with pytest.raises(tinker.RequestFailedError) as caught:
        service.create_training_client_from_state_with_optimizer(pick(source)).result()
    assert caught.value.category == types.RequestErrorCategory.User


def test_requests_driving_a_corrupted_run_fail(
    server: EmulatorServer, rest: tinker.RestClient, service: tinker.ServiceClient
) -> None:
    source = _checkpointed_run(rest)
    assert source.last_checkpoint is not None
    client = service.create_training_client_from_state_with_optimizer(
        source.last_checkpoint.tinker_path
    ).result()
    assert client.model_id is not None
    corrupted = httpx.post(f"{server.base_url}/_emulator/runs/{client.model_id}/corrupt")
    assert corrupted.json()["corrupted"] is True
    assert rest.get_training_run(client.model_id).result().corrupted is True

    with pytest.raises(tinker.RequestFailedError) as caught:
        client.save_state("after-corruption").result()
    assert caught.value.category == types.RequestErrorCategory.Server


def test_fresh_lora_client_trains_and_exports_for_sampling(
    rest: tinker.RestClient, service: tinker.ServiceClient
) -> None:
    client = service.create_lora_training_client("Qwen/Qwen3-8B", rank=16).result()
    assert client.model_id is not None
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(np.array([2, 3, 4], dtype=np.int64)),
            "weights": types.TensorData.from_numpy(np.ones(3, dtype=np.float32)),
        },
    )
    out = client.forward_backward([datum], "cross_entropy").result()
    assert "loss:sum" in out.metrics
    client.optim_step(types.AdamParams(learning_rate=1e-4)).result()
    sampler = client.save_weights_for_sampler("000010").result()
    assert sampler.path == f"tinker://{client.model_id}/sampler_weights/000010"
    run = rest.get_training_run(client.model_id).result()
    assert run.lora_rank == 16
    assert run.last_sampler_checkpoint is not None
    assert run.last_sampler_checkpoint.tinker_path == sampler.path


class _QuickHeartbeatAsyncio:
    """The asyncio module, except that the heartbeat loop's 10 s sleep lasts 20 ms."""

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    @staticmethod
    async def sleep(delay: float, result: Any = None) -> Any:
        return await asyncio.sleep(0.02 if delay == HEARTBEAT_PERIOD_S else delay, result)


def test_heartbeats_keep_the_session_runs_progressing_until_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The SDK heartbeats every 10 s from a local constant; shortening that one sleep
    # lets the real heartbeat loop run within a unit test.
    monkeypatch.setattr(holder_module, "asyncio", _QuickHeartbeatAsyncio())
    with EmulatorServer(EmulatorConfig(runs=5, seed=3)) as server:
        emu = server.emulator
        service = tinker.ServiceClient(base_url=server.base_url, api_key=api_key(server))
        client = service.create_lora_training_client("meta-llama/Llama-3.1-8B", rank=8).result()
        assert client.model_id is not None
        run = emu.runs[client.model_id]
        started = run.last_request_at
        emu.advance(120.0)
        # Heartbeats may have started already; one more may be in flight across the advance.
        seen = emu.request_counts()["requests"].get("session_heartbeat", 0)

        assert emu.wait_for_requests("session_heartbeat", seen + 2, timeout_s=10.0)
        assert run.last_request_at >= started + 120.0

        service.close("success", detail="contract test").result()
        session = emu.sessions[_session_id(client.model_id)]
        assert session.finished == "success"
        assert emu.request_counts()["requests"]["finish_session"] == 1


def test_futures_answer_try_again_before_their_result() -> None:
    with EmulatorServer(EmulatorConfig(runs=5, seed=4, future_try_again=2)) as server:
        service = tinker.ServiceClient(base_url=server.base_url, api_key=api_key(server))
        try:
            client = service.create_lora_training_client("Qwen/Qwen3-8B", rank=8).result()
            saved = client.save_state("first").result()
        finally:
            service.close("success").result()
        assert saved.path == f"tinker://{client.model_id}/weights/first"
        # Two futures (create_model, save_weights), each polled twice more than needed.
        assert server.emulator.request_counts()["requests"]["retrieve_future"] == 6
