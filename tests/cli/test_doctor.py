"""`tinker-recovery doctor`: the preflight plus live checks, against the bundled emulator on
127.0.0.1, with a good config and with each check failing (issue 11, "A preflight that matches
run")."""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.harness import Emu, emulator, free_port, with_store
from tinker_recovery import doctor
from tinker_recovery.__main__ import main

KEY = "tml-doctor-key-0123456789"


@pytest.fixture(scope="module")
def emu() -> Iterator[Emu]:
    with emulator(runs=3) as running:
        yield running


@pytest.fixture
def listener() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts connections (a webhook receiver stand-in)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield int(sock.getsockname()[1])


def write_config(tmp_path: Path, body: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


def good_config(emu: Emu, tmp_path: Path, webhook_port: int) -> dict[str, Any]:
    state = tmp_path / "state.db"
    with_store(f"sqlite:///{state}", lambda store: store.leader())  # creates and migrates it
    return {
        "tinker": {"base_url": emu.base_url, "request_timeout": "2s", "retry_attempts": 1},
        "state": {"url": f"sqlite:///{state}"},
        "policy": {
            "rules": [
                {"name": "jobs", "action": "recover", "handoff": "cmd"},
                {"name": "hooks", "action": "recover", "handoff": "hook"},
            ]
        },
        "handoffs": {
            "cmd": {"type": "command", "argv": [sys.executable, "-c", "pass", "{checkpoint}"]},
            "hook": {"type": "webhook", "url": f"http://127.0.0.1:{webhook_port}/hook"},
        },
        "http": {"host": "127.0.0.1", "port": free_port()},
    }


def env(key: str | None = KEY) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin"} | ({} if key is None else {"TINKER_API_KEY": key})


def by_name(report: doctor.Report) -> dict[str, doctor.Check]:
    return {check.name: check for check in report.checks}


async def test_a_good_config_passes_every_check(emu: Emu, tmp_path: Path, listener: int) -> None:
    path = write_config(tmp_path, good_config(emu, tmp_path, listener))

    report = await doctor.diagnose(path, timeout_s=5, env=env())

    assert [(c.name, c.level) for c in report.checks] == [
        ("config", "ok"),
        ("tinker", "ok"),
        ("store", "ok"),
        ("handoff cmd", "ok"),
        ("handoff hook", "ok"),
        ("http", "ok"),
    ], report.checks
    checks = by_name(report)
    assert "key accepted" in checks["tinker"].detail
    assert "first page lists 3 of 3 runs" in checks["tinker"].detail
    assert "takes a write (rolled back)" in checks["store"].detail
    assert "accepts connections" in checks["handoff hook"].detail
    assert report.exit_code == 0
    assert report.verdict == "verdict: ok: all 6 checks passed"
    assert emu.count("client_config") >= 1


def test_doctor_prints_one_line_per_check_and_exits_0(
    emu: Emu, tmp_path: Path, listener: int, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("TINKER_API_KEY", KEY)
    path = write_config(tmp_path, good_config(emu, tmp_path, listener))
    capsys.readouterr()  # the setup's own log lines

    code = main(["doctor", "--config", str(path), "--timeout", "5s"])

    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].split() == ["RESULT", "CHECK", "DETAIL"]
    rows = [line for line in lines[1:-1] if not line.startswith(" ")]  # not wrapped details
    assert [row.split()[:2] for row in rows] == [
        ["ok", "config"], ["ok", "tinker"], ["ok", "store"], ["ok", "handoff"], ["ok", "handoff"],
        ["ok", "http"],
    ]  # fmt: skip
    assert lines[-1] == "verdict: ok: all 6 checks passed"
    assert KEY not in out


@pytest.mark.parametrize(
    ("key", "detail"),
    [
        (None, "no API key: set TINKER_API_KEY"),
        ("not-a-tinker-key", "401"),
    ],
    ids=["no-key", "rejected-key"],
)
async def test_a_missing_or_rejected_key_fails_the_tinker_check(
    emu: Emu, tmp_path: Path, listener: int, key: str | None, detail: str
) -> None:
    path = write_config(tmp_path, good_config(emu, tmp_path, listener))

    report = await doctor.diagnose(path, timeout_s=5, env=env(key))

    check = by_name(report)["tinker"]
    assert check.level == "FAIL"
    assert detail in check.detail
    assert "not-a-tinker-key" not in check.detail
    assert report.exit_code == 1
    assert report.verdict == "verdict: FAIL: 1 of 6 checks failed (tinker)"


async def test_an_unreachable_tinker_fails_within_the_timeout(
    emu: Emu, tmp_path: Path, listener: int
) -> None:
    body = good_config(emu, tmp_path, listener)
    body["tinker"]["base_url"] = f"http://127.0.0.1:{free_port()}"
    path = write_config(tmp_path, body)

    report = await doctor.diagnose(path, timeout_s=5, env=env())

    assert by_name(report)["tinker"].level == "FAIL"
    assert report.exit_code == 1


@pytest.mark.parametrize("broken", ["not-a-database", "missing-directory"])
async def test_a_store_that_cannot_open_fails_the_store_check(
    emu: Emu, tmp_path: Path, listener: int, broken: str
) -> None:
    body = good_config(emu, tmp_path, listener)
    if broken == "not-a-database":
        bad = tmp_path / "garbage.db"
        bad.write_bytes(b"this is not a SQLite database file" * 100)
    else:
        bad = tmp_path / "no" / "such" / "dir" / "state.db"
    body["state"]["url"] = f"sqlite:///{bad}"
    path = write_config(tmp_path, body)

    report = await doctor.diagnose(path, timeout_s=5, env=env())

    check = by_name(report)["store"]
    assert check.level == "FAIL", check
    assert str(bad) in check.detail
    assert not (tmp_path / "no").exists()
    assert report.exit_code == 1


async def test_a_store_not_created_yet_is_fine_when_its_directory_is_writable(
    emu: Emu, tmp_path: Path, listener: int
) -> None:
    body = good_config(emu, tmp_path, listener)
    fresh = tmp_path / "fresh.db"
    body["state"]["url"] = f"sqlite:///{fresh}"
    path = write_config(tmp_path, body)

    report = await doctor.diagnose(path, timeout_s=5, env=env())

    assert by_name(report)["store"].level == "ok"
    assert not fresh.exists()


async def test_a_missing_handoff_executable_fails_its_check(
    emu: Emu, tmp_path: Path, listener: int
) -> None:
    body = good_config(emu, tmp_path, listener)
    body["handoffs"]["cmd"]["argv"] = [str(tmp_path / "restart-job.sh"), "{checkpoint}"]
    path = write_config(tmp_path, body)

    report = await doctor.diagnose(path, timeout_s=5, env=env())

    checks = [(c.name, c.level) for c in report.checks]
    assert ("config", "warn") in checks  # what check-config says, as a warning
    assert by_name(report)["handoff cmd"].level == "FAIL"
    assert "no file there" in by_name(report)["handoff cmd"].detail
    assert report.exit_code == 1


async def test_a_webhook_nobody_listens_on_fails_its_check(
    emu: Emu, tmp_path: Path, listener: int
) -> None:
    body = good_config(emu, tmp_path, listener)
    body["handoffs"]["hook"]["url"] = f"https://user:s3cret@127.0.0.1:{free_port()}/hook"
    path = write_config(tmp_path, body)

    report = await doctor.diagnose(path, timeout_s=5, env=env())

    check = by_name(report)["handoff hook"]
    assert check.level == "FAIL"
    assert "refuses connections" in check.detail
    assert "s3cret" not in check.detail


async def test_an_http_port_in_use_fails_the_http_check(
    emu: Emu, tmp_path: Path, listener: int
) -> None:
    body = good_config(emu, tmp_path, listener)
    body["http"]["port"] = listener  # taken by the stand-in receiver, not a daemon
    path = write_config(tmp_path, body)

    report = await doctor.diagnose(path, timeout_s=5, env=env())

    check = by_name(report)["http"]
    assert check.level == "FAIL"
    assert "in use by another program" in check.detail


def test_a_refused_config_exits_2_with_the_located_refusal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(
        tmp_path,
        {
            "policy": {"rules": [{"name": "r", "action": "recover", "handoff": "h"}]},
            "handoffs": {"h": {"type": "command", "argv": ["/bin/true", "{chekpoint}"]}},
        },
    )

    code = main(["doctor", "--config", str(path), "-o", "json"])

    report = json.loads(capsys.readouterr().out)
    assert code == 2
    assert report["checks"][0]["result"] == "FAIL"
    assert report["checks"][0]["detail"].startswith(f"{path}:")
    assert "chekpoint" in report["checks"][0]["detail"]
