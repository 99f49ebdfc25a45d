"""Entry points for the python handoff tests (imported by name, as `ho_targets:...`)."""

from __future__ import annotations

import asyncio
import threading

from tinker_recovery.shell.handoff import HandoffRequest

calls: list[tuple[str, HandoffRequest, str]] = []


def sync_target(request: HandoffRequest) -> str:
    calls.append(("sync", request, threading.current_thread().name))
    return f"queued {request.lineage_id}"


async def async_target(request: HandoffRequest) -> None:
    calls.append(("async", request, threading.current_thread().name))


async def never_returns(request: HandoffRequest) -> None:
    await asyncio.Event().wait()


def raises(request: HandoffRequest) -> None:
    raise RuntimeError("scheduler said no")


class Namespace:
    @staticmethod
    def nested(request: HandoffRequest) -> str:
        return "nested ok"


not_callable = 42
