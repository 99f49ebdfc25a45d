"""Command handoff: placeholders, environment, hostile values, failures."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from ho_fakes import request

from tinker_recovery.errors import ActionFailed, ConfigError
from tinker_recovery.settings import CommandHandoff
from tinker_recovery.shell.clock import SystemClock
from tinker_recovery.shell.handoff import HandoffAction, HandoffRequest, build_handoff
from tinker_recovery.shell.procs import CommandResult, SubprocessRunner

RECORDER = (
    "import json, os, sys; "
    "json.dump({'argv': sys.argv[1:], 'env': dict(os.environ)}, open(os.environ['OUT'], 'w'))"
)

HOSTILE = [
    "$(touch pwned_subst)",
    "; touch pwned",
    "`touch pwned_tick`",
    "a b\nc\td 'quoted' \"dq\" | touch pwned_pipe && touch pwned_and",
    "{checkpoint} {{}} %s ${HOME}",
]


def command(argv: list[str], **kw: Any) -> HandoffAction:
    cfg = CommandHandoff(type="command", argv=argv, **kw)
    return build_handoff(
        cfg, runner=SubprocessRunner(), http=httpx.AsyncClient(), clock=SystemClock()
    )


ALL_PLACEHOLDERS = [
    "--lineage={lineage}",
    "{corrupted_run}",
    "{checkpoint}",
    "{attempt}",
    "{idempotency_key}",
    "opt={restore_optimizer}",
    "{{literal}}",
]


async def run_recorder(
    tmp_path: Path, req: HandoffRequest, **kw: Any
) -> tuple[str, dict[str, Any]]:
    out = tmp_path / "record.json"
    env = {"OUT": str(out), **kw.pop("env", {})}
    # Braces in argv are placeholders, so the recorder's own dict literals are escaped.
    script = RECORDER.replace("{", "{{").replace("}", "}}")
    action = command([sys.executable, "-c", script, *ALL_PLACEHOLDERS], env=env, cwd=tmp_path)
    detail = await action.hand_off(req)
    return detail, json.loads(out.read_text())


async def test_placeholders_and_environment_arrive(tmp_path: Path) -> None:
    detail, record = await run_recorder(tmp_path, request())
    assert "exited 0" in detail
    assert record["argv"] == [
        "--lineage=lin-1",
        "sess-1:train:0",
        "tinker://sess-1:train:0/weights/000020",
        "2",
        "att-123",
        "opt=1",
        "{literal}",
    ]
    env = record["env"]
    assert env["TINKER_RECOVERY_LINEAGE"] == "lin-1"
    assert env["TINKER_RECOVERY_CORRUPTED_RUN"] == "sess-1:train:0"
    assert env["TINKER_RECOVERY_CHECKPOINT"] == "tinker://sess-1:train:0/weights/000020"
    assert env["TINKER_RECOVERY_ATTEMPT"] == "2"
    assert env["TINKER_RECOVERY_IDEMPOTENCY_KEY"] == "att-123"
    assert env["TINKER_RECOVERY_RESTORE_OPTIMIZER"] == "1"
    assert json.loads(env["TINKER_RECOVERY_USER_METADATA"]) == {"tinker_recovery.lineage": "lin-1"}


@pytest.mark.parametrize("value", HOSTILE)
async def test_hostile_values_arrive_verbatim_and_inject_nothing(
    tmp_path: Path, value: str
) -> None:
    req = request(
        lineage_id=value,
        corrupted_run_id=value,
        checkpoint_path=value,
        idempotency_key=value,
        user_metadata={"k": value, value: "v"},
    )
    _detail, record = await run_recorder(tmp_path, req)
    argv = record["argv"]
    assert len(argv) == len(ALL_PLACEHOLDERS)  # no value split into extra arguments
    assert argv[0] == f"--lineage={value}"
    assert argv[1] == argv[2] == argv[4] == value
    assert record["env"]["TINKER_RECOVERY_CHECKPOINT"] == value
    assert json.loads(record["env"]["TINKER_RECOVERY_USER_METADATA"]) == {"k": value, value: "v"}
    assert sorted(os.listdir(tmp_path)) == ["record.json"]  # no pwned* files


async def test_large_value_arrives_whole(tmp_path: Path) -> None:
    big = "A" * 100_000  # under Linux's 128 KiB limit on one argv/env string
    _detail, record = await run_recorder(tmp_path, request(checkpoint_path=big))
    assert record["argv"][2] == big


async def test_megabyte_value_fails_cleanly_without_running(tmp_path: Path) -> None:
    huge = "$(touch pwned) " + "B" * 1_000_000  # beyond what exec accepts for one string
    with pytest.raises(ActionFailed, match="could not start") as caught:
        await run_recorder(tmp_path, request(user_metadata={"k": huge}))
    assert caught.value.action == "handoff"
    assert caught.value.may_have_acted is False  # nothing ran: the executor may fail at once
    assert os.listdir(tmp_path) == []


async def test_daemon_secrets_are_withheld_and_extra_env_added(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TINKER_API_KEY", "tml-daemon-secret")
    monkeypatch.setenv("TINKER_RECOVERY_HTTP__TOKEN", "operator-token")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("KEEP_ME", "yes")
    _detail, record = await run_recorder(tmp_path, request(), env={"JOB_QUEUE": "gpu"})
    env = record["env"]
    assert "TINKER_API_KEY" not in env
    assert "TINKER_RECOVERY_HTTP__TOKEN" not in env
    assert "NOTIFY_SOCKET" not in env
    assert env["KEEP_ME"] == "yes"
    assert env["JOB_QUEUE"] == "gpu"
    assert "tml-daemon-secret" not in json.dumps(record)


@pytest.mark.parametrize(
    "element",
    [
        "{unknown}",
        "{checkpoint.__class__}",
        "{checkpoint[0]}",
        "{attempt!r}",
        "{attempt:>10}",
        "{}",
        "{0}",
        "unbalanced {",
    ],
)
def test_bad_placeholder_is_a_config_error_at_build_time(element: str) -> None:
    with pytest.raises(ConfigError, match=r"argv\[1\]"):
        command(["prog", element])


async def test_nonzero_exit_is_action_failed_with_exit_code() -> None:
    code = "import sys; print('quota exceeded', file=sys.stderr); sys.exit(7)"
    with pytest.raises(ActionFailed, match="quota exceeded") as caught:
        await command([sys.executable, "-c", code]).hand_off(request())
    assert caught.value.exit_code == 7
    assert caught.value.may_have_acted is True  # it ran: it may have started the job first


async def test_a_command_killed_by_a_signal_says_which() -> None:
    code = "import os, signal; os.kill(os.getpid(), signal.SIGABRT)"
    with pytest.raises(ActionFailed, match="was killed by SIGABRT") as caught:
        await command([sys.executable, "-c", code]).hand_off(request())
    assert caught.value.exit_code == -6
    assert caught.value.may_have_acted is True


class TimingOutRunner:
    """A CommandRunner that reports a timeout, to check how the action words it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Sequence[str], float]] = []

    async def run(
        self,
        argv: Sequence[str],
        *,
        timeout_s: float,
        env: Mapping[str, str],
        cwd: Path | None = None,
    ) -> CommandResult:
        self.calls.append((argv, timeout_s))
        return CommandResult(
            exit_code=None, stdout_tail="", stderr_tail="", timed_out=True, duration_s=timeout_s
        )


async def test_timeout_is_action_failed_and_uses_the_configured_timeout() -> None:
    runner = TimingOutRunner()
    cfg = CommandHandoff(type="command", argv=["systemctl", "restart", "job"], timeout="90s")
    action = build_handoff(cfg, runner=runner, http=httpx.AsyncClient(), clock=SystemClock())
    with pytest.raises(ActionFailed, match="timed out after 90s") as caught:
        await action.hand_off(request())
    assert caught.value.exit_code is None
    assert runner.calls == [(["systemctl", "restart", "job"], 90.0)]
