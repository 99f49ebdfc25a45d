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


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def _error(path: Path, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        config_loader.load_settings(path, env={} if env is None else env)
    return str(caught.value)


def test_valid_file_loads_with_env_override(tmp_path: Path) -> None:
    path = _write(tmp_path, "poll:\n  interval: 5m\nlog: {level: debug}\n")
    cfg = config_loader.load_settings(path, env={"TINKER_RECOVERY_LOG__FORMAT": "console"})
    assert cfg.poll.interval == 300.0
    assert cfg.log.level == "debug"
    assert cfg.log.format == "console"


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    cfg = config_loader.load_settings(_write(tmp_path, ""), env={})
    assert cfg.poll.interval == 30.0


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
    assert message.startswith("env: ")


def test_cross_field_error_is_reported(tmp_path: Path) -> None:
    path = _write(tmp_path, "policy:\n  rules:\n    - {name: a, handoff: nowhere}\n")
    assert "no handoff named 'nowhere'" in _error(path)


def test_render_effective_masks_every_secret(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "tinker: {api_key: key-1234567}\n"
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
    assert {"restart_unit", "notify_scheduler", "in_process"} <= set(cfg.handoffs)
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
    path = _write(tmp_path, "tinker: {base_url: 'http://from-config:2'}\n")
    cfg = config_loader.load_settings(path, env={})
    assert secrets.resolve_base_url(cfg.tinker, env) == "http://from-config:2"
