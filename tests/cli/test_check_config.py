"""`check-config` prints preflight's warnings to stderr and still exits 0 (issue 11)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tinker_recovery.__main__ import main


def test_warnings_go_to_stderr_and_the_effective_config_to_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "restart-job.sh"
    path = tmp_path / "config.yaml"
    path.write_text(
        json.dumps(
            {
                "policy": {"rules": [{"name": "r", "action": "recover", "handoff": "h"}]},
                "handoffs": {"h": {"type": "command", "argv": [str(missing), "{checkpoint}"]}},
            }
        )
    )

    code = main(["check-config", "--config", str(path)])

    out, err = capsys.readouterr()
    assert code == 0
    assert err.startswith(f"warning: {path}:")
    assert f"{missing}: no executable file there" in err
    assert "handoffs.h.argv[0]" in err
    assert "warning: " not in out
    assert "restart-job.sh" in out  # the effective config itself
