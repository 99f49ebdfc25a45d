"""How the daemon process leaves once the SDK's Rust transport is loaded (see __main__._leave)."""

from __future__ import annotations

import subprocess
import sys

LEAVE = """
import sys
{preload}
from tinker_recovery.__main__ import _leave
import atexit
atexit.register(lambda: print("finalised", flush=True))
print("logged line", end="")  # unflushed: _leave must flush it
code = _leave(7)
print(f" returned {{code}}")
sys.exit(code)
"""


def run_leave(preload: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", LEAVE.format(preload=preload)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_with_pyqwest_loaded_it_flushes_and_exits_with_the_code_before_finalisation() -> None:
    done = run_leave("import pyqwest")
    assert done.returncode == 7
    assert done.stdout == "logged line"  # flushed; neither returned nor finalised


def test_without_pyqwest_it_returns_and_the_interpreter_finalises_normally() -> None:
    done = run_leave("")
    assert done.returncode == 7
    assert done.stdout == "logged line returned 7\nfinalised\n"
