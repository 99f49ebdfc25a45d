"""The emulator's state: the fleet, the emulated clock, sessions, futures, counters, faults.

`Emulator` is what the HTTP layer and tests talk to. Reads of the fleet (pages, runs,
checkpoints) live here; the training-session protocol (load/save/futures) is in training.py
and the operator's levers (corrupt, incident, expire...) in control.py's helpers below.
Every public method takes the lock: the server thread serves while a test thread pokes.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import math
import random
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from tinker_recovery.emulator import fleet
from tinker_recovery.emulator.config import EmulatorConfig
from tinker_recovery.emulator.faults import FaultBook

Scope = Literal["owned", "accessible"]
FUTURES_KEPT = 10_000
SESSION_TIMEOUT_S = 60.0
"""A session that sent nothing for this long (wall seconds) is dead; the SDK beats every 10 s."""
MIN_TTL_S = 3600
"""The service refuses a checkpoint `ttl_seconds` below this (tinker-cookbook issue #603)."""


def check_ttl(ttl_seconds: object) -> int | None:
    """A checkpoint TTL as the service accepts it: null, or whole seconds of at least an hour.

    Anything else is a 400 with the reason, as the service answers (the SDK raises it as
    `BadRequestError` at once, without retrying).
    """
    if ttl_seconds is None:
        return None
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int):
        raise ApiError(400, "ttl_seconds must be an integer number of seconds or null")
    if ttl_seconds < MIN_TTL_S:
        raise ApiError(400, f"ttl_seconds must be at least {MIN_TTL_S} seconds (got {ttl_seconds})")
    return ttl_seconds


class ApiError(Exception):
    """An HTTP error answer: status plus a `detail` for the JSON body."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(slots=True)
class Session:
    session_id: str
    owner: str
    created_at: float
    last_seen: float
    last_seen_mono: float
    """Wall-clock (monotonic) time of the last request or heartbeat, for liveness."""
    project_id: str | None = None
    user_metadata: dict[str, Any] | None = None
    tags: list[str] = field(default_factory=list)
    finished: str | None = None
    run_ids: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Sampler:
    """A sampling session: a fixed snapshot of weights that `asample` requests draw from."""

    sampler_id: str
    session_id: str
    base_model: str
    model_path: str | None
    """The sampler checkpoint it was created from; None for a base model or a snapshot
    taken by `save_weights_and_get_sampling_client`."""
    step: int
    """Optimizer step of the weights it serves (for the emulated logprobs)."""
    samples: int = 0


@dataclass(slots=True)
class PendingFuture:
    payload: dict[str, Any] | bytes
    try_again_left: int


class Emulator:
    """State of one emulated Tinker service."""

    def __init__(
        self,
        config: EmulatorConfig,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.lock = threading.RLock()
        self._counted = threading.Condition(self.lock)
        self._monotonic = monotonic
        self._mono0 = monotonic()
        if config.start_time is not None:
            self._t0 = config.start_time
        else:
            # A whole-second epoch for the fleet's history, but "now" must be the wall clock:
            # clients compare our timestamps with their own (flooring alone lagged up to 1 s).
            started = wall()
            self._t0 = float(math.floor(started))
            self._mono0 -= (started - self._t0) / config.time_scale
        self._offset_s = 0.0
        self.faults = FaultBook(config.seed)
        self.requests: Counter[str] = Counter()
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.sessions: dict[str, Session] = {}
        self.futures: OrderedDict[str, PendingFuture] = OrderedDict()
        self.unloadable: dict[str, str] = {}
        self.samplers: dict[str, Sampler] = {}
        self.rng = random.Random(config.seed + 1)
        self._future_seq = 0
        self._release: asyncio.Event | None = None
        self._release_loop: asyncio.AbstractEventLoop | None = None
        self.runs: dict[str, fleet.Run] = {}
        self._owned: list[fleet.Run] = []
        self._all: list[fleet.Run] = []
        for run in fleet.generate(config, self._t0):
            self.add_run(run)

    # -- time -----------------------------------------------------------------------------
    def now(self) -> float:
        """Emulated epoch seconds: start + scaled elapsed wall time + manual advances."""
        elapsed = self._monotonic() - self._mono0
        return self._t0 + elapsed * self.config.time_scale + self._offset_s

    def advance(self, seconds: float) -> float:
        """Move emulated time forward (driven runs progress and checkpoint accordingly)."""
        if seconds < 0 or not math.isfinite(seconds):
            raise ApiError(400, "seconds must be a finite, non-negative number")
        with self.lock:
            self._offset_s += seconds
            return self.now()

    def monotonic(self) -> float:
        return self._monotonic()

    def seen(self, session: Session) -> None:
        """A request from `session` arrived: it is alive (runs progress only through training
        requests and heartbeats, see training.py)."""
        session.last_seen = self.now()
        session.last_seen_mono = self._monotonic()

    def session_alive(self, session: Session) -> bool:
        if session.finished is not None:
            return False
        return self._monotonic() - session.last_seen_mono <= SESSION_TIMEOUT_S

    # -- hanging requests -------------------------------------------------------------------
    async def hold(self, seconds: float) -> None:
        """Hold a request for `seconds`, or until `release_hangs` (fault cleared, shutdown)."""
        loop = asyncio.get_running_loop()
        with self.lock:
            if self._release is None or self._release_loop is not loop:
                self._release, self._release_loop = asyncio.Event(), loop
            release = self._release
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), seconds)

    def release_hangs(self) -> None:
        """Let every held request go on; safe to call from any thread."""
        with self.lock:
            release, loop = self._release, self._release_loop
            self._release = self._release_loop = None
        if release is not None and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(release.set)

    # -- registry -------------------------------------------------------------------------
    def add_run(self, run: fleet.Run) -> None:
        with self.lock:
            if run.run_id in self.runs:
                raise ApiError(409, "run id already exists")
            self.runs[run.run_id] = run
            self._all.append(run)
            if not run.shared:
                self._owned.append(run)

    def new_session_id(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def run(self, run_id: str, scope: Scope = "accessible") -> fleet.Run:
        found = self.runs.get(run_id)
        if found is None or (scope == "owned" and found.shared):
            raise ApiError(404, "training run not found")
        return found

    def checkpoint(self, tinker_path: str) -> tuple[fleet.Run, fleet.Checkpoint]:
        """Resolve a tinker path to a visible checkpoint; 400 if malformed, 404 if absent."""
        try:
            run_id, checkpoint_id = fleet.parse_tinker_path(tinker_path)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from exc
        return self.checkpoint_by_id(run_id, checkpoint_id)

    def checkpoint_by_id(
        self, run_id: str, checkpoint_id: str
    ) -> tuple[fleet.Run, fleet.Checkpoint]:
        run = self.run(run_id)
        ckpt = run.find_checkpoint(checkpoint_id, self.now())
        if ckpt is None:
            raise ApiError(404, "checkpoint not found")
        return run, ckpt

    # -- counters -------------------------------------------------------------------------
    def count(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[endpoint] += 1
            self.statuses[(endpoint, status)] += 1
            self._counted.notify_all()

    def wait_for_requests(self, endpoint: str, at_least: int, timeout_s: float) -> bool:
        """Block until `endpoint` has answered `at_least` requests (for tests; no polling)."""
        with self._counted:
            return self._counted.wait_for(lambda: self.requests[endpoint] >= at_least, timeout_s)

    def request_counts(self) -> dict[str, Any]:
        with self.lock:
            by_status: dict[str, dict[str, int]] = {}
            for (endpoint, status), n in sorted(self.statuses.items()):
                by_status.setdefault(endpoint, {})[str(status)] = n
            return {"requests": dict(sorted(self.requests.items())), "by_status": by_status}

    def reset_counters(self) -> None:
        with self.lock:
            self.requests.clear()
            self.statuses.clear()

    # -- futures --------------------------------------------------------------------------
    def submit(
        self,
        payload: dict[str, Any] | bytes,
        model_id: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Register a finished operation and return the untyped future the SDK polls
        (plus `extra` keys, e.g. a sample's `sample_sequence_ids`)."""
        with self.lock:
            self._future_seq += 1
            request_id = f"req-{self._future_seq}"
            self.futures[request_id] = PendingFuture(payload, self.config.future_try_again)
            while len(self.futures) > FUTURES_KEPT:
                self.futures.popitem(last=False)
        out: dict[str, Any] = {"request_id": request_id, **(extra or {})}
        if model_id is not None:
            out["model_id"] = model_id
        return out

    def fail(
        self, message: str, category: str = "user", model_id: str | None = None
    ) -> dict[str, Any]:
        """A future whose result is the service's request-failed answer."""
        return self.submit({"error": message, "category": category}, model_id)

    def retrieve(self, request_id: str) -> dict[str, Any] | bytes:
        with self.lock:
            pending = self.futures.get(request_id)
            if pending is None:
                raise ApiError(404, "unknown request_id")
            if pending.try_again_left > 0:
                pending.try_again_left -= 1
                return {"type": "try_again", "request_id": request_id, "queue_state": "active"}
            return pending.payload

    # -- reads ----------------------------------------------------------------------------
    def page_runs(
        self,
        *,
        scope: Scope,
        limit: int,
        offset: int,
        project_id: str | None = None,
        keep_fraction: float | None = None,
    ) -> bytes:
        """One `list_training_runs` page as JSON bytes, spliced from per-run caches."""
        with self.lock:
            now = self.now()
            pool = self._owned if scope == "owned" else self._all
            if project_id is not None:
                pool = [r for r in pool if r.project_id == project_id]
            limit = min(limit, self.config.page_max)
            chunk = pool[offset : offset + limit]
            if keep_fraction is not None:
                chunk = chunk[: int(len(chunk) * keep_fraction)]
            cursor = {"offset": offset, "limit": limit, "total_count": len(pool)}
            return b"".join(
                (
                    b'{"training_runs":[',
                    b",".join(r.wire_bytes(now) for r in chunk),
                    b'],"cursor":',
                    json.dumps(cursor).encode(),
                    b"}",
                )
            )

    def run_bytes(self, run_id: str, scope: Scope) -> bytes:
        with self.lock:
            return self.run(run_id, scope).wire_bytes(self.now())

    def list_checkpoints(self, run_id: str) -> dict[str, Any]:
        with self.lock:
            run = self.run(run_id)
            return {
                "checkpoints": [c.to_wire() for c in run.checkpoints(self.now())],
                "cursor": None,
            }

    def list_user_checkpoints(
        self, *, limit: int, offset: int, keep_fraction: float | None = None
    ) -> dict[str, Any]:
        """All owned runs' checkpoints, newest first (costs O(all checkpoints): not a hot path)."""
        with self.lock:
            now = self.now()
            limit = min(limit, self.config.page_max)
            per_run = [list(reversed(r.checkpoints(now))) for r in self._owned]
            total = sum(len(c) for c in per_run)
            merged: Iterator[fleet.Checkpoint] = heapq.merge(
                *per_run, key=lambda c: c.time, reverse=True
            )
            page: list[fleet.Checkpoint] = []
            for index, ckpt in enumerate(merged):
                if index >= offset + limit:
                    break
                if index >= offset:
                    page.append(ckpt)
            if keep_fraction is not None:
                page = page[: int(len(page) * keep_fraction)]
            return {
                "checkpoints": [c.to_wire() for c in page],
                "cursor": {"offset": offset, "limit": limit, "total_count": total},
            }

    def weights_info(self, tinker_path: str) -> dict[str, Any]:
        with self.lock:
            run, ckpt = self.checkpoint(tinker_path)
            info: dict[str, Any] = {
                "base_model": run.base_model,
                "is_lora": run.is_lora,
                "lora_rank": run.lora_rank,
                "train_unembed": True,
                "train_mlp": True,
                "train_attn": True,
            }
            if ckpt.checkpoint_type == "training":
                info["optimizer_config"] = {"type": "adamw"}
            return info

    # -- checkpoint edits through the public API --------------------------------------------
    def delete_checkpoint(self, run_id: str, checkpoint_id: str) -> None:
        with self.lock:
            run, _ = self.checkpoint_by_id(run_id, checkpoint_id)
            run.overlay.pop(checkpoint_id, None)
            run.deleted.add(checkpoint_id)
            run.touch()

    def set_ttl(self, run_id: str, checkpoint_id: str, ttl_seconds: object) -> None:
        ttl_seconds = check_ttl(ttl_seconds)
        with self.lock:
            run, ckpt = self.checkpoint_by_id(run_id, checkpoint_id)
            expires = None if ttl_seconds is None else self.now() + ttl_seconds
            run.update_checkpoint(ckpt, expires_at=expires)

    def set_public(self, run_id: str, checkpoint_id: str, public: bool) -> None:
        with self.lock:
            run, ckpt = self.checkpoint_by_id(run_id, checkpoint_id)
            run.update_checkpoint(ckpt, public=public)
