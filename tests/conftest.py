"""Suite-wide hooks."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Generator
from typing import Any

import pytest


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Generator[None, Any, Any]:
    """Close the event loop a sync test left behind.

    looptime asks the policy for a loop even in sync tests; the default policy then creates one
    nobody closes, and its ResourceWarning (an error here) lands in some later, unrelated test.
    """
    if inspect.iscoroutinefunction(pyfuncitem.obj):
        return (yield)
    policy = asyncio.get_event_loop_policy()
    before = _policy_loop(policy)
    try:
        return (yield)
    finally:
        after = _policy_loop(policy)
        if after is not None and after is not before and not after.is_running():
            after.close()
            policy.set_event_loop(None)


def _policy_loop(policy: asyncio.AbstractEventLoopPolicy) -> asyncio.AbstractEventLoop | None:
    """The loop the default policy holds for this thread, without creating one."""
    local = getattr(policy, "_local", None)
    loop: asyncio.AbstractEventLoop | None = getattr(local, "_loop", None)
    return loop
