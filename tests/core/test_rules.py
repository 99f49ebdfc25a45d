"""match_rule: ordered rules, first match wins, hostile metadata is only ever data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, cast

import pytest
from policy_builders import rule, run

from tinker_recovery.core import rules
from tinker_recovery.settings import Match

RUN = run(
    "sess-7:train:0",
    base_model="Qwen/Qwen3-8B",
    owner="team-a",
    is_lora=True,
    metadata={"team": "search", "purpose": "sft-v2", "empty": ""},
)


@pytest.mark.parametrize(
    ("match", "expected"),
    [
        pytest.param({}, True, id="empty-matches-all"),
        pytest.param({"run_id": "sess-7:*"}, True, id="run-id-glob"),
        pytest.param({"run_id": "sess-8:*"}, False, id="run-id-glob-miss"),
        pytest.param({"base_model": "Qwen/*"}, True, id="base-model-glob"),
        pytest.param({"base_model": "qwen/*"}, False, id="globs-are-case-sensitive"),
        pytest.param({"is_lora": True}, True, id="lora"),
        pytest.param({"is_lora": False}, False, id="full-only"),
        pytest.param({"owner": "team-?"}, True, id="owner-glob"),
        pytest.param({"owner": "team-b"}, False, id="owner-miss"),
        pytest.param({"labels": {"team": "search"}}, True, id="label-exact"),
        pytest.param({"labels": {"purpose": "sft-*"}}, True, id="label-glob"),
        pytest.param({"labels": {"purpose": "rl-*"}}, False, id="label-glob-miss"),
        pytest.param({"labels": {"missing": "*"}}, False, id="label-absent-never-matches"),
        pytest.param({"labels": {"empty": "*"}}, True, id="empty-value-matches-star"),
        pytest.param({"labels": {"!missing": ""}}, True, id="negated-absent"),
        pytest.param({"labels": {"!team": ""}}, False, id="negated-present"),
        pytest.param({"labels": {"team": "search", "!owner_note": "x"}}, True, id="combined"),
        pytest.param({"owner": "team-a", "is_lora": False}, False, id="all-fields-must-match"),
    ],
)
def test_match_fields(match: dict[str, Any], expected: bool) -> None:
    assert rules.matches(RUN, Match.model_validate(match)) is expected


def test_first_matching_rule_wins() -> None:
    ordered = [
        rule("other", match={"owner": "team-b"}),
        rule("search", match={"labels": {"team": "search"}}),
        rule("catch-all"),
    ]
    found = rules.match_rule(RUN, ordered)
    assert found is not None
    assert found.name == "search"


def test_no_rule_matches() -> None:
    assert rules.match_rule(RUN, [rule("b-only", match={"owner": "team-b"})]) is None
    assert rules.match_rule(RUN, []) is None


HOSTILE_VALUES = [
    pytest.param("x; rm -rf / #", id="shell-metacharacters"),
    pytest.param("$(touch /tmp/pwned)`id`", id="command-substitution"),
    pytest.param("search\nteam: admin", id="newline"),
    pytest.param("search\x00", id="nul"),
    pytest.param("[!a-z]*?{}", id="glob-metacharacters-in-value"),
    pytest.param("a" * 2_000_000, id="huge"),
    pytest.param(("a" * 30 + "b") * 10_000, id="backtracking-bait"),
]


@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_hostile_metadata_is_compared_as_data(value: str) -> None:
    hostile = run(metadata={"team": value, "*": "x"})
    assert rules.matches(hostile, Match(labels={"team": "search"})) is False
    assert rules.matches(hostile, Match(labels={"team": "*a*a*a*a*a*a*c"})) is False
    assert rules.matches(hostile, Match(labels={"team": "*"})) is True


def test_metadata_keys_are_not_patterns() -> None:
    # A user key "*" must not satisfy a selector on some other key.
    assert rules.matches(run(metadata={"*": "x"}), Match(labels={"team": "*"})) is False


def test_non_string_metadata_values_never_match() -> None:
    # The poller should hand over strings, but the matcher must not trust that.
    untrusted = cast("Mapping[str, str]", {"team": 42, "list": ["a"]})
    weird = replace(run(), user_metadata=untrusted)
    assert rules.matches(weird, Match(labels={"team": "*"})) is False
    assert rules.matches(weird, Match(labels={"list": "*"})) is False
    assert rules.matches(weird, Match(labels={"!team": ""})) is False
