"""The small Python API for people who write their own loop, against the emulator."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import tinker

from e2e.harness import JOB_KEY, Emu
from jobside.conftest import TAGS, handoff_for, run_metadata
from tinker_recovery import jobside


@pytest.fixture
def service(emu: Emu, monkeypatch: pytest.MonkeyPatch) -> Iterator[tinker.ServiceClient]:
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    client = tinker.ServiceClient(base_url=emu.base_url, api_key=JOB_KEY)
    yield client
    client.close("success").result()


def test_current_handoff_is_none_on_a_plain_start() -> None:
    assert jobside.current_handoff({"PATH": "/bin"}) is None


def test_current_handoff_reads_the_daemons_variables() -> None:
    handoff = handoff_for("tinker://r/weights/1", source="tinker://o/weights/1")
    assert jobside.current_handoff(handoff.environment()) == handoff


def test_malformed_variables_are_an_error_not_a_plain_start() -> None:
    env = {**handoff_for("tinker://r/weights/1").environment()}
    env["TINKER_RECOVERY_USER_METADATA"] = "{not json"
    with pytest.raises(jobside.HandoffInvalid, match="TINKER_RECOVERY_USER_METADATA"):
        jobside.current_handoff(env)


def test_merge_keeps_the_jobs_keys_and_ours_win_on_tags() -> None:
    own = {"team": "nlp", "tinker_recovery.attempt": "99"}
    merged = jobside.merge_user_metadata(own, handoff_for("tinker://r/weights/1"))
    assert merged == {"team": "nlp", **TAGS}
    assert own == {"team": "nlp", "tinker_recovery.attempt": "99"}  # not modified


def test_create_training_client_resumes_from_the_handed_off_checkpoint(
    emu: Emu, service: tinker.ServiceClient
) -> None:
    source = emu.create_run(checkpoints=2)
    checkpoint = emu.training_checkpoints(source)[0]
    client = jobside.create_training_client(
        service,
        base_model="Qwen/Qwen3-8B",
        resume_from="tinker://ignored/weights/1",
        user_metadata={"team": "nlp"},
        handoff=handoff_for(checkpoint),
    ).result()
    assert run_metadata(emu, client.model_id) == {"team": "nlp", **TAGS}
    assert emu.count("load_weights") == 1
    assert emu.count("create_model") == 0


def test_create_training_client_without_a_handoff_starts_fresh(
    emu: Emu, service: tinker.ServiceClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TINKER_RECOVERY_CHECKPOINT", raising=False)
    client = jobside.create_training_client(
        service, base_model="Qwen/Qwen3-8B", rank=8, user_metadata={"team": "nlp"}
    ).result()
    assert run_metadata(emu, client.model_id) == {"team": "nlp"}
    assert emu.count("create_model") == 1
