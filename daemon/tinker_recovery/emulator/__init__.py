"""A local Tinker API that the official SDK drives over real HTTP (tests, benchmarks, demos).

It imports nothing from tinker_recovery.shell, core or app: it stands for the remote service.
"""

from tinker_recovery.emulator.config import EmulatorConfig
from tinker_recovery.emulator.faults import ENDPOINTS, FaultSpec
from tinker_recovery.emulator.server import EmulatorServer, create_app, serve
from tinker_recovery.emulator.state import Emulator

__all__ = [
    "ENDPOINTS",
    "Emulator",
    "EmulatorConfig",
    "EmulatorServer",
    "FaultSpec",
    "create_app",
    "serve",
]
