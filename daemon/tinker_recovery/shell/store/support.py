"""Pieces both backends share: the migration files and the fencing state of one store instance.

Migrations are numbered files `NNNN_name.sql` under `migrations/<dialect>/`, applied in order
and recorded in a `schema_version` table. Each file is split on `;` into statements, so a file
must not put `;` inside string literals or bodies, and comments take whole lines (`-- ...`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Literal

from tinker_recovery.errors import FencedOut

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


def load_migrations(dialect: Literal["sqlite", "postgres"]) -> list[Migration]:
    """The migrations shipped with the package for one dialect, oldest first."""
    folder = resources.files(__package__).joinpath("migrations", dialect)
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match is None:
            continue
        found.append(
            Migration(
                version=int(match.group(1)),
                name=match.group(2),
                statements=split_statements(entry.read_text(encoding="utf-8")),
            )
        )
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate {dialect} migration numbers: {versions}")
    return found


def split_statements(script: str) -> tuple[str, ...]:
    lines = [line for line in script.splitlines() if not line.lstrip().startswith("--")]
    parts = (part.strip() for part in "\n".join(lines).split(";"))
    return tuple(part for part in parts if part)


@dataclass(slots=True)
class FenceState:
    """What one store instance knows about its own leadership.

    A store that never asked for the lease (the CLI, single-process tools, tests) writes
    unfenced. Once `acquire_or_renew` has been called the instance is *engaged*: from then on
    every fenced write needs the lease row to still carry this holder and epoch, unexpired,
    checked in the same transaction as the write.
    """

    engaged: bool = False
    holder: str | None = None
    epoch: int | None = None

    def held(self, epoch: int | None = None) -> tuple[str, int] | None:
        """(holder, epoch) a fenced write must find on the lease row: the work's own epoch
        when it names one, else the latest this instance was granted."""
        wanted = self.epoch if epoch is None else epoch
        if self.holder is None or wanted is None:
            return None
        return self.holder, wanted

    def refuse(self, epoch: int | None = None) -> FencedOut:
        if self.holder is None:
            return FencedOut("this replica does not hold the leader lease; write refused")
        wanted = self.epoch if epoch is None else epoch
        return FencedOut(
            f"replica {self.holder} no longer holds the leader lease of epoch {wanted}"
            f" (latest granted: {self.epoch}); write refused"
        )
