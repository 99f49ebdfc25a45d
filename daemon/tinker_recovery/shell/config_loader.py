"""Load the YAML config into `Settings`, with errors an operator can act on.

Owns: reading the file (a missing or unreadable file is an error, never silent defaults),
turning YAML and validation errors into `file:line:col: field.path: message` lines (or
`env NAME: field.path: message` when the bad value came from the environment), printing the
effective config with every secret masked, and the JSON Schema of the config.

It must not log secrets nor put input values into messages: pydantic's messages for our
fields carry no input, and we never append `input`.

Hostile files are bounded before they cost anything: a file over `MAX_CONFIG_BYTES` is refused
unread, nesting deep enough to exhaust the composer's recursion is an error, and YAML aliases may
add at most `MAX_ALIAS_EXPANSION` nodes to the document (a "billion laughs" file is a few hundred
bytes that expand to 10**9 nodes); every walk visits a shared node once.

One validation for `run` and `check-config`: `load_settings` (both call it) validates the
models, then builds what `run` builds from them without side effects (each handoff action via
`handoff.build_handoff`, the store object via `open_store`, neither connects nor opens files) and
applies the cross-checks a model cannot see (a `recover` rule that could never hand off). Each
refusal is located like a validation error. `preflight` also returns warnings: facts about this
machine that may differ where the daemon runs (a command handoff's executable missing from
PATH), which refuse nothing.

Run `python -m tinker_recovery.shell.config_loader --schema` to print the JSON Schema
(`config/schema.json` is that output, checked by a test).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import httpx
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
from tinker_recovery.shell import handoff, procs
from tinker_recovery.shell.clock import SystemClock
from tinker_recovery.shell.store import open_store

MASK = logs.MASK
# A config is a few kilobytes; a megabyte is already a mistake (or a file meant to hurt).
MAX_CONFIG_BYTES = 1024 * 1024
# Nodes aliases may add on top of the document as written. Real configs reuse a block or two
# (a few hundred nodes); an alias bomb needs millions.
MAX_ALIAS_EXPANSION = 100_000
# Our schema is six levels deep; PyYAML's pure-Python composer and scanner slow down (and then
# overflow the stack) on thousands of levels, so anything far deeper is refused.
MAX_DEPTH = 64
# libyaml (C) composes in linear time and caps nesting itself; the pure-Python scanner is
# quadratic in flow nesting. Fall back to it only where PyYAML was built without libyaml.
_COMPOSER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Preflight:
    """What `run` would start with, and the warnings an operator should read first."""

    settings: settings.Settings
    warnings: list[str] = field(default_factory=list)


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
        with path.open("rb") as file:
            # Read one byte past the cap rather than trusting st_size (FIFOs, /proc, growth).
            data = file.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{path}: config file is larger than {MAX_CONFIG_BYTES // 1024} KiB; refusing "
                "to parse it"
            )
        return data.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{path}: cannot read config file: {reason}") from None


def load_settings(path: Path, *, env: Mapping[str, str] | None = None) -> settings.Settings:
    """Validate `path` (+ `env`, default `os.environ`) into Settings, or raise ConfigError.

    The one validation `run` and `check-config` share (see `preflight` for its warnings).
    Registers every secret found in the result with the log redactor.
    """
    return preflight(path, env=env).settings


def preflight(path: Path, *, env: Mapping[str, str] | None = None) -> Preflight:
    """`load_settings` plus warnings; raises ConfigError with one located line per refusal."""
    text = _read(path)
    root = _compose(path, text)
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
        raise ConfigError(_env_parse_error(exc, env)) from None
    except yaml.YAMLError as exc:  # composed fine, but e.g. a !!python tag safe_load refuses
        raise ConfigError(yaml_error_line(path, exc)) from None

    from_env = _env_names(env)
    env_map = os.environ if env is None else env
    if refusals := [
        located(path, root, loc, message, from_env)
        for loc, message in runtime_refusals(loaded, env_map)
    ]:
        raise ConfigError("\n".join(refusals))
    warnings = [
        "warning: " + located(path, root, loc, message, from_env)
        for loc, message in machine_warnings(loaded, env_map)
    ]

    for secret in _secret_values(loaded):
        logs.register_secret(secret)
    return Preflight(loaded, warnings)


# -- hostile input -----------------------------------------------------------------------------


def _compose(path: Path, text: str) -> yaml.Node | None:
    try:
        root = yaml.compose(text, Loader=_COMPOSER)
    except yaml.YAMLError as exc:
        if "maximum nesting depth" in str(exc):
            raise ConfigError(f"{path}: yaml: the document is nested too deeply") from None
        raise ConfigError(yaml_error_line(path, exc)) from None
    except RecursionError:
        raise ConfigError(f"{path}: yaml: the document is nested too deeply") from None
    if root is not None and not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path}:1:1: the config must be a mapping of sections")
    if root is not None:
        _check_alias_expansion(path, root)
    return root


def _children(node: yaml.Node) -> Iterator[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            yield key_node
            yield value_node
    elif isinstance(node, yaml.SequenceNode):
        yield from node.value


def _refusal(path: Path, node: yaml.Node, problem: str) -> ConfigError:
    mark = node.start_mark
    return ConfigError(f"{path}:{mark.line + 1}:{mark.column + 1}: yaml: {problem}")


def _check_alias_expansion(path: Path, root: yaml.Node) -> None:
    """Refuse aliases that loop or expand the document by more than MAX_ALIAS_EXPANSION nodes,
    and nesting deeper than MAX_DEPTH.

    The composer shares one node object per anchor, so the graph is small even when its
    expansion is astronomically large: count each node's expanded size once (memoised,
    iterative, so neither time nor the stack depends on the expansion).
    """
    sizes: dict[int, int] = {}  # id(node) -> nodes it expands to, itself included
    on_path: set[int] = set()  # nodes whose children are still being counted
    shared: list[yaml.Node] = []  # nodes reached a second time: the targets of aliases
    stack: list[tuple[yaml.Node, bool, int]] = [(root, False, 1)]
    while stack:
        node, children_done, depth = stack.pop()
        if children_done:
            on_path.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in _children(node))
        elif id(node) in on_path:
            raise _refusal(path, node, "an alias refers to the node that contains it")
        elif id(node) in sizes:
            shared.append(node)
        elif depth > MAX_DEPTH:
            raise _refusal(path, node, f"nested more than {MAX_DEPTH} levels deep")
        else:
            on_path.add(id(node))
            stack.append((node, True, depth))
            stack.extend((child, False, depth + 1) for child in _children(node))
    expansion = sizes[id(root)] - len(sizes)
    if expansion > MAX_ALIAS_EXPANSION:
        worst = max(shared, key=lambda node: sizes[id(node)], default=root)
        raise _refusal(
            path,
            worst,
            f"aliases expand the document by more than {MAX_ALIAS_EXPANSION} nodes (an alias "
            "bomb?); write the values out",
        )


def _env_parse_error(exc: SettingsError, env: Mapping[str, str] | None) -> str:
    """Name the variable whose JSON value did not parse (pydantic-settings names the section)."""
    source = os.environ if env is None else env
    section = re.search(r'field "([^"]+)"', str(exc))
    prefix = ("tinker_recovery_" + section.group(1) + "__") if section else "tinker_recovery_"
    candidates = sorted(
        name
        for name in source
        if name.lower().startswith(prefix) or name.lower() == prefix.removesuffix("__")
    )
    for name in candidates:
        try:
            json.loads(source[name])
        except json.JSONDecodeError as bad:
            # Position only: the value may hold a secret, so it never goes into the message.
            return f"env {name}: not valid JSON: {bad.msg} at line {bad.lineno} column {bad.colno}"
    shown = ", ".join(candidates) or (section.group(1) if section else "?")
    return f"env {shown}: a value does not parse as JSON"


# -- what `run` would refuse once the models are valid ------------------------------------------


def runtime_refusals(cfg: settings.Settings, env: Mapping[str, str]) -> list[tuple[Loc, str]]:
    """(config path, message) for everything `run` would refuse after validation succeeded."""
    found: list[tuple[Loc, str]] = []
    found += _handoff_refusals(cfg)
    try:
        # The same constructor `run` calls; it only parses the URL (no file, no connection).
        open_store(cfg.state.url, clock=SystemClock(), state_directory=env.get("STATE_DIRECTORY"))
    except ConfigError as exc:
        found.append((("state", "url"), str(exc)))
    if not cfg.policy.rules:
        found.append(
            (
                ("policy", "rules"),
                "no rules: every run would be ignored (omit the key for the "
                "default rule, or add at least one)",
            )
        )
    for i, rule in enumerate(cfg.policy.rules):
        found += [(("policy", "rules", i, "match", *at), why) for at, why in _glob_errors(rule)]
        if rule.action == "recover" and rule.handoff is None and rule.restore != "sdk":
            found.append(
                (
                    ("policy", "rules", i, "handoff"),
                    f"rule {rule.name!r} recovers but names no handoff and restore is "
                    f"{rule.restore!r}: every attempt would fail; name a handoff, set "
                    "restore: sdk, or use action: alert",
                )
            )
    return found


def _glob_errors(rule: settings.Rule) -> list[tuple[Loc, str]]:
    """Globs fnmatch would take literally although the author meant a pattern."""
    globs: list[tuple[Loc, str | None]] = [
        (("run_id",), rule.match.run_id),
        (("base_model",), rule.match.base_model),
        (("owner",), rule.match.owner),
    ]
    globs += [(("labels", key), value) for key, value in rule.match.labels.items()]
    found: list[tuple[Loc, str]] = []
    for at, pattern in globs:
        if pattern is not None and (problem := glob_problem(pattern)):
            found.append((at, problem))
    return found


def glob_problem(pattern: str) -> str | None:
    """Why `pattern` is not the glob it looks like, or None.

    fnmatch never fails: an unclosed `[` silently becomes a literal character, so `[abc`
    matches only the text "[abc". That is never what the author meant; `[[]` is the literal.
    """
    i = 0
    while i < len(pattern):
        if pattern[i] != "[":
            i += 1
            continue
        j = i + 1
        if j < len(pattern) and pattern[j] == "!":
            j += 1
        if j < len(pattern) and pattern[j] == "]":
            j += 1  # a leading ] is a member of the set
        while j < len(pattern) and pattern[j] != "]":
            j += 1
        if j >= len(pattern):
            return (
                f"invalid glob: the '[' at position {i + 1} is never closed (write [[] for a "
                "literal '[')"
            )
        i = j + 1
    return None


_ARGV_PREFIX = re.compile(r"^handoff argv\[(\d+)\]: ")


def _handoff_refusals(cfg: settings.Settings) -> list[tuple[Loc, str]]:
    found: list[tuple[Loc, str]] = []
    # Never used to send anything: the preflight only constructs the actions.
    unused = httpx.AsyncClient(transport=httpx.MockTransport(lambda _: httpx.Response(500)))
    runner = procs.SubprocessRunner()
    for name, entry in cfg.handoffs.items():
        try:
            handoff.build_handoff(entry, runner=runner, http=unused, clock=SystemClock())
        except ConfigError as exc:
            message = str(exc)
            loc: Loc = ("handoffs", name)
            if match := _ARGV_PREFIX.match(message):
                loc += ("argv", int(match.group(1)))
                message = message[match.end() :]
            elif isinstance(entry, settings.WebhookHandoff):
                loc += ("url",)
            elif isinstance(entry, settings.PythonHandoff):
                loc += ("entry_point",)
            found.append((loc, message.removeprefix("handoff ")))
    return found


def machine_warnings(cfg: settings.Settings, env: Mapping[str, str]) -> list[tuple[Loc, str]]:
    """Facts of this machine that would make handoffs fail here (may differ where `run` runs).

    A missing executable is a warning, not an error: check-config often runs elsewhere (CI, a
    laptop) than the daemon, the daemon's PATH differs (systemd), and a job's script may be
    deployed after the daemon's config. The attempt would fail with a clear reason anyway.
    """
    found: list[tuple[Loc, str]] = []
    for name, entry in cfg.handoffs.items():
        if not isinstance(entry, settings.CommandHandoff):
            continue
        program = entry.argv[0]
        if "{" in program:
            continue  # filled in per attempt
        if os.sep in program:
            base = entry.cwd if entry.cwd is not None else Path.cwd()
            target = Path(program) if Path(program).is_absolute() else base / program
            if not (target.is_file() and os.access(target, os.X_OK)):
                found.append(
                    (("handoffs", name, "argv", 0), f"{program}: no executable file there")
                )
        elif shutil.which(program, path=entry.env.get("PATH", env.get("PATH"))) is None:
            found.append((("handoffs", name, "argv", 0), f"{program}: not found on PATH"))
    return found


def located(
    path: Path, root: yaml.Node | None, loc: Loc, message: str, from_env: dict[tuple[str, ...], str]
) -> str:
    """`file:line:col: field.path: message`, or `env NAME: ...` when env set the value."""
    lowered = tuple(str(k).lower() for k in loc)
    blamed = next((name for p, name in from_env.items() if _overlaps(p, lowered)), None)
    if blamed is not None:
        return f"env {blamed}: {_dotted(loc)}: {message}"
    mark, shown = _locate(root, loc, at_key=False)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else f"{path}"
    return f"{where}: {shown}: {message}"


# -- locating errors -------------------------------------------------------------------------


def yaml_error_line(path: Path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return f"{path}: yaml: {problem}"
    return f"{path}:{mark.line + 1}:{mark.column + 1}: yaml: {problem}"


def _duplicate_keys(
    path: Path, node: yaml.Node | None, at: str = "", visited: set[int] | None = None
) -> list[str]:
    """Equal keys in one mapping. Each node is visited once, however many aliases share it."""
    visited = set() if visited is None else visited
    found: list[str] = []
    if node is None or id(node) in visited:
        return found
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            where = f"{at}.{key}" if at else key
            if key in seen:
                mark = key_node.start_mark
                found.append(f"{path}:{mark.line + 1}:{mark.column + 1}: {where}: duplicate key")
            seen.add(key)
            found += _duplicate_keys(path, value_node, where, visited)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found += _duplicate_keys(path, item, f"{at}[{i}]", visited)
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
