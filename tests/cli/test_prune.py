"""`tinker-recovery prune` against the bundled emulator on 127.0.0.1 and a real SQLite store
(issue 13, "Retention (opt-in)"): a dry run lists what would go and the bytes it frees and
deletes nothing; prune deletes exactly that; a checkpoint an open attempt (or a hold, or the
guard) protects is never deleted; a failed deletion is reported and the rest go on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from e2e.harness import JOB_KEY, Emu, emulator, with_store
from tinker_recovery import prune
from tinker_recovery.__main__ import main
from tinker_recovery.core.model import (
    Attempt,
    AttemptOutcome,
    AttemptStep,
    CheckpointView,
    Lineage,
    LineageState,
)
from tinker_recovery.obs.metrics import Metrics
from tinker_recovery.settings import TinkerSettings
from tinker_recovery.shell.clock import SystemClock
from tinker_recovery.shell.gateway import TinkerGateway, make_http_client
from tinker_recovery.shell.store.base import Event, Store

AT = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def emu() -> Iterator[Emu]:
    with emulator(runs=0) as running:
        yield running


def _ev(lineage_id: str) -> Event:
    return Event(at=AT, kind="test_setup", reason="set up by the test", lineage_id=lineage_id)


def _lineage(lineage_id: str, root: str, current: str, **changes: Any) -> Lineage:
    return Lineage(
        lineage_id=lineage_id,
        root_run_id=root,
        current_run_id=current,
        state=changes.pop("state", LineageState.HEALTHY),
        reason="set up by the test",
        first_seen_at=AT,
        updated_at=AT,
        **changes,
    )


def _attempt(
    lineage_id: str, corrupted: str, path: str, *, done: bool, succ: str | None
) -> Attempt:
    return Attempt(
        attempt_id=f"{lineage_id}-att-1",
        lineage_id=lineage_id,
        number=1,
        corrupted_run_id=corrupted,
        step=AttemptStep.DONE if done else AttemptStep.HANDED_OFF,
        started_at=AT,
        updated_at=AT,
        checkpoint_path=path,
        handed_off_path=path,
        successor_run_id=succ,
        outcome=AttemptOutcome.SUCCEEDED if done else None,
        finished_at=AT if done else None,
    )


@dataclass
class Fleet:
    config: Path
    url: str
    root: str  # lineage "recovered": corrupted root, 4 checkpoints; attempt used its 2nd
    succ: str  # its successor, the current run, 3 checkpoints
    busy: str  # lineage "busy": an attempt in flight restores from its oldest checkpoint
    held: str  # lineage "held": paused by an operator

    def listing(self, emu: Emu, run_id: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = emu._json(
            "GET", f"/api/v1/training_runs/{run_id}/checkpoints"
        )["checkpoints"]
        return rows


@pytest.fixture
def fleet(emu: Emu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fleet:
    # The root stopped (corrupted) two hours before its successor started: every successor
    # checkpoint is newer than every root one.
    root = emu.create_run(kind="idle", checkpoints=4)
    emu._json("POST", "/_emulator/clock/advance", {"seconds": 7200})
    succ = emu.create_run(checkpoints=3)
    busy, held = emu.create_run(checkpoints=5), emu.create_run(checkpoints=5)
    used = emu.training_checkpoints(root)[1]
    url = f"sqlite:///{tmp_path / 'state.db'}"

    async def fill(store: Store) -> None:
        await store.save_lineage(_lineage("recovered", root, succ, attempts_total=1), _ev("x"))
        await store.save_attempt(
            _attempt("recovered", root, used, done=True, succ=succ), _ev("recovered")
        )
        await store.save_lineage(_lineage("busy", busy, busy, attempts_total=1), _ev("busy"))
        oldest = emu.training_checkpoints(busy)[0]
        await store.save_attempt(_attempt("busy", busy, oldest, done=False, succ=None), _ev("b"))
        await store.save_lineage(_lineage("held", held, held), _ev("held"))
        await store.set_hold("held", True, by="ana", at=AT, reason="investigating")

    with_store(url, fill)
    config = tmp_path / "config.yaml"
    body = {
        "tinker": {"base_url": emu.base_url, "request_timeout": "5s", "retry_attempts": 1},
        "state": {"url": url},
        "policy": {"rules": [{"name": "jobs", "action": "alert"}]},
    }
    config.write_text(json.dumps(body))
    monkeypatch.setenv("TINKER_API_KEY", JOB_KEY)
    emu._json("POST", "/_emulator/reset")
    return Fleet(config, url, root, succ, busy, held)


def expected_deletions(emu: Emu, fleet: Fleet) -> list[str]:
    """With --keep 3: the successor's 3 are the newest; the root's 2nd was used by the
    attempt; so the root's 1st, 3rd and 4th go. Nothing of the busy or held lineage."""
    r = emu.training_checkpoints(fleet.root)
    return [r[0], r[2], r[3]]


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_dry_run_lists_what_would_go_and_the_bytes_freed_and_deletes_nothing(
    emu: Emu, fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {run: fleet.listing(emu, run) for run in (fleet.root, fleet.succ, fleet.busy)}
    doomed = expected_deletions(emu, fleet)
    sizes = {c["tinker_path"]: c["size_bytes"] for c in before[fleet.root]}

    code, out, err = run_cli(
        capsys, "prune", "--config", str(fleet.config), "--dry-run", "-o", "json"
    )

    assert (code, err) == (0, "")
    data = json.loads(out)
    planned = [
        c["tinker_path"]
        for lin in data["lineages"]
        for c in lin["checkpoints"]
        if c["action"] == "delete"
    ]
    assert sorted(planned) == sorted(doomed)
    assert data["would_delete"] == 3
    assert data["frees_bytes"] == sum(sizes[p] for p in doomed) > 0
    assert data["unknown_sizes"] == 0
    reasons = {
        c["tinker_path"]: c["reason"] for lin in data["lineages"] for c in lin["checkpoints"]
    }
    assert reasons[emu.training_checkpoints(fleet.root)[1]] == "used_by_attempt"
    assert {reasons[p] for p in emu.training_checkpoints(fleet.busy)} == {"attempt_in_flight"}
    assert {reasons[p] for p in emu.training_checkpoints(fleet.held)} == {"lineage_held"}
    sampler = [c for c in before[fleet.root] if c["checkpoint_type"] == "sampler"]
    assert {reasons[c["tinker_path"]] for c in sampler} == {"not_training"}
    # Nothing was deleted: no DELETE reached the service and every listing is as it was.
    assert emu.count("delete_checkpoint") == 0
    assert {run: fleet.listing(emu, run) for run in before} == before

    code, out, _ = run_cli(capsys, "prune", "--config", str(fleet.config), "--dry-run")
    assert code == 0
    assert "dry run: would delete 3 checkpoint(s)" in " ".join(out.split())
    assert "sampler checkpoints are left alone" in " ".join(out.split())
    assert emu.count("delete_checkpoint") == 0


def test_prune_deletes_exactly_the_planned_ones_and_never_one_in_use(
    emu: Emu, fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    doomed = expected_deletions(emu, fleet)
    everything = {
        run: [c["tinker_path"] for c in fleet.listing(emu, run)]
        for run in (fleet.root, fleet.succ, fleet.busy, fleet.held)
    }
    in_use = emu.training_checkpoints(fleet.busy)[0]

    code, out, err = run_cli(capsys, "prune", "--config", str(fleet.config), "-o", "json")

    assert (code, err) == (0, "")
    data = json.loads(out)
    assert data["deleted"] == 3
    assert emu.count("delete_checkpoint") == 3
    after = {run: [c["tinker_path"] for c in fleet.listing(emu, run)] for run in everything}
    for run, paths in everything.items():
        assert after[run] == [p for p in paths if p not in doomed], run
    assert in_use in after[fleet.busy]
    # Once pruned, a second run finds nothing more to delete.
    code, out, _ = run_cli(capsys, "prune", "--config", str(fleet.config), "-o", "json")
    assert (code, json.loads(out)["deleted"]) == (0, 0)


def test_a_failed_deletion_is_reported_and_the_rest_go_on(
    emu: Emu, fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    doomed = expected_deletions(emu, fleet)
    emu.add_fault(kind="error", endpoints=["delete_checkpoint"], status=500, times=1)

    code, out, err = run_cli(
        capsys, "prune", "--config", str(fleet.config), "--lineage", "recovered"
    )

    assert code == 1
    assert "1 failure(s)" in err
    assert "HTTP 500" in err
    left = emu.training_checkpoints(fleet.root)
    # Deletions go oldest first: the first one (the oldest) failed, the other two went.
    assert [p in left for p in doomed] == [True, False, False]
    assert JOB_KEY not in out + err


def test_an_attempt_started_during_prune_stops_its_lineages_deletions(
    emu: Emu, fleet: Fleet
) -> None:
    """The daemon may start an attempt between the plan and a deletion: the store is read
    again before each one, so the rest of that lineage's deletions are skipped."""
    doomed = expected_deletions(emu, fleet)

    async def go(store: Store) -> prune.Report:
        tinker_cfg = TinkerSettings(base_url=emu.base_url, retry_attempts=1)

        class StartsAnAttempt:
            def __init__(self, api: prune.CheckpointApi) -> None:
                self.api, self.deleted = api, 0

            async def list_checkpoints(self, run_id: str) -> list[CheckpointView]:
                return await self.api.list_checkpoints(run_id)

            async def delete_checkpoint(self, tinker_path: str) -> None:
                await self.api.delete_checkpoint(tinker_path)
                self.deleted += 1
                second = _attempt("recovered", fleet.succ, doomed[0], done=False, succ=None)
                await store.save_attempt(
                    replace(second, attempt_id="recovered-att-2", number=2), _ev("recovered")
                )

        http = make_http_client(tinker_cfg)
        try:
            gateway = TinkerGateway(
                base_url=emu.base_url,
                api_key=SecretStr(JOB_KEY),
                http=http,
                cfg=tinker_cfg,
                clock=SystemClock(),
                metrics=Metrics(CollectorRegistry()),
            )
            return await prune.prune(
                store,
                StartsAnAttempt(gateway),
                keep=3,
                now=datetime.now(UTC),
                cfg={},
                lineage_id="recovered",
            )
        finally:
            await http.aclose()

    report = with_store(fleet.url, go)

    results = report.lineages[0].results
    assert sorted(results.values()) == ["deleted", "skipped", "skipped"]
    assert emu.count("delete_checkpoint") == 1
    assert sum(p in emu.training_checkpoints(fleet.root) for p in doomed) == 2


def test_an_unknown_lineage_is_refused(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "prune", "--config", str(fleet.config), "--lineage", "nope")
    assert code == 1
    assert "lineage nope: not in the store" in err
