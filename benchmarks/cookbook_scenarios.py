"""Figures for issue 10's cookbook scenarios: tinker-cookbook 0.6.1's supervised loop,
unmodified, corrupted mid-run and recovered by a real `tinker-recovery run` daemon.

Runs the same scenarios as tests/cookbook/test_cookbook_recovery.py (they live in
tests/cookbook/recovery.py and assert their own claims) and prints one row per scenario:
daemon handoffs for the one corruption, launcher restarts they caused, healthy (live, not
corrupted) jobs stopped, the checkpoint the resumed job continued from, the attempts'
outcomes, and seconds from the corruption to the daemon's verdict (the attempt's
`finished_at` in the store minus the wall-clock time of the corrupt call).

    .venv/bin/python benchmarks/cookbook_scenarios.py [--only NAME ...] [--json]

Needs .venv-cookbook (`make cookbook`). About 1-2 minutes per scenario on 2 cores. A scenario
whose claim fails prints FAILED with the first line of the reason, and the run exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from cookbook import recovery  # noqa: E402

SCENARIOS: dict[str, Callable[[Path], recovery.Figures]] = {
    "exec": recovery.through_exec,
    "no-integration": recovery.no_integration,
    "ambiguous": recovery.ambiguous,
    "unloadable-none": lambda w: recovery.unloadable(w, "none"),
    "unloadable-sdk": lambda w: recovery.unloadable(w, "sdk"),
}
COLUMNS = ("scenario", "handoffs", "restarts", "healthy_killed", "resumed_from", "outcome")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), default=None)
    parser.add_argument("--json", action="store_true", help="one JSON object per scenario")
    parser.add_argument("--keep", type=Path, default=None, help="work under DIR and keep it")
    args = parser.parse_args(argv)
    names = args.only or list(SCENARIOS)
    rows: list[dict[str, object]] = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="cookbook-scenarios-") as scratch:
        tmp = args.keep or Path(scratch)
        for name in names:
            began = time.monotonic()
            try:
                row = SCENARIOS[name](Path(tmp) / name).row()
            except BaseException as exc:  # an assertion or pytest's Failed from a wait
                if isinstance(exc, KeyboardInterrupt):
                    raise
                failed = True
                traceback.print_exc()
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                row = {"scenario": name, "outcome": f"FAILED: {first[:160]}"}
            row["wall_s"] = round(time.monotonic() - began, 1)
            rows.append(row)
            if args.json:
                sys.stdout.write(json.dumps(row) + "\n")
                sys.stdout.flush()
    if not args.json:
        header = (*COLUMNS, "recovery_s", "wall_s")
        table = [[str(row.get(c, "")) for c in header] for row in rows]
        widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(header)]
        sys.stdout.write(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + "\n")
        sys.stdout.write("-+-".join("-" * w for w in widths) + "\n")
        for r in table:
            sys.stdout.write(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
