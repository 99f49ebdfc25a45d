"""The listing's slim projection agrees with the SDK's `tinker.types.TrainingRun` (issue 12).

Pages are decoded into msgspec structs holding only what the watcher reads. These tests hold the
projection to the SDK's models: every projected field exists there with the same type and the
same optionality, and the same bodies give the same views (or are refused alike). An SDK upgrade
that renames, retypes or makes a field required fails here, not in production.
"""

from __future__ import annotations

import json
import types
import typing
from datetime import UTC
from typing import Any

import pydantic
import pytest
from gw_fakes import FakeTinker, make_rig, make_run
from tinker import types as wire

from tinker_recovery.shell import gateway_base
from tinker_recovery.shell.gateway import MalformedResponse
from tinker_recovery.shell.poller import run_payload

msgspec = pytest.importorskip("msgspec")

PAIRS: list[tuple[Any, type[pydantic.BaseModel]]] = [
    (gateway_base.SlimRunsPage, wire.TrainingRunsResponse),
    (gateway_base.SlimRun, wire.TrainingRun),
    (gateway_base.SlimCheckpoint, wire.Checkpoint),
    (gateway_base.SlimCursor, wire.Cursor),
]
SDK_OF = {slim: sdk for slim, sdk in PAIRS}


def normalised(tp: Any) -> Any:
    """A comparable form of a type: unions as frozensets, projected structs as the SDK model."""
    if tp in SDK_OF:
        return SDK_OF[tp]
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return frozenset(normalised(arg) for arg in typing.get_args(tp))
    if origin is typing.Literal:
        return ("literal", frozenset(typing.get_args(tp)))
    if origin is not None:
        return (origin, tuple(normalised(arg) for arg in typing.get_args(tp)))
    return tp


@pytest.mark.parametrize(("slim", "sdk"), PAIRS, ids=lambda c: getattr(c, "__name__", str(c)))
def test_every_projected_field_has_the_sdk_name_type_and_optionality(
    slim: Any, sdk: type[pydantic.BaseModel]
) -> None:
    sdk_fields = sdk.model_fields
    for field in msgspec.structs.fields(slim):
        assert field.encode_name in sdk_fields, f"{sdk.__name__} has no field {field.encode_name}"
        theirs = sdk_fields[field.encode_name]
        assert normalised(field.type) == normalised(theirs.annotation), field.name
        assert field.required == theirs.is_required(), field.name
        if not field.required:
            assert field.default == theirs.default, field.name


def test_every_required_sdk_field_is_projected() -> None:
    # A field the SDK requires is one a page without it fails on: the projection must agree.
    for slim, sdk in PAIRS:
        projected = {f.encode_name for f in msgspec.structs.fields(slim)}
        required = {name for name, f in sdk.model_fields.items() if f.is_required()}
        assert required <= projected, (sdk.__name__, required - projected)


def page(runs: list[dict[str, Any]], *, total: int | None = None) -> bytes:
    count = len(runs) if total is None else total
    body = {"training_runs": runs, "cursor": {"offset": 0, "limit": 100, "total_count": count}}
    return json.dumps(body).encode()


def variants() -> list[dict[str, Any]]:
    plain = make_run(1)
    naive = make_run(2)
    naive["last_request_time"] = "2026-11-29T11:00:00"
    offset = make_run(3, corrupted=True)
    offset["last_request_time"] = "2026-11-29T13:30:00.123456-05:30"
    assert offset["last_checkpoint"] is not None
    offset["last_checkpoint"]["expires_at"] = "2026-12-06T10:00:00Z"
    bare = {  # only the required keys
        "training_run_id": "sess-bare:train:0",
        "base_model": "meta-llama/Llama-3.1-8B",
        "model_owner": "bob",
        "is_lora": False,
        "last_request_time": "2026-11-29T11:00:00Z",
    }
    extra = make_run(4)
    extra["last_sampler_checkpoint"] = {
        "checkpoint_id": "sampler_weights/000010",
        "checkpoint_type": "sampler",
        "time": "2026-11-29T09:00:00Z",
        "tinker_path": "tinker://sess-000004:train:0/sampler_weights/000010",
    }
    extra["some_future_field"] = {"nested": [1, 2, 3]}
    nulls = make_run(5)
    nulls.update(user_metadata=None, last_checkpoint=None, lora_rank=None)
    tagged = make_run(6)
    tagged["user_metadata"] = {"tinker_recovery.lineage": "lin-1", "k": "v"}
    return [plain, naive, offset, bare, extra, nulls, tagged]


def test_the_same_page_gives_the_same_views_as_the_sdk_models() -> None:
    body = page(variants())
    slim = gateway_base.parse_runs_page(body)
    sdk = gateway_base.parse_runs_page(body, use_projection=False)
    assert slim == sdk
    assert len(slim.runs) == 7
    for view in slim.runs:  # aware UTC, as core.model requires
        assert view.last_request_time.tzinfo is UTC
        if view.last_checkpoint is not None:
            assert view.last_checkpoint.time.tzinfo is UTC


def _without(key: str) -> dict[str, Any]:
    run = make_run(9)
    del run[key]
    return run


def _with(**changes: Any) -> dict[str, Any]:
    run = make_run(9)
    run.update(changes)
    return run


BAD_BODIES = [
    pytest.param(page([_without("training_run_id")]), id="no-run-id"),
    pytest.param(page([_without("last_request_time")]), id="no-last-request-time"),
    pytest.param(page([_with(is_lora=None)]), id="null-required"),
    pytest.param(page([_with(base_model=7)]), id="int-for-str"),
    pytest.param(page([_with(corrupted=None)]), id="null-corrupted"),
    pytest.param(page([_with(last_request_time="yesterday")]), id="bad-time"),
    pytest.param(page([_with(user_metadata={"k": 1})]), id="metadata-not-str"),
    pytest.param(
        page([_with(last_checkpoint={**make_run(9)["last_checkpoint"], "checkpoint_type": "x"})]),
        id="bad-checkpoint-type",
    ),
    pytest.param(json.dumps({"training_runs": []}).encode(), id="no-cursor"),
    pytest.param(b"<html>hi</html>", id="not-json"),
    pytest.param(page([make_run(9)])[:-20], id="cut-off"),
]


@pytest.mark.parametrize("body", BAD_BODIES)
def test_a_body_the_sdk_refuses_is_refused_by_the_projection(body: bytes) -> None:
    with pytest.raises(MalformedResponse):
        gateway_base.parse_runs_page(body, use_projection=False)
    with pytest.raises(MalformedResponse, match="list_runs: malformed"):
        gateway_base.parse_runs_page(body)


def test_projected_views_serialise_like_the_sdk_views_for_the_event_log() -> None:
    # The poller stores each decided run with dataclasses.asdict: every view must survive it.
    body = page(variants())
    slim = gateway_base.parse_runs_page(body)
    sdk = gateway_base.parse_runs_page(body, use_projection=False)
    payloads = [run_payload(view) for view in slim.runs]
    assert payloads == [run_payload(view) for view in sdk.runs]
    assert json.loads(json.dumps(payloads)) == payloads


def test_repeated_strings_are_shared_across_views() -> None:
    slim = gateway_base.parse_runs_page(page([make_run(i) for i in range(3)]))
    first, second, _ = slim.runs
    assert first.base_model is second.base_model
    assert first.owner is second.owner


async def test_without_msgspec_pages_are_parsed_with_the_sdk_models(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gateway_base, "msgspec", None)
    assert not gateway_base.projection_available()
    server = FakeTinker(runs=[make_run(i) for i in range(150)])
    rig = make_rig(server)
    runs = await rig.gateway.list_runs()
    assert [r.run_id for r in runs] == [f"sess-{i:06d}:train:0" for i in range(150)]
