"""The official SDK runs a real training loop against the emulator: per-datum loss outputs,
a loss that follows the step count across restores, sampling clients of every kind, and the
service's TTL floor with cookbook-style rolling saves."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tinker
from tinker import types

from tinker_recovery.emulator import EmulatorServer

from .conftest import api_key


def _datum(tokens: list[int]) -> types.Datum:
    """A next-token datum: input tokens[:-1], targets tokens[1:], every target weighted 1."""
    n = len(tokens) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(np.array(tokens[1:], dtype=np.int64)),
            "weights": types.TensorData.from_numpy(np.ones(n, dtype=np.float32)),
        },
    )


def _mean_nll(out: types.ForwardBackwardOutput, data: list[types.Datum]) -> float:
    """What tinker-cookbook's compute_mean_nll computes, on the parsed SDK types."""
    total, weight = 0.0, 0.0
    for output, datum in zip(out.loss_fn_outputs, data, strict=True):
        weights = np.asarray(datum.loss_fn_inputs["weights"].data, dtype=np.float32)
        total += float(np.dot(output["logprobs"].to_numpy(), weights))
        weight += float(weights.sum())
    return -total / weight


BATCH = [_datum([5, 6, 7, 8, 9]), _datum([10, 11, 12]), _datum([1, 2, 3, 4, 5, 6, 7, 8])]


def test_forward_backward_returns_one_logprob_per_target_token(
    service: tinker.ServiceClient,
) -> None:
    client = service.create_lora_training_client("Qwen/Qwen3-8B", rank=8).result()

    out = client.forward_backward(BATCH, "cross_entropy").result()

    assert out.loss_fn_output_type == "ArrayRecord"
    assert len(out.loss_fn_outputs) == len(BATCH)
    for output, datum in zip(out.loss_fn_outputs, BATCH, strict=True):
        logprobs = output["logprobs"]
        assert logprobs.dtype == "float32"
        assert logprobs.shape == datum.loss_fn_inputs["target_tokens"].shape
        assert all(v < 0 for v in logprobs.data)
    nll = _mean_nll(out, BATCH)
    assert 0.0 < nll < 10.0
    assert out.metrics["loss:sum"] == pytest.approx(
        nll * sum(len(d.loss_fn_inputs["weights"].data) for d in BATCH), rel=1e-5
    )


def test_loss_falls_with_optimizer_steps_and_forward_does_not_step(
    service: tinker.ServiceClient,
) -> None:
    client = service.create_lora_training_client("Qwen/Qwen3-8B", rank=8).result()
    first = _mean_nll(client.forward_backward(BATCH, "cross_entropy").result(), BATCH)
    adam = types.AdamParams(learning_rate=1e-4)

    for _ in range(5):
        client.forward_backward(BATCH, "cross_entropy").result()
        client.optim_step(adam).result()
    after = _mean_nll(client.forward(BATCH, "cross_entropy").result(), BATCH)
    again = _mean_nll(client.forward(BATCH, "cross_entropy").result(), BATCH)

    assert after < first
    assert again == after  # forward (forward_only) takes no step


def test_restore_continues_the_loss_curve_from_the_saved_step(
    service: tinker.ServiceClient,
) -> None:
    client = service.create_lora_training_client("Qwen/Qwen3-8B", rank=8).result()
    adam = types.AdamParams(learning_rate=1e-4)
    for _ in range(8):
        client.forward_backward(BATCH, "cross_entropy").result()
        client.optim_step(adam).result()
    at_save = _mean_nll(client.forward(BATCH, "cross_entropy").result(), BATCH)
    state = client.save_state("000008").result()

    restored = service.create_training_client_from_state_with_optimizer(state.path).result()
    fresh = service.create_lora_training_client("Qwen/Qwen3-8B", rank=8).result()

    assert _mean_nll(restored.forward(BATCH, "cross_entropy").result(), BATCH) == at_save
    assert _mean_nll(fresh.forward(BATCH, "cross_entropy").result(), BATCH) > at_save


PROMPT = types.ModelInput.from_ints([101, 102, 103, 104])


def test_sampling_client_from_saved_sampler_weights_honours_the_request(
    service: tinker.ServiceClient,
) -> None:
    trainer = service.create_lora_training_client("Qwen/Qwen3-8B", rank=8).result()
    saved = trainer.save_weights_for_sampler("000000").result()
    sampler = service.create_sampling_client(model_path=saved.path).result()
    assert sampler.get_base_model() == "Qwen/Qwen3-8B"

    result = sampler.sample(
        PROMPT, num_samples=3, sampling_params=types.SamplingParams(max_tokens=7, stop=[])
    ).result()

    assert len(result.sequences) == 3
    for seq in result.sequences:
        assert len(seq.tokens) == 7
        assert seq.stop_reason == "length"
        assert seq.logprobs is not None
        assert len(seq.logprobs) == 7
        assert set(seq.tokens) <= {101, 102, 103, 104}
    assert len({seq.sequence_id for seq in result.sequences}) == 3


def test_sampling_stops_on_stop_tokens_and_scores_the_prompt(
    service: tinker.ServiceClient,
) -> None:
    trainer = service.create_lora_training_client("Qwen/Qwen3-8B", rank=8).result()
    sampler = trainer.save_weights_and_get_sampling_client().result()
    params = types.SamplingParams(max_tokens=12, stop=[999], seed=3)

    result = sampler.sample(PROMPT, 16, params, include_prompt_logprobs=True).result()

    reasons = {seq.stop_reason for seq in result.sequences}
    assert reasons == {"stop", "length"}
    for seq in result.sequences:
        assert 1 <= len(seq.tokens) <= 12
        if seq.stop_reason == "stop":
            assert seq.tokens[-1] == 999
        else:
            assert len(seq.tokens) == 12
    assert result.prompt_logprobs is not None
    assert result.prompt_logprobs[0] is None
    assert len(result.prompt_logprobs) == PROMPT.length
    assert all(v is not None and v < 0 for v in result.prompt_logprobs[1:])
    # The same seed gives the same samples.
    again = sampler.sample(PROMPT, 16, params).result()
    assert [s.tokens for s in again.sequences] == [s.tokens for s in result.sequences]


def test_training_client_samples_from_a_model_path_and_counts_requests(
    server: EmulatorServer, service: tinker.ServiceClient
) -> None:
    trainer = service.create_lora_training_client("meta-llama/Llama-3.1-8B", rank=8).result()
    saved = trainer.save_weights_for_sampler("ckpt").result()
    sampler = trainer.create_sampling_client(saved.path).result()

    futures = [
        sampler.sample(PROMPT, 2, types.SamplingParams(max_tokens=3, stop=[])) for _ in range(4)
    ]
    results = [f.result() for f in futures]

    assert [len(r.sequences) for r in results] == [2, 2, 2, 2]
    counts = server.emulator.request_counts()["requests"]
    assert counts["asample"] == 4
    assert counts["create_sampling_session"] == 1


def test_sampling_client_for_a_missing_checkpoint_fails_fast(
    server: EmulatorServer, service: tinker.ServiceClient
) -> None:
    trainer = service.create_lora_training_client("Qwen/Qwen3-8B", rank=8).result()
    missing = f"tinker://{trainer.model_id}/sampler_weights/nope"

    with pytest.raises(tinker.NotFoundError) as caught:
        service.create_sampling_client(model_path=missing).result()
    assert "checkpoint not found" in str(caught.value)


def test_ttl_below_an_hour_is_refused_as_the_service_does(
    rest: tinker.RestClient, service: tinker.ServiceClient
) -> None:
    client = service.create_lora_training_client("Qwen/Qwen3-8B", rank=8).result()
    saved = client.save_state("periodic").result()

    with pytest.raises(tinker.BadRequestError) as caught:
        rest.set_checkpoint_ttl_from_tinker_path(saved.path, 600).result()
    assert caught.value.status_code == 400
    assert "3600" in str(caught.value)
    with pytest.raises(tinker.BadRequestError):
        client.save_state("short-lived", ttl_seconds=60).result()

    rest.set_checkpoint_ttl_from_tinker_path(saved.path, 3600).result()
    [ckpt] = rest.list_checkpoints(client.model_id).result().checkpoints
    assert ckpt.expires_at is not None
    assert ckpt.checkpoint_id == "weights/periodic"


def test_rolling_saves_delete_the_previous_one(
    rest: tinker.RestClient, service: tinker.ServiceClient
) -> None:
    """The cookbook's rolling checkpoints: state only, a 2 h TTL, each deletes the one before."""
    client = service.create_lora_training_client("Qwen/Qwen3-8B", rank=8).result()
    previous: str | None = None
    for step in (5, 10, 15):
        path = client.save_state(f"rolling-{step:06d}", ttl_seconds=7200).result().path
        if previous is not None:
            rest.delete_checkpoint_from_tinker_path(previous).result()
        previous = path

    listed = rest.list_checkpoints(client.model_id).result().checkpoints
    assert [c.checkpoint_id for c in listed] == ["weights/rolling-000015"]
    [only] = listed
    assert only.expires_at is not None
    remaining = only.expires_at.timestamp() - only.time.timestamp()
    assert math.isclose(remaining, 7200, abs_tol=1)
    with pytest.raises(tinker.NotFoundError):
        rest.delete_checkpoint_from_tinker_path(
            f"tinker://{client.model_id}/weights/rolling-000010"
        ).result()


def test_emulator_serves_every_sdk_sampling_route(server: EmulatorServer) -> None:
    """A fresh ServiceClient samples a base model without any training client."""
    service = tinker.ServiceClient(base_url=server.base_url, api_key=api_key(server))
    try:
        sampler = service.create_sampling_client(base_model="Qwen/Qwen3-8B").result()
        out = sampler.sample(PROMPT, 1, types.SamplingParams(max_tokens=2, stop=[])).result()
    finally:
        service.close("success").result()
    assert [len(s.tokens) for s in out.sequences] == [2]
