"""Only a verdict about a checkpoint marks it bad (issue 9, defect 3).

Nothing ever clears `bad_checkpoints`, so a mark is forever. weights_info answers that say
nothing about the checkpoint (a 2xx body that does not fit the wire model, 401, 403, 429, 5xx,
a transport error) fail the attempt, which backs off and retries; the same good checkpoint is
then chosen. A list_checkpoints answer that is not "the run is gone" fails the attempt too,
instead of being read as "no checkpoints" and handing off an older one.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from ex_fakes import (
    RUN_ID,
    T0,
    World,
    build_world,
    ckpt,
    corrupted_run,
    lineage,
    only,
    rule,
    run_attempt,
    seed,
    stored,
)

from tinker_recovery.core.model import AttemptOutcome, Lineage
from tinker_recovery.errors import RemoteRejected, RemoteUnavailable
from tinker_recovery.shell.gateway import GatewayUnavailable, MalformedResponse

ROOT_RUN = "run-root"


@pytest.fixture
async def world(tmp_path: Path) -> World:
    return await build_world(tmp_path / "state.db")


def second_attempt_of(first: Lineage) -> Lineage:
    """The lineage as the poller hands it over for the attempt after a failed one."""
    return replace(first, attempts_total=2, attempt_starts=(*first.attempt_starts, T0))


NOT_A_VERDICT = [
    pytest.param(
        MalformedResponse(
            "weights_info: malformed response (1 errors; first at base_model: Field required)",
            status_code=200,
        ),
        id="malformed-200",
    ),
    pytest.param(RemoteRejected("weights_info: HTTP 401: bad key", status_code=401), id="401"),
    pytest.param(RemoteRejected("weights_info: HTTP 403: forbidden", status_code=403), id="403"),
    pytest.param(RemoteRejected("weights_info: HTTP 409: busy", status_code=409), id="409"),
    pytest.param(
        GatewayUnavailable("weights_info: HTTP 429", reason="rate_limited", status_code=429),
        id="429",
    ),
    pytest.param(
        GatewayUnavailable("weights_info: HTTP 502", reason="http_5xx", status_code=502), id="502"
    ),
    pytest.param(
        GatewayUnavailable("weights_info: connection failed", reason="connection"),
        id="connection",
    ),
]


@pytest.mark.parametrize("trouble", NOT_A_VERDICT)
async def test_weights_info_trouble_fails_the_attempt_and_marks_nothing_bad(
    world: World, trouble: Exception
) -> None:
    good, older = ckpt("030", age_s=60), ckpt("020", age_s=120)
    world.gateway.checkpoints[RUN_ID] = [good, older]
    world.gateway.infos[good.tinker_path] = trouble
    current = await seed(world)

    attempt = await run_attempt(world, current, corrupted_run(), rule())

    after = await stored(world, attempt)
    assert after.outcome is AttemptOutcome.FAILED
    assert str(trouble) in after.reason
    assert world.handoff.requests == []  # the older checkpoint is not handed off instead
    assert world.gateway.info_calls == [good.tinker_path]
    assert await world.store.bad_checkpoints([good.tinker_path, older.tinker_path]) == set()
    assert world.sample("checkpoints_rejected_total", reason="unloadable") == 0

    # The service recovers; the next attempt of the lineage picks the same, newest checkpoint.
    del world.gateway.infos[good.tinker_path]
    again = await seed(world, second_attempt_of(current))
    await run_attempt(world, again, corrupted_run(), rule())
    assert only(world.handoff.requests).checkpoint_path == good.tinker_path


@pytest.mark.parametrize("status", [404, 410, 400])
async def test_weights_info_verdict_on_the_checkpoint_still_marks_it_bad(
    world: World, status: int
) -> None:
    gone, older = ckpt("030", age_s=60), ckpt("020", age_s=120)
    world.gateway.checkpoints[RUN_ID] = [gone, older]
    world.gateway.infos[gone.tinker_path] = RemoteRejected(
        f"weights_info: HTTP {status}: checkpoint not found", status_code=status
    )
    current = await seed(world)

    await run_attempt(world, current, corrupted_run(), rule())

    assert only(world.handoff.requests).checkpoint_path == older.tinker_path
    assert await world.store.bad_checkpoints([gone.tinker_path]) == {gone.tinker_path}


NOT_GONE = [
    pytest.param(
        MalformedResponse(
            "list_checkpoints: malformed response (1 errors; first at checkpoints: Field required)",
            status_code=200,
        ),
        id="malformed-200",
    ),
    pytest.param(RemoteRejected("list_checkpoints: HTTP 401", status_code=401), id="401"),
    pytest.param(RemoteRejected("list_checkpoints: HTTP 403", status_code=403), id="403"),
    pytest.param(RemoteUnavailable("list_checkpoints: HTTP 503"), id="503"),
]


@pytest.mark.parametrize("trouble", NOT_GONE)
async def test_a_listing_that_is_not_an_answer_never_hands_off_an_older_checkpoint(
    world: World, trouble: Exception
) -> None:
    # The corrupted run's own listing fails; the lineage's root run lists an older checkpoint.
    world.gateway.checkpoints[RUN_ID] = trouble
    world.gateway.checkpoints[ROOT_RUN] = [ckpt("010", age_s=3600, run=ROOT_RUN)]
    current = await seed(world, lineage(root_run_id=ROOT_RUN))

    attempt = await run_attempt(world, current, corrupted_run(), rule())

    after = await stored(world, attempt)
    assert after.outcome is AttemptOutcome.FAILED
    assert "list_checkpoints" in after.reason
    assert world.handoff.requests == []
    assert world.gateway.info_calls == []


@pytest.mark.parametrize("trouble", NOT_GONE)
async def test_an_earlier_run_listing_that_is_not_an_answer_fails_the_attempt(
    world: World, trouble: Exception
) -> None:
    # The root's listing answers with trouble, so the candidate set is unknown: fail (as a 503
    # always did) rather than rank an incomplete set, and retry after the backoff.
    newest = ckpt("050", age_s=60)
    world.gateway.checkpoints[RUN_ID] = [newest]
    world.gateway.checkpoints[ROOT_RUN] = trouble
    current = await seed(world, lineage(root_run_id=ROOT_RUN))

    attempt = await run_attempt(world, current, corrupted_run(), rule())

    after = await stored(world, attempt)
    assert after.outcome is AttemptOutcome.FAILED
    assert world.handoff.requests == []


async def test_a_run_that_is_gone_lists_no_checkpoints_and_falls_back(world: World) -> None:
    world.gateway.checkpoints[RUN_ID] = RemoteRejected("HTTP 404: no such run", status_code=404)
    root = ckpt("010", age_s=3600, run=ROOT_RUN)
    world.gateway.checkpoints[ROOT_RUN] = [root]
    current = await seed(world, lineage(root_run_id=ROOT_RUN))

    await run_attempt(world, current, corrupted_run(), rule())

    assert only(world.handoff.requests).checkpoint_path == root.tinker_path
