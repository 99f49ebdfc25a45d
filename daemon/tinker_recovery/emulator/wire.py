"""Protobuf and JSON shapes of the training and sampling payloads (SDK 0.38's public proto).

`forward_backward` requests arrive as protobuf (the SDK's only encoding) or, from other
clients, as JSON; both are read into `DatumShape`s. Results that the SDK only accepts as
protobuf (`ForwardBackwardOutput`, `SampleResponse`) are built here. Imported lazily by the
HTTP layer: the protobuf runtime is only needed when a job actually trains or samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tinker.proto import tinker_public_pb2 as public_pb

from tinker_recovery.emulator import model
from tinker_recovery.emulator.state import ApiError

_NUMPY_OF: dict[int, Any] = {
    public_pb.DTYPE_FLOAT32: np.float32,
    public_pb.DTYPE_INT64: np.int64,
    public_pb.DTYPE_INT32: np.int32,
}


@dataclass(frozen=True, slots=True)
class DatumShape:
    """What the emulator needs of one datum: its input tokens and the tokens its loss covers."""

    input_tokens: list[int]
    targets: list[int]
    weights: list[float] | None


@dataclass(frozen=True, slots=True)
class FwdBwdRequest:
    model_id: str
    loss_fn: str
    forward_only: bool
    data: list[DatumShape]


def _tensor_values(tensor: public_pb.Tensor) -> list[float] | list[int]:
    dtype = _NUMPY_OF.get(tensor.dtype)
    if dtype is None:
        raise ApiError(400, f"unsupported tensor dtype {tensor.dtype}")
    if tensor.HasField("sparse_csr"):
        raise ApiError(400, "sparse loss_fn_inputs are not supported by the emulator")
    values: list[float] | list[int] = np.frombuffer(tensor.dense, dtype=dtype).tolist()
    return values


def _datum_from_proto(datum: public_pb.Datum) -> DatumShape:
    tokens: list[int] = []
    for chunk in datum.model_input:
        if chunk.HasField("encoded_text"):
            tokens.extend(np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32).tolist())
    inputs = datum.loss_fn_inputs
    targets = tokens
    if "target_tokens" in inputs:
        targets = [int(t) for t in _tensor_values(inputs["target_tokens"])]
    weights = None
    if "weights" in inputs:
        weights = [float(w) for w in _tensor_values(inputs["weights"])]
    return DatumShape(tokens, targets, weights)


def fwdbwd_from_proto(raw: bytes) -> FwdBwdRequest:
    message = public_pb.ForwardBackwardRequest()
    try:
        message.ParseFromString(raw)
    except Exception as exc:  # protobuf's DecodeError; its module has no type stubs
        raise ApiError(400, "request body is not a ForwardBackwardRequest") from exc
    return FwdBwdRequest(
        model_id=message.model_id,
        loss_fn=message.loss_fn or "cross_entropy",
        forward_only=message.forward_only,
        data=[_datum_from_proto(d) for d in message.data],
    )


def _json_tensor(value: object) -> list[Any]:
    if isinstance(value, Mapping):
        value = value.get("data")
    if not isinstance(value, list):
        raise ApiError(400, "a loss_fn_inputs tensor must carry a data list")
    return value


def _datum_from_json(datum: object) -> DatumShape:
    if not isinstance(datum, Mapping):
        raise ApiError(400, "each datum must be an object")
    tokens: list[int] = []
    chunks = (datum.get("model_input") or {}).get("chunks") or []
    for chunk in chunks:
        if isinstance(chunk, Mapping) and isinstance(chunk.get("tokens"), list):
            tokens.extend(int(t) for t in chunk["tokens"])
    inputs = datum.get("loss_fn_inputs") or {}
    if not isinstance(inputs, Mapping):
        raise ApiError(400, "loss_fn_inputs must be an object")
    targets = tokens
    if "target_tokens" in inputs:
        targets = [int(t) for t in _json_tensor(inputs["target_tokens"])]
    weights = None
    if "weights" in inputs:
        weights = [float(w) for w in _json_tensor(inputs["weights"])]
    return DatumShape(tokens, targets, weights)


def fwdbwd_from_json(body: Mapping[str, Any], *, forward_only: bool = False) -> FwdBwdRequest:
    """The JSON form (`{"model_id", "forward_backward_input": {"data", "loss_fn"}}`)."""
    model_id = body.get("model_id")
    if not isinstance(model_id, str) or not model_id:
        raise ApiError(400, "model_id must be a non-empty string")
    fb_input = body.get("forward_backward_input") or body.get("forward_input") or {}
    if not isinstance(fb_input, Mapping):
        raise ApiError(400, "forward_backward_input must be an object")
    data = fb_input.get("data") or []
    if not isinstance(data, list):
        raise ApiError(400, "forward_backward_input.data must be a list")
    return FwdBwdRequest(
        model_id=model_id,
        loss_fn=str(fb_input.get("loss_fn") or "cross_entropy"),
        forward_only=forward_only,
        data=[_datum_from_json(d) for d in data],
    )


def fwdbwd_output(data: Sequence[DatumShape], step: int) -> bytes:
    """A ForwardBackwardOutput: per datum, `logprobs` with one float32 per target token.

    `loss:sum` is the weighted negative log-likelihood over the batch, as cross_entropy
    reports it (weights default to 1 when a datum has none).
    """
    per_datum = [np.asarray(model.target_logprobs(d.targets, step), dtype=np.float32) for d in data]
    loss_sum = 0.0
    for datum, logprobs in zip(data, per_datum, strict=True):
        weights = datum.weights if datum.weights is not None else [1.0] * len(logprobs)
        loss_sum -= float(np.dot(logprobs, np.asarray(weights[: len(logprobs)], dtype=np.float32)))
    offsets = np.cumsum([0, *(a.nbytes for a in per_datum)], dtype=np.int64)
    record = public_pb.ArrayRecord(num_datums=len(per_datum))
    field = record.fields["logprobs"]
    field.dtype = public_pb.DTYPE_FLOAT32
    field.data = b"".join(a.tobytes() for a in per_datum)
    field.offsets = offsets.tobytes()
    message = public_pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    message.loss_fn_outputs.append(record)
    message.metrics["loss:sum"] = loss_sum
    encoded: bytes = message.SerializeToString()
    return encoded


def prompt_tokens(prompt: object) -> list[int]:
    """The token ids of a JSON ModelInput (`{"chunks": [{"tokens": [...]}, ...]}`)."""
    if not isinstance(prompt, Mapping) or not isinstance(prompt.get("chunks"), list):
        raise ApiError(400, "prompt must be a ModelInput with chunks")
    tokens: list[int] = []
    for chunk in prompt["chunks"]:
        if not isinstance(chunk, Mapping):
            raise ApiError(400, "each prompt chunk must be an object")
        if chunk.get("type", "encoded_text") != "encoded_text":
            raise ApiError(400, "the emulator samples from text chunks only")
        raw = chunk.get("tokens")
        if not isinstance(raw, list) or not all(isinstance(t, int) for t in raw):
            raise ApiError(400, "chunk tokens must be a list of integers")
        tokens.extend(raw)
    return tokens


def sample_response(
    sequences: Sequence[model.Continuation], prompt_logprobs: Sequence[float] | None
) -> bytes:
    message = public_pb.SampleResponse()
    for seq in sequences:
        reason = public_pb.STOP_REASON_STOP if seq.stopped else public_pb.STOP_REASON_LENGTH
        message.sequences.append(
            public_pb.SampledSequence(
                stop_reason=reason,
                tokens=np.asarray(seq.tokens, dtype=np.int32).tobytes(),
                logprobs=np.asarray(seq.logprobs, dtype=np.float32).tobytes(),
            )
        )
    if prompt_logprobs is not None:
        message.prompt_logprobs = np.asarray(prompt_logprobs, dtype=np.float32).tobytes()
    encoded: bytes = message.SerializeToString()
    return encoded
