"""The Tinker HTTP API (`/api/v1/...`) as SDK 0.38 speaks it, with faults applied per endpoint.

Each route gets a stable endpoint name (faults.ENDPOINTS). The wrapper counts the request,
applies any faults that fire, checks the API key, and turns `ApiError` into the JSON-bodied
4xx the real service gives. An unexpected bug becomes a JSON 500, never a traceback page.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tinker_recovery.emulator import fleet, sampling, training
from tinker_recovery.emulator.faults import FaultSpec
from tinker_recovery.emulator.state import ApiError, Emulator, Scope

log = structlog.get_logger(__name__)

Handler = Callable[[Request, float | None], Awaitable[Response]]
KEY_PREFIXES = ("tml-", "eyJ")
OPEN_ENDPOINTS = frozenset({"healthz", "client_config"})


def error_response(
    status: int, detail: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def json_bytes(payload: bytes, status: int = 200) -> Response:
    return Response(payload, status_code=status, media_type="application/json")


async def read_json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, "request body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def query_int(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ApiError(400, f"{name} must be an integer") from exc
    if value < 0:
        raise ApiError(400, f"{name} must not be negative")
    return value


def _scope(request: Request) -> Scope:
    raw = request.query_params.get("access_scope", "owned")
    if raw == "owned":
        return "owned"
    if raw == "accessible":
        return "accessible"
    raise ApiError(400, "access_scope must be 'owned' or 'accessible'")


def _check_key(request: Request) -> None:
    key = request.headers.get("x-api-key", "")
    if not key.startswith(KEY_PREFIXES):
        # Never echo the key back: it may be a real secret pasted by mistake.
        raise ApiError(401, "missing or invalid API key")


async def _apply_pre_faults(emu: Emulator, faults: list[FaultSpec]) -> Response | None:
    for fault in faults:
        if fault.kind == "latency":
            await asyncio.sleep(fault.latency_s)
        elif fault.kind == "hang":
            await emu.hold(fault.hang_s)
    for fault in faults:
        if fault.kind == "error":
            return error_response(fault.status, "injected fault: service unavailable")
        if fault.kind == "rate_limit":
            headers = {
                "Retry-After": str(math.ceil(fault.retry_after_s)),
                "retry-after-ms": str(int(fault.retry_after_s * 1000)),
            }
            return error_response(429, "injected fault: rate limited", headers)
    return None


def _malformed(response: Response) -> Response:
    body = bytes(response.body)
    cut = body[: max(1, len(body) // 2)] if body else b"{"
    return Response(cut, status_code=response.status_code, media_type="application/json")


def endpoint(
    emu: Emulator, name: str, handler: Handler
) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a handler with counting, faults, auth and error translation."""

    async def handle(request: Request) -> Response:
        faults = emu.faults.pick(name)
        response = await _apply_pre_faults(emu, faults)
        if response is None:
            response = await _call(request, handler, faults, name)
        if any(f.kind == "malformed" for f in faults) and response.status_code < 400:
            response = _malformed(response)
        if faults:
            response.headers["x-emulator-faults"] = ",".join(sorted({f.kind for f in faults}))
        emu.count(name, response.status_code)
        return response

    return handle


async def _call(request: Request, handler: Handler, faults: list[FaultSpec], name: str) -> Response:
    keep = next((f.keep_fraction for f in faults if f.kind == "truncate"), None)
    try:
        if name not in OPEN_ENDPOINTS:
            _check_key(request)
        return await handler(request, keep)
    except ApiError as exc:
        return error_response(exc.status, exc.detail)
    except Exception:  # the one boundary where any bug must become a JSON 500, not a crash
        log.exception("emulator_handler_failed", endpoint=name)
        return error_response(500, "internal emulator error")


def routes(emu: Emulator) -> list[Route]:  # noqa: C901 - a flat table of small closures
    async def client_config(request: Request, keep: float | None) -> Response:
        await read_json(request)
        # The SDK fetches this through a one-off connection pool it never closes; closing the
        # connection here keeps its socket from lingering until garbage collection.
        return JSONResponse(
            {"pjwt_auth_enabled": False, "use_pyqwest_transport": True},
            headers={"Connection": "close"},
        )

    async def dynamic_config(request: Request, keep: float | None) -> Response:
        await read_json(request)
        return JSONResponse({"refresh_interval_sec": 300})

    async def telemetry(request: Request, keep: float | None) -> Response:
        await read_json(request)
        return JSONResponse({"status": "accepted"})

    async def healthz(request: Request, keep: float | None) -> Response:
        return JSONResponse({"status": "ok"})

    async def capabilities(request: Request, keep: float | None) -> Response:
        models = [
            {"model_name": m, "max_context_length": 32768, "trainable": True, "sampleable": True}
            for m in fleet.BASE_MODELS
        ]
        return JSONResponse({"supported_models": models})

    async def list_runs(request: Request, keep: float | None) -> Response:
        page = emu.page_runs(
            scope=_scope(request),
            limit=query_int(request, "limit", 20),
            offset=query_int(request, "offset", 0),
            project_id=request.query_params.get("project_id"),
            keep_fraction=keep,
        )
        return json_bytes(page)

    async def get_run(request: Request, keep: float | None) -> Response:
        return json_bytes(emu.run_bytes(request.path_params["run_id"], _scope(request)))

    async def list_checkpoints(request: Request, keep: float | None) -> Response:
        out = emu.list_checkpoints(request.path_params["run_id"])
        if keep is not None:
            out["checkpoints"] = out["checkpoints"][: int(len(out["checkpoints"]) * keep)]
        return JSONResponse(out)

    async def list_user_checkpoints(request: Request, keep: float | None) -> Response:
        limit = query_int(request, "limit", 100)
        offset = query_int(request, "offset", 0)
        return JSONResponse(
            emu.list_user_checkpoints(limit=limit, offset=offset, keep_fraction=keep)
        )

    def ckpt_id(request: Request) -> tuple[str, str]:
        params = request.path_params
        if params["segment"] not in fleet.SEGMENT_OF:
            raise ApiError(404, "checkpoint not found")
        return params["run_id"], f"{params['segment']}/{params['name']}"

    async def delete_checkpoint(request: Request, keep: float | None) -> Response:
        emu.delete_checkpoint(*ckpt_id(request))
        return Response(status_code=204)

    async def set_ttl(request: Request, keep: float | None) -> Response:
        body = await read_json(request)
        if "ttl_seconds" not in body:
            raise ApiError(400, "ttl_seconds is required (an integer or null)")
        emu.set_ttl(*ckpt_id(request), body["ttl_seconds"])
        return JSONResponse({})

    async def publish(request: Request, keep: float | None) -> Response:
        emu.set_public(*ckpt_id(request), public=request.method == "POST")
        return JSONResponse({})

    async def weights_info(request: Request, keep: float | None) -> Response:
        path = (await read_json(request)).get("tinker_path")
        if not isinstance(path, str):
            raise ApiError(400, "tinker_path must be a string")
        return JSONResponse(emu.weights_info(path))

    def body_call(fn: Callable[[Emulator, dict[str, Any]], dict[str, Any]]) -> Handler:
        async def call(request: Request, keep: float | None) -> Response:
            return JSONResponse(fn(emu, await read_json(request)))

        return call

    async def finish(request: Request, keep: float | None) -> Response:
        body = await read_json(request)
        return JSONResponse(training.finish_session(emu, request.path_params["session_id"], body))

    async def retrieve(request: Request, keep: float | None) -> Response:
        request_id = (await read_json(request)).get("request_id")
        if not isinstance(request_id, str):
            raise ApiError(400, "request_id must be a string")
        payload = emu.retrieve(request_id)
        if isinstance(payload, bytes):
            return Response(payload, media_type="application/x-protobuf")
        return JSONResponse(payload)

    async def forward_backward(request: Request, keep: float | None) -> Response:
        # Imported here: protobuf is only needed by the job scripts that train.
        from tinker_recovery.emulator import wire

        if "protobuf" not in request.headers.get("content-type", ""):
            parsed = wire.fwdbwd_from_json(await read_json(request))
        elif request.headers.get("content-encoding"):
            raise ApiError(400, "compressed forward_backward bodies are not supported")
        else:
            parsed = wire.fwdbwd_from_proto(await request.body())
        return JSONResponse(training.forward_backward(emu, parsed))

    async def get_sampler(request: Request, keep: float | None) -> Response:
        return JSONResponse(sampling.get_sampler(emu, request.path_params["sampler_id"]))

    async def auth_token(request: Request, keep: float | None) -> Response:
        raise ApiError(404, "JWT exchange is not enabled on this server")

    ckpt = "/api/v1/training_runs/{run_id}/checkpoints/{segment}/{name}"
    table: list[tuple[str, str, list[str], Handler]] = [
        ("client_config", "/api/v1/client/config", ["POST"], client_config),
        ("dynamic_config", "/api/v1/client/dynamic_config", ["POST"], dynamic_config),
        ("auth_token", "/api/v1/auth/token", ["POST"], auth_token),
        ("telemetry", "/api/v1/telemetry", ["POST"], telemetry),
        ("healthz", "/api/v1/healthz", ["GET"], healthz),
        ("get_server_capabilities", "/api/v1/get_server_capabilities", ["GET"], capabilities),
        ("create_session", "/api/v1/create_session", ["POST"], body_call(training.create_session)),
        ("session_heartbeat", "/api/v1/session_heartbeat", ["POST"], body_call(training.heartbeat)),
        ("finish_session", "/api/v1/sessions/{session_id}/finish", ["POST"], finish),
        ("list_training_runs", "/api/v1/training_runs", ["GET"], list_runs),
        ("get_training_run", "/api/v1/training_runs/{run_id}", ["GET"], get_run),
        (
            "list_checkpoints",
            "/api/v1/training_runs/{run_id}/checkpoints",
            ["GET"],
            list_checkpoints,
        ),
        ("list_user_checkpoints", "/api/v1/checkpoints", ["GET"], list_user_checkpoints),
        ("delete_checkpoint", ckpt, ["DELETE"], delete_checkpoint),
        ("set_checkpoint_ttl", ckpt + "/ttl", ["PUT"], set_ttl),
        ("publish_checkpoint", ckpt + "/publish", ["POST"], publish),
        ("unpublish_checkpoint", ckpt + "/publish", ["DELETE"], publish),
        ("weights_info", "/api/v1/weights_info", ["POST"], weights_info),
        ("load_weights", "/api/v1/load_weights", ["POST"], body_call(training.load_weights)),
        ("create_model", "/api/v1/create_model", ["POST"], body_call(training.create_model)),
        ("get_info", "/api/v1/get_info", ["POST"], body_call(training.get_info)),
        ("save_weights", "/api/v1/save_weights", ["POST"], body_call(_save(sampler=False))),
        (
            "save_weights_for_sampler",
            "/api/v1/save_weights_for_sampler",
            ["POST"],
            body_call(_save(sampler=True)),
        ),
        (
            "forward_backward",
            "/api/v1/forward_backward",
            ["POST"],
            forward_backward,
        ),
        ("optim_step", "/api/v1/optim_step", ["POST"], body_call(training.optim_step)),
        ("unload_model", "/api/v1/unload_model", ["POST"], body_call(training.unload_model)),
        (
            "create_sampling_session",
            "/api/v1/create_sampling_session",
            ["POST"],
            body_call(sampling.create_sampling_session),
        ),
        ("get_sampler", "/api/v1/samplers/{sampler_id}", ["GET"], get_sampler),
        ("asample", "/api/v1/asample", ["POST"], body_call(sampling.asample)),
        ("retrieve_future", "/api/v1/retrieve_future", ["POST"], retrieve),
    ]
    return [
        Route(path, endpoint(emu, name, handler), methods=methods, name=name)
        for name, path, methods, handler in table
    ]


def _save(*, sampler: bool) -> Callable[[Emulator, dict[str, Any]], dict[str, Any]]:
    def save(emu: Emulator, body: dict[str, Any]) -> dict[str, Any]:
        return training.save_weights(emu, body, sampler=sampler)

    return save
