"""Where the deploy tests find the repository and the external tools they drive.

`make unit` puts `.tools/bin` (promtool) on PATH and the venv holds hadolint; when a test is run
some other way we still look in those places, so a plain `.venv/bin/pytest tests/deploy` works
after `make tools`. A missing tool is a failure, not a skip: `make test` must prove each piece.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def find_tool(name: str) -> str:
    """Absolute path of an external tool, or fail the test with how to install it."""
    extra = [REPO / ".tools" / "bin", Path(sys.executable).parent]
    search = os.pathsep.join([os.environ.get("PATH", ""), *map(str, extra)])
    found = shutil.which(name, path=search)
    if found is None:
        pytest.fail(f"{name} not found on PATH or in .tools/bin: run `make tools`")
    return found
