"""Rich output for the command line: tables that wrap and are never cut, colour only on a TTY.

Cell values are taken as plain text (never rich markup) and flattened to one line, so a hostile
run tag cannot fake rows or styles. `-o wide` lays every column out at full width and adds the
detail columns; the default table wraps long values (reasons) inside their column instead.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import IO, Literal

from rich.console import Console
from rich.table import Table
from rich.text import Text

Output = Literal["table", "wide", "json"]
# Wide output never wraps: lines may be as long as their content (pipe it to `less -S`).
WIDE_WIDTH = 100_000
# A wrapped column (a reason) keeps at least this many characters a line.
MIN_WRAP_WIDTH = 20
COLUMN_GAP = 2  # rich's default cell padding: one space each side


def console(output: Output, file: IO[str] | None = None) -> Console:
    """Colour only when the stream is a terminal (rich also honours NO_COLOR and TERM=dumb).
    Off a terminal, tables are laid out for COLUMNS columns (80 when unset)."""
    stream = file if file is not None else sys.stdout
    width = WIDE_WIDTH if output == "wide" else None
    return Console(file=stream, width=width, highlight=False, soft_wrap=False, emoji=False)


def flat(value: object) -> str:
    text = "" if value is None else str(value)
    return " ".join(text.replace("\r", " ").replace("\n", " ").split(" "))


def table(
    out: Console,
    header: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    wrap: Sequence[str] = ("REASON",),
    title: str | None = None,
) -> None:
    """Print rows; the `wrap` columns fold inside their width, the others keep one line at full
    width. Nothing is ever cut: when the one-line columns alone need more than the terminal
    has, the table is laid out wider than the terminal instead."""
    wide = out.width >= WIDE_WIDTH
    cells = [[flat(cell) for cell in row] for row in rows]
    natural = [max([len(name), *(len(row[i]) for row in cells)]) for i, name in enumerate(header)]
    folds = [name in wrap and not wide for name in header]
    needed = sum(
        min(width, MIN_WRAP_WIDTH) if fold else width
        for width, fold in zip(natural, folds, strict=True)
    ) + COLUMN_GAP * (len(header) - 1)
    grid = Table(
        box=None,
        show_edge=False,
        pad_edge=False,
        header_style="bold",
        title=title,
        title_justify="left",
        title_style="bold",
        expand=False,
    )
    for name, width, fold in zip(header, natural, folds, strict=True):
        grid.add_column(
            name,
            overflow="fold",
            no_wrap=not fold,
            min_width=min(width, MIN_WRAP_WIDTH) if fold else width,
        )
    for row in cells:
        grid.add_row(*(Text(cell) for cell in row))
    terminal = out.width
    out.width = max(terminal, needed)  # print(width=) can only narrow, never widen
    try:
        with out.capture() as captured:
            out.print(grid, crop=False)
    finally:
        out.width = terminal
    # Cells are padded to their column; trailing blanks only make copy-paste worse.
    text = "\n".join(part.rstrip() for part in captured.get().splitlines())
    out.file.write(text + "\n")


def line(out: Console, text: str, style: str | None = None) -> None:
    out.print(Text(text, style=style or ""), crop=False, soft_wrap=True)
