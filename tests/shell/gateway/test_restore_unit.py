"""SdkRestorer with a scripted stand-in for tinker.ServiceClient: calls, closing, translation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import tinker
from pydantic import SecretStr

from tinker_recovery.errors import ActionFailed
from tinker_recovery.shell.restore import RestoreResult, SdkRestorer

KEY = "tml-restorer-secret-key"


@dataclass
class Done:
    value: Any = None
    error: BaseException | None = None
    timeouts: list[float | None] = field(default_factory=list)

    def result(self, timeout: float | None = None) -> Any:
        self.timeouts.append(timeout)
        if self.error is not None:
            raise self.error
        return self.value


@dataclass
class Saved:
    path: str


class FakeTraining:
    model_id = "sess-9:train:0"

    def __init__(self, save: Done) -> None:
        self.save = save
        self.saved_names: list[str] = []

    def save_state(self, name: str) -> Done:
        self.saved_names.append(name)
        return self.save


class FakeService:
    def __init__(self, load: Done, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.load = load
        self.calls: list[tuple[str, str, dict[str, str] | None]] = []
        self.closed: list[str] = []

    def create_training_client_from_state_with_optimizer(
        self, path: str, base_model: str | None = None, user_metadata: dict[str, str] | None = None
    ) -> Done:
        self.calls.append(("with_optimizer", path, user_metadata))
        return self.load

    def create_training_client_from_state(
        self, path: str, base_model: str | None = None, user_metadata: dict[str, str] | None = None
    ) -> Done:
        self.calls.append(("weights_only", path, user_metadata))
        return self.load

    def close(self, status: str, detail: str | None = None) -> Done:
        self.closed.append(status)
        return Done()


def restorer_with(load: Done) -> tuple[SdkRestorer, list[FakeService]]:
    made: list[FakeService] = []

    def factory(**kwargs: Any) -> FakeService:
        made.append(FakeService(load, **kwargs))
        return made[-1]

    restorer = SdkRestorer(
        base_url="http://127.0.0.1:1", api_key=SecretStr(KEY), timeout_s=30, client_factory=factory
    )
    return restorer, made


@pytest.mark.parametrize(
    ("with_optimizer", "call"), [(True, "with_optimizer"), (False, "weights_only")]
)
async def test_success_loads_saves_and_closes(with_optimizer: bool, call: str) -> None:
    training = FakeTraining(Done(Saved("tinker://sess-9:train:0/weights/recovery-2")))
    restorer, made = restorer_with(Done(training))
    result = await restorer.restore(
        "tinker://old:train:0/weights/000020",
        with_optimizer=with_optimizer,
        user_metadata={"tinker_recovery.lineage": "lin"},
        save_name="recovery-2",
    )
    assert result == RestoreResult("sess-9:train:0", "tinker://sess-9:train:0/weights/recovery-2")
    [service] = made
    assert service.kwargs == {"base_url": "http://127.0.0.1:1", "api_key": KEY}
    assert service.calls == [
        (call, "tinker://old:train:0/weights/000020", {"tinker_recovery.lineage": "lin"})
    ]
    assert training.saved_names == ["recovery-2"]
    assert service.closed == ["success"]
    # Every wait inside the worker is bounded by what is left of the deadline.
    assert all(t is not None and 0 < t <= 30 for t in service.load.timeouts)


async def test_sdk_failure_is_action_failed_and_the_session_closed_as_errored() -> None:
    error = tinker.RequestFailedError(f"bad path; key was {KEY}", "req-1", "user")  # type: ignore[arg-type]  # category is an enum in the SDK; a str reads the same
    restorer, made = restorer_with(Done(error=error))
    with pytest.raises(ActionFailed, match="RequestFailedError") as caught:
        await restorer.restore(
            "tinker://x/weights/1", with_optimizer=True, user_metadata={}, save_name="r"
        )
    assert caught.value.action == "restore"
    assert KEY not in str(caught.value)
    assert made[0].closed == ["errored"]


async def test_deadline_inside_the_sdk_is_action_failed_and_interrupted() -> None:
    restorer, made = restorer_with(Done(error=TimeoutError()))
    with pytest.raises(ActionFailed, match="did not finish within 30s"):
        await restorer.restore(
            "tinker://x/weights/1", with_optimizer=False, user_metadata={}, save_name="r"
        )
    assert made[0].closed == ["interrupted"]


async def test_bad_key_is_action_failed_without_the_key() -> None:
    # The real SDK refuses keys that do not look like Tinker keys before any HTTP.
    restorer = SdkRestorer(
        base_url="http://127.0.0.1:1", api_key=SecretStr("nope-123"), timeout_s=5
    )
    with pytest.raises(ActionFailed) as caught:
        await restorer.restore(
            "tinker://x/weights/1", with_optimizer=True, user_metadata={}, save_name="r"
        )
    assert "nope-123" not in str(caught.value)
