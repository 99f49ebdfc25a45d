"""The emulated fleet: runs, their checkpoints, and how both move with time.

A run's periodic checkpoints are arithmetic (origin + k * interval), so a 100,000-run fleet
costs a few objects per run and an idle emulator does no work at all: everything is derived
from "now" when asked. Explicit changes (a save, a deleted checkpoint, a new TTL) live in
small per-run overlays. Each run caches its wire JSON until its next visible change.
Nothing here reads a clock or does I/O; callers pass `now` (emulated epoch seconds).
"""

from __future__ import annotations

import json
import math
import random
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

from tinker_recovery.emulator.config import EmulatorConfig

RunKind = Literal["driven", "idle", "finished", "session"]
CheckpointType = Literal["training", "sampler"]
SEGMENT_OF: dict[str, CheckpointType] = {"weights": "training", "sampler_weights": "sampler"}
SEGMENT_FOR: dict[CheckpointType, str] = {"training": "weights", "sampler": "sampler_weights"}

BASE_MODELS = (
    "Qwen/Qwen3-8B",
    "Qwen/Qwen3-30B-A3B",
    "Qwen/Qwen3-4B-Instruct-2507",
    "meta-llama/Llama-3.1-8B",
    "meta-llama/Llama-3.2-1B",
    "meta-llama/Llama-3.3-70B-Instruct",
    "openai/gpt-oss-20b",
)
LORA_RANKS = (8, 16, 32, 64, 128)
OWNERS = ("alice@acme.example", "bob@acme.example", "chen@acme.example", "dana@acme.example")
FOREIGN_OWNERS = ("eve@partner.example", "farid@partner.example")
TEAMS = ("post-training", "evals", "research", "agents")
PROJECTS = ("math-rl", "chat-sft", "tool-use", "code-rl", "summarize")
RENDERERS = ("qwen3", "llama3", "role_colon", "gpt_oss")


_COMPACT = (",", ":")
_HEAD_KEYS = ("training_run_id", "base_model", "model_owner", "is_lora", "corrupted", "lora_rank")
_TAIL_KEYS = ("last_checkpoint", "last_sampler_checkpoint", "user_metadata")
_STAMP_KEY = b',"last_request_time":'


def iso(ts: float) -> str:
    """An aware UTC ISO 8601 string, the form the SDK's pydantic models parse."""
    return datetime.fromtimestamp(ts, UTC).isoformat()


def parse_tinker_path(path: str) -> tuple[str, str]:
    """`tinker://<run>/<segment>/<name>` -> (run_id, checkpoint_id); ValueError when malformed."""
    prefix = "tinker://"
    if not path.startswith(prefix):
        raise ValueError("tinker path must start with tinker://")
    parts = path[len(prefix) :].split("/")
    if len(parts) != 3 or not all(parts) or parts[1] not in SEGMENT_OF:
        raise ValueError("tinker path must be tinker://<run>/<weights|sampler_weights>/<name>")
    return parts[0], f"{parts[1]}/{parts[2]}"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    run_id: str
    checkpoint_id: str
    time: float
    size_bytes: int
    expires_at: float | None = None
    public: bool = False
    user_metadata: dict[str, str] | None = None
    listed_after_expiry: bool = False
    """An operator's lever: keep listing it (with a past expires_at) after it expired."""
    step: int | None = None
    """Optimizer steps the saved state had taken (for the emulated loss curve)."""

    @property
    def train_step(self) -> int:
        """The step a restore from this checkpoint resumes at: as saved, else from the name
        (periodic checkpoints are named by step), else 0."""
        if self.step is not None:
            return self.step
        name = self.checkpoint_id.split("/", 1)[1]
        return int(name) if name.isdigit() else 0

    @property
    def checkpoint_type(self) -> CheckpointType:
        return SEGMENT_OF[self.checkpoint_id.split("/", 1)[0]]

    @property
    def tinker_path(self) -> str:
        return f"tinker://{self.run_id}/{self.checkpoint_id}"

    def is_visible(self, now: float) -> bool:
        """The service stops listing (and serving) a checkpoint once it expires."""
        return self.expires_at is None or self.expires_at > now or self.listed_after_expiry

    def to_wire(self) -> dict[str, Any]:
        return {
            "checkpoint_id": self.checkpoint_id,
            "checkpoint_type": self.checkpoint_type,
            "time": iso(self.time),
            "tinker_path": self.tinker_path,
            "size_bytes": self.size_bytes,
            "public": self.public,
            "user_metadata": self.user_metadata,
            "expires_at": None if self.expires_at is None else iso(self.expires_at),
        }


@dataclass(slots=True, eq=False)
class Run:
    """One training run. Periodic checkpoints exist between `origin` and the run's stop time."""

    run_id: str
    session_id: str
    base_model: str
    model_owner: str
    lora_rank: int | None
    user_metadata: dict[str, str] | None
    kind: RunKind
    created_at: float
    origin: float
    stopped_at: float = math.inf
    """When requests stopped (idle/finished); inf while driven."""
    last_request_at: float = 0.0
    """Explicit activity time, used by session runs (driven ones derive it)."""
    checkpoint_interval_s: float = 0.0
    """0 means no periodic checkpoints (session runs checkpoint through save_state)."""
    request_interval_s: float = 30.0
    steps_per_checkpoint: int = 10
    sampler_every: int = 1
    periodic_ttl_s: float | None = None
    size_bytes: int = 0
    shared: bool = False
    project_id: str | None = None
    corrupted_at: float | None = None
    loaded_from: str | None = None
    steps: int = 0
    """Optimizer steps taken (session runs; a restore starts from its checkpoint's step)."""
    overlay: dict[str, Checkpoint] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    version: int = 0
    cache: bytes = b""
    cache_version: int = -1
    cache_until: float = -math.inf
    """The whole JSON is valid until then (the next `last_request_time` tick or expiry)."""
    stamp_start: int = 0
    """Where `last_request_time`'s value sits in `cache`: [stamp_start, stamp_end). The rest"""
    stamp_end: int = 0
    """is kept when only that value moves (every `request_interval_s` while driven)."""
    shape_until: float = -math.inf
    """Head and tail are valid until then: the next periodic checkpoint or a latest's expiry."""

    @property
    def is_lora(self) -> bool:
        return self.lora_rank is not None

    @property
    def corrupted(self) -> bool:
        return self.corrupted_at is not None

    def touch(self) -> None:
        """Record a change so the cached JSON is rebuilt on the next read."""
        self.version += 1

    def activity_end(self, now: float) -> float:
        """The last instant this run was driven, as of `now`."""
        end = min(now, self.stopped_at)
        return end if self.corrupted_at is None else min(end, self.corrupted_at)

    def last_request(self, now: float) -> float:
        if self.kind == "session":
            return self.last_request_at
        end = self.activity_end(now)
        if end == self.stopped_at:
            return end
        ticks = math.floor((end - self.origin) / self.request_interval_s)
        return self.origin + max(ticks, 0) * self.request_interval_s

    def _periodic_count(self, until: float) -> int:
        if self.checkpoint_interval_s <= 0 or until < self.origin:
            return 0
        return math.floor((until - self.origin) / self.checkpoint_interval_s)

    def _periodic(self, k: int, ctype: CheckpointType) -> Checkpoint:
        t = self.origin + k * self.checkpoint_interval_s + (1.0 if ctype == "sampler" else 0.0)
        ckpt_id = f"{SEGMENT_FOR[ctype]}/{k * self.steps_per_checkpoint:06d}"
        expires = None if self.periodic_ttl_s is None else t + self.periodic_ttl_s
        size = self.size_bytes if ctype == "training" else self.size_bytes // 3
        return Checkpoint(self.run_id, ckpt_id, t, size, expires)

    def _periodic_ids(self, now: float) -> list[tuple[int, CheckpointType]]:
        count = self._periodic_count(self.last_request(now))
        first = 1
        if self.periodic_ttl_s is not None:
            # Skip the long-expired prefix arithmetically instead of building it.
            horizon = now - self.periodic_ttl_s - self.origin
            first = max(1, math.floor(horizon / self.checkpoint_interval_s))
        out: list[tuple[int, CheckpointType]] = []
        for k in range(first, count + 1):
            out.append((k, "training"))
            if k % self.sampler_every == 0:
                out.append((k, "sampler"))
        return out

    def checkpoints(self, now: float) -> list[Checkpoint]:
        """Visible checkpoints, oldest first."""
        found: dict[str, Checkpoint] = {}
        for k, ctype in self._periodic_ids(now):
            ckpt = self._periodic(k, ctype)
            found[ckpt.checkpoint_id] = ckpt
        found.update(self.overlay)
        visible = [c for cid, c in found.items() if cid not in self.deleted and c.is_visible(now)]
        visible.sort(key=lambda c: (c.time, c.checkpoint_id))
        return visible

    def find_checkpoint(self, checkpoint_id: str, now: float) -> Checkpoint | None:
        for ckpt in self.checkpoints(now):
            if ckpt.checkpoint_id == checkpoint_id:
                return ckpt
        return None

    def _latest_of(self, ctype: CheckpointType, now: float) -> Checkpoint | None:
        """The newest visible checkpoint of one type, without listing the whole history."""
        best: Checkpoint | None = None
        step = 1 if ctype == "training" else self.sampler_every
        count = self._periodic_count(self.last_request(now))
        k = count - count % step
        while k >= 1:
            ckpt = self._periodic(k, ctype)
            if ckpt.checkpoint_id not in self.deleted and ckpt.checkpoint_id not in self.overlay:
                # Older periodic ones share the TTL, so if this one expired they all did.
                best = ckpt if ckpt.is_visible(now) else None
                break
            k -= step
        for ckpt in self.overlay.values():
            if ckpt.checkpoint_type != ctype or not ckpt.is_visible(now):
                continue
            if best is None or (ckpt.time, ckpt.checkpoint_id) > (best.time, best.checkpoint_id):
                best = ckpt
        return best

    def _latest(self, now: float) -> tuple[Checkpoint | None, Checkpoint | None]:
        return self._latest_of("training", now), self._latest_of("sampler", now)

    def _shape_until(self, now: float, latest: tuple[Checkpoint | None, ...]) -> float:
        """Until when the latest checkpoints (so everything but `last_request_time`) hold: a
        latest one expiring, or, while driven, the next periodic checkpoint (the count can only
        move once `now` reaches its time, since `last_request(now) <= now`; a stopped run's is
        fixed). Everything else changes through a mutation, which calls `touch`."""
        until = math.inf
        for ckpt in latest:
            if ckpt is not None and ckpt.expires_at is not None:
                until = min(until, ckpt.expires_at)
        driven = self.kind != "session" and self.activity_end(now) == now
        if self.checkpoint_interval_s > 0 and driven:
            count = self._periodic_count(self.last_request(now))
            until = min(until, self.origin + (count + 1) * self.checkpoint_interval_s)
        return until

    def _stamp_until(self, now: float) -> float:
        """Until when `last_request_time` holds: the next request tick while driven."""
        if self.kind != "session" and self.activity_end(now) == now:
            return self.last_request(now) + self.request_interval_s
        return math.inf

    def _valid_until(self, now: float, latest: tuple[Checkpoint | None, ...]) -> float:
        until = self._stamp_until(now)
        for ckpt in latest:
            if ckpt is not None and ckpt.expires_at is not None:
                until = min(until, ckpt.expires_at)
        return until

    def to_wire(
        self, now: float, latest: tuple[Checkpoint | None, Checkpoint | None] | None = None
    ) -> dict[str, Any]:
        train, sampler = latest if latest is not None else self._latest(now)
        return {
            "training_run_id": self.run_id,
            "base_model": self.base_model,
            "model_owner": self.model_owner,
            "is_lora": self.is_lora,
            "corrupted": self.corrupted,
            "lora_rank": self.lora_rank,
            "last_request_time": iso(self.last_request(now)),
            "last_checkpoint": None if train is None else train.to_wire(),
            "last_sampler_checkpoint": None if sampler is None else sampler.to_wire(),
            "user_metadata": self.user_metadata,
        }

    def wire_bytes(self, now: float) -> bytes:
        """The run's JSON (`to_wire` compactly dumped), rebuilt only when time or a change made
        it stale. A driven run's `last_request_time` moves every `request_interval_s`, far more
        often than anything else in it, so only that value is re-rendered then: the bytes around
        it are kept until the latest checkpoints can change. Reading a run costs
        the same however long ago it was last read (the listing stays linear in the fleet)."""
        if self.cache_version == self.version:
            if now < self.cache_until:
                return self.cache
            if now < self.shape_until:
                stamp = json.dumps(iso(self.last_request(now))).encode()
                old = self.cache
                self.cache = b"".join((old[: self.stamp_start], stamp, old[self.stamp_end :]))
                self.stamp_end = self.stamp_start + len(stamp)
                self.cache_until = min(self._stamp_until(now), self.shape_until)
                return self.cache
        latest = self._latest(now)
        wire = self.to_wire(now, latest)
        head = {k: wire[k] for k in _HEAD_KEYS}
        stamp_value = wire["last_request_time"]
        tail = {k: wire[k] for k in _TAIL_KEYS}
        # json.dumps of a dict is "{" + ",".join(key:value) + "}", so the three parts joined are
        # byte for byte the dump of the whole dict.
        head_bytes = json.dumps(head, separators=_COMPACT).encode()[:-1] + _STAMP_KEY
        tail_bytes = b"," + json.dumps(tail, separators=_COMPACT).encode()[1:]
        stamp = json.dumps(stamp_value).encode()
        self.cache = b"".join((head_bytes, stamp, tail_bytes))
        self.stamp_start = len(head_bytes)
        self.stamp_end = self.stamp_start + len(stamp)
        self.cache_version = self.version
        self.shape_until = self._shape_until(now, latest)
        self.cache_until = min(self._valid_until(now, latest), self.shape_until)
        return self.cache

    def add_checkpoint(self, ckpt: Checkpoint) -> None:
        self.overlay[ckpt.checkpoint_id] = ckpt
        self.deleted.discard(ckpt.checkpoint_id)
        self.touch()

    def update_checkpoint(self, ckpt: Checkpoint, **changes: Any) -> Checkpoint:
        new = replace(ckpt, **changes)
        self.add_checkpoint(new)
        return new


def _session_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _labels(rng: random.Random, renderer: str) -> dict[str, str] | None:
    if rng.random() < 0.15:
        return None
    labels = {"team": rng.choice(TEAMS), "project": rng.choice(PROJECTS)}
    if rng.random() < 0.8:
        labels["renderer_name"] = renderer
    if rng.random() < 0.5:
        labels["wandb_link"] = (
            f"https://wandb.ai/acme/{labels['project']}/runs/{rng.getrandbits(32):08x}"
        )
    return labels


def _pick_kind(rng: random.Random, driven_fraction: float) -> RunKind:
    if rng.random() < driven_fraction:
        return "driven"
    return "idle" if rng.random() < 0.55 else "finished"


def _new_run(
    rng: random.Random, run_id: str, session_id: str, kind: RunKind, cfg: EmulatorConfig, t0: float
) -> Run:
    model_index = rng.randrange(len(BASE_MODELS))
    renderer = RENDERERS[model_index % len(RENDERERS)]
    if kind == "driven":
        created = t0 - rng.uniform(3600.0, 3 * 86400.0)
        stopped = math.inf
    else:
        created = t0 - rng.uniform(2 * 86400.0, 20 * 86400.0)
        stopped = min(created + rng.uniform(3600.0, 2 * 86400.0), t0 - 3600.0)
    run = Run(
        run_id=run_id,
        session_id=session_id,
        base_model=BASE_MODELS[model_index],
        model_owner=rng.choice(OWNERS),
        lora_rank=rng.choice(LORA_RANKS),
        user_metadata=_labels(rng, renderer),
        kind=kind,
        created_at=created,
        origin=created + 60.0,
        stopped_at=stopped,
        checkpoint_interval_s=cfg.checkpoint_interval_s,
        request_interval_s=cfg.request_interval_s,
        steps_per_checkpoint=rng.choice((10, 20, 50, 100)),
        sampler_every=rng.choice((1, 2, 5)),
        periodic_ttl_s=cfg.periodic_ttl_s if rng.random() < 0.6 else None,
        size_bytes=rng.randrange(50, 2000) * 1_000_000,
    )
    if kind == "finished":
        for ctype in ("training", "sampler"):
            ckpt_id = f"{SEGMENT_FOR[ctype]}/final"
            size = run.size_bytes if ctype == "training" else run.size_bytes // 3
            run.overlay[ckpt_id] = Checkpoint(run_id, ckpt_id, stopped, size)
    return run


def generate(cfg: EmulatorConfig, t0: float) -> list[Run]:
    """The seeded fleet: `cfg.runs` owned runs followed by `cfg.shared_runs` foreign ones."""
    rng = random.Random(cfg.seed)
    runs: list[Run] = []
    session_id = _session_uuid(rng)
    seq = 0
    for index in range(cfg.runs + cfg.shared_runs):
        if seq >= 3 or (seq > 0 and rng.random() < 0.6):
            session_id, seq = _session_uuid(rng), 0
        kind = _pick_kind(rng, cfg.driven_fraction)
        run = _new_run(rng, f"{session_id}:train:{seq}", session_id, kind, cfg, t0)
        seq += 1
        if index >= cfg.runs:
            run.shared = True
            run.model_owner = rng.choice(FOREIGN_OWNERS)
        runs.append(run)
    idle = [r for r in runs if r.kind == "idle" and not r.shared]
    for run in rng.sample(idle, min(cfg.corrupted_at_start, len(idle))):
        run.corrupted_at = run.stopped_at
    return runs
