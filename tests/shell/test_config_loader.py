"""Config loading: located errors, env blame, masking, API key sources, the committed schema."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr

from tinker_recovery import settings
from tinker_recovery.errors import ConfigError
from tinker_recovery.obs import logs
from tinker_recovery.settings import TinkerSettings
from tinker_recovery.shell import config_loader, secrets

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "config.example.yaml"


@pytest.fixture(autouse=True)
def _forget_secrets() -> Iterator[None]:
    yield
    logs.forget_secrets()


# The built-in default rule recovers with no handoff, which the preflight refuses (every attempt
# would fail); files that test something else declare a rule that only alerts.
ALERT_ONLY = "policy:\n  rules: [{name: watch, action: alert}]\n"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def _error(path: Path, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        config_loader.load_settings(path, env={} if env is None else env)
    return str(caught.value)


def test_valid_file_loads_with_env_override(tmp_path: Path) -> None:
    path = _write(tmp_path, ALERT_ONLY + "poll:\n  interval: 5m\nlog: {level: debug}\n")
    cfg = config_loader.load_settings(path, env={"TINKER_RECOVERY_LOG__FORMAT": "console"})
    assert cfg.poll.interval == 300.0
    assert cfg.log.level == "debug"
    assert cfg.log.format == "console"


def test_a_file_naming_only_rules_gives_defaults_elsewhere(tmp_path: Path) -> None:
    cfg = config_loader.load_settings(_write(tmp_path, ALERT_ONLY), env={})
    assert cfg.poll.interval == 30.0


def test_an_empty_file_is_refused_because_the_default_rule_cannot_recover(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path, "")
    assert _error(path) == (
        f"{path}: policy.rules[0].handoff: rule 'default' recovers but names no handoff and "
        "restore is 'none': every attempt would fail; name a handoff, set restore: sdk, or use "
        "action: alert"
    )


def test_unknown_key_three_levels_deep_points_at_the_key(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "policy:\n  rules:\n    - name: a\n      backoff:\n        base: 1s\n        facter: 3\n",
    )
    assert (
        _error(path)
        == f"{path}:6:9: policy.rules[0].backoff.facter: Extra inputs are not permitted"
    )


def test_wrong_type_is_located(tmp_path: Path) -> None:
    path = _write(tmp_path, "http:\n  enabled: true\n  port: nine\n")
    message = _error(path)
    assert message.startswith(f"{path}:3:9: http.port: Input should be a valid integer")
    assert "nine" not in message  # input values are never echoed


def test_bad_duration_is_located(tmp_path: Path) -> None:
    path = _write(tmp_path, "poll:\n  interval: soonish\n")
    assert _error(path) == (
        f"{path}:2:13: poll.interval: a duration must be like 30s, 5m or 24h, got 'soonish'"
    )


def test_several_errors_give_one_line_each(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "poll: {interval: -1s}\n"
        "handoffs:\n  hook: {type: webhook}\n  cmd: {type: command, argv: []}\n",
    )
    lines = _error(path).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"{path}:1:18: poll.interval: ")
    assert lines[1] == f"{path}:3:9: handoffs.hook.url: Field required"
    assert lines[2].startswith(f"{path}:4:30: handoffs.cmd.argv: List should have at least 1 item")


def test_yaml_syntax_error_uses_problem_mark(tmp_path: Path) -> None:
    path = _write(tmp_path, "poll:\n  interval: [30s\nlog: {}\n")
    message = _error(path)
    assert message.startswith(f"{path}:3:")
    assert ": yaml: " in message


def test_duplicate_keys_are_errors(tmp_path: Path) -> None:
    path = _write(tmp_path, "poll:\n  interval: 1m\n  interval: 2m\n")
    assert _error(path) == f"{path}:3:3: poll.interval: duplicate key"


def test_unsafe_yaml_tags_are_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "poll: !!python/object:os.system {}\n")
    assert ": yaml: " in _error(path)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = _write(tmp_path, "- poll\n- log\n")
    assert _error(path) == f"{path}:1:1: the config must be a mapping of sections"


def test_missing_file_is_an_error_not_defaults(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    assert _error(path) == f"{path}: config file not found"


def test_directory_is_an_error(tmp_path: Path) -> None:
    assert "is a directory" in _error(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "poll: {}\n")
    path.chmod(0)
    assert _error(path) == f"{path}: cannot read config file: Permission denied"


def test_env_override_error_names_the_variable(tmp_path: Path) -> None:
    path = _write(tmp_path, "poll:\n  interval: 30s\n")
    message = _error(path, {"TINKER_RECOVERY_POLL__INTERVAL": "later"})
    assert message == (
        "env TINKER_RECOVERY_POLL__INTERVAL: poll.interval: "
        "a duration must be like 30s, 5m or 24h, got 'later'"
    )


def test_env_json_that_does_not_parse_is_a_config_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "")
    message = _error(path, {"TINKER_RECOVERY_POLICY__RULES": "[not json"})
    assert message == (
        "env TINKER_RECOVERY_POLICY__RULES: not valid JSON: Expecting value at line 1 column 2"
    )


def test_cross_field_error_is_reported(tmp_path: Path) -> None:
    path = _write(tmp_path, "policy:\n  rules:\n    - {name: a, handoff: nowhere}\n")
    assert "no handoff named 'nowhere'" in _error(path)


def test_render_effective_masks_every_secret(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        ALERT_ONLY + "tinker: {api_key: key-1234567}\n"
        "state: {url: 'postgresql://bob:pg-pass-99@db/tr'}\n"
        "http: {token: tok-abcdef}\n"
        "handoffs:\n  hook: {type: webhook, url: 'https://h/x', secret: hook-secret-1}\n",
    )
    cfg = config_loader.load_settings(path, env={})
    text = config_loader.render_effective(cfg)
    for secret in ("key-1234567", "pg-pass-99", "tok-abcdef", "hook-secret-1"):
        assert secret not in text
    shown = yaml.safe_load(text)
    assert shown["tinker"]["api_key"] == "***"
    assert shown["http"]["token"] == "***"
    assert shown["handoffs"]["hook"]["secret"] == "***"
    assert shown["state"]["url"] == "postgresql://bob:***@db/tr"
    # Loading registered them with the log redactor too.
    assert logs.redact_text("x key-1234567 pg-pass-99") == "x *** ***"


def test_example_config_loads_and_renders(tmp_path: Path) -> None:
    cfg = config_loader.load_settings(EXAMPLE, env={})
    assert {"restart_unit", "notify_scheduler"} <= set(cfg.handoffs)
    assert [rule.name for rule in cfg.policy.rules][-1] == "default"
    shown = yaml.safe_load(config_loader.render_effective(cfg))
    assert shown["poll"]["interval"] == "30s"  # durations as the file writes them
    rules = {rule["name"]: rule for rule in shown["policy"]["rules"]}
    assert rules["default"]["confirm_deadline"] == "15m"
    assert rules["default"]["checkpoint"]["protect_ttl"] == "1d"
    assert rules["default"]["checkpoint"]["max_age"] is None
    assert shown["tinker"]["retry_base_delay"] == "200ms"


def test_the_rendered_config_loads_back_to_the_same_settings(tmp_path: Path) -> None:
    cfg = config_loader.load_settings(EXAMPLE, env={})
    again = config_loader.load_settings(
        _write(tmp_path, config_loader.render_effective(cfg)), env={}
    )
    assert again.model_dump() == cfg.model_dump()


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (86400.0, "1d"),
        (7200.0, "2h"),
        (900.0, "15m"),
        (90.0, "90s"),
        (30.0, "30s"),
        (1.5, "1.5s"),
        (0.25, "250ms"),
        (0.0, "0s"),
        (0.0001, "0.0001s"),
    ],
)
def test_durations_format_in_the_largest_exact_unit_and_parse_back(
    seconds: float, text: str
) -> None:
    assert settings.format_duration(seconds) == text
    assert settings.parse_duration_s(text) == seconds


def test_committed_schema_matches_the_generated_one() -> None:
    committed = json.loads((REPO / "config" / "schema.json").read_text())
    assert committed == config_loader.json_schema(), (
        "regenerate: python -m tinker_recovery.shell.config_loader --schema > config/schema.json"
    )


def test_example_validates_against_the_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = config_loader.json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load(EXAMPLE.read_text()), schema)


# -- hostile files ------------------------------------------------------------------------------


def test_a_billion_laughs_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    # Nine levels of nine aliases: 9**9 (387 million) nodes from under a kilobyte of text. The
    # old duplicate-key walk visited every expanded node and did not finish in 90 s.
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 10):
        refs = ", ".join([f"*a{level - 1}"] * 9)
        lines.append(f"a{level}: &a{level} [{refs}]")
    path = _write(
        tmp_path,
        "policy:\n  rules:\n    - name: x\n      match:\n        labels:\n"
        + "".join(f"          {line}\n" for line in lines),
    )
    message = _error(path)
    assert f"aliases expand the document by more than {config_loader.MAX_ALIAS_EXPANSION}" in (
        message
    )
    assert message.startswith(f"{path}:")


def test_a_few_aliases_of_a_shared_block_are_fine(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "policy:\n  rules:\n"
        "    - {name: a, action: alert, backoff: &slow {base: 1m, cap: 1h}}\n"
        "    - {name: b, action: alert, backoff: *slow}\n",
    )
    cfg = config_loader.load_settings(path, env={})
    assert cfg.policy.rules[1].backoff.cap == 3600.0


def test_a_recursive_alias_is_refused_not_a_recursion_error(tmp_path: Path) -> None:
    path = _write(tmp_path, ALERT_ONLY + "handoffs: &loop\n  h: *loop\n")
    assert "an alias refers to the node that contains it" in _error(path)


def test_deep_nesting_is_a_config_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "policy: " + "[" * 50_000 + "]" * 50_000 + "\n")
    assert _error(path) == f"{path}: yaml: the document is nested too deeply"


def test_nesting_beyond_the_schema_is_refused_before_the_pure_python_loader(
    tmp_path: Path,
) -> None:
    depth = config_loader.MAX_DEPTH + 5
    path = _write(tmp_path, ALERT_ONLY + "handoffs: " + "[" * depth + "]" * depth + "\n")
    assert f"yaml: nested more than {config_loader.MAX_DEPTH} levels deep" in _error(path)


def test_a_file_over_the_size_cap_is_refused_unparsed(tmp_path: Path) -> None:
    path = _write(tmp_path, ALERT_ONLY + "# padding\n" * (config_loader.MAX_CONFIG_BYTES // 10))
    assert _error(path) == f"{path}: config file is larger than 1024 KiB; refusing to parse it"


def test_a_file_just_under_the_cap_loads(tmp_path: Path) -> None:
    padding = "#" * (config_loader.MAX_CONFIG_BYTES - len(ALERT_ONLY) - 1) + "\n"
    path = _write(tmp_path, ALERT_ONLY + padding)
    assert path.stat().st_size == config_loader.MAX_CONFIG_BYTES
    assert config_loader.load_settings(path, env={}).policy.rules[0].name == "watch"


# -- the preflight `run` and `check-config` share ----------------------------------------------

HANDOFF_RULE = "policy:\n  rules:\n    - {name: r, handoff: job}\n"


@pytest.mark.parametrize(
    ("text", "where", "expected"),
    [
        pytest.param(
            HANDOFF_RULE + "handoffs:\n  job:\n    type: command\n"
            "    argv: [/bin/true, '{checkpoint}', '{chekpoint}']\n",
            "7:39",
            "handoffs.job.argv[2]: unknown placeholder in '{chekpoint}'",
            id="unknown-placeholder",
        ),
        pytest.param(
            ALERT_ONLY + "state:\n  url: mysql://db/tr\n",
            "4:8",
            "state.url: unsupported state URL scheme 'mysql'",
            id="state-url-scheme",
        ),
        pytest.param(
            ALERT_ONLY + "state:\n  url: 'sqlite://host/x.db'\n",
            "4:8",
            "state.url: sqlite URLs take no host",
            id="sqlite-url-with-host",
        ),
        pytest.param(
            "policy:\n  rules: []\n",
            "2:10",
            "policy.rules: no rules: every run would be ignored",
            id="no-rules",
        ),
        pytest.param(
            "policy:\n  rules:\n    - name: a\n      action: alert\n"
            '      match: {run_id: "[abc"}\n',
            "5:23",
            "policy.rules[0].match.run_id: invalid glob: the '[' at position 1 is never closed",
            id="invalid-glob",
        ),
        pytest.param(
            "policy:\n  rules:\n    - name: a\n      action: alert\n"
            '      match: {labels: {team: "ml-[x"}}\n',
            "5:30",
            "policy.rules[0].match.labels.team: invalid glob",
            id="invalid-label-glob",
        ),
        pytest.param(
            "policy:\n  rules:\n    - {name: a, action: recover, restore: none}\n",
            "3:7",
            "policy.rules[0].handoff: rule 'a' recovers but names no handoff",
            id="recover-without-handoff",
        ),
        pytest.param(
            HANDOFF_RULE + "handoffs:\n  job: {type: webhook, url: 'ftp://h/x'}\n",
            "5:29",
            "handoffs.job.url: webhook url must be an http(s) URL with a host",
            id="webhook-url",
        ),
        pytest.param(
            HANDOFF_RULE + "handoffs:\n  job: {type: python, entry_point: 'no_such_mod:f'}\n",
            "5:36",
            "handoffs.job.entry_point: entry_point 'no_such_mod:f': cannot import",
            id="python-entry-point",
        ),
    ],
)
def test_check_config_refuses_what_run_refuses_with_file_line_col(
    tmp_path: Path, text: str, where: str, expected: str
) -> None:
    path = _write(tmp_path, text)
    message = _error(path)
    assert message.startswith(f"{path}:{where}: {expected}"), message


def test_check_config_command_exits_2_with_the_located_refusal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tinker_recovery.__main__ import main

    path = _write(tmp_path, "policy:\n  rules: []\n")
    assert main(["check-config", "--config", str(path)]) == 2
    assert f"{path}:2:10: policy.rules: no rules" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("policy:\n  rules: [{name: a, restore: sdk}]\n", id="restore-only"),
        pytest.param("policy:\n  rules: [{name: a, action: ignore}]\n", id="ignore"),
        pytest.param(
            "policy:\n  rules: [{name: a, action: alert, match: {run_id: 'x[[]y*'}}]\n",
            id="literal-bracket-glob",
        ),
        pytest.param(ALERT_ONLY + "state: {url: 'postgresql://u@db:5432/tr'}\n", id="postgres-url"),
    ],
)
def test_the_preflight_accepts_what_run_accepts(tmp_path: Path, text: str) -> None:
    config_loader.load_settings(_write(tmp_path, text), env={})


def test_a_missing_handoff_executable_is_a_warning_not_a_refusal(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        HANDOFF_RULE + "handoffs:\n  job:\n    type: command\n"
        "    argv: [no-such-resume-tool-9f2, '{checkpoint}']\n",
    )
    checked = config_loader.preflight(path, env={"PATH": str(tmp_path)})
    assert checked.settings.handoffs["job"].type == "command"
    assert checked.warnings == [
        f"warning: {path}:7:12: handoffs.job.argv[0]: no-such-resume-tool-9f2: not found on PATH"
    ]
    tool = tmp_path / "no-such-resume-tool-9f2"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert config_loader.preflight(path, env={"PATH": str(tmp_path)}).warnings == []


def test_an_absolute_executable_that_is_not_there_is_a_warning(tmp_path: Path) -> None:
    missing = tmp_path / "bin" / "resume"
    path = _write(
        tmp_path,
        HANDOFF_RULE + f"handoffs:\n  job: {{type: command, argv: ['{missing}']}}\n",
    )
    [warning] = config_loader.preflight(path, env={}).warnings
    assert warning.endswith(f"handoffs.job.argv[0]: {missing}: no executable file there")


def test_a_refusal_set_from_env_names_the_variable(tmp_path: Path) -> None:
    path = _write(tmp_path, ALERT_ONLY)
    message = _error(path, {"TINKER_RECOVERY_STATE__URL": "redis://cache/0"})
    assert message.startswith(
        "env TINKER_RECOVERY_STATE__URL: state.url: unsupported state URL scheme 'redis'"
    )


@pytest.mark.parametrize(
    ("pattern", "ok"),
    [
        ("run-*", True),
        ("[abc]*", True),
        ("[!abc]", True),
        ("[]]", True),
        ("[!]]x", True),
        ("x[[]", True),
        ("[abc", False),
        ("run-[", False),
        ("[]", False),
        ("ok-[a]-[b", False),
    ],
)
def test_glob_problem_finds_unclosed_sets(pattern: str, ok: bool) -> None:
    assert (config_loader.glob_problem(pattern) is None) is ok


# -- API key sources ---------------------------------------------------------------------------


def test_api_key_from_config_wins() -> None:
    cfg = TinkerSettings(api_key=SecretStr(" from-config \n"))
    key = secrets.resolve_api_key(cfg, {"TINKER_API_KEY": "from-env"})
    assert key is not None
    assert key.get_secret_value() == "from-config"
    assert logs.redact_text("from-config") == "***"


def test_api_key_from_env_then_file_then_credentials(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "tinker_api_key").write_text("from-credential")
    with_file = TinkerSettings(api_key_file=key_file)
    env = {"TINKER_API_KEY": " from-env ", "CREDENTIALS_DIRECTORY": str(creds)}

    def value(cfg: TinkerSettings, env: dict[str, str]) -> str | None:
        key = secrets.resolve_api_key(cfg, env)
        return None if key is None else key.get_secret_value()

    assert value(with_file, env) == "from-env"
    assert value(with_file, {"CREDENTIALS_DIRECTORY": str(creds)}) == "from-file"
    assert value(TinkerSettings(), {"CREDENTIALS_DIRECTORY": str(creds)}) == "from-credential"
    assert value(TinkerSettings(), {"CREDENTIALS_DIRECTORY": str(tmp_path)}) is None
    assert value(TinkerSettings(), {}) is None


def test_unreadable_key_file_names_the_path_not_the_content(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match="API key file not found") as caught:
        secrets.resolve_api_key(TinkerSettings(api_key_file=missing), {})
    assert str(missing) in str(caught.value)
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    with pytest.raises(ConfigError, match="API key file is empty"):
        secrets.resolve_api_key(TinkerSettings(api_key_file=empty), {})


def test_base_url_config_wins_over_env(tmp_path: Path) -> None:
    env = {"TINKER_BASE_URL": "http://from-env:1"}
    assert secrets.resolve_base_url(TinkerSettings(), env) == "http://from-env:1"
    assert secrets.resolve_base_url(TinkerSettings(), {}) == "http://127.0.0.1:8765"
    path = _write(tmp_path, ALERT_ONLY + "tinker: {base_url: 'http://from-config:2'}\n")
    cfg = config_loader.load_settings(path, env={})
    assert secrets.resolve_base_url(cfg.tinker, env) == "http://from-config:2"
