"""Injected faults: what an operator can break, per endpoint, and the dice that decide when.

A `FaultSpec` is validated from the control API's JSON (pydantic, unknown keys rejected).
`FaultBook.pick` returns the faults that fire for one request; applying them to the HTTP
exchange is the server's job (see api.py). Dice come from a seeded RNG, so a fault with
`probability < 1` fires on the same requests in every run with the same seed and traffic.
"""

from __future__ import annotations

import random
import threading
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

FaultKind = Literal["latency", "error", "rate_limit", "hang", "malformed", "truncate"]

ENDPOINTS = frozenset(
    {
        "client_config",
        "dynamic_config",
        "auth_token",
        "create_session",
        "session_heartbeat",
        "finish_session",
        "telemetry",
        "healthz",
        "get_server_capabilities",
        "list_training_runs",
        "get_training_run",
        "list_checkpoints",
        "list_user_checkpoints",
        "delete_checkpoint",
        "set_checkpoint_ttl",
        "publish_checkpoint",
        "unpublish_checkpoint",
        "weights_info",
        "load_weights",
        "create_model",
        "get_info",
        "save_weights",
        "save_weights_for_sampler",
        "forward_backward",
        "optim_step",
        "unload_model",
        "retrieve_future",
        "create_sampling_session",
        "get_sampler",
        "asample",
    }
)
"""Stable endpoint names, used for fault scoping and request counts."""


class FaultSpec(BaseModel):
    """One fault rule. `endpoints` ["*"] means every Tinker endpoint (never the control API)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: FaultKind
    endpoints: tuple[str, ...] = ("*",)
    probability: float = Field(1.0, ge=0.0, le=1.0)
    times: int | None = Field(None, ge=1, description="fire this many times, then retire")
    status: int = Field(503, ge=400, le=599, description="for kind=error")
    latency_s: float = Field(0.5, ge=0.0, le=600.0, description="for kind=latency")
    retry_after_s: float = Field(1.0, ge=0.0, le=3600.0, description="for kind=rate_limit")
    hang_s: float = Field(30.0, ge=0.0, le=3600.0, description="for kind=hang")
    keep_fraction: float = Field(0.5, ge=0.0, le=1.0, description="for kind=truncate")

    @field_validator("endpoints")
    @classmethod
    def _known_endpoints(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [name for name in value if name != "*" and name not in ENDPOINTS]
        if unknown:
            raise ValueError(f"unknown endpoints: {', '.join(unknown)}")
        if not value:
            raise ValueError("endpoints must not be empty")
        return value

    def covers(self, endpoint: str) -> bool:
        return "*" in self.endpoints or endpoint in self.endpoints


class FaultBook:
    """The active faults. Thread-safe: tests add faults while the server thread serves."""

    def __init__(self, seed: int) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._faults: dict[int, FaultSpec] = {}
        self._remaining: dict[int, int | None] = {}
        self._next_id = 1

    def add(self, spec: FaultSpec) -> int:
        with self._lock:
            fault_id = self._next_id
            self._next_id += 1
            self._faults[fault_id] = spec
            self._remaining[fault_id] = spec.times
            return fault_id

    def remove(self, fault_id: int) -> FaultSpec | None:
        with self._lock:
            self._remaining.pop(fault_id, None)
            return self._faults.pop(fault_id, None)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self._remaining.clear()

    def pick(self, endpoint: str) -> list[FaultSpec]:
        """The faults that fire for one request to `endpoint` (and use up their `times`)."""
        with self._lock:
            fired: list[FaultSpec] = []
            for fault_id, spec in list(self._faults.items()):
                if not spec.covers(endpoint) or self._rng.random() >= spec.probability:
                    continue
                fired.append(spec)
                remaining = self._remaining[fault_id]
                if remaining is not None:
                    if remaining <= 1:
                        del self._faults[fault_id]
                        del self._remaining[fault_id]
                    else:
                        self._remaining[fault_id] = remaining - 1
            return fired

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {"id": fid, "remaining": self._remaining[fid], **spec.model_dump(mode="json")}
                for fid, spec in self._faults.items()
            ]
