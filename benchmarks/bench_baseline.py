"""The baseline watcher: one `RestClient.get_training_run(run_id)` per watched run per cycle.

This is what a per-run monitor (tinkex's, for one) does. It runs in its own process, with the
official SDK, at most `--concurrency` requests in flight (the daemon's page concurrency).
Protocol on stdio, one JSON object per line: it lists the run ids once with the SDK's paged
`list_training_runs` (set-up, not measured), prints {"event": "ready"}, waits for one line on
stdin (the harness resets the emulator's counters meanwhile), then runs `--cycles` cycles back
to back and prints {"event": "cycle", ...} after each. `--sample K` polls only the first K runs
per cycle; the harness then scales the per-run figures to N and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import tinker


def say(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def list_run_ids(rest: tinker.RestClient) -> list[str]:
    ids: list[str] = []
    while True:
        page = rest.list_training_runs(limit=100, offset=len(ids)).result()
        ids.extend(run.training_run_id for run in page.training_runs)
        if len(ids) >= page.cursor.total_count or not page.training_runs:
            return ids


async def one_cycle(rest: tinker.RestClient, run_ids: list[str], concurrency: int) -> int:
    todo = iter(run_ids)
    corrupted = 0

    async def worker() -> None:
        nonlocal corrupted
        for run_id in todo:  # workers share one iterator: at most `concurrency` in flight
            run = await rest.get_training_run(run_id)
            corrupted += run.corrupted

    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, len(run_ids))):
            group.create_task(worker())
    return corrupted


async def watch(args: argparse.Namespace) -> None:
    rest = tinker.RestClient(base_url=args.base_url, api_key=args.api_key)
    run_ids = await asyncio.to_thread(list_run_ids, rest)
    polled = run_ids[: args.sample] if args.sample else run_ids
    say(event="ready", runs=len(run_ids), polled=len(polled))
    await asyncio.to_thread(sys.stdin.readline)
    for cycle in range(args.cycles):
        wall0, cpu0 = time.perf_counter(), time.process_time()  # process-wide: all threads
        corrupted = await one_cycle(rest, polled, args.concurrency)
        say(
            event="cycle",
            cycle=cycle,
            polled=len(polled),
            corrupted=corrupted,
            wall_s=time.perf_counter() - wall0,
            cpu_s=time.process_time() - cpu0,
        )
    say(event="done")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key", default="tml-bench-baseline")
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--sample", type=int, default=0, help="poll only this many runs")
    asyncio.run(watch(parser.parse_args()))


if __name__ == "__main__":
    main()
