"""Issue 3, tests 10 and 12: config errors at the command line; operator commands on the store."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from e2e.harness import DaemonProc, Emu, cli, daemon_config, rule

pytestmark = pytest.mark.slow

Daemons = Callable[[Path, dict[str, Any]], DaemonProc]

BAD_KEY = """\
tinker:
  base_url: http://127.0.0.1:1
policy:
  confirmations: 2
  max_concurent: 4
"""
BAD_VALUE = """\
poll:
  interval: soon
"""


@pytest.mark.parametrize("command", ["run", "check-config"])
@pytest.mark.parametrize(
    ("text", "where"),
    [
        pytest.param(BAD_KEY, "config.yaml:5:3: policy.max_concurent: ", id="unknown-key"),
        pytest.param(BAD_VALUE, "config.yaml:2:13: poll.interval: ", id="bad-duration"),
    ],
)
def test_a_bad_config_exits_2_with_a_located_message(
    tmp_path: Path, command: str, text: str, where: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    answer = cli(command, "--config", str(path))
    assert answer.returncode == 2, answer.stderr
    first = answer.stderr.splitlines()[0]
    assert first.startswith(f"{tmp_path}/{where}"), answer.stderr
    assert answer.stdout == ""


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_a_missing_config_file_exits_2(tmp_path: Path, command: str) -> None:
    answer = cli(command, "--config", str(tmp_path / "nowhere.yaml"))
    assert answer.returncode == 2
    assert answer.stderr == f"{tmp_path / 'nowhere.yaml'}: config file not found\n"


def _json(*args: str, code: int = 0) -> Any:
    answer = cli(*args, "--json")
    assert answer.returncode == code, answer.stderr
    return json.loads(answer.stdout)


def test_status_history_pause_resume_and_recover_against_a_live_daemon(
    emu: Emu, daemons: Daemons, tmp_path: Path
) -> None:
    rules = [rule("r", "a")]  # recover_preexisting is off: the ignored run waits for an operator
    ignored = emu.create_run(user_metadata={"scenario": "a"}, checkpoints=3, corrupted=True)
    daemon = daemons(tmp_path, daemon_config(emu, tmp_path, rules)).start()
    config = str(daemon.config_path)
    run_id = emu.create_run(user_metadata={"scenario": "a"})
    daemon.wait_polls(1)
    emu.corrupt(run_id)

    def recovered(target: str, attempts: int = 1) -> bool:
        lineage = daemon.lineage_for_run(target)
        return (
            lineage is not None
            and lineage.state.value == "healthy"
            and lineage.attempts_total == attempts
        )

    daemon.wait_for(lambda: recovered(run_id), "the first recovery")
    status = _json("status", "--config", config)
    assert set(status) == {"leader", "holds", "hold_details", "lineages", "fleet"}
    assert status["leader"]["replica"].endswith(f":{daemon.proc.pid}")  # type: ignore[union-attr]  # started above
    assert status["holds"] == []
    # Fleet health comes from the running daemon's /status.
    health = {c["check"]: c for c in status["fleet"]["checks"]}
    assert health["daemon"]["state"] == "ok"
    assert f"127.0.0.1:{daemon.port}" in health["daemon"]["detail"]
    assert health["incident breaker"] == {
        "check": "incident breaker", "state": "ok", "detail": "closed"
    }  # fmt: skip
    assert health["polls"]["state"] == "ok"
    assert health["dry run"]["detail"] == "off, per the running daemon"
    by_root = {lin["root_run_id"]: lin for lin in status["lineages"]}
    assert by_root[run_id]["state"] == "healthy"
    assert by_root[run_id]["display_state"] == "recovered"  # confirmed, so recovered
    assert by_root[ignored]["state"] == "ignored"
    assert set(by_root[run_id]) >= {"lineage_id", "state", "reason", "current_run_id"}
    history = _json("history", run_id, "--config", config)
    assert set(history) == {"lineage", "attempts", "events"}
    assert [a["outcome"] for a in history["attempts"]] == ["succeeded"]
    assert {"seq", "at", "kind", "reason", "data"} <= set(history["events"][0])
    kinds = [e["data"].get("decision") for e in history["events"] if e["kind"] == "decision"]
    assert kinds[:2] == ["suspect", "recover"], kinds

    # Pause this lineage: its successor's corruption is confirmed but not acted on.
    lineage_id = history["lineage"]["lineage_id"]
    successor = history["lineage"]["current_run_id"]
    paused = _json(
        "pause", "--lineage", lineage_id, "--reason", "bad shard", "--by", "ana", "--config", config
    )
    assert paused | {"at": None} == {
        "held": True, "lineage": lineage_id, "by": "ana", "reason": "bad shard", "at": None
    }  # fmt: skip
    emu.corrupt(successor)
    daemon.wait_for(lambda: daemon.lineage_state(successor) == "held", "the paused lineage held")
    daemon.wait_polls(2)
    assert len(daemon.handoff_calls()) == 1
    status = _json("status", "--config", config)
    assert status["holds"] == [lineage_id]
    assert status["hold_details"][0]["reason"] == "bad shard"
    _json("resume", "--lineage", lineage_id, "--config", config)
    daemon.wait_for(lambda: recovered(successor, 2), "recovery after resume")
    assert len(daemon.handoff_calls()) == 2

    # `recover RUN --wait --until finished` on the ignored pre-existing run, from a checkpoint
    # the operator picks: the command follows the request to the attempt's success.
    older = emu.training_checkpoints(ignored)[0]
    answer = cli(
        "recover", ignored, "--checkpoint", older, "--wait", "--until", "finished",
        "--timeout", "25s", "--config", config,
    )  # fmt: skip
    assert answer.returncode == 0, answer.stderr
    lines = answer.stdout.splitlines()
    assert lines[0].startswith(f"recovery of {ignored} queued as request ")
    assert lines[1].startswith(f"request {lines[0].rsplit(' ', 1)[1]} started: attempt 1 of")
    assert " succeeded" in lines[2]
    assert recovered(ignored)
    (attempt,) = daemon.attempts_for_run(ignored)
    assert attempt.checkpoint_path == older
    assert [c["TINKER_RECOVERY_CHECKPOINT"] for c in daemon.handoff_calls()][-1] == older

    # A run the store never saw, while a leader runs: queued, and the leader refuses it;
    # --wait reports the refusal with exit 1 and history shows it.
    refused = _json(
        "recover", "no-such-run:train:0", "--wait", "--timeout", "20s", "--config", config, code=1
    )
    assert refused["outcome"] == "refused"
    assert isinstance(refused["request_id"], int)
    assert "not in the latest listing" in refused["reason"]
    events = _json("history", "no-such-run:train:0", "--config", config)["events"]
    assert [e["kind"] for e in events] == ["manual_recovery_refused"]

    # What the store already rules out is refused at once, without asking the leader.
    answer = cli("recover", run_id, "--checkpoint", "not-a-path", "--config", config)
    assert answer.returncode == 1
    assert "is not a tinker://RUN/... path" in answer.stderr
    assert daemon.stop() == 0
