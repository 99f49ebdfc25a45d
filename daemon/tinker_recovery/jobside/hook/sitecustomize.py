"""The in-job hook of `tinker-recovery exec`: loaded by the job's own interpreter at start-up.

`exec` puts this file's directory first on PYTHONPATH, so the job's Python imports it as
`sitecustomize` (site.py does that for every interpreter). It then:

- chains to the `sitecustomize` the job would have loaded without us (the next one on sys.path);
- waits for `tinker` to be imported (a one-shot import hook; nothing is imported eagerly, so
  Python processes that never use the SDK pay for nothing), then wraps, on the SDK's classes:
  * every `ServiceClient` method that creates a training client, so the run carries the
    attempt's `tinker_recovery.*` metadata (TINKER_RECOVERY_USER_METADATA) merged with the
    job's own `user_metadata`: the job's keys are kept, ours win on `tinker_recovery.*` keys;
  * `TrainingClient.optim_step` and `save_state`, to report the job's first progress;
- reports small JSON lines to the FIFO named by TINKER_RECOVERY_EXEC_STATUS: `client` (a
  training client was created), `client_failed` (creating one failed, e.g. an unloadable
  checkpoint), `progress` (the first optim_step or save_state answered successfully).

Rules for this file: stdlib and tinker only (the job's environment may not have anything else,
not even tinker_recovery); never raise into the job; never change what the job's calls return.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import json
import os
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

STATUS_ENV = "TINKER_RECOVERY_EXEC_STATUS"
METADATA_ENV = "TINKER_RECOVERY_USER_METADATA"
TAG_PREFIX = "tinker_recovery."

CREATORS = (
    "create_lora_training_client",
    "create_lora_training_client_async",
    "create_training_client_from_state",
    "create_training_client_from_state_async",
    "create_training_client_from_state_with_optimizer",
    "create_training_client_from_state_with_optimizer_async",
)
PROGRESS_CALLS = ("optim_step", "save_state")
_MARK = "__tinker_recovery_wrapped__"
_PIPE_BUF = 4096  # one write of at most this many bytes to a FIFO is atomic (Linux: PIPE_BUF)

_lock = threading.Lock()
_progress_reported = False
# Read once at start-up: a job that later clears its environment is still tagged.
_attempt_metadata: dict[str, str] = {}
_status_path: str | None = None


def merge_metadata(own: Any, ours: dict[str, str]) -> Any:
    """The job's `user_metadata` with ours laid over it (ours win on tinker_recovery.* keys)."""
    if not ours:
        return own
    if own is not None and not isinstance(own, dict):
        return own  # not ours to fix: let the SDK reject it the way it would have
    merged = dict(own or {})
    for key, value in ours.items():
        if key.startswith(TAG_PREFIX) or key not in merged:
            merged[key] = value
    return merged


def our_metadata() -> dict[str, str]:
    raw = os.environ.get(METADATA_ENV)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        _warn(f"{METADATA_ENV} is not JSON; the run is not tagged")
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def report(event: str, **fields: Any) -> None:
    """One JSON line to exec's FIFO; silently nothing if exec is not (or no longer) listening."""
    path = _status_path
    if not path:
        return
    line = json.dumps({"event": event, "pid": os.getpid(), **fields}, default=str)
    data = (line[: _PIPE_BUF - 200] + "\n").encode("utf-8", "replace")
    try:
        # O_NONBLOCK: fails with ENXIO when nobody reads instead of blocking the job.
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.write(fd, data)
    except OSError as exc:
        if exc.errno not in (errno.EPIPE, errno.EAGAIN):
            _warn(f"status report failed: {exc}")
    finally:
        os.close(fd)


def _report_progress(call: str, model_id: Any) -> None:
    global _progress_reported
    with _lock:
        if _progress_reported:
            return
        _progress_reported = True
    report("progress", call=call, model_id=model_id)


def _warn(message: str) -> None:
    with contextlib.suppress(OSError, ValueError):  # a closed stderr must not break the job
        sys.stderr.write(f"tinker-recovery hook: {message}\n")


def _on_done(future: Any, callback: Callable[[Any], None], failed: Callable[[str], None]) -> None:
    """Run `callback(result)` or `failed(reason)` when the SDK future `future` completes."""
    try:
        concurrent_future = future.future()
    except Exception:  # noqa: BLE001 - an SDK without APIFuture.future(): no reports, job runs
        return

    def done(f: Any) -> None:
        try:
            if f.cancelled():
                return
            exc = f.exception()
            if exc is not None:
                failed(f"{type(exc).__name__}: {exc}")
            else:
                callback(f.result())
        except Exception as exc:  # noqa: BLE001 - a callback of ours must never hurt the job
            _warn(f"report failed: {exc}")

    concurrent_future.add_done_callback(done)


def _wrap_creator(cls: type, name: str) -> bool:
    original = cls.__dict__.get(name)
    if original is None or getattr(original, _MARK, False):
        return False
    signature = inspect.signature(original)
    if "user_metadata" not in signature.parameters:
        return False

    def tagged(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return args, kwargs  # a wrong call: the SDK raises its own error for it
        bound.arguments["user_metadata"] = merge_metadata(
            bound.arguments.get("user_metadata"), _attempt_metadata
        )
        return bound.args, bound.kwargs

    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            args, kwargs = tagged(args, kwargs)
            return await original(*args, **kwargs)

        wrapper: Any = async_wrapper
    else:

        @functools.wraps(original)
        def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
            args, kwargs = tagged(args, kwargs)
            result = original(*args, **kwargs)
            _on_done(
                result,
                lambda client: report("client", call=name, model_id=client.model_id),
                lambda reason: report("client_failed", call=name, error=reason),
            )
            return result

        wrapper = sync_wrapper
    setattr(wrapper, _MARK, True)
    setattr(cls, name, wrapper)
    return True


def _wrap_progress(cls: type, name: str) -> bool:
    original = cls.__dict__.get(name)
    if original is None or getattr(original, _MARK, False):
        return False

    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        if not _progress_reported:
            model_id = getattr(self, "model_id", None)
            _on_done(result, lambda _r: _report_progress(name, model_id), lambda _why: None)
        return result

    setattr(wrapper, _MARK, True)
    setattr(cls, name, wrapper)
    return True


def patch_tinker(tinker: ModuleType) -> list[str]:
    """Wrap the SDK's classes in place; the names wrapped (for tests and diagnostics)."""
    wrapped: list[str] = []
    service = getattr(tinker, "ServiceClient", None)
    training = getattr(tinker, "TrainingClient", None)
    if service is None or training is None:
        _warn("this tinker SDK has no ServiceClient/TrainingClient; runs are not tagged")
        return wrapped
    for name in CREATORS:
        if _wrap_creator(service, name):
            wrapped.append(f"ServiceClient.{name}")
    for name in PROGRESS_CALLS:
        if _wrap_progress(training, name):
            wrapped.append(f"TrainingClient.{name}")
    if not any(n.startswith("ServiceClient.") for n in wrapped):
        _warn("found no training-client constructors to wrap; runs are not tagged")
    return wrapped


class _Loader(importlib.abc.Loader):
    """Runs tinker's own loader, then patches the module; gives the real loader back after."""

    def __init__(self, real: importlib.abc.Loader) -> None:
        self._real = real

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._real.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        if module.__spec__ is not None:
            module.__spec__.loader = self._real
        module.__loader__ = self._real
        self._real.exec_module(module)
        try:
            patch_tinker(module)
        except Exception as exc:  # noqa: BLE001 - an SDK we cannot wrap still runs the job
            _warn(f"could not wrap the tinker SDK ({type(exc).__name__}: {exc}); not tagged")


class _Finder(importlib.abc.MetaPathFinder):
    """One-shot: intercepts the first import of `tinker` and removes itself."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "tinker":
            return None
        with _lock:
            if self in sys.meta_path:
                sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Wrap tinker now if it is already imported, else when it is first imported."""
    global _attempt_metadata, _status_path
    _attempt_metadata = our_metadata()
    _status_path = os.environ.get(STATUS_ENV) or None
    tinker = sys.modules.get("tinker")
    if tinker is not None:
        patch_tinker(tinker)
    else:
        sys.meta_path.insert(0, _Finder())


def chain_sitecustomize() -> None:
    """Run the sitecustomize the job would have got without us: the next one on sys.path."""
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # its errors reach site.py, as they would have


if __name__ == "sitecustomize":  # imported by site.py; imported as a package module: inert
    install()
    chain_sitecustomize()
