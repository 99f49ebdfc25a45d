"""Operator commands against a real SQLite store, in process (issue 11, "Operator commands say
what happened"): refusals exit 1 with the reason and are recorded, holds carry reason and
author, states are named honestly, reasons are never cut, one time format, no colour off a TTY.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tinker_recovery.__main__ import main
from tinker_recovery.core.model import (
    Attempt,
    AttemptOutcome,
    AttemptStep,
    Lineage,
    LineageState,
)
from tinker_recovery.shell.clock import SystemClock
from tinker_recovery.shell.store import open_store
from tinker_recovery.shell.store.base import BadCheckpoint, Event, Store, Transition

T = TypeVar("T")
AT = datetime(2026, 11, 29, 12, 0, 5, 123456, tzinfo=UTC)
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
LONG_REASON = (
    "checkpoint tinker://run-a:train:0/weights/000040 rejected: weights_info says base model "
    "Qwen/Qwen3-8B but the run trains meta-llama/Llama-3.1-8B, so restoring it would silently "
    "swap models; the next older checkpoint tinker://run-a:train:0/weights/000030 is tried "
    "instead (END-OF-REASON)"
)


def lineage(lineage_id: str, run_id: str, state: LineageState, **changes: Any) -> Lineage:
    base = Lineage(
        lineage_id=lineage_id,
        root_run_id=run_id,
        current_run_id=run_id,
        state=state,
        reason=f"{state.value} for the test",
        first_seen_at=AT,
        updated_at=AT,
    )
    return replace(base, **changes)


def attempt(lineage_id: str, run_id: str, **changes: Any) -> Attempt:
    base = Attempt(
        attempt_id=f"{lineage_id}-att-1",
        lineage_id=lineage_id,
        number=1,
        corrupted_run_id=run_id,
        step=AttemptStep.HANDED_OFF,
        started_at=AT,
        updated_at=AT,
    )
    return replace(base, **changes)


def on_store(url: str, work: Callable[[Store], Awaitable[T]]) -> T:
    async def go() -> T:
        store = open_store(url, clock=SystemClock(), state_directory=None)
        await store.open()
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(go())


@pytest.fixture
def url(tmp_path: Path) -> str:
    """A store with: a healthy run, one awaiting confirmation, one recovered, one whose lineage
    moved on to a successor, and one exhausted with a long reason."""
    made = f"sqlite:///{tmp_path / 'state.db'}"

    async def fill(store: Store) -> None:
        await store.save_lineage(lineage("lin-ok", "run-ok", LineageState.HEALTHY), _ev("lin-ok"))
        waiting = lineage(
            "lin-wait",
            "run-wait",
            LineageState.RECOVERED,
            attempts_total=1,
            current_run_id="run-wait-2",
            reason="attempt 1: handed off; waiting for the successor to progress",
        )
        await store.save_lineage(waiting, _ev("lin-wait"))
        await store.save_attempt(attempt("lin-wait", "run-wait"), _ev("lin-wait"))
        done = lineage("lin-done", "run-done", LineageState.HEALTHY, attempts_total=1)
        await store.save_lineage(done, _ev("lin-done"))
        finished = attempt(
            "lin-done",
            "run-done",
            step=AttemptStep.DONE,
            outcome=AttemptOutcome.SUCCEEDED,
            finished_at=AT,
        )
        await store.save_attempt(finished, _ev("lin-done"))
        moved = lineage("lin-moved", "run-old", LineageState.HEALTHY, current_run_id="run-new")
        await store.save_lineage(moved, _ev("lin-moved"))
        spent = lineage("lin-long", "run-a:train:0", LineageState.EXHAUSTED, reason=LONG_REASON)
        await store.save_lineage(spent, _ev("lin-long"))
        await store.commit(
            Transition(
                bad_checkpoint=BadCheckpoint("tinker://run-a:train:0/weights/000040", "bad", AT)
            )
        )

    on_store(made, fill)
    return made


def _ev(lineage_id: str) -> Event:
    return Event(at=AT, kind="test_setup", reason="set up by the test", lineage_id=lineage_id)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def words(text: str) -> str:
    """`text` without whitespace: a value wrapped in the last column reads whole again."""
    return "".join(text.split())


def events_for(url: str, run_id: str) -> list[Event]:
    return on_store(url, lambda s: s.events(run_id=run_id, limit=100))


# -- the store must exist -------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [["status"], ["history", "some-run"], ["pause", "--reason", "x"], ["resume"]],
)
def test_missing_sqlite_store_is_an_error_and_nothing_is_created(
    tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere" / "state.db"

    code, out, err = run_cli(capsys, *command, "--state", f"sqlite:///{missing}")

    assert code == 1
    assert f"no state store at {missing}" in err
    assert out == ""
    assert not missing.parent.exists()


# -- recover --------------------------------------------------------------------------------


def test_recover_with_a_checkpoint_that_is_not_a_path_is_refused_and_recorded(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(
        capsys, "recover", "run-ok", "--checkpoint", "not-a-path", "--state", url, "--by", "ana"
    )

    assert code == 1
    assert "refused" in err
    assert "'not-a-path' is not a tinker://RUN/... path" in err
    assert on_store(url, lambda s: s.pending_manual_requests()) == []
    (event,) = [e for e in events_for(url, "run-ok") if e.kind == "manual_recovery_refused"]
    assert event.lineage_id == "lin-ok"
    assert event.data["requested_by"] == "ana"
    code, out, _ = run_cli(capsys, "history", "run-ok", "--state", url)
    assert code == 0
    assert "manual_recovery_refused" in out
    assert words("not a tinker://RUN/... path") in words(out)  # wrapped in its column, not cut


def test_recover_of_a_run_the_store_never_saw_with_no_leader_is_refused_and_recorded(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "recover", "nosuch-run", "--state", url, "-o", "json")

    assert code == 1
    answer = json.loads(out)
    assert answer["outcome"] == "refused"
    assert answer["request_id"] is None
    assert "not in the store" in answer["reason"]
    assert "no daemon holds the lease" in answer["reason"]
    code, out, _ = run_cli(capsys, "history", "nosuch-run", "--state", url, "--json")
    assert code == 0
    assert [e["kind"] for e in json.loads(out)["events"]] == ["manual_recovery_refused"]


def test_recover_of_an_unknown_run_is_queued_while_a_leader_holds_the_lease(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    on_store(url, lambda s: s.acquire_or_renew("replica-1", 60.0))

    code, out, _ = run_cli(capsys, "recover", "new-run", "--state", url, "--json")

    assert code == 0
    assert json.loads(out)["outcome"] == "queued"
    (pending,) = on_store(url, lambda s: s.pending_manual_requests())
    assert pending.run_id == "new-run"


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["run-old"], "lineage lin-moved has moved on to run run-new"),
        (["run-wait-2"], "lineage lin-wait already has an attempt in flight"),
        (
            ["run-a:train:0", "--checkpoint", "tinker://run-a:train:0/weights/000040"],
            "failed validation in an earlier attempt",
        ),
    ],
    ids=["moved-on", "in-flight", "bad-checkpoint"],
)
def test_recover_refuses_what_the_store_already_rules_out(
    url: str, capsys: pytest.CaptureFixture[str], args: list[str], reason: str
) -> None:
    code, _, err = run_cli(capsys, "recover", *args, "--state", url)

    assert code == 1
    assert reason in err
    assert on_store(url, lambda s: s.pending_manual_requests()) == []


def test_recover_wait_gives_up_after_its_timeout_with_exit_1(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(
        capsys, "recover", "run-ok", "--wait", "--timeout", "1s", "--state", url
    )

    assert code == 1
    assert "queued as request 1" in out
    assert "gave up waiting: still queued" in err


def test_a_malformed_run_id_is_a_usage_error(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "recover", "has space", "--state", url)
    assert code == 2
    assert "printable characters without whitespace" in err


# -- holds ----------------------------------------------------------------------------------


def test_pause_refuses_a_lineage_the_store_does_not_know(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "pause", "--lineage", "bogus", "--reason", "r", "--state", url)

    assert code == 1
    assert "no lineage 'bogus' in the store" in err
    assert on_store(url, lambda s: s.holds()) == set()


def test_pause_needs_a_reason(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "pause", "--lineage", "lin-ok", "--state", url)
    assert code == 2
    assert "--reason" in err


def test_holds_record_reason_and_author_and_status_shows_them(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(
        capsys, "pause", "--lineage", "lin-ok", "--reason", "bad shard 7", "--by", "ana@box",
        "--state", url, "--json",
    )  # fmt: skip
    assert code == 0
    assert json.loads(out) | {"at": None} == {
        "held": True, "lineage": "lin-ok", "by": "ana@box", "reason": "bad shard 7", "at": None
    }  # fmt: skip
    code, out, _ = run_cli(capsys, "pause", "--reason", "INC-42", "--by", "bo", "--state", url)
    assert (code, out) == (0, "paused the whole fleet (by bo: INC-42)\n")

    code, out, _ = run_cli(capsys, "status", "--state", url, "--json")
    status = json.loads(out)
    assert status["holds"] == ["*", "lin-ok"]
    assert [(h["scope"], h["by"], h["reason"]) for h in status["hold_details"]] == [
        ("*", "bo", "INC-42"),
        ("lin-ok", "ana@box", "bad shard 7"),
    ]
    fleet = {c["check"]: c for c in status["fleet"]["checks"]}
    assert fleet["fleet paused"]["state"] == "warn"
    assert "by bo" in fleet["fleet paused"]["detail"]
    assert "INC-42" in fleet["fleet paused"]["detail"]
    code, out, _ = run_cli(capsys, "status", "--state", url)
    assert "bad shard 7" in out
    assert "ana@box" in out

    code, _, err = run_cli(capsys, "pause", "--lineage", "lin-ok", "--reason", "x", "--state", url)
    assert code == 1
    assert "already paused by ana@box" in err


def test_resume_with_nothing_held_says_so_and_exits_1(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "resume", "--state", url)
    assert code == 1
    assert out == ""
    assert "the whole fleet is not paused, nothing to resume; nothing is held" in err

    run_cli(capsys, "pause", "--lineage", "lin-ok", "--reason", "r", "--state", url)
    code, _, err = run_cli(capsys, "resume", "--state", url)
    assert code == 1
    assert "held now: lin-ok" in err
    code, out, _ = run_cli(capsys, "resume", "--lineage", "lin-ok", "--state", url)
    assert code == 0
    assert out.startswith("resumed lineage lin-ok")
    assert on_store(url, lambda s: s.holds()) == set()


# -- status and history ---------------------------------------------------------------------


def test_status_names_states_honestly_and_shows_health_from_the_store_with_a_note(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "status", "--state", url, "--daemon-url", "http://127.0.0.1:9")
    assert code == 0
    health = out.partition("\n\n")[0]
    assert health.splitlines()[0].split() == ["HEALTH", "STATE", "DETAIL"]
    assert "not answering at http://127.0.0.1:9 " in health
    assert words("read from the store and the config") in words(health)
    assert re.search(r"leader\s+FAIL\s+no daemon holds the lease", health)
    assert re.search(r"dry run\s+ok\s+off, per the config", health)

    code, out, _ = run_cli(capsys, "status", "--state", url, "--json")
    states = {lin["lineage_id"]: lin["display_state"] for lin in json.loads(out)["lineages"]}
    assert states == {
        "lin-wait": "awaiting confirmation",
        "lin-done": "recovered",
        "lin-long": "exhausted",
    }


def test_status_never_cuts_a_reason_and_wide_keeps_it_on_one_line(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    _, out, _ = run_cli(capsys, "status", "--state", url)
    assert "…" not in out
    assert "\x1b[" not in out  # no colour off a terminal
    assert max(len(line) for line in out.splitlines()) <= 100
    assert words(LONG_REASON) in words(out)

    _, wide, _ = run_cli(capsys, "status", "--state", url, "-o", "wide")
    (row,) = [line for line in wide.splitlines() if line.startswith("lin-long")]
    assert row.endswith(LONG_REASON)
    assert "ROOT RUN" in wide
    _, alias, _ = run_cli(capsys, "status", "--state", url, "--wide")
    assert alias == wide


def test_one_iso_8601_utc_format_in_tables_and_json(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = run_cli(capsys, "history", "run-wait", "--state", url, "-o", "json")
    history = json.loads(out)
    times = [e["at"] for e in history["events"]]
    times += [history["lineage"]["updated_at"], history["attempts"][0]["started_at"]]
    assert times
    assert all(ISO.match(t) for t in times), times
    assert "2026-11-29T12:00:05Z" in times
    _, table, _ = run_cli(capsys, "history", "run-wait", "--state", url)
    assert "2026-11-29T12:00:05Z" in table
    assert "2026-11-29 12:00" not in table
    _, alias, _ = run_cli(capsys, "history", "run-wait", "--state", url, "--json")
    assert json.loads(alias) == history


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_history_limit_must_be_at_least_1(
    url: str, capsys: pytest.CaptureFixture[str], limit: str
) -> None:
    code, out, err = run_cli(capsys, "history", "run-ok", "--limit", limit, "--state", url)
    assert code == 2
    assert out == ""
    assert "--limit" in err


def test_history_fills_run_on_rows_whose_event_names_only_a_checkpoint(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rejected = Event(
        at=AT + timedelta(seconds=1),
        kind="checkpoint_rejected",
        reason="expired",
        lineage_id="lin-long",
        data={"checkpoint_path": "tinker://run-a:train:0/weights/000010"},
    )
    on_store(url, lambda s: s.append_event(rejected))
    _, out, _ = run_cli(capsys, "history", "lin-long", "--state", url, "--json")
    (row,) = [e for e in json.loads(out)["events"] if e["kind"] == "checkpoint_rejected"]
    assert row["run_id"] == "run-a:train:0"


# -- the rest of the command line -----------------------------------------------------------


def test_every_option_says_its_default_and_commands_show_examples(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for command in ("status", "history", "recover", "pause", "resume", "doctor"):
        code, out, _ = run_cli(capsys, command, "--help")
        assert code == 0
        assert "Example" in out, command
        assert "[default:" in out, command
    _, out, _ = run_cli(capsys, "recover", "--help")
    assert "[default: 5m]" in out
    assert "[default: $USER@host]" in out


def test_shell_completion_scripts_are_click_s(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "completion", "bash")
    assert code == 0
    assert "_TINKER_RECOVERY_COMPLETE=bash_complete" in out


def test_an_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "stauts")
    assert code == 2
    assert "No such command" in err


def test_long_ids_on_a_narrow_terminal_are_never_cut_nor_dropped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    made = f"sqlite:///{tmp_path / 'state.db'}"
    run_id = "87751d4c-a850-4e2c-84dc-da6a797d76de:train:0"
    spent = lineage(run_id, run_id, LineageState.EXHAUSTED, reason=LONG_REASON)
    on_store(made, lambda s: s.save_lineage(spent, _ev(run_id)))

    _, out, _ = run_cli(capsys, "status", "--state", made)

    (row,) = [line for line in out.splitlines() if line.startswith(run_id)]
    assert row.split()[:4] == [run_id, "exhausted", "0", run_id]
    assert "REASON" in out
    assert words(LONG_REASON) in words(out.partition("REASON")[2])
