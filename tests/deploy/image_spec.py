"""The runtime stage of the Dockerfile as data, for tests that check or replay it.

dockerfile-parse handles continuation lines, comments and ENV syntax; this module only picks
out the final stage and decodes the JSON (exec) forms the tests rely on. A shell-form
ENTRYPOINT, CMD or HEALTHCHECK is rejected on purpose: exec form keeps tini as PID 1's only
child and lets the tests run the exact argv.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from deploy_paths import REPO
from dockerfile_parse import DockerfileParser

DOCKERFILE = REPO / "Dockerfile"


@dataclass(frozen=True)
class Copy:
    sources: tuple[str, ...]
    dest: str
    from_stage: str | None


@dataclass(frozen=True)
class ImageSpec:
    base_images: tuple[str, ...]
    env: dict[str, str]
    user: str
    workdir: str
    volumes: tuple[str, ...]
    expose: tuple[int, ...]
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    healthcheck_options: dict[str, str]
    healthcheck: tuple[str, ...]
    runs: tuple[str, ...]
    copies: tuple[Copy, ...] = field(default=())

    @property
    def uid(self) -> int:
        return int(self.user.split(":")[0])


def _exec_form(instruction: str, value: str) -> tuple[str, ...]:
    decoded = json.loads(value)
    if not (isinstance(decoded, list) and all(isinstance(part, str) for part in decoded)):
        raise ValueError(f"{instruction} must use the JSON exec form, got {value!r}")
    return tuple(decoded)


def _copy(value: str) -> Copy:
    words = shlex.split(value)
    flags = [w for w in words if w.startswith("--")]
    paths = [w for w in words if not w.startswith("--")]
    from_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
    return Copy(sources=tuple(paths[:-1]), dest=paths[-1], from_stage=from_stage)


def _healthcheck(value: str) -> tuple[dict[str, str], tuple[str, ...]]:
    options_text, sep, command = value.partition("CMD")
    if not sep:
        raise ValueError("HEALTHCHECK must have a CMD")
    options = {}
    for word in options_text.split():
        key, _, val = word.removeprefix("--").partition("=")
        options[key] = val
    return options, _exec_form("HEALTHCHECK CMD", command.strip())


def load(path: Path = DOCKERFILE) -> ImageSpec:
    parser = DockerfileParser(path=str(path))
    structure = parser.structure
    froms = [i for i, item in enumerate(structure) if item["instruction"] == "FROM"]
    final = structure[froms[-1] :]
    fields: dict[str, list[str]] = {}
    for item in final:
        fields.setdefault(item["instruction"], []).append(item["value"])

    def last(instruction: str, default: str = "") -> str:
        return fields.get(instruction, [default])[-1]

    volumes: list[str] = []
    for value in fields.get("VOLUME", []):
        volumes.extend(json.loads(value) if value.startswith("[") else value.split())
    options, health = _healthcheck(last("HEALTHCHECK"))
    return ImageSpec(
        base_images=tuple(parser.parent_images),
        env=dict(parser.envs),
        user=last("USER", "0"),
        workdir=last("WORKDIR", "/"),
        volumes=tuple(volumes),
        expose=tuple(int(v.split("/")[0]) for v in " ".join(fields.get("EXPOSE", [])).split()),
        entrypoint=_exec_form("ENTRYPOINT", last("ENTRYPOINT", "[]")),
        cmd=_exec_form("CMD", last("CMD", "[]")),
        healthcheck_options=options,
        healthcheck=health,
        runs=tuple(fields.get("RUN", [])),
        copies=tuple(_copy(v) for v in fields.get("COPY", [])),
    )


def context_sources(path: Path = DOCKERFILE) -> list[str]:
    """Every path any stage copies from the build context (not from another stage)."""
    parser = DockerfileParser(path=str(path))
    copies = [_copy(i["value"]) for i in parser.structure if i["instruction"] in ("COPY", "ADD")]
    return [source for c in copies if c.from_stage is None for source in c.sources]
