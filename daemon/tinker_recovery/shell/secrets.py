"""Where the Tinker API key (and base URL) come from.

API key, first found wins:
  1. `tinker.api_key` in the config (or TINKER_RECOVERY_TINKER__API_KEY),
  2. the environment variable TINKER_API_KEY (what the SDK itself reads),
  3. the file `tinker.api_key_file`,
  4. `$CREDENTIALS_DIRECTORY/tinker_api_key` (systemd `LoadCredential=tinker_api_key:...`).
Values are stripped of surrounding whitespace; an empty value counts as unset, except that a
configured `api_key_file` that is empty is an error (it was meant to hold the key). A file
that cannot be read raises ConfigError naming the path, never the content.

Base URL: the config wins when it sets `tinker.base_url` (YAML or its env override); only when
it does not is TINKER_BASE_URL (the SDK's variable) used; then the built-in default.

Whatever key is returned is registered with the log redactor first.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pydantic import SecretStr

from tinker_recovery.errors import ConfigError
from tinker_recovery.obs import logs
from tinker_recovery.settings import TinkerSettings

API_KEY_ENV = "TINKER_API_KEY"
BASE_URL_ENV = "TINKER_BASE_URL"
CREDENTIAL_NAME = "tinker_api_key"


def _read_key(path: Path, *, missing_ok: bool) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return None
        raise ConfigError(f"{path}: API key file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise ConfigError(f"{path}: cannot read API key file: {reason}") from None
    return text.strip()


def _found(value: str) -> SecretStr:
    logs.register_secret(value)
    return SecretStr(value)


def resolve_api_key(cfg: TinkerSettings, env: Mapping[str, str]) -> SecretStr | None:
    """The API key by the order above, or None when no source provides one."""
    if cfg.api_key is not None and (value := cfg.api_key.get_secret_value().strip()):
        return _found(value)
    if value := env.get(API_KEY_ENV, "").strip():
        return _found(value)
    if cfg.api_key_file is not None:
        from_file = _read_key(cfg.api_key_file, missing_ok=False)
        if not from_file:
            raise ConfigError(f"{cfg.api_key_file}: API key file is empty")
        return _found(from_file)
    if credentials := env.get("CREDENTIALS_DIRECTORY"):
        from_credential = _read_key(Path(credentials) / CREDENTIAL_NAME, missing_ok=True)
        if from_credential:
            return _found(from_credential)
    return None


def resolve_base_url(cfg: TinkerSettings, env: Mapping[str, str]) -> str:
    """`tinker.base_url` if the config set it, else TINKER_BASE_URL, else the default."""
    if "base_url" in cfg.model_fields_set:
        return cfg.base_url
    return env.get(BASE_URL_ENV, "").strip() or cfg.base_url
