"""The control API under /_emulator/ and the emulator's answers to bad requests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tinker_recovery.emulator import Emulator, EmulatorConfig, EmulatorServer

KEY = {"X-API-Key": "tml-control-tests"}


@pytest.fixture
def http(server: EmulatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=KEY, timeout=5.0) as client:
        yield client


def _run(http: httpx.Client, run_id: str) -> dict[str, Any]:
    # Accessible scope: incidents also hit the runs other organisations share with us.
    response = http.get(f"/api/v1/training_runs/{run_id}", params={"access_scope": "accessible"})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _create(http: httpx.Client, **spec: Any) -> dict[str, Any]:
    response = http.post("/_emulator/runs", json=spec)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def test_created_driven_run_checkpoints_as_time_advances(http: httpx.Client) -> None:
    created = _create(http, kind="driven", checkpoints=1, checkpoint_interval_s=600)
    before = _run(http, created["run_id"])
    assert before["last_checkpoint"]["checkpoint_id"].startswith("weights/")

    http.post("/_emulator/clock/advance", json={"seconds": 1300})

    after = _run(http, created["run_id"])
    assert after["last_request_time"] > before["last_request_time"]
    listed = http.get(f"/api/v1/training_runs/{created['run_id']}/checkpoints").json()
    training = [c for c in listed["checkpoints"] if c["checkpoint_type"] == "training"]
    assert len(training) == 3
    assert after["last_checkpoint"] == training[-1]


def test_corrupting_a_run_flags_it_and_freezes_its_progress(http: httpx.Client) -> None:
    created = _create(http, kind="driven", checkpoints=2)
    corrupted = http.post(f"/_emulator/runs/{created['run_id']}/corrupt").json()
    assert corrupted["corrupted"] is True
    frozen = _run(http, created["run_id"])
    assert frozen["corrupted"] is True

    http.post("/_emulator/clock/advance", json={"seconds": 7200})

    assert _run(http, created["run_id"]) == frozen


def test_incident_corrupts_a_count_then_a_fraction_of_driven_runs(http: httpx.Client) -> None:
    first = http.post("/_emulator/incident", json={"count": 2}).json()
    assert len(first["corrupted"]) == 2
    for run_id in first["corrupted"]:
        assert _run(http, run_id)["corrupted"] is True
    rest = http.post("/_emulator/incident", json={"fraction": 1.0}).json()
    assert rest["candidates"] == first["candidates"] - 2
    assert not set(rest["corrupted"]) & set(first["corrupted"])
    listing = http.get("/_emulator/runs", params={"kind": "driven", "corrupted": "false"}).json()
    assert listing["total_count"] == 0


def test_incident_needs_exactly_one_of_count_or_fraction(http: httpx.Client) -> None:
    response = http.post("/_emulator/incident", json={"count": 1, "fraction": 0.5})
    assert response.status_code == 400
    assert "exactly one" in response.json()["detail"]


def test_finished_run_has_final_checkpoints(http: httpx.Client) -> None:
    created = _create(http, kind="finished", checkpoints=0, user_metadata={"team": "evals"})
    run = _run(http, created["run_id"])
    assert run["last_checkpoint"]["checkpoint_id"] == "weights/final"
    assert run["last_sampler_checkpoint"]["checkpoint_id"] == "sampler_weights/final"
    assert run["user_metadata"] == {"team": "evals"}


def test_expired_checkpoint_vanishes_from_listings(http: httpx.Client) -> None:
    created = _create(http, kind="idle", checkpoints=3)
    path = _run(http, created["run_id"])["last_checkpoint"]["tinker_path"]
    assert http.post("/_emulator/checkpoints/expire", json={"tinker_path": path}).status_code == 200
    after = _run(http, created["run_id"])
    assert after["last_checkpoint"]["tinker_path"] != path
    info = http.post("/api/v1/weights_info", json={"tinker_path": path})
    assert info.status_code == 404


def test_expired_checkpoint_can_stay_listed_but_unloadable(http: httpx.Client) -> None:
    created = _create(http, kind="idle", checkpoints=3)
    path = _run(http, created["run_id"])["last_checkpoint"]["tinker_path"]
    http.post("/_emulator/checkpoints/expire", json={"tinker_path": path, "listed": True})
    ckpt = _run(http, created["run_id"])["last_checkpoint"]
    assert ckpt["tinker_path"] == path
    assert ckpt["expires_at"] is not None
    session = http.post("/api/v1/create_session", json={"tags": []}).json()["session_id"]
    future = http.post(
        "/api/v1/load_weights",
        json={"session_id": session, "model_seq_id": 0, "path": path, "optimizer": True},
    ).json()
    result = http.post("/api/v1/retrieve_future", json={"request_id": future["request_id"]}).json()
    assert result["category"] == "user"
    assert "expired" in result["error"]


def test_unloadable_needs_an_existing_checkpoint(http: httpx.Client) -> None:
    response = http.post(
        "/_emulator/checkpoints/unloadable", json={"tinker_path": "tinker://x:train:0/weights/1"}
    )
    assert response.status_code == 404


def test_sessions_and_info_are_listed(http: httpx.Client) -> None:
    session = http.post("/api/v1/create_session", json={"tags": ["t"]}).json()["session_id"]
    sessions = http.get("/_emulator/sessions").json()["sessions"]
    assert [s["session_id"] for s in sessions] == [session]
    info = http.get("/_emulator").json()
    assert info["config"]["page_max"] == 10
    assert info["runs"] == 34


def test_same_seed_same_fleet_other_seed_other_fleet() -> None:
    def snapshot(seed: int) -> bytes:
        config = EmulatorConfig(runs=40, seed=seed, start_time=1_800_000_000.0, page_max=40)
        frozen = Emulator(config, monotonic=lambda: 0.0)
        return frozen.page_runs(scope="owned", limit=40, offset=0)

    assert snapshot(5) == snapshot(5)
    assert snapshot(5) != snapshot(6)


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        pytest.param("GET", "/api/v1/training_runs?limit=abc", None, 400, id="limit-not-int"),
        pytest.param("GET", "/api/v1/training_runs?offset=-3", None, 400, id="negative-offset"),
        pytest.param("GET", "/api/v1/training_runs?access_scope=all", None, 400, id="bad-scope"),
        pytest.param("GET", "/api/v1/nothing-here", None, 404, id="unknown-route"),
        pytest.param("DELETE", "/api/v1/training_runs", None, 405, id="wrong-method"),
        pytest.param("POST", "/api/v1/weights_info", {"tinker_path": "s3://x"}, 400, id="bad-path"),
        pytest.param("POST", "/api/v1/weights_info", {}, 400, id="missing-path"),
        pytest.param(
            "POST",
            "/api/v1/weights_info",
            {"tinker_path": "tinker://a:train:0/weights/1"},
            404,
            id="unknown-checkpoint",
        ),
        pytest.param("POST", "/api/v1/retrieve_future", {"request_id": "r"}, 404, id="no-future"),
        pytest.param(
            "POST", "/api/v1/load_weights", {"session_id": "s", "path": "p"}, 400, id="bad-load"
        ),
        pytest.param("POST", "/api/v1/save_weights", {"model_id": "m:train:0"}, 404, id="no-model"),
        pytest.param("POST", "/_emulator/runs", {"kind": "zombie"}, 400, id="bad-run-kind"),
        pytest.param("POST", "/_emulator/clock/advance", {"seconds": -1}, 400, id="time-backwards"),
        pytest.param("GET", "/_emulator/runs?corrupted=maybe", None, 400, id="bad-bool"),
        pytest.param("POST", "/_emulator/runs/none/corrupt", None, 404, id="corrupt-unknown"),
    ],
)
def test_bad_requests_get_json_errors_with_a_detail(
    http: httpx.Client, method: str, path: str, body: Any, status: int
) -> None:
    response = http.request(method, path, json=body)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["detail"]


def test_non_json_body_is_a_400(http: httpx.Client) -> None:
    response = http.post("/api/v1/create_session", content=b"{not json")
    assert response.status_code == 400
    assert "JSON" in response.json()["detail"]


def test_missing_or_foreign_api_key_is_a_401_that_never_echoes_it(server: EmulatorServer) -> None:
    secret = "sk-very-secret-value"
    response = httpx.get(f"{server.base_url}/api/v1/training_runs", headers={"X-API-Key": secret})
    assert response.status_code == 401
    assert secret not in response.text
    assert httpx.get(f"{server.base_url}/api/v1/training_runs").status_code == 401
