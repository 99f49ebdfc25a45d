"""Load the YAML config into `Settings`, with errors an operator can act on.

Owns: reading the file (a missing or unreadable file is an error, never silent defaults),
turning YAML and validation errors into `file:line:col: field.path: message` lines (or
`env NAME: field.path: message` when the bad value came from the environment), printing the
effective config with every secret masked, and the JSON Schema of the config.

It must not log secrets nor put input values into messages: pydantic's messages for our
fields carry no input, and we never append `input`.

Run `python -m tinker_recovery.shell.config_loader --schema` to print the JSON Schema
(`config/schema.json` is that output, checked by a test).
"""

from __future__ import annotations

import json
import os
import sys
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from tinker_recovery import settings
from tinker_recovery.errors import ConfigError
from tinker_recovery.obs import logs

MASK = logs.MASK


class _MappingEnvSource(EnvSettingsSource):
    """The stock env source, reading a given mapping instead of `os.environ` (tests, reload)."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._given_env = dict(env)
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        if self.case_sensitive:
            return dict(self._given_env)
        return {k.lower(): v for k, v in self._given_env.items()}


def _settings_class(path: Path, env: Mapping[str, str] | None) -> type[settings.Settings]:
    """`settings.load`'s file-backed subclass, with the env source swapped when `env` is given.

    Source order stays whatever `Settings.settings_customise_sources` says.
    """

    class _Loaded(settings.Settings):
        model_config = SettingsConfigDict(yaml_file=path)

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            if env is not None:
                env_settings = _MappingEnvSource(settings_cls, env)
            return super().settings_customise_sources(
                settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
            )

    return _Loaded


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{path}: cannot read config file: {reason}") from None


def load_settings(path: Path, *, env: Mapping[str, str] | None = None) -> settings.Settings:
    """Validate `path` (+ `env`, default `os.environ`) into Settings, or raise ConfigError.

    Registers every secret found in the result with the log redactor.
    """
    text = _read(path)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_error_line(path, exc)) from None
    if root is not None and not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path}:1:1: the config must be a mapping of sections")
    if duplicates := _duplicate_keys(path, root):
        # PyYAML keeps the last of two equal keys silently; an operator would not expect that.
        raise ConfigError("\n".join(duplicates))

    try:
        loaded = _settings_class(path, env)()
    except ValidationError as exc:
        lines = error_lines(path, root, exc, env=env)
        raise ConfigError("\n".join(lines)) from None
    except SettingsError as exc:
        # Raised by the env source when a complex value (JSON) from env does not parse.
        raise ConfigError(f"env: {exc}") from None
    except yaml.YAMLError as exc:  # composed fine, but e.g. a !!python tag safe_load refuses
        raise ConfigError(yaml_error_line(path, exc)) from None

    for secret in _secret_values(loaded):
        logs.register_secret(secret)
    return loaded


# -- locating errors -------------------------------------------------------------------------


def yaml_error_line(path: Path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return f"{path}: yaml: {problem}"
    return f"{path}:{mark.line + 1}:{mark.column + 1}: yaml: {problem}"


def _duplicate_keys(path: Path, node: yaml.Node | None, at: str = "") -> list[str]:
    found: list[str] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            where = f"{at}.{key}" if at else key
            if key in seen:
                mark = key_node.start_mark
                found.append(f"{path}:{mark.line + 1}:{mark.column + 1}: {where}: duplicate key")
            seen.add(key)
            found += _duplicate_keys(path, value_node, where)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found += _duplicate_keys(path, item, f"{at}[{i}]")
    return found


def _lookup(node: yaml.Node, key: str | int) -> tuple[yaml.Node, yaml.Node] | None:
    """(key node, value node) of `key` in a mapping, or (item, item) of index `key` in a list."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(key):
                return key_node, value_node
    elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
        item: yaml.Node = node.value[key]
        return item, item
    return None


def _is_tag(node: yaml.Node, key: str | int) -> bool:
    # Discriminated unions (handoffs) put the `type` value into the loc; it is no YAML key.
    found = _lookup(node, "type")
    return found is not None and isinstance(found[1], yaml.ScalarNode) and found[1].value == key


def _locate(
    root: yaml.Node | None, loc: tuple[str | int, ...], *, at_key: bool
) -> tuple[yaml.Mark | None, str]:
    """Walk `loc` down the composed YAML: (mark of the deepest node reached, display path).

    A bad value points at the value (`at_key`: at its key, for unknown keys); a missing key
    at the mapping that lacks it.
    """
    node, mark = root, root.start_mark if root is not None else None
    shown: list[str | int] = []
    for i, key in enumerate(loc):
        if node is None:
            shown.extend(loc[i:])
            break
        found = _lookup(node, key)
        if found is None:
            if _is_tag(node, key):
                continue
            shown.extend(k for k in loc[i:] if not _is_tag(node, k))
            break
        key_node, node = found
        mark = key_node.start_mark if at_key and i == len(loc) - 1 else node.start_mark
        shown.append(key)
    return mark, _dotted(shown)


def _dotted(loc: list[str | int] | tuple[str | int, ...]) -> str:
    out = ""
    for key in loc:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out or "(root)"


def _env_names(env: Mapping[str, str] | None) -> dict[tuple[str, ...], str]:
    """Config paths set from the environment -> the variable that set them."""
    source = env if env is not None else os.environ
    prefix = "tinker_recovery_"
    found: dict[tuple[str, ...], str] = {}
    for name in source:
        if name.lower().startswith(prefix) and len(name) > len(prefix):
            found[tuple(name[len(prefix) :].lower().split("__"))] = name
    return found


def _overlaps(env_path: tuple[str, ...], loc: tuple[str, ...]) -> bool:
    if not loc:
        return False
    shorter = min(len(env_path), len(loc))
    return env_path[:shorter] == loc[:shorter]


def _message(error: Mapping[str, Any]) -> str:
    msg = str(error["msg"])
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def error_lines(
    path: Path, root: yaml.Node | None, exc: ValidationError, *, env: Mapping[str, str] | None
) -> list[str]:
    """One located line per validation error, blaming env when env set the value."""
    from_env = _env_names(env)
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        loc = tuple(error["loc"])
        message = _message(error)
        lowered = tuple(str(k).lower() for k in loc)
        # Env set this value, or a whole section above it (a JSON value), or a key below it.
        blamed = next(
            (name for p, name in from_env.items() if _overlaps(p, lowered)),
            None,
        )
        if blamed is not None:
            lines.append(f"env {blamed}: {_dotted(loc)}: {message}")
            continue
        mark, shown = _locate(root, loc, at_key=error["type"] == "extra_forbidden")
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else f"{path}"
        lines.append(f"{where}: {shown}: {message}")
    return lines


def url_password(value: str) -> str | None:
    """The password in `scheme://user:password@host/...`, if `value` is such a URL."""
    if "://" not in value or "@" not in value:
        return None
    try:
        return urllib.parse.urlsplit(value).password
    except ValueError:
        return None


def mask_url_password(value: str, mask: str) -> str:
    password = url_password(value)
    if not password:
        return value
    parts = urllib.parse.urlsplit(value)
    user, _, host = parts.netloc.rpartition("@")
    name = user.split(":", 1)[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{name}:{mask}@{host}"))


# -- secrets and rendering -------------------------------------------------------------------


def _secret_values(model: BaseModel) -> list[str]:
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, SecretStr):
            found.append(value.get_secret_value())
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name))
        elif isinstance(value, Mapping):
            for item in value.values():
                walk(item)
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)
        elif isinstance(value, str) and (password := url_password(value)):
            found.append(password)

    walk(model)
    return found


def _is_duration(info: FieldInfo) -> bool:
    """A `settings.Duration` field, optional or not (its parser is among the validators)."""

    def parses(metadata: Any) -> bool:
        return any(
            isinstance(m, BeforeValidator) and m.func is settings.parse_duration_s for m in metadata
        )

    return parses(info.metadata) or any(
        parses(getattr(arg, "__metadata__", ())) for arg in get_args(info.annotation)
    )


def _masked(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return MASK
    if isinstance(value, BaseModel):
        shown = {}
        for name, info in type(value).model_fields.items():
            field = getattr(value, name)
            is_seconds = isinstance(field, float) and _is_duration(info)
            # Durations as written in the file (30s, 15m), not as float seconds.
            shown[name] = settings.format_duration(field) if is_seconds else _masked(field)
        return shown
    if isinstance(value, Mapping):
        return {str(k): _masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(v) for v in value]
    if isinstance(value, str):
        return mask_url_password(value, MASK)
    if isinstance(value, Path):
        return str(value)
    return value


def render_effective(cfg: settings.Settings) -> str:
    """YAML of the effective config; SecretStr fields and URL passwords shown as "***"."""
    return yaml.safe_dump(_masked(cfg), sort_keys=False, default_flow_style=False)


class _ConfigSchema(GenerateJsonSchema):
    """Durations are validated from `30s`/`5m`/`24h` strings too: say so in the schema."""

    def function_before_schema(
        self, schema: core_schema.BeforeValidatorFunctionSchema
    ) -> JsonSchemaValue:
        if schema["function"].get("function") is settings.parse_duration_s:
            return {
                "anyOf": [
                    {"type": "number", "minimum": 0},
                    {"type": "string", "pattern": settings._DURATION.pattern},
                ],
                "description": "seconds, or a duration such as 30s, 5m, 24h, 250ms, 1d",
            }
        return super().function_before_schema(schema)


def json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of the YAML config file."""
    schema = settings.Settings.model_json_schema(schema_generator=_ConfigSchema)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "tinker-recovery configuration"
    return schema


def schema_text() -> str:
    """`json_schema()` as committed in config/schema.json."""
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def _main(argv: list[str]) -> int:
    if argv == ["--schema"]:
        sys.stdout.write(schema_text())
        return 0
    sys.stderr.write("usage: python -m tinker_recovery.shell.config_loader --schema\n")
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
