"""Failpoints: let crash tests kill the daemon at an exact step, as etcd's gofail does.

`TINKER_RECOVERY_FAILPOINT=<name>` in the environment makes `hit(name)` SIGKILL this process on
the spot, with no cleanup, which is what a power cut or the OOM killer would do. Unset (always, in
production) `hit` is a dictionary lookup. Written by hand because no maintained Python library
offers process-kill failpoints.
"""

from __future__ import annotations

import os
import signal

_ENV = "TINKER_RECOVERY_FAILPOINT"
_armed = os.environ.get(_ENV, "")


def hit(name: str) -> None:
    """Die here if the failpoint `name` is armed."""
    if _armed and _armed == name:
        os.kill(os.getpid(), signal.SIGKILL)
