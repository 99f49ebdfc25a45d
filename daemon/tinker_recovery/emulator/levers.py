"""The operator's levers: create runs, corrupt them, stage incidents, break checkpoints.

Request bodies are pydantic models (unknown keys rejected) so the control API and Python
callers share one validation. Lineage is reported as the daemon would reconstruct it:
a successor names its predecessor in `tinker_recovery.recovered_from` metadata; the
emulator also knows which checkpoint each restored run was loaded from.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tinker_recovery.emulator import fleet
from tinker_recovery.emulator.state import Emulator

RECOVERED_FROM = "tinker_recovery.recovered_from"
LINEAGE = "tinker_recovery.lineage"


class CreateRun(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["driven", "idle", "finished"] = "driven"
    base_model: str = "Qwen/Qwen3-8B"
    lora_rank: int | None = Field(32, ge=1)
    owner: str | None = None
    user_metadata: dict[str, str] | None = None
    checkpoints: int = Field(2, ge=0, le=10_000, description="periodic checkpoints already saved")
    checkpoint_interval_s: float | None = Field(None, gt=0)
    periodic_ttl_s: float | None = Field(None, gt=0)
    shared: bool = False
    corrupted: bool = False


class Incident(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    fraction: float | None = Field(None, ge=0.0, le=1.0)
    count: int | None = Field(None, ge=0)
    include_sessions: bool = True

    @model_validator(mode="after")
    def _one_of(self) -> Incident:
        if (self.fraction is None) == (self.count is None):
            raise ValueError("give exactly one of fraction or count")
        return self


class CheckpointLever(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    tinker_path: str
    error: str | None = None
    listed: bool = False


def describe(emu: Emulator, run: fleet.Run, now: float) -> dict[str, Any]:
    """A run as the control API shows it: wire fields plus emulator-only facts."""
    metadata = run.user_metadata or {}
    return {
        "run_id": run.run_id,
        "kind": run.kind,
        "session_id": run.session_id,
        "model_owner": run.model_owner,
        "base_model": run.base_model,
        "lora_rank": run.lora_rank,
        "shared": run.shared,
        "corrupted": run.corrupted,
        "corrupted_at": None if run.corrupted_at is None else fleet.iso(run.corrupted_at),
        "last_request_time": fleet.iso(run.last_request(now)),
        "checkpoint_count": len(run.checkpoints(now)),
        "user_metadata": run.user_metadata,
        "lineage": metadata.get(LINEAGE),
        "recovered_from": metadata.get(RECOVERED_FROM),
        "loaded_from": run.loaded_from,
        "session_alive": _session_alive(emu, run),
    }


def _session_alive(emu: Emulator, run: fleet.Run) -> bool | None:
    session = emu.sessions.get(run.session_id) if run.kind == "session" else None
    return None if session is None else emu.session_alive(session)


def list_runs(
    emu: Emulator, *, corrupted: bool | None, kind: str | None, limit: int, offset: int
) -> dict[str, Any]:
    """Runs with their lineage links; successors are computed from metadata and restores."""
    with emu.lock:
        now = emu.now()
        successors: dict[str, list[str]] = {}
        for run in emu.runs.values():
            if run.kind != "session":
                continue
            parents = {(run.user_metadata or {}).get(RECOVERED_FROM)}
            if run.loaded_from is not None:
                parents.add(fleet.parse_tinker_path(run.loaded_from)[0])
            for parent in parents - {None}:
                successors.setdefault(str(parent), []).append(run.run_id)
        rows = [
            r
            for r in emu.runs.values()
            if (corrupted is None or r.corrupted == corrupted) and (kind is None or r.kind == kind)
        ]
        page = []
        for run in rows[offset : offset + limit]:
            row = describe(emu, run, now)
            row["successors"] = successors.get(run.run_id, [])
            page.append(row)
        return {"runs": page, "total_count": len(rows), "now": fleet.iso(now)}


def create_run(emu: Emulator, spec: CreateRun) -> dict[str, Any]:
    with emu.lock:
        now = emu.now()
        session_id = emu.new_session_id()
        interval = spec.checkpoint_interval_s or emu.config.checkpoint_interval_s
        origin = now - spec.checkpoints * interval - 1.0
        run = fleet.Run(
            run_id=f"{session_id}:train:0",
            session_id=session_id,
            base_model=spec.base_model,
            model_owner=spec.owner or emu.config.owner,
            lora_rank=spec.lora_rank,
            user_metadata=spec.user_metadata,
            kind=spec.kind,
            created_at=origin - 60.0,
            origin=origin,
            stopped_at=math.inf if spec.kind == "driven" else now,
            checkpoint_interval_s=interval,
            request_interval_s=emu.config.request_interval_s,
            periodic_ttl_s=spec.periodic_ttl_s,
            size_bytes=(spec.lora_rank or 64) * 4_000_000,
            shared=spec.shared,
        )
        if spec.kind == "finished":
            for segment in ("weights", "sampler_weights"):
                run.overlay[f"{segment}/final"] = fleet.Checkpoint(
                    run.run_id, f"{segment}/final", now, run.size_bytes
                )
        if spec.corrupted:
            run.corrupted_at = now
        emu.add_run(run)
        return describe(emu, run, now)


def corrupt(emu: Emulator, run_id: str) -> dict[str, Any]:
    """Flag a run corrupted; its driving stops there and requests against it fail."""
    with emu.lock:
        run = emu.run(run_id)
        now = emu.now()
        if run.corrupted_at is None:
            run.corrupted_at = now
            run.touch()
        return describe(emu, run, now)


def incident(emu: Emulator, spec: Incident) -> dict[str, Any]:
    """Corrupt a seeded random pick of the runs being driven (fleet and live sessions)."""
    with emu.lock:
        now = emu.now()
        candidates = [
            r
            for r in emu.runs.values()
            if not r.corrupted
            and (
                (r.kind == "driven" and r.stopped_at > now)
                or (spec.include_sessions and _session_alive(emu, r) is True)
            )
        ]
        wanted = (
            spec.count
            if spec.count is not None
            else round(len(candidates) * (spec.fraction or 0.0))
        )
        picked = emu.rng.sample(candidates, min(wanted, len(candidates)))
        for run in picked:
            run.corrupted_at = now
            run.touch()
        return {"corrupted": [r.run_id for r in picked], "candidates": len(candidates)}


def mark_unloadable(emu: Emulator, spec: CheckpointLever) -> dict[str, Any]:
    """Restores from this checkpoint fail with a user-category request error from now on."""
    with emu.lock:
        emu.checkpoint(spec.tinker_path)
        emu.unloadable[spec.tinker_path] = spec.error or (
            f"failed to load {spec.tinker_path}: checkpoint data is unreadable"
        )
        return {"tinker_path": spec.tinker_path, "error": emu.unloadable[spec.tinker_path]}


def expire(emu: Emulator, spec: CheckpointLever) -> dict[str, Any]:
    """Expire a checkpoint now. It vanishes (as the service deletes expired ones), unless
    `listed` keeps it visible with a past `expires_at` while loads of it still fail."""
    with emu.lock:
        run, ckpt = emu.checkpoint(spec.tinker_path)
        now = emu.now()
        if spec.listed:
            emu.unloadable[spec.tinker_path] = f"checkpoint {spec.tinker_path} has expired"
            run.update_checkpoint(ckpt, expires_at=now, listed_after_expiry=True)
        else:
            run.update_checkpoint(ckpt, expires_at=now)
        return {
            "tinker_path": spec.tinker_path,
            "expired_at": fleet.iso(now),
            "listed": spec.listed,
        }
