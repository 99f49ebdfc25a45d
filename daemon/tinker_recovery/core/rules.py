"""Rule matching: ordered rules, first match wins.

Run attributes come from the service and `user_metadata` comes from users, so everything on the
run side is treated as hostile: values are only ever compared with `fnmatchcase` against globs
from the operator's config (never compiled as patterns themselves), non-string values never match,
and Python's glob translation keeps `*` atomic, so huge values cost linear time, not exponential.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase

from tinker_recovery.core.model import RunView
from tinker_recovery.settings import Match, Rule

ABSENT_PREFIX = "!"  # a label selector key "!k" means: user_metadata has no key k


def match_rule(run: RunView, rules: Sequence[Rule]) -> Rule | None:
    """The first rule whose `match` accepts the run, or None (the run is then ignored)."""
    for rule in rules:
        if matches(run, rule.match):
            return rule
    return None


def matches(run: RunView, match: Match) -> bool:
    """True when every field given in `match` accepts the run; an empty match accepts all."""
    if match.is_lora is not None and match.is_lora is not run.is_lora:
        return False
    globs = ((match.run_id, run.run_id), (match.base_model, run.base_model))
    if not all(_glob(pattern, value) for pattern, value in globs):
        return False
    if not _glob(match.owner, run.owner):
        return False
    return all(_label(run.user_metadata, key, pattern) for key, pattern in match.labels.items())


def _glob(pattern: str | None, value: object) -> bool:
    if pattern is None:
        return True
    return isinstance(value, str) and fnmatchcase(value, pattern)


def _label(metadata: Mapping[str, str], key: str, pattern: str) -> bool:
    if key.startswith(ABSENT_PREFIX):
        return key[len(ABSENT_PREFIX) :] not in metadata
    if key not in metadata:
        return False
    return _glob(pattern, metadata[key])
