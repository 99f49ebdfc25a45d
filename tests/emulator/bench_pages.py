"""Measure what one `list_training_runs` page costs the emulator (not a test; prints figures).

    .venv/bin/python tests/emulator/bench_pages.py --runs 100000 --pages 1000 --limit 100

Reports fleet build time, the in-process cost of building a page (cold caches, then warm),
and the wall time per page over real HTTP with one httpx client on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import httpx

from tinker_recovery.emulator import Emulator, EmulatorConfig, EmulatorServer


def _measure(label: str, pages: int, fn: object) -> None:
    assert callable(fn)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for index in range(pages):
        fn(index)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    sys.stdout.write(
        f"{label:<34} {pages} pages: wall {wall * 1000 / pages:7.3f} ms/page, "
        f"cpu {cpu * 1000 / pages:7.3f} ms/page\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--pages", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=100)
    args = parser.parse_args()
    config = EmulatorConfig(runs=args.runs, page_max=args.limit)
    span = max(1, args.runs // args.limit)

    wall0 = time.perf_counter()
    emu = Emulator(config)
    sys.stdout.write(f"fleet of {args.runs} runs built in {time.perf_counter() - wall0:.2f} s\n")

    def page(index: int) -> None:
        emu.page_runs(scope="owned", limit=args.limit, offset=(index % span) * args.limit)

    _measure("in-process, cold caches", args.pages, page)
    _measure("in-process, warm caches", args.pages, page)

    with EmulatorServer(config) as server, httpx.Client(base_url=server.base_url) as client:
        headers = {"X-API-Key": "tml-bench"}

        def fetch(index: int) -> None:
            params = {"limit": args.limit, "offset": (index % span) * args.limit}
            response = client.get("/api/v1/training_runs", params=params, headers=headers)
            response.raise_for_status()

        # The server thread's own CPU clock isolates the emulator from the client's share.
        server_clock = time.pthread_getcpuclockid(server.thread_ident)
        for label in ("HTTP, cold caches", "HTTP, warm caches"):
            before = time.clock_gettime(server_clock)
            _measure(f"{label} (client+server)", args.pages, fetch)
            spent = time.clock_gettime(server_clock) - before
            sys.stdout.write(
                f"{'':<34} server thread cpu {spent * 1000 / args.pages:7.3f} ms/page\n"
            )
        size = len(
            client.get(
                "/api/v1/training_runs", params={"limit": args.limit}, headers=headers
            ).content
        )
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sys.stdout.write(f"page size {size / 1024:.1f} KiB; peak RSS {rss_mib:.0f} MiB\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
