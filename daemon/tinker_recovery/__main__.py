"""The `tinker-recovery` command (its commands live in tinker_recovery.cli).

Exit codes: 0 done, 1 failed or refused, 2 usage or config.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line (tinker_recovery.cli) on `argv`; the exit code."""
    from tinker_recovery import cli

    return cli.main(argv)


def _leave(code: int) -> int:
    """Exit the daemon process with `code` now, skipping interpreter finalisation, if the SDK's
    Rust HTTP transport (pyqwest) was loaded by a `restore: sdk`.

    On CPython 3.11 a pyqwest thread still handing its last response to Python while the
    interpreter finalises aborts the process (SIGABRT), even after the SDK session was closed
    and waited for: a clean stop would then exit 134. Nothing is lost by leaving early: the
    store and clients are closed by now, and the log streams are flushed here.
    """
    if "pyqwest" not in sys.modules:
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
