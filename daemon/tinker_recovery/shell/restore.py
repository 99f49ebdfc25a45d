"""SdkRestorer: `restore: sdk` — load a checkpoint into a new training run and save it once.

Uses the official SDK (`tinker.ServiceClient`), as DESIGN.md asks: its auth, wire models and
futures protocol are not ours to rewrite. The SDK blocks and retries for minutes on its own,
and even its client constructor does blocking HTTP, so the whole sequence runs in a worker
thread with its own deadline, and the caller awaits it under the daemon's deadline too.

A thread cannot be killed: if the daemon's deadline passes first, the thread finishes (or fails)
in the background and its session is closed then. The new run it may have created carries the
lineage tags, so the executor's successor search still recognises it.

Telemetry is left to the user's environment (`TINKER_TELEMETRY=0` turns it off); see
docs/tinker-gateway.md.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import structlog
import tinker
from pydantic import SecretStr

from tinker_recovery.core.model import TAG_IDEMPOTENCY_KEY, TAG_LINEAGE
from tinker_recovery.errors import ActionFailed

log = structlog.get_logger(__name__)

# Head room for the worker to close its session after its own deadline, before ours fires.
_CLOSE_GRACE_S = 10.0


@dataclass(frozen=True, slots=True)
class RestoreResult:
    new_run_id: str
    saved_path: str


class _Future(Protocol):
    def result(self, timeout: float | None = None) -> Any: ...


class ServiceClientLike(Protocol):
    """The part of `tinker.ServiceClient` the restorer uses (a seam for tests)."""

    def create_training_client_from_state_with_optimizer(
        self, path: str, base_model: str | None = None, user_metadata: dict[str, str] | None = None
    ) -> Any: ...

    def create_training_client_from_state(
        self, path: str, base_model: str | None = None, user_metadata: dict[str, str] | None = None
    ) -> Any: ...

    def close(
        self, status: Literal["success", "errored", "interrupted"], detail: str | None = None
    ) -> Any: ...


ClientFactory = Callable[..., ServiceClientLike]


class SdkRestorer:
    def __init__(
        self,
        *,
        base_url: str,
        api_key: SecretStr,
        timeout_s: float,
        client_factory: ClientFactory | None = None,
    ) -> None:
        self._base_url = base_url
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._factory: ClientFactory = client_factory or tinker.ServiceClient

    async def restore(
        self,
        checkpoint_path: str,
        *,
        with_optimizer: bool,
        user_metadata: Mapping[str, str],
        save_name: str,
    ) -> RestoreResult:
        """Load `checkpoint_path` into a new run and save it once as `save_name`.

        Raises ActionFailed(action="restore") on any SDK failure or when the deadline passes.
        """
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._timeout_s + _CLOSE_GRACE_S):
                result = await asyncio.to_thread(
                    self._restore_blocking,
                    checkpoint_path,
                    with_optimizer,
                    dict(user_metadata),
                    save_name,
                )
        except TimeoutError:
            raise ActionFailed(
                f"restore from {checkpoint_path} did not finish within {self._timeout_s:g}s",
                action="restore",
            ) from None
        log.info(
            "restore_finished",
            lineage_id=user_metadata.get(TAG_LINEAGE),
            attempt_id=user_metadata.get(TAG_IDEMPOTENCY_KEY),
            checkpoint=checkpoint_path,
            new_run_id=result.new_run_id,
            saved_path=result.saved_path,
            duration_s=round(time.monotonic() - started, 3),
        )
        return result

    def _restore_blocking(
        self,
        checkpoint_path: str,
        with_optimizer: bool,
        user_metadata: dict[str, str],
        save_name: str,
    ) -> RestoreResult:
        deadline = time.monotonic() + self._timeout_s

        def remaining() -> float:
            return max(0.001, deadline - time.monotonic())

        status: Literal["success", "errored", "interrupted"] = "errored"
        client: ServiceClientLike | None = None
        try:
            client = self._factory(
                base_url=self._base_url, api_key=self._api_key.get_secret_value()
            )
            if with_optimizer:
                pending = client.create_training_client_from_state_with_optimizer(
                    checkpoint_path, user_metadata=user_metadata
                )
            else:
                pending = client.create_training_client_from_state(
                    checkpoint_path, user_metadata=user_metadata
                )
            training = pending.result(timeout=remaining())
            saved = training.save_state(save_name).result(timeout=remaining())
            status = "success"
            return RestoreResult(new_run_id=str(training.model_id), saved_path=str(saved.path))
        except TimeoutError:
            status = "interrupted"
            raise ActionFailed(
                f"restore from {checkpoint_path} did not finish within {self._timeout_s:g}s",
                action="restore",
            ) from None
        except tinker.RequestFailedError as exc:
            # The service ran the load and refused it: a user-category failure blames the
            # checkpoint (unloadable, incompatible); server/unknown ones may be transient.
            raise ActionFailed(
                self._describe(checkpoint_path, exc),
                action="restore",
                checkpoint_at_fault=str(getattr(exc, "category", "")).lower().endswith("user"),
            ) from exc
        except tinker.TinkerError as exc:
            raise ActionFailed(self._describe(checkpoint_path, exc), action="restore") from exc
        except ValueError as exc:  # the SDK raises it for a bad tinker path or a 4xx poll
            raise ActionFailed(
                self._describe(checkpoint_path, exc), action="restore", checkpoint_at_fault=True
            ) from exc
        finally:
            if client is not None:
                self._close(client, status)

    def _close(self, client: ServiceClientLike, status: str) -> None:
        try:
            client.close(status).result(timeout=_CLOSE_GRACE_S)  # type: ignore[arg-type]  # status is one of the literals set above
        except Exception as exc:  # noqa: BLE001  # closing is best effort; the restore's outcome stands
            log.warning("restore_close_failed", error=type(exc).__name__)

    def _describe(self, checkpoint_path: str, exc: BaseException) -> str:
        # SDK messages carry server bodies; mask the key in case a server echoes it.
        text = str(exc).replace(self._api_key.get_secret_value(), "***")[:300]
        return f"restore from {checkpoint_path} failed: {type(exc).__name__}: {text}"
