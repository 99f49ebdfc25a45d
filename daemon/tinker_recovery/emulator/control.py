"""The control API under `/_emulator/`: the operator's levers over HTTP (see docs/emulator.md).

Thin JSON routes over levers.py and the Emulator. Faults never apply here and requests here
are not counted, so a test can always inspect and repair the emulator it is breaking.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tinker_recovery.emulator import fleet, levers
from tinker_recovery.emulator.api import error_response, query_int, read_json
from tinker_recovery.emulator.faults import FaultSpec
from tinker_recovery.emulator.state import ApiError, Emulator

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[Request], Awaitable[Response]]


class Advance(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    seconds: float = Field(ge=0.0)


def parse(model: type[M], body: dict[str, Any]) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ApiError(400, problems) from exc


def _guard(handler: Handler) -> Handler:
    async def call(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return error_response(exc.status, exc.detail)

    return call


def _optional_bool(request: Request, name: str) -> bool | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    if raw.lower() in ("true", "1", "yes"):
        return True
    if raw.lower() in ("false", "0", "no"):
        return False
    raise ApiError(400, f"{name} must be true or false")


def routes(emu: Emulator) -> list[Route]:  # noqa: C901 - a flat table of small closures
    async def info(request: Request) -> Response:
        cfg = emu.config
        return JSONResponse(
            {
                "now": fleet.iso(emu.now()),
                "runs": len(emu.runs),
                "sessions": len(emu.sessions),
                "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
            }
        )

    async def list_runs(request: Request) -> Response:
        out = levers.list_runs(
            emu,
            corrupted=_optional_bool(request, "corrupted"),
            kind=request.query_params.get("kind"),
            limit=query_int(request, "limit", 100),
            offset=query_int(request, "offset", 0),
        )
        return JSONResponse(out)

    async def create_run(request: Request) -> Response:
        spec = parse(levers.CreateRun, await read_json(request))
        return JSONResponse(levers.create_run(emu, spec), status_code=201)

    async def get_run(request: Request) -> Response:
        with emu.lock:
            run = emu.run(request.path_params["run_id"])
            return JSONResponse(levers.describe(emu, run, emu.now()))

    async def corrupt(request: Request) -> Response:
        return JSONResponse(levers.corrupt(emu, request.path_params["run_id"]))

    async def incident(request: Request) -> Response:
        return JSONResponse(levers.incident(emu, parse(levers.Incident, await read_json(request))))

    async def unloadable(request: Request) -> Response:
        spec = parse(levers.CheckpointLever, await read_json(request))
        return JSONResponse(levers.mark_unloadable(emu, spec))

    async def expire(request: Request) -> Response:
        spec = parse(levers.CheckpointLever, await read_json(request))
        return JSONResponse(levers.expire(emu, spec))

    async def list_faults(request: Request) -> Response:
        return JSONResponse({"faults": emu.faults.describe()})

    async def add_fault(request: Request) -> Response:
        spec = parse(FaultSpec, await read_json(request))
        return JSONResponse({"id": emu.faults.add(spec)}, status_code=201)

    async def clear_faults(request: Request) -> Response:
        emu.faults.clear()
        emu.release_hangs()
        return JSONResponse({"faults": []})

    async def remove_fault(request: Request) -> Response:
        try:
            fault_id = int(request.path_params["fault_id"])
        except ValueError as exc:
            raise ApiError(400, "fault id must be an integer") from exc
        removed = emu.faults.remove(fault_id)
        if removed is None:
            raise ApiError(404, "fault not found")
        if removed.kind == "hang":
            emu.release_hangs()
        return Response(status_code=204)

    async def requests(request: Request) -> Response:
        return JSONResponse(emu.request_counts())

    async def reset_requests(request: Request) -> Response:
        emu.reset_counters()
        return JSONResponse(emu.request_counts())

    async def reset(request: Request) -> Response:
        emu.faults.clear()
        emu.release_hangs()
        emu.reset_counters()
        return JSONResponse({"faults": [], **emu.request_counts()})

    async def advance(request: Request) -> Response:
        spec = parse(Advance, await read_json(request))
        return JSONResponse({"now": fleet.iso(emu.advance(spec.seconds))})

    async def sessions(request: Request) -> Response:
        with emu.lock:
            rows = [
                {
                    "session_id": s.session_id,
                    "alive": emu.session_alive(s),
                    "finished": s.finished,
                    "last_seen": fleet.iso(s.last_seen),
                    "run_ids": list(s.run_ids),
                }
                for s in emu.sessions.values()
            ]
        return JSONResponse({"sessions": rows})

    table: list[tuple[str, list[str], Handler]] = [
        ("/_emulator", ["GET"], info),
        ("/_emulator/runs", ["GET"], list_runs),
        ("/_emulator/runs", ["POST"], create_run),
        ("/_emulator/runs/{run_id}", ["GET"], get_run),
        ("/_emulator/runs/{run_id}/corrupt", ["POST"], corrupt),
        ("/_emulator/incident", ["POST"], incident),
        ("/_emulator/checkpoints/unloadable", ["POST"], unloadable),
        ("/_emulator/checkpoints/expire", ["POST"], expire),
        ("/_emulator/faults", ["GET"], list_faults),
        ("/_emulator/faults", ["POST"], add_fault),
        ("/_emulator/faults", ["DELETE"], clear_faults),
        ("/_emulator/faults/{fault_id}", ["DELETE"], remove_fault),
        ("/_emulator/requests", ["GET"], requests),
        ("/_emulator/requests", ["DELETE"], reset_requests),
        ("/_emulator/reset", ["POST"], reset),
        ("/_emulator/clock/advance", ["POST"], advance),
        ("/_emulator/sessions", ["GET"], sessions),
    ]
    return [Route(path, _guard(handler), methods=methods) for path, methods, handler in table]
