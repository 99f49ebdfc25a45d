"""list_runs returns a listing only when it is consistent (issue 9, defect 2).

Offset paging while the fleet changes shifts later pages: a live run can fall between two pages
and another be served twice. Such a listing is no evidence (DESIGN.md "Talking to Tinker"): the
gateway lists again, a bounded number of times, and otherwise raises InconsistentListing, which
the poller counts as an "unknown" cycle.
"""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest
from gw_fakes import FakeTinker, make_rig, make_run

from tinker_recovery.errors import InconsistentListing, RemoteUnavailable
from tinker_recovery.shell.gateway import poll_error_reason


def page_requests(server: FakeTinker) -> int:
    return server.count("/training_runs")


def live_ids(server: FakeTinker) -> set[str]:
    return {run["training_run_id"] for run in server.runs}


async def test_a_run_deleted_between_pages_never_hides_a_live_run() -> None:
    server = FakeTinker(runs=[make_run(i) for i in range(300)])
    deleted: list[dict[str, Any]] = []

    def delete_once_after_page_1(offset: int) -> None:
        if offset == 100 and not deleted:
            # Run 50 goes away after pages 0 and 1 were served: page 2 now starts one run
            # later, so run 200 is on neither page 1 (as served) nor page 2.
            deleted.append(server.runs.pop(50))

    server.on_page = delete_once_after_page_1
    rig = make_rig(server, max_concurrent_pages=1)
    runs = await rig.gateway.list_runs()
    ids = [r.run_id for r in runs]
    assert "sess-000200:train:0" in ids
    assert set(ids) == live_ids(server)
    assert len(ids) == len(set(ids)) == 299
    # First listing: page 0, 1, 2 (page 2 reported the new total); then one full re-list.
    assert page_requests(server) == 3 + 3


async def test_a_run_moved_to_the_head_mid_listing_is_not_a_complete_listing() -> None:
    # The total stays the same, but the order changed: run 250 moved to the head after page 0
    # was served. Page 1 then repeats run 99 and run 250 is on no page of that listing.
    server = FakeTinker(runs=[make_run(i) for i in range(300)])
    moved: list[bool] = []

    def move_once_after_page_0(offset: int) -> None:
        if offset == 0 and not moved:
            moved.append(True)
            server.runs.insert(0, server.runs.pop(250))

    server.on_page = move_once_after_page_0
    rig = make_rig(server, max_concurrent_pages=1)
    runs = await rig.gateway.list_runs()
    ids = [r.run_id for r in runs]
    assert "sess-000250:train:0" in ids
    assert len(ids) == len(set(ids)) == 300
    assert ids[0] == "sess-000250:train:0"  # the second listing's order, not a mix of two


async def test_a_fleet_that_never_settles_makes_the_cycle_unknown_at_bounded_cost() -> None:
    server = FakeTinker(runs=[make_run(i) for i in range(300)])
    created = iter(range(1000, 2000))

    def create_a_run_after_every_page_0(offset: int) -> None:
        if offset == 0:
            server.runs.insert(0, make_run(next(created)))

    server.on_page = create_a_run_after_every_page_0
    rig = make_rig(server)
    with pytest.raises(InconsistentListing) as caught:
        await rig.gateway.list_runs()
    assert isinstance(caught.value, RemoteUnavailable)  # the poller's "unknown" cycle
    assert poll_error_reason(caught.value) == "inconsistent"
    # Three listings at most, each at most ceil(N / page) pages; no backoff sleeps.
    assert page_requests(server) <= 3 * math.ceil(303 / 100)
    assert rig.clock.sleeps == []


async def test_a_listing_abandons_its_pages_once_the_total_moved() -> None:
    server = FakeTinker(runs=[make_run(i) for i in range(1000)])
    created = iter(range(5000, 6000))

    def create_after_page_0(offset: int) -> None:
        if offset == 0:
            server.runs.insert(0, make_run(next(created)))

    server.on_page = create_after_page_0
    rig = make_rig(server, max_concurrent_pages=1)
    with pytest.raises(InconsistentListing):
        await rig.gateway.list_runs()
    # Each listing stops at the first page that reports another total: page 0 and page 1.
    assert page_requests(server) == 3 * 2


async def test_pages_that_disagree_on_the_total_are_never_a_complete_listing() -> None:
    # Every run is served, but page 2 counts a fleet of 301: the pages do not describe one fleet.
    server = FakeTinker(runs=[make_run(i) for i in range(300)])

    def page_2_counts_differently(request: httpx.Request) -> httpx.Response | None:
        if request.url.params.get("offset") != "200":
            return None
        body = {
            "training_runs": server.runs[200:300],
            "cursor": {"offset": 200, "limit": 100, "total_count": 301},
        }
        return httpx.Response(200, json=body)

    server.script = page_2_counts_differently
    rig = make_rig(server)
    with pytest.raises(InconsistentListing, match="total 301"):
        await rig.gateway.list_runs()
    assert page_requests(server) == 3 * 3


async def test_a_stable_fleet_is_listed_once() -> None:
    server = FakeTinker(runs=[make_run(i) for i in range(250)])
    rig = make_rig(server)
    runs = await rig.gateway.list_runs()
    assert len(runs) == 250
    assert page_requests(server) == 3
