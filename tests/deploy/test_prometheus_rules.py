"""alerts.yaml passes `promtool check rules` and its unit tests, and every alert is operable.

promtool comes from Debian's prometheus package (`make tools` unpacks it into .tools/bin).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_paths import DEPLOY, REPO, find_tool

RULES = DEPLOY / "prometheus" / "alerts.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts.test.yaml"
OPERATIONS = REPO / "docs" / "operations.md"

# What an on-call engineer needs paged for (issue 4); more alerts may be added.
REQUIRED_ALERTS = {
    "TinkerRecoveryDown",
    "TinkerRecoveryAbsent",
    "TinkerRecoveryLineageExhausted",
    "TinkerRecoveryRecoveriesFailing",
    "TinkerRecoveryPollingStale",
    "TinkerRecoveryPollErrors",
    "TinkerRecoveryIncidentBreakerOpen",
    "TinkerRecoveryNoLeader",
    # issue 11
    "TinkerRecoveryFleetPaused",
    "TinkerRecoveryDryRunLeftOn",
    "TinkerRecoveryConfigReloadFailed",
}
# The one base URL an operator changes (alerts.yaml's header says how); see _runbook_base().
RUNBOOK_BASE_LINE = re.compile(r"^# RUNBOOK_BASE: (\S+)$", re.MULTILINE)


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=30
    )


def _alerts() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules_passes() -> None:
    result = _promtool("check", "rules", RULES.name, cwd=RULES.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = _promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_unit_tests_catch_a_wrong_threshold(tmp_path: Path) -> None:
    # The unit tests must bite: loosen one alert and promtool has to report a failure.
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    text = RULES.read_text(encoding="utf-8")
    broken = text.replace(
        "tinker_recovery_last_successful_poll_timestamp_seconds) > 300", "x) > 3000"
    )
    assert broken != text
    (tmp_path / RULES.name).write_text(broken, encoding="utf-8")
    result = _promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0
    assert "TinkerRecoveryPollingStale" in result.stdout + result.stderr


def test_required_alerts_exist() -> None:
    assert {rule["alert"] for rule in _alerts()} >= REQUIRED_ALERTS


def test_every_alert_is_tested_firing_and_quiet() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in _alerts()}
    assert names - firing == set(), "alerts without a firing test"
    assert names - quiet == set(), "alerts without a not-firing test"


@pytest.mark.parametrize("rule", _alerts(), ids=lambda rule: str(rule["alert"]))
def test_alert_has_severity_summary_and_runbook(rule: dict[str, Any]) -> None:
    assert rule["labels"]["severity"] in {"critical", "warning"}
    annotations = rule["annotations"]
    assert annotations["summary"].strip()
    assert annotations["description"].strip()
    base, _, anchor = annotations["runbook_url"].partition("#")
    # Absolute: a pager or chat receiver has no repository to resolve a relative path against.
    assert base == _runbook_base()
    assert anchor == rule["alert"].lower()
    assert anchor in _anchors(OPERATIONS.read_text(encoding="utf-8"))


def _runbook_base() -> str:
    match = RUNBOOK_BASE_LINE.search(RULES.read_text(encoding="utf-8"))
    assert match, "alerts.yaml must declare its runbook base URL in a '# RUNBOOK_BASE:' line"
    base = match.group(1)
    assert base.startswith("https://"), base
    return base


def test_rule_tests_expect_the_same_runbook_base() -> None:
    # The unit tests compare annotations literally; a base changed in one file only would fail
    # there, but say it plainly here.
    urls = re.findall(r"runbook_url: (\S+)", RULE_TESTS.read_text(encoding="utf-8"))
    assert urls
    assert {url.partition("#")[0] for url in urls} == {_runbook_base()}


def _anchors(markdown: str) -> set[str]:
    """Heading anchors as GitHub renders them (lowercase, punctuation dropped, spaces -> -)."""
    anchors = set()
    for line in markdown.splitlines():
        if match := re.match(r"^#{1,6}\s+(.*?)\s*$", line):
            slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


def test_anchor_slugs_follow_github() -> None:
    assert _anchors("## Install and upgrade: systemd\n### TinkerRecoveryDown") == {
        "install-and-upgrade-systemd",
        "tinkerrecoverydown",
    }
