"""The JSON form of records: exact round trips, tolerance of newer rows, refusal of naive times."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from store_helpers import EPOCH, full_attempt, full_lineage, make_attempt

from tinker_recovery.shell.store import codec


def test_times_are_fixed_width_so_text_order_is_time_order() -> None:
    whole = codec.dump_time(EPOCH)
    fraction = codec.dump_time(EPOCH.replace(microsecond=5))
    assert len(whole) == len(fraction)
    assert whole < fraction
    assert codec.load_time(fraction) == EPOCH.replace(microsecond=5)


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        codec.dump_time(datetime(2026, 1, 1))  # noqa: DTZ001 - the point of the test


def test_rows_from_a_newer_version_load_without_their_extra_fields() -> None:
    lineage_blob = json.loads(codec.lineage_to_json(full_lineage()))
    lineage_blob["field_from_the_future"] = {"x": 1}
    assert codec.lineage_from_json(json.dumps(lineage_blob)) == full_lineage()
    attempt_blob = json.loads(codec.attempt_to_json(full_attempt()))
    attempt_blob["another_new_field"] = [1, 2]
    assert codec.attempt_from_json(attempt_blob) == full_attempt()


def test_rows_missing_optional_fields_take_defaults() -> None:
    blob = json.loads(codec.attempt_to_json(make_attempt()))
    for key in ("checkpoint_path", "outcome", "finished_at", "reason"):
        del blob[key]
    assert codec.attempt_from_json(blob) == make_attempt()


def test_event_data_that_json_cannot_hold_is_stringified() -> None:
    from tinker_recovery.shell.store.base import Event

    event = Event(at=EPOCH, kind="k", reason="r", data={"when": EPOCH, "obj": object})
    data = codec.event_data_from_json(codec.event_data_to_json(event))
    assert data["when"] == codec.dump_time(EPOCH)
    assert isinstance(data["obj"], str)
