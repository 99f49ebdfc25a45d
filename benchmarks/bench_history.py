"""The daemon's poll cycle with a year of history in its store, against an empty store, and
what event retention does to the database; plus each cycle's CPU as a ratio to `json.loads`.

    .venv/bin/python benchmarks/bench_history.py --sizes 10000 100000 \
        [--lineages 10000 --events 1000000 --cycles 4 --workdir DIR]

Per fleet size N: the emulator in its own process (`--runs N --seed 7 --page-max 100`); the
floor, `json.loads` of every page the daemon reads, timed in this process on the bodies just
fetched from that emulator; then the real daemon (`tinker-recovery run`, gateway + poller,
under `/usr/bin/time -v`, through bench_scenarios.measure_watch: two warm-up cycles, then
--cycles measured) twice, on the same emulator: with an empty SQLite store, then with a copy
of the history store, then with a copy in which every lineage is closed (healthy, nothing
left for the cycle to read: the history's size alone). All configs set `state.events_max_age`
past the history's age, so the first cycle's retention deletes nothing and the measured cycles
see the whole year.

The history store is made once: the schema by the real `SqliteStore.open()` (its migrations),
then bulk inserts whose rows come from the store's own encoders (`statements.lineage_params`,
`codec.event_data_to_json`): --lineages lineages (about 96 % healthy and inactive, 3 %
exhausted, 1 % waiting), their runs long gone from the fleet, and --events events spread over
365 days, each with a run payload as the poller stores them. Then the retention: the real
`Store.compact` with the daemon's defaults (180 days, 2,000,000 rows) and with 30 days,
reporting the SQLite file size (main file + WAL) before, after each, and after a `VACUUM`
(done here with sqlite3; the daemon itself reuses freed pages and never shrinks the file).
Everything talks to 127.0.0.1 only; every wait is bounded. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_procs as procs
import bench_scenarios as scenarios

INTERVALS = {10_000: 2.0, 100_000: 5.0, 300_000: 12.0, 1_000_000: 30.0}
RETENTION_AGE = "400d"  # longer than the history: the measured cycles see all of it


def interval_for(n: int) -> float:
    return next((s for limit, s in sorted(INTERVALS.items()) if n <= limit), 30.0)


def _payload(rng: random.Random, run_id: str, at: datetime) -> dict[str, Any]:
    """A run as the poller records it behind a decision (the shape, not the exact keys)."""
    step = rng.randrange(1, 400) * 10
    return {
        "training_run_id": run_id,
        "base_model": rng.choice(("Qwen/Qwen3-8B", "meta-llama/Llama-3.1-8B")),
        "model_owner": "alice@acme.example",
        "is_lora": True,
        "corrupted": rng.random() < 0.3,
        "lora_rank": 32,
        "last_request_time": at.isoformat(),
        "last_checkpoint": {
            "checkpoint_id": f"weights/{step:06d}",
            "tinker_path": f"tinker://{run_id}/weights/{step:06d}",
            "time": (at - timedelta(minutes=20)).isoformat(),
            "expires_at": (at + timedelta(days=7)).isoformat(),
        },
        "user_metadata": {"team": "evals", "project": f"p{rng.randrange(20)}"},
    }


def build_history(path: Path, lineages: int, events: int, seed: int = 11) -> dict[str, Any]:
    from tinker_recovery.core.model import Lineage, LineageState
    from tinker_recovery.shell.clock import SystemClock
    from tinker_recovery.shell.store import codec
    from tinker_recovery.shell.store import statements as q
    from tinker_recovery.shell.store.sqlite import SqliteStore

    t0 = time.perf_counter()
    store = SqliteStore(path, clock=SystemClock())

    async def schema() -> None:
        await store.open()
        await store.close()

    asyncio.run(schema())
    rng = random.Random(seed)
    now = datetime.now(UTC)
    year_ago = now - timedelta(days=365)
    rows, states = [], {"healthy": 0, "exhausted": 0, "waiting": 0}
    ids = []
    for i in range(lineages):
        run_id = f"hist-{i:05d}-{rng.getrandbits(48):012x}:train:0"
        first = year_ago + timedelta(seconds=rng.uniform(0, 360 * 86400))
        roll = rng.random()
        if roll < 0.03:
            state, starts = (
                LineageState.EXHAUSTED,
                tuple(first + timedelta(hours=h) for h in (1, 2, 3)),
            )
            extra: dict[str, Any] = {"attempts_total": 3}
        elif roll < 0.04:
            state, starts = LineageState.WAITING, (first + timedelta(hours=1),)
            extra = {"attempts_total": 1, "next_attempt_at": now + timedelta(days=30)}
        else:
            state, starts, extra = LineageState.HEALTHY, (), {}
        states[state.value] += 1
        lineage = Lineage(
            lineage_id=f"lin-{i:05d}",
            root_run_id=run_id,
            current_run_id=run_id,
            state=state,
            reason="bench history",
            first_seen_at=first,
            updated_at=first + timedelta(days=rng.uniform(0, 3)),
            attempt_starts=starts,
            rule="bench",
            **extra,
        )
        rows.append(q.lineage_params(lineage, codec.dump_time))
        ids.append((lineage.lineage_id, run_id))
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    with conn:
        conn.executemany(q.UPSERT_LINEAGE, rows)
    from tinker_recovery.shell.store.base import Event

    batch: list[dict[str, Any]] = []
    span = 365 * 86400.0
    for k in range(events):
        lineage_id, run_id = ids[rng.randrange(len(ids))]
        at = year_ago + timedelta(seconds=span * k / events)  # oldest first, as appended
        event = Event(
            at=at,
            kind="lineage_transition",
            reason=rng.choice(("healthy", "suspect", "confirmed", "progress", "recovered")),
            lineage_id=lineage_id,
            run_id=run_id,
            data=_payload(rng, run_id, at),
        )
        batch.append(
            {
                "at": codec.dump_time(event.at),
                "kind": event.kind,
                "reason": event.reason,
                "lineage_id": event.lineage_id,
                "attempt_id": None,
                "run_id": event.run_id,
                "data": codec.event_data_to_json(event),
            }
        )
        if len(batch) == 50_000:
            with conn:
                conn.executemany(q.INSERT_EVENT, batch)
            batch.clear()
    if batch:
        with conn:
            conn.executemany(q.INSERT_EVENT, batch)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return {"lineages": states, "events": events, "build_s": time.perf_counter() - t0}


def close_all(source: Path, target: Path) -> int:
    """A copy of the history where every lineage is closed (healthy, no attempt in its budget):
    the same year of rows, none of which the cycle has to read."""
    shutil.copyfile(source, target)
    conn = sqlite3.connect(target)
    with conn:
        changed = conn.execute(
            "UPDATE lineages SET state = 'healthy', active = 0, data = json_set(data,"
            " '$.state', 'healthy', '$.attempt_starts', json('[]'), '$.next_attempt_at', NULL)"
            " WHERE active = 1"
        ).rowcount
    conn.close()
    return int(changed)


def db_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


def retention(path: Path) -> list[dict[str, Any]]:
    """The real Store.compact on a copy of the history, then VACUUM; sizes at each step."""
    from tinker_recovery.shell.clock import SystemClock
    from tinker_recovery.shell.store.sqlite import SqliteStore

    out = [{"step": "history as built", "bytes": db_bytes(path), "deleted": 0}]

    async def compact(age_days: float, keep: int) -> int:
        store = SqliteStore(path, clock=SystemClock())
        await store.open()
        try:
            before = datetime.now(UTC) - timedelta(days=age_days)
            return await store.compact(before=before, keep=keep)
        finally:
            await store.close()

    for label, age, keep in (
        ("compact, defaults (180 d, 2,000,000 rows)", 180.0, 2_000_000),
        ("compact, 30 d", 30.0, 2_000_000),
    ):
        t0 = time.perf_counter()
        deleted = asyncio.run(compact(age, keep))
        out.append(
            {
                "step": label,
                "bytes": db_bytes(path),
                "deleted": deleted,
                "seconds": time.perf_counter() - t0,
            }
        )
    conn = sqlite3.connect(path)
    left = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    t0 = time.perf_counter()
    conn.execute("VACUUM")
    conn.close()
    out.append(
        {
            "step": f"VACUUM (sqlite3; {left:,} events left)",
            "bytes": db_bytes(path),
            "deleted": 0,
            "seconds": time.perf_counter() - t0,
        }
    )
    return out


def json_floor(base_url: str, n: int, repeats: int = 5) -> dict[str, float]:
    """json.loads of every page the daemon reads, the bodies fetched from the same emulator."""
    bodies = []
    with httpx.Client(base_url=base_url, timeout=60, headers={"X-API-Key": procs.DAEMON_KEY}) as c:
        for offset in range(0, n, 100):
            r = c.get("/api/v1/training_runs", params={"limit": 100, "offset": offset})
            r.raise_for_status()
            bodies.append(r.content)
    samples = []
    for _ in range(repeats):
        c0 = time.process_time()
        for body in bodies:
            json.loads(body)
        samples.append(time.process_time() - c0)
    return {"json_loads_s": statistics.median(samples), "pages": len(bodies)}


def with_retention(config: dict[str, Any]) -> dict[str, Any]:
    config["state"]["events_max_age"] = RETENTION_AGE
    return config


def print_size(
    n: int, interval: float, cycles: int, floor: dict[str, float], rows: dict[str, Any]
) -> None:
    print(f"\n## {n:,} runs, interval {interval:g} s, {cycles} measured cycles\n")
    print(
        f"json.loads of the same {floor['pages']:,} pages: {floor['json_loads_s']:.3f} s "
        f"({floor['json_loads_s'] / n * 1e6:.2f} µs/run)\n"
    )
    print(
        "| store | requests/cycle | daemon CPU s/cycle | µs/run | x json.loads | "
        "wall s (median / max) | peak RSS MB | emulator CPU s/cycle |"
    )
    print("|---|---|---:|---:|---:|---|---:|---:|")
    for variant, row in rows.items():
        cpu = row["cpu_s_per_cycle"]
        print(
            f"| {variant} | {sorted(set(row['requests_per_cycle']))} | {cpu:.3f} | "
            f"{cpu / n * 1e6:.1f} | {cpu / floor['json_loads_s']:.2f} | "
            f"{row['wall_s_median']:.3f} / {row['wall_s_max']:.3f} | "
            f"{row['peak_rss_mb']:.0f} | {row['emulator_cpu_s_per_cycle']:.3f} |"
        )
    for variant in ("history", "history-closed"):
        if variant in rows:
            ratio = rows[variant]["cpu_s_per_cycle"] / rows["empty"]["cpu_s_per_cycle"]
            print(f"\n{variant} / empty CPU per cycle: {ratio:.3f} (target <= 1.10)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--history-sizes", type=int, nargs="*", help="default: every size")
    ap.add_argument("--lineages", type=int, default=10_000)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--cycles", type=int, default=4)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--json", type=Path, help="raw figures")
    args = ap.parse_args()
    history_sizes = set(args.sizes if args.history_sizes is None else args.history_sizes)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-history-"))
    workdir.mkdir(parents=True, exist_ok=True)
    original = procs.daemon_config
    procs.daemon_config = lambda **kw: with_retention(original(**kw))
    started = time.time()
    print(
        f"# bench_history {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.2f}; workdir {workdir}"
    )
    figures: dict[str, Any] = {"sizes": {}}
    history = workdir / "history.db"
    if history_sizes:
        built = build_history(history, args.lineages, args.events)
        figures["history"] = {**built, "bytes": db_bytes(history)}
        print(
            f"\nhistory store: {built['lineages']} lineages, {args.events:,} events, "
            f"{db_bytes(history) / 1e6:.0f} MB, built in {built['build_s']:.0f} s"
        )
    for n in args.sizes:
        interval = interval_for(n)
        emu = procs.Emulator(runs=n, workdir=workdir)
        try:
            floor = json_floor(emu.base_url, n)
            rows = {}
            variants = ["empty"] + (["history", "history-closed"] if n in history_sizes else [])
            for variant in variants:
                name = f"{variant}-{n}"
                if variant == "history":
                    shutil.copyfile(history, workdir / f"{name}.db")
                elif variant == "history-closed":
                    close_all(history, workdir / f"{name}.db")
                rows[variant] = scenarios.measure_watch(
                    emu, workdir=workdir, name=name, interval_s=interval, cycles=args.cycles
                )
        finally:
            emu.close()
        figures["sizes"][n] = {"floor": floor, **rows}
        print_size(n, interval, args.cycles, floor, rows)
        sys.stdout.flush()
    if history_sizes:
        steps = retention(history)
        figures["retention"] = steps
        print("\n## retention on the history store\n")
        print("| step | events deleted | seconds | SQLite file + WAL, MB |")
        print("|---|---:|---:|---:|")
        for step in steps:
            secs = f"{step['seconds']:.1f}" if "seconds" in step else ""
            print(f"| {step['step']} | {step['deleted']:,} | {secs} | {step['bytes'] / 1e6:.0f} |")
    print(f"\ntook {time.time() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1, default=str))


if __name__ == "__main__":
    main()
