"""One request: bounded retries, Retry-After, error translation, the time bound, auth."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from gw_fakes import API_KEY, FakeTinker, make_jwt, make_rig, make_run

from tinker_recovery.errors import InconsistentListing, RemoteRejected, RemoteUnavailable
from tinker_recovery.shell.gateway import GatewayUnavailable, MalformedResponse, poll_error_reason


def fail_get_run(*answers: httpx.Response) -> FakeTinker:
    """Server whose get_run answers `answers` in turn, then serves normally."""
    server = FakeTinker(runs=[make_run(1)])
    queue = list(answers)

    def script(request: httpx.Request) -> httpx.Response | None:
        if "/training_runs/" in request.url.path and queue:
            return queue.pop(0)
        return None

    server.script = script
    return server


async def test_5xx_is_retried_with_full_jitter_then_succeeds() -> None:
    server = fail_get_run(httpx.Response(503), httpx.Response(502))
    rig = make_rig(server, rand=lambda: 0.5)
    run = await rig.gateway.get_run("sess-000001:train:0")
    assert run.run_id == "sess-000001:train:0"
    assert rig.clock.sleeps == [pytest.approx(0.1), pytest.approx(0.2)]  # 0.5 * 0.2 * 2**n
    assert rig.requests_counted("get_run", "503") == 1
    assert rig.requests_counted("get_run", "502") == 1
    assert rig.requests_counted("get_run", "200") == 1


@pytest.mark.parametrize(
    ("headers", "slept"),
    [
        pytest.param({"Retry-After": "2"}, 2.0, id="retry-after-seconds"),
        pytest.param({"retry-after-ms": "1500"}, 1.5, id="retry-after-ms"),
        pytest.param({"Retry-After": "3600"}, 5.0, id="capped-at-retry-max-delay"),
        pytest.param({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.1, id="date-ignored"),
    ],
)
async def test_429_honours_retry_after_up_to_the_cap(headers: dict[str, str], slept: float) -> None:
    server = fail_get_run(httpx.Response(429, headers=headers))
    rig = make_rig(server, rand=lambda: 0.5)
    await rig.gateway.get_run("sess-000001:train:0")
    assert rig.clock.sleeps == [pytest.approx(slept)]


async def test_persistent_failure_stops_after_retry_attempts() -> None:
    server = fail_get_run(*[httpx.Response(500, headers={"Retry-After": "7"})] * 10)
    rig = make_rig(server, retry_attempts=4)
    with pytest.raises(GatewayUnavailable) as caught:
        await rig.gateway.get_run("sess-000001:train:0")
    assert rig.requests_counted("get_run", "500") == 4
    assert len(rig.clock.sleeps) == 3
    assert caught.value.retry_after_s == 7.0  # the server's wish is passed on to the poller
    assert poll_error_reason(caught.value) == "http_5xx"


@pytest.mark.parametrize("status", [400, 403, 404, 409, 422])
async def test_4xx_is_rejected_at_once(status: int) -> None:
    server = fail_get_run(httpx.Response(status, json={"detail": "no"}))
    rig = make_rig(server)
    with pytest.raises(RemoteRejected) as caught:
        await rig.gateway.get_run("sess-000001:train:0")
    assert caught.value.status_code == status
    assert rig.clock.sleeps == []
    assert poll_error_reason(caught.value) == "rejected"


async def test_connection_errors_are_retried_and_counted() -> None:
    server = FakeTinker(runs=[make_run(1)])

    def refuse(request: httpx.Request) -> httpx.Response | None:
        raise httpx.ConnectError("refused", request=request)

    server.script = refuse
    rig = make_rig(server)
    with pytest.raises(RemoteUnavailable) as caught:
        await rig.gateway.list_runs()
    assert poll_error_reason(caught.value) == "connection"
    assert rig.requests_counted("client_config", "connection") == 3


@pytest.mark.looptime
@pytest.mark.parametrize("hanging", ["/client/config", "/training_runs"])
async def test_hanging_server_fails_within_timeout_times_attempts_plus_delays(
    hanging: str,
) -> None:
    server = FakeTinker(runs=[make_run(1)])

    async def hang(request: httpx.Request) -> httpx.Response | None:
        if request.url.path.endswith(hanging):
            await asyncio.Event().wait()
        return None

    server.script = hang
    rig = make_rig(server, request_timeout=10.0, retry_attempts=3, retry_max_delay=5.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(GatewayUnavailable) as caught:
        await rig.gateway.list_runs()
    waited_s = (loop.time() - started) + sum(rig.clock.sleeps)  # loop time + clock sleeps
    bound_s = 10.0 * 3 + 5.0 * 2
    assert waited_s <= bound_s
    assert poll_error_reason(caught.value) == "timeout"
    endpoint = "client_config" if hanging == "/client/config" else "list_runs"
    assert rig.requests_counted(endpoint, "timeout") == 3


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        pytest.param(GatewayUnavailable("x", reason="rate_limited"), "rate_limited", id="429"),
        pytest.param(MalformedResponse("x"), "malformed", id="malformed"),
        pytest.param(InconsistentListing("x"), "inconsistent", id="inconsistent"),
        pytest.param(RemoteRejected("x", status_code=403), "rejected", id="rejected"),
        pytest.param(TimeoutError(), "timeout", id="cycle-timeout"),
        pytest.param(RemoteUnavailable("x"), "other", id="other-unavailable"),
        pytest.param(ValueError("x"), "other", id="bug"),
    ],
)
def test_poll_error_reason_maps_to_the_closed_label_set(exc: BaseException, reason: str) -> None:
    assert poll_error_reason(exc) == reason


async def test_key_never_appears_in_errors_even_if_the_server_echoes_it() -> None:
    server = fail_get_run(httpx.Response(401, text=f"bad key {API_KEY} for you"))
    rig = make_rig(server)
    with pytest.raises(RemoteRejected) as caught:
        await rig.gateway.get_run("sess-000001:train:0")
    assert API_KEY not in str(caught.value)
    assert "***" in str(caught.value)


async def test_client_config_is_fetched_once() -> None:
    server = FakeTinker(runs=[make_run(1)])
    rig = make_rig(server)
    await asyncio.gather(rig.gateway.list_runs(), rig.gateway.get_run("sess-000001:train:0"))
    await rig.gateway.list_runs()
    assert server.count("/client/config") == 1
    assert {r.headers["X-API-Key"] for r in server.requests} == {API_KEY}


def jwt_server(*tokens: str) -> FakeTinker:
    server = FakeTinker(runs=[make_run(1)], config={"pjwt_auth_enabled": True})
    pending = list(tokens)

    def script(request: httpx.Request) -> httpx.Response | None:
        if request.url.path.endswith("/auth/token"):
            assert request.headers["X-API-Key"] == API_KEY
            return httpx.Response(200, json={"jwt": pending.pop(0)})
        return None

    server.script = script
    return server


async def test_jwt_is_exchanged_used_and_refreshed_at_half_life() -> None:
    # Lifetime 1000 s (from iat/exp, not our clock); refresh at 0.45 + 0.1 * 0.5 = half.
    first, second = make_jwt(iat=0, exp=1000, tag="one"), make_jwt(iat=0, exp=1000, tag="two")
    server = jwt_server(first, second)
    rig = make_rig(server, rand=lambda: 0.5)
    await rig.gateway.get_run("sess-000001:train:0")
    rig.clock.t += 499
    await rig.gateway.get_run("sess-000001:train:0")
    rig.clock.t += 2
    await rig.gateway.get_run("sess-000001:train:0")
    used = [r.headers["X-API-Key"] for r in server.requests if "/training_runs/" in r.url.path]
    assert used == [first, first, second]
    assert server.count("/auth/token") == 2


async def test_invalid_token_401_is_exchanged_once_and_replayed() -> None:
    first, second = make_jwt(iat=0, exp=1000, tag="one"), make_jwt(iat=0, exp=1000, tag="two")
    server = jwt_server(first, second)
    inner = server.script
    assert inner is not None
    rejected = {"count": 0}

    def script(request: httpx.Request) -> httpx.Response | None:
        if "/training_runs/" in request.url.path and request.headers["X-API-Key"] == first:
            rejected["count"] += 1
            return httpx.Response(
                401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}, json={}
            )
        answer = inner(request)
        assert not isinstance(answer, asyncio.Future)
        return answer if isinstance(answer, httpx.Response) else None

    server.script = script
    rig = make_rig(server)
    run = await rig.gateway.get_run("sess-000001:train:0")
    assert run.run_id == "sess-000001:train:0"
    assert rejected["count"] == 1
    assert server.count("/auth/token") == 2


async def test_second_invalid_token_is_rejected_not_looped() -> None:
    tokens = [make_jwt(iat=0, exp=1000, tag=str(i)) for i in range(5)]
    server = jwt_server(*tokens)
    inner = server.script
    assert inner is not None

    def script(request: httpx.Request) -> httpx.Response | None:
        if "/training_runs/" in request.url.path:
            return httpx.Response(
                401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}, json={}
            )
        answer = inner(request)
        return answer if isinstance(answer, httpx.Response) else None

    server.script = script
    rig = make_rig(server)
    with pytest.raises(RemoteRejected) as caught:
        await rig.gateway.get_run("sess-000001:train:0")
    assert caught.value.status_code == 401
    assert server.count("/auth/token") == 2
    assert all(t not in str(caught.value) for t in tokens)


async def test_jwt_without_exp_is_malformed() -> None:
    server = jwt_server(make_jwt(iat=0, exp=None))
    rig = make_rig(server)
    with pytest.raises(MalformedResponse, match="exp"):
        await rig.gateway.list_runs()


async def test_weights_info_reads_optimizer_presence_from_the_payload() -> None:
    server = FakeTinker()
    answers = [
        {"base_model": "m", "is_lora": True, "lora_rank": 8, "optimizer_config": {"type": "adamw"}},
        {"base_model": "m", "is_lora": False},
    ]

    def script(request: httpx.Request) -> httpx.Response | None:
        if request.url.path.endswith("/weights_info"):
            assert json.loads(request.content) == {"tinker_path": "tinker://r/weights/1"}
            return httpx.Response(200, json=answers.pop(0))
        return None

    server.script = script
    rig = make_rig(server)
    with_opt = await rig.gateway.weights_info("tinker://r/weights/1")
    without = await rig.gateway.weights_info("tinker://r/weights/1")
    assert (with_opt.has_optimizer_state, with_opt.lora_rank) == (True, 8)
    assert (without.has_optimizer_state, without.is_lora) == (False, False)


async def test_set_checkpoint_ttl_puts_to_the_checkpoint_path() -> None:
    server = FakeTinker()
    rig = make_rig(server)
    await rig.gateway.set_checkpoint_ttl("tinker://sess-1:train:0/weights/000020", 86400)
    [put] = [r for r in server.requests if r.method == "PUT"]
    assert put.url.path == "/api/v1/training_runs/sess-1:train:0/checkpoints/weights/000020/ttl"
    assert json.loads(put.content) == {"ttl_seconds": 86400}
    with pytest.raises(RemoteRejected, match="not a tinker checkpoint path"):
        await rig.gateway.set_checkpoint_ttl("s3://elsewhere/x", None)


async def test_list_checkpoints_converts_each_checkpoint() -> None:
    server = FakeTinker()
    ckpt = make_run(3)["last_checkpoint"]

    def script(request: httpx.Request) -> httpx.Response | None:
        if request.url.path.endswith("/checkpoints"):
            return httpx.Response(200, json={"checkpoints": [ckpt, ckpt], "cursor": None})
        return None

    server.script = script
    rig = make_rig(server)
    views = await rig.gateway.list_checkpoints("sess-000003:train:0")
    assert [v.checkpoint_id for v in views] == ["weights/000020", "weights/000020"]
