"""Sampling: sampling sessions and `asample`, as SDK 0.38's SamplingClient drives them.

A sampling session is created from a checkpoint (`ServiceClient.create_sampling_client(
model_path=...)`), from a base model, or from a training run's current weights
(`save_weights_and_get_sampling_client`, see training.py). `asample` answers with a future
carrying one `sample_sequence_ids` entry per sample; its result is a protobuf
`SampleResponse` of the requested shape (model.py makes the tokens and logprobs).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tinker_recovery.emulator.state import ApiError, Emulator, Sampler

MAX_SAMPLES = 128
MAX_TOKENS = 4096
DEFAULT_MAX_TOKENS = 16
UNSUPPORTED = (
    "topk_prompt_logprobs",
    "topk_sample_logprobs",
    "target_prompt_logprobs",
    "prompt_alt_tokens_k",
    "prompt_logprobs_last_n",
)


def _sampler_from_path(emu: Emulator, sampler_id: str, session_id: str, model_path: str) -> Sampler:
    run, ckpt = emu.checkpoint(model_path)
    if model_path in emu.unloadable:
        raise ApiError(400, emu.unloadable[model_path])
    return Sampler(sampler_id, session_id, run.base_model, model_path, ckpt.train_step)


def create_sampling_session(emu: Emulator, body: dict[str, Any]) -> dict[str, Any]:
    session_id = body.get("session_id")
    seq = body.get("sampling_session_seq_id")
    if not isinstance(session_id, str) or isinstance(seq, bool) or not isinstance(seq, int):
        raise ApiError(400, "session_id and sampling_session_seq_id are required")
    model_path, base_model = body.get("model_path"), body.get("base_model")
    with emu.lock:
        session = emu.sessions.get(session_id)
        if session is None:
            raise ApiError(404, "session not found")
        sampler_id = f"{session_id}:sample:{seq}"
        if sampler_id in emu.samplers:
            raise ApiError(400, f"sampling session {sampler_id} already exists")
        if isinstance(model_path, str):
            sampler = _sampler_from_path(emu, sampler_id, session_id, model_path)
        elif isinstance(base_model, str) and base_model:
            sampler = Sampler(sampler_id, session_id, base_model, None, 0)
        else:
            raise ApiError(400, "give model_path or base_model")
        emu.samplers[sampler_id] = sampler
        emu.seen(session)
        return {"sampling_session_id": sampler_id, "type": "create_sampling_session"}


def get_sampler(emu: Emulator, sampler_id: str) -> dict[str, Any]:
    with emu.lock:
        sampler = emu.samplers.get(sampler_id)
        if sampler is None:
            raise ApiError(404, "sampler not found")
        return {
            "sampler_id": sampler.sampler_id,
            "base_model": sampler.base_model,
            "model_path": sampler.model_path,
        }


def _stops(params: Mapping[str, Any]) -> tuple[list[int], bool]:
    """(stop token ids, whether something else may end a sample early: stop strings, or the
    implicit end-of-sequence that `stop: null` keeps)."""
    stop = params.get("stop")
    if stop is None:
        return [], True
    if isinstance(stop, str):
        return [], True
    if not isinstance(stop, list):
        raise ApiError(400, "sampling_params.stop must be a string, a list or null")
    if all(isinstance(s, int) and not isinstance(s, bool) for s in stop):
        return list(stop), False
    if all(isinstance(s, str) for s in stop):
        return [], bool(stop)
    raise ApiError(400, "sampling_params.stop must be all strings or all token ids")


def _count(value: object, name: str, default: int, limit: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise ApiError(400, f"{name} must be an integer from 0 to {limit}")
    return value


def _resolve(emu: Emulator, body: Mapping[str, Any]) -> Sampler:
    sampler_id = body.get("sampling_session_id")
    if isinstance(sampler_id, str):
        sampler = emu.samplers.get(sampler_id)
        if sampler is None:
            raise ApiError(404, "sampling session not found")
        return sampler
    model_path, base_model = body.get("model_path"), body.get("base_model")
    if isinstance(model_path, str):
        return _sampler_from_path(emu, "", "", model_path)
    if isinstance(base_model, str) and base_model:
        return Sampler("", "", base_model, None, 0)
    raise ApiError(400, "give sampling_session_id, model_path or base_model")


def asample(emu: Emulator, body: dict[str, Any]) -> dict[str, Any]:
    """One sample request: `num_samples` sequences of at most `max_tokens` tokens each."""
    from tinker_recovery.emulator import model, wire

    for name in UNSUPPORTED:
        if body.get(name):
            raise ApiError(400, f"{name} is not emulated")
    num_samples = _count(body.get("num_samples", 1), "num_samples", 1, MAX_SAMPLES)
    params = body.get("sampling_params") or {}
    if not isinstance(params, Mapping):
        raise ApiError(400, "sampling_params must be an object")
    max_tokens = _count(params.get("max_tokens"), "max_tokens", DEFAULT_MAX_TOKENS, MAX_TOKENS)
    stop_tokens, may_stop = _stops(params)
    seed = params.get("seed")
    prompt = wire.prompt_tokens(body.get("prompt"))
    seq_id = body.get("seq_id")
    with emu.lock:
        sampler = _resolve(emu, body)
        request_seq = seq_id if isinstance(seq_id, int) else sampler.samples
        sampler.samples += 1
        session = emu.sessions.get(sampler.session_id)
        if session is not None:
            emu.seen(session)
    sequences = model.sample(
        prompt,
        num_samples=num_samples,
        max_tokens=max_tokens,
        stop_tokens=stop_tokens,
        may_stop_early=may_stop,
        seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
        request_seq=request_seq,
        step=sampler.step,
    )
    logprobs = model.prompt_logprobs(prompt, sampler.step) if body.get("prompt_logprobs") else None
    ids = [f"{sampler.sampler_id or 'direct'}:{request_seq}:{i}" for i in range(num_samples)]
    return emu.submit(wire.sample_response(sequences, logprobs), extra={"sample_sequence_ids": ids})
