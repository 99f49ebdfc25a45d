"""list_runs paging: offsets, server caps, a fleet that moves mid-cycle, never a partial fleet."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest
from gw_fakes import FakeTinker, make_rig, make_run

from tinker_recovery.core.model import CheckpointKind
from tinker_recovery.errors import RemoteRejected, RemoteUnavailable
from tinker_recovery.shell.gateway import MalformedResponse


def offsets_asked(server: FakeTinker) -> list[tuple[int, int]]:
    pages = [r for r in server.requests if r.url.path.endswith("/training_runs")]
    return sorted((int(r.url.params["offset"]), int(r.url.params["limit"])) for r in pages)


async def test_uneven_last_page_is_fetched_and_nothing_more() -> None:
    server = FakeTinker(runs=[make_run(i) for i in range(250)])
    rig = make_rig(server)
    runs = await rig.gateway.list_runs()
    assert [r.run_id for r in runs] == [f"sess-{i:06d}:train:0" for i in range(250)]
    assert offsets_asked(server) == [(0, 100), (100, 100), (200, 100)]


@pytest.mark.parametrize("echo", [False, True], ids=["cursor-says-cap", "cursor-echoes-ask"])
async def test_server_cap_below_page_size_steps_by_what_was_served(echo: bool) -> None:
    server = FakeTinker(runs=[make_run(i) for i in range(95)], cap=30, echo_requested_limit=echo)
    rig = make_rig(server)
    runs = await rig.gateway.list_runs()
    assert len({r.run_id for r in runs}) == 95
    assert offsets_asked(server) == [(0, 100), (30, 30), (60, 30), (90, 30)]


async def test_empty_fleet_is_one_request() -> None:
    server = FakeTinker(runs=[])
    rig = make_rig(server)
    assert await rig.gateway.list_runs() == []
    assert offsets_asked(server) == [(0, 100)]


async def test_fleet_growing_mid_cycle_fetches_the_new_tail() -> None:
    server = FakeTinker(runs=[make_run(i) for i in range(200)])

    def grow(offset: int) -> None:
        if offset == 0 and len(server.runs) == 200:
            server.runs.extend(make_run(i) for i in range(200, 230))

    server.on_page = grow
    rig = make_rig(server)
    runs = await rig.gateway.list_runs()
    assert len(runs) == 230  # page 0 said 200; a later page said 230
    assert (200, 100) in offsets_asked(server)


async def test_fleet_shrinking_mid_cycle_returns_what_is_there() -> None:
    server = FakeTinker(runs=[make_run(i) for i in range(250)])

    def shrink(offset: int) -> None:
        if offset == 0:
            del server.runs[150:]

    server.on_page = shrink
    rig = make_rig(server)
    runs = await rig.gateway.list_runs()
    assert len(runs) == 150


async def test_run_shifted_across_a_page_boundary_is_returned_once() -> None:
    server = FakeTinker(runs=[make_run(i) for i in range(200)])

    def insert_newest_first(offset: int) -> None:
        if offset == 0 and len(server.runs) == 200:
            server.runs.insert(0, make_run(999))

    server.on_page = insert_newest_first
    rig = make_rig(server)
    runs = await rig.gateway.list_runs()
    ids = [r.run_id for r in runs]
    assert len(ids) == len(set(ids))
    # The first listing saw the run pushed from page 0 into page 1 twice; the re-list is
    # consistent: each run once, the new one and the tail run included.
    assert "sess-000099:train:0" in ids
    assert "sess-000199:train:0" in ids
    assert "sess-000999:train:0" in ids
    assert len(ids) == 201


async def test_pages_in_flight_never_exceed_the_limit() -> None:
    server = FakeTinker(runs=[make_run(i) for i in range(1000)], page_delay=True)
    rig = make_rig(server, page_size=10, max_concurrent_pages=3)
    runs = await rig.gateway.list_runs()
    assert len(runs) == 1000
    assert server.max_in_flight == 3


async def test_one_failing_page_fails_the_whole_listing() -> None:
    server = FakeTinker(runs=[make_run(i) for i in range(500)])

    def fail_offset_300(request: httpx.Request) -> httpx.Response | None:
        if request.url.params.get("offset") == "300":
            return httpx.Response(503, json={"detail": "overloaded"})
        return None

    server.script = fail_offset_300
    rig = make_rig(server)
    with pytest.raises(RemoteUnavailable, match="HTTP 503"):
        await rig.gateway.list_runs()
    assert rig.requests_counted("list_runs", "503") == 3  # retried, then gave up


def _truncate_page_200(request: httpx.Request) -> httpx.Response | None:
    if request.url.params.get("offset") != "200":
        return None
    return httpx.Response(
        200,
        json={
            "training_runs": [make_run(i) for i in range(200, 250)],  # 50 of the 100 asked
            "cursor": {"offset": 200, "limit": 100, "total_count": 400},
        },
    )


def _cut_json_body(request: httpx.Request) -> httpx.Response | None:
    if request.url.params.get("offset") != "100":
        return None
    body = httpx.Response(200, json={"training_runs": [make_run(1)], "cursor": None}).content
    return httpx.Response(200, content=body[: len(body) // 2])


def _missing_required_field(request: httpx.Request) -> httpx.Response | None:
    if request.url.params.get("offset") != "100":
        return None
    run = make_run(100)
    del run["last_request_time"]
    return httpx.Response(
        200,
        json={
            "training_runs": [run] + [make_run(i) for i in range(101, 200)],
            "cursor": {"offset": 100, "limit": 100, "total_count": 400},
        },
    )


def _no_cursor(request: httpx.Request) -> httpx.Response | None:
    if not request.url.path.endswith("/training_runs"):
        return None
    return httpx.Response(200, json={"training_runs": []})


def _html_error_page(request: httpx.Request) -> httpx.Response | None:
    if not request.url.path.endswith("/training_runs"):
        return None
    return httpx.Response(200, text="<html>gateway says hi</html>")


def _wrong_offset_echoed(request: httpx.Request) -> httpx.Response | None:
    if request.url.params.get("offset") != "100":
        return None
    return httpx.Response(
        200,
        json={
            "training_runs": [make_run(i) for i in range(100)],
            "cursor": {"offset": 0, "limit": 100, "total_count": 400},
        },
    )


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(_truncate_page_200, id="short-page-mid-fleet"),
        pytest.param(_cut_json_body, id="json-cut-off"),
        pytest.param(_missing_required_field, id="missing-required-field"),
        pytest.param(_no_cursor, id="no-cursor"),
        pytest.param(_html_error_page, id="not-json"),
        pytest.param(_wrong_offset_echoed, id="cursor-offset-mismatch"),
    ],
)
async def test_bad_page_raises_malformed_and_never_returns_partial(
    script: object,
) -> None:
    server = FakeTinker(runs=[make_run(i) for i in range(400)])
    server.script = script  # type: ignore[assignment]  # the params are all valid scripts
    rig = make_rig(server)
    with pytest.raises(MalformedResponse) as caught:
        await rig.gateway.list_runs()
    assert isinstance(caught.value, RemoteRejected)
    assert rig.requests_counted("list_runs", "200") >= 1
    assert rig.clock.sleeps == []  # a malformed answer is not retried


async def test_views_are_converted_to_aware_utc_and_core_kinds() -> None:
    run = make_run(7, corrupted=True)
    run["last_request_time"] = "2026-11-29T11:00:00"  # naive: taken as UTC
    run["user_metadata"] = None
    server = FakeTinker(runs=[run])
    rig = make_rig(server)
    [view] = await rig.gateway.list_runs()
    assert view.corrupted is True
    assert view.owner == "alice"
    assert view.lora_rank == 32
    assert view.user_metadata == {}
    assert view.last_request_time == datetime(2026, 11, 29, 11, 0, tzinfo=UTC)
    assert view.last_checkpoint is not None
    assert view.last_checkpoint.kind is CheckpointKind.TRAINING
    assert view.last_checkpoint.time == datetime(2026, 11, 29, 8, 0, tzinfo=UTC)
    assert view.last_checkpoint.time.tzinfo is UTC


async def test_scope_and_project_are_sent_as_query_values() -> None:
    server = FakeTinker(runs=[make_run(1)])
    rig = make_rig(server, access_scope="accessible", project_id="proj-7")
    await rig.gateway.list_runs()
    [page] = [r for r in server.requests if r.url.path.endswith("/training_runs")]
    assert page.url.params["access_scope"] == "accessible"
    assert page.url.params["project_id"] == "proj-7"
    assert page.headers["X-API-Key"].startswith("tml-")
