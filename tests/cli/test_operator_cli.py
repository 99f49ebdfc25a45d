"""Operator commands refuse a state path that holds no store instead of creating one."""

from __future__ import annotations

from pathlib import Path

import pytest

from tinker_recovery.__main__ import main


@pytest.mark.parametrize("command", [["status"], ["history", "some-run"], ["pause"], ["resume"]])
def test_missing_sqlite_store_is_an_error_and_nothing_is_created(
    tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere" / "state.db"

    code = main([*command, "--state", f"sqlite:///{missing}"])

    assert code == 1
    assert f"no state store at {missing}" in capsys.readouterr().out
    assert not missing.exists()
    assert not missing.parent.exists()
