"""The training-session side of the API: sessions, heartbeats, restores, saves, futures.

Long operations finish at once and are parked as futures (state.Emulator.submit) for
`retrieve_future` to hand back; failures use the service's future error protocol
(`{"error", "category"}`), which the SDK raises as `RequestFailedError`. New runs take the
id the SDK computes itself, `<session_id>:train:<model_seq_id>`, and keep the caller's
user_metadata exactly as sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tinker_recovery.emulator import fleet
from tinker_recovery.emulator.state import ApiError, Emulator, Sampler, Session, check_ttl

if TYPE_CHECKING:
    from tinker_recovery.emulator.wire import FwdBwdRequest


def _str(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{key} must be a non-empty string")
    return value


def _int(body: dict[str, Any], key: str) -> int:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ApiError(400, f"{key} must be a non-negative integer")
    return value


def _metadata(body: dict[str, Any]) -> dict[str, str] | None:
    value = body.get("user_metadata")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ApiError(400, "user_metadata must be an object")
    return {str(k): str(v) for k, v in value.items()}


def create_session(emu: Emulator, body: dict[str, Any]) -> dict[str, Any]:
    tags = body.get("tags") or []
    if not isinstance(tags, list):
        raise ApiError(400, "tags must be a list")
    with emu.lock:
        now = emu.now()
        session = Session(
            session_id=emu.new_session_id(),
            owner=emu.config.owner,
            created_at=now,
            last_seen=now,
            last_seen_mono=emu.monotonic(),
            project_id=body.get("project_id"),
            user_metadata=body.get("user_metadata"),
            tags=[str(t) for t in tags],
        )
        emu.sessions[session.session_id] = session
        return {"session_id": session.session_id, "type": "create_session"}


def _session(emu: Emulator, session_id: str) -> Session:
    session = emu.sessions.get(session_id)
    if session is None:
        raise ApiError(404, "session not found")
    return session


def _progress(emu: Emulator, session: Session) -> None:
    """A live session drives its runs: their last_request_time follows the heartbeats."""
    now = emu.now()
    session.last_seen = now
    session.last_seen_mono = emu.monotonic()
    for run_id in session.run_ids:
        run = emu.runs[run_id]
        if not run.corrupted:
            run.last_request_at = now
            run.touch()


def heartbeat(emu: Emulator, body: dict[str, Any]) -> dict[str, Any]:
    with emu.lock:
        session = _session(emu, _str(body, "session_id"))
        if session.finished is None:
            _progress(emu, session)
        return {"type": "session_heartbeat"}


def finish_session(emu: Emulator, session_id: str, body: dict[str, Any]) -> dict[str, Any]:
    with emu.lock:
        session = _session(emu, session_id)
        reason = body.get("reason")
        status = reason.get("type") if isinstance(reason, dict) else None
        session.finished = str(status or "unknown")
        return {"status": "finished"}


def _new_session_run(
    emu: Emulator,
    session: Session,
    seq: int,
    base_model: str,
    lora_rank: int | None,
    body: dict[str, Any],
) -> fleet.Run:
    now = emu.now()
    run = fleet.Run(
        run_id=f"{session.session_id}:train:{seq}",
        session_id=session.session_id,
        base_model=base_model,
        model_owner=session.owner,
        lora_rank=lora_rank,
        user_metadata=_metadata(body),
        kind="session",
        created_at=now,
        origin=now,
        last_request_at=now,
        request_interval_s=emu.config.request_interval_s,
        project_id=session.project_id,
    )
    emu.add_run(run)
    session.run_ids.append(run.run_id)
    return run


def load_weights(emu: Emulator, body: dict[str, Any]) -> dict[str, Any]:
    """Restore: a new run in the caller's session from a checkpoint (or load into a model)."""
    path = _str(body, "path")
    with_optimizer = bool(body.get("optimizer"))
    with emu.lock:
        if body.get("session_id") is None:
            target = emu.run(_str(body, "model_id"))
            return _load_into(emu, target, path, with_optimizer)
        seq = _int(body, "model_seq_id")
        session = _session(emu, _str(body, "session_id"))
        model_id = f"{session.session_id}:train:{seq}"
        if model_id in emu.runs:
            return emu.fail(f"model {model_id} already exists", model_id=model_id)
        problem = _restore_problem(emu, path, with_optimizer)
        if problem is not None:
            return emu.fail(problem, model_id=model_id)
        source, _ = emu.checkpoint(path)
        base_model = body.get("base_model") or source.base_model
        if base_model != source.base_model:
            return emu.fail("base_model does not match the checkpoint", model_id=model_id)
        run = _new_session_run(emu, session, seq, source.base_model, source.lora_rank, body)
        run.loaded_from = path
        run.steps = emu.checkpoint(path)[1].train_step
        _progress(emu, session)
        result = {"type": "load_weights", "path": path, "model_id": model_id}
        return emu.submit(result, model_id)


def _restore_problem(emu: Emulator, path: str, with_optimizer: bool) -> str | None:
    """Why a restore from `path` fails, in the words a request-failed answer would use."""
    try:
        _, ckpt = emu.checkpoint(path)
    except ApiError as exc:
        return f"cannot load {path}: {exc.detail}"
    if path in emu.unloadable:
        return emu.unloadable[path]
    if with_optimizer and ckpt.checkpoint_type != "training":
        return f"cannot load optimizer state from {path}: sampler weights carry none"
    return None


def _load_into(emu: Emulator, run: fleet.Run, path: str, with_optimizer: bool) -> dict[str, Any]:
    problem = _restore_problem(emu, path, with_optimizer)
    if problem is None and run.corrupted:
        problem = f"training run {run.run_id} is corrupted"
    if problem is not None:
        return emu.fail(problem, category="user", model_id=run.run_id)
    run.steps = emu.checkpoint(path)[1].train_step
    return emu.submit({"type": "load_weights", "path": path, "model_id": run.run_id}, run.run_id)


def create_model(emu: Emulator, body: dict[str, Any]) -> dict[str, Any]:
    base_model = _str(body, "base_model")
    lora = body.get("lora_config")
    rank = lora.get("rank") if isinstance(lora, dict) else None
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ApiError(400, "lora_config.rank must be a positive integer")
    with emu.lock:
        session = _session(emu, _str(body, "session_id"))
        seq = _int(body, "model_seq_id")
        model_id = f"{session.session_id}:train:{seq}"
        if model_id in emu.runs:
            return emu.fail(f"model {model_id} already exists", model_id=model_id)
        _new_session_run(emu, session, seq, base_model, rank, body)
        _progress(emu, session)
        return emu.submit({"model_id": model_id, "type": "create_model"}, model_id)


def get_info(emu: Emulator, body: dict[str, Any]) -> dict[str, Any]:
    with emu.lock:
        run = emu.run(_str(body, "model_id"))
        return {
            "model_id": run.run_id,
            "model_data": {
                "arch": "transformer",
                "model_name": run.base_model,
                "tokenizer_id": run.base_model,
            },
            "is_lora": run.is_lora,
            "lora_rank": run.lora_rank,
            "model_name": run.base_model,
            "type": "get_info",
        }


def _driving(emu: Emulator, body: dict[str, Any]) -> tuple[fleet.Run, str | None]:
    """The run a training request drives, plus why it must fail (a corrupted run)."""
    run = emu.run(_str(body, "model_id"))
    if run.corrupted:
        return run, f"training run {run.run_id} is corrupted; restore it from a checkpoint"
    if run.kind == "session":
        run.last_request_at = emu.now()
        run.touch()
    return run, None


def save_weights(emu: Emulator, body: dict[str, Any], *, sampler: bool) -> dict[str, Any]:
    """save_state (`weights/<name>`) or save_weights_for_sampler (`sampler_weights/<name>`)."""
    ttl = check_ttl(body.get("ttl_seconds"))
    with emu.lock:
        run, problem = _driving(emu, body)
        kind = "save_weights_for_sampler" if sampler else "save_weights"
        if problem is not None:
            return emu.fail(problem, category="server", model_id=run.run_id)
        name = body.get("path")
        if name is None and sampler:
            return _snapshot_sampler(emu, run, body, kind)
        name = str(name) if name is not None else f"{body.get('seq_id') or 0:06d}"
        if "/" in name or not name:
            return emu.fail("checkpoint name must be non-empty and contain no '/'")
        segment = fleet.SEGMENT_FOR["sampler" if sampler else "training"]
        checkpoint_id = f"{segment}/{name}"
        now = emu.now()
        if run.find_checkpoint(checkpoint_id, now) is not None and not body.get("overwrite"):
            return emu.fail(f"checkpoint {checkpoint_id} already exists; pass overwrite=True")
        size = (run.lora_rank or 64) * 4_000_000
        ckpt = fleet.Checkpoint(
            run.run_id,
            checkpoint_id,
            now,
            size if not sampler else size // 3,
            None if ttl is None else now + ttl,
            user_metadata=_metadata(body),
            step=run.steps,
        )
        run.add_checkpoint(ckpt)
        return emu.submit({"path": ckpt.tinker_path, "type": kind})


def _snapshot_sampler(
    emu: Emulator, run: fleet.Run, body: dict[str, Any], kind: str
) -> dict[str, Any]:
    """`save_weights_and_get_sampling_client`: a sampling session on the current weights,
    with no checkpoint left behind."""
    seq = _int(body, "sampling_session_seq_id")
    sampler_id = f"{run.session_id}:sample:{seq}"
    if sampler_id in emu.samplers:
        return emu.fail(f"sampling session {sampler_id} already exists")
    emu.samplers[sampler_id] = Sampler(sampler_id, run.session_id, run.base_model, None, run.steps)
    return emu.submit({"sampling_session_id": sampler_id, "type": kind})


def forward_backward(emu: Emulator, request: FwdBwdRequest) -> dict[str, Any]:
    """forward_backward and forward: per-datum `logprobs`, one per target token, as the
    service answers (protobuf); values follow the run's step count (model.py)."""
    from tinker_recovery.emulator import wire

    with emu.lock:
        run, problem = _driving(emu, {"model_id": request.model_id})
        if problem is not None:
            return emu.fail(problem, category="server", model_id=run.run_id)
        step = run.steps
    return emu.submit(wire.fwdbwd_output(request.data, step))


def optim_step(emu: Emulator, body: dict[str, Any]) -> dict[str, Any]:
    with emu.lock:
        run, problem = _driving(emu, body)
        if problem is not None:
            return emu.fail(problem, category="server", model_id=run.run_id)
        run.steps += 1
        return emu.submit({"metrics": {}})


def unload_model(emu: Emulator, body: dict[str, Any]) -> dict[str, Any]:
    with emu.lock:
        run = emu.run(_str(body, "model_id"))
        return emu.submit({"model_id": run.run_id, "type": "unload_model"})
