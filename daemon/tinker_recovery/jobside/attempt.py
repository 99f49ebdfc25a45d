"""One handed-off attempt, as the job sees it: read from TINKER_RECOVERY_* or a handoff file.

The daemon's handoff passes the attempt as environment variables (command handoff) or as a JSON
body (webhook; also the format of the relay file `exec --write-handoff` writes). Both are parsed
here into one frozen `Handoff`. Stdlib only: this runs inside users' training jobs.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "TINKER_RECOVERY_"
TAG_PREFIX = "tinker_recovery."
FILE_EVENT = "tinker_recovery.handoff"

# environment variable -> field, exactly what shell/handoff.py's HandoffRequest.environment sends
_ENV_FIELDS = {
    "TINKER_RECOVERY_LINEAGE": "lineage_id",
    "TINKER_RECOVERY_CORRUPTED_RUN": "corrupted_run_id",
    "TINKER_RECOVERY_CHECKPOINT": "checkpoint_path",
    "TINKER_RECOVERY_ATTEMPT": "attempt",
    "TINKER_RECOVERY_IDEMPOTENCY_KEY": "idempotency_key",
    "TINKER_RECOVERY_RESTORE_OPTIMIZER": "restore_optimizer",
    "TINKER_RECOVERY_USER_METADATA": "user_metadata",
    "TINKER_RECOVERY_SOURCE_CHECKPOINT": "source_checkpoint_path",
}


class HandoffInvalid(ValueError):
    """The attempt's values are missing or malformed; the message says which one."""


@dataclass(frozen=True, slots=True)
class Handoff:
    """The attempt the daemon handed off: resume `lineage_id` from `checkpoint_path`."""

    lineage_id: str
    corrupted_run_id: str
    checkpoint_path: str
    attempt: int
    idempotency_key: str
    restore_optimizer: bool
    user_metadata: Mapping[str, str] = field(default_factory=dict)
    # With `restore: sdk`, checkpoint_path is a fresh copy of this original checkpoint.
    source_checkpoint_path: str | None = None

    @property
    def original_checkpoint_path(self) -> str:
        """The checkpoint the daemon chose, before any `restore: sdk` copy."""
        return self.source_checkpoint_path or self.checkpoint_path

    def environment(self) -> dict[str, str]:
        """The TINKER_RECOVERY_* variables a command handoff would have set for this attempt."""
        env = {
            "TINKER_RECOVERY_LINEAGE": self.lineage_id,
            "TINKER_RECOVERY_CORRUPTED_RUN": self.corrupted_run_id,
            "TINKER_RECOVERY_CHECKPOINT": self.checkpoint_path,
            "TINKER_RECOVERY_ATTEMPT": str(self.attempt),
            "TINKER_RECOVERY_IDEMPOTENCY_KEY": self.idempotency_key,
            "TINKER_RECOVERY_RESTORE_OPTIMIZER": "1" if self.restore_optimizer else "0",
            "TINKER_RECOVERY_USER_METADATA": json.dumps(dict(self.user_metadata), sort_keys=True),
        }
        if self.source_checkpoint_path is not None:
            env["TINKER_RECOVERY_SOURCE_CHECKPOINT"] = self.source_checkpoint_path
        return env

    def as_json(self) -> dict[str, Any]:
        """The webhook body's shape (and the relay file's)."""
        body: dict[str, Any] = {
            "event": FILE_EVENT,
            "lineage_id": self.lineage_id,
            "corrupted_run_id": self.corrupted_run_id,
            "checkpoint_path": self.checkpoint_path,
            "attempt": self.attempt,
            "idempotency_key": self.idempotency_key,
            "restore_optimizer": self.restore_optimizer,
            "user_metadata": dict(self.user_metadata),
        }
        if self.source_checkpoint_path is not None:
            body["source_checkpoint_path"] = self.source_checkpoint_path
        return body


def from_environment(environ: Mapping[str, str] | None = None) -> Handoff | None:
    """The attempt in `environ` (default os.environ); None when no checkpoint was handed off."""
    env = os.environ if environ is None else environ
    if not env.get("TINKER_RECOVERY_CHECKPOINT"):
        return None
    values: dict[str, Any] = {}
    for name, field_name in _ENV_FIELDS.items():
        if name in env:
            values[field_name] = env[name]
    raw_metadata = values.get("user_metadata", "{}")
    try:
        values["user_metadata"] = json.loads(raw_metadata)
    except ValueError:
        raise HandoffInvalid("TINKER_RECOVERY_USER_METADATA is not JSON") from None
    values["restore_optimizer"] = values.get("restore_optimizer", "1") not in ("0", "false", "")
    return _build(values, where="environment")


def from_json(body: Mapping[str, Any], *, where: str = "handoff") -> Handoff:
    """Parse a webhook body / relay file. Unknown keys are ignored (newer daemons add some)."""
    if body.get("event", FILE_EVENT) != FILE_EVENT:
        raise HandoffInvalid(f"{where}: event is {body.get('event')!r}, not {FILE_EVENT!r}")
    return _build(dict(body), where=where)


def _build(values: dict[str, Any], *, where: str) -> Handoff:
    def text(name: str, *, required: bool = True) -> str | None:
        value = values.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            raise HandoffInvalid(f"{where}: {name} is missing or not a string")
        return value

    try:
        attempt = int(values.get("attempt", 0))
    except (TypeError, ValueError):
        raise HandoffInvalid(f"{where}: attempt is not a number") from None
    metadata = values.get("user_metadata") or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise HandoffInvalid(f"{where}: user_metadata must map strings to strings")
    restore_optimizer = values.get("restore_optimizer", True)
    if not isinstance(restore_optimizer, bool):
        raise HandoffInvalid(f"{where}: restore_optimizer must be true or false")
    return Handoff(
        lineage_id=text("lineage_id") or "",
        corrupted_run_id=text("corrupted_run_id") or "",
        checkpoint_path=text("checkpoint_path") or "",
        attempt=attempt,
        idempotency_key=text("idempotency_key") or "",
        restore_optimizer=restore_optimizer,
        user_metadata=dict(metadata),
        source_checkpoint_path=text("source_checkpoint_path", required=False),
    )


def read_file(path: Path) -> Handoff | None:
    """The attempt in a relay file; None if there is none. Raises HandoffInvalid if unreadable."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise HandoffInvalid(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        body = json.loads(raw)
    except ValueError:
        raise HandoffInvalid(f"{path}: not JSON") from None
    if not isinstance(body, dict):
        raise HandoffInvalid(f"{path}: not a JSON object")
    return from_json(body, where=str(path))


def write_file(path: Path, handoff: Handoff) -> None:
    """Replace `path` atomically (temp file in the same directory, fsync, rename, fsync dir)."""
    data = (json.dumps(handoff.as_json(), sort_keys=True, indent=2) + "\n").encode()
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_directory(directory)


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (best effort: not every file system allows it)."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
