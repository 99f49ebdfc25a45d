"""The listing hot path side by side: parsers, transports and GC tuning on the same pages.

    .venv/bin/python benchmarks/bench_listing.py --sizes 10000 100000 [--cycles 4]

Two parts, both on one deterministic fleet per size (emulator-shaped runs, 100 per page):

1. parse: per-run CPU of `json.loads` (the floor), `orjson.loads`, the SDK's pydantic models
   plus views (the old path) and the msgspec projection plus views (the new one), in this
   process, with the previous listing's views kept alive as the daemon keeps them.
2. cycle: `TinkerGateway.list_runs()` against a page server in its own process on 127.0.0.1
   (a bare asyncio HTTP/1.1 server replaying prebuilt bodies, so the server is never what
   limits the figure). Each client variant runs in a fresh process, so its peak RSS is its
   own; it also times `json.loads` on the very pages it fetched, and the ratio of the two is
   the figure that holds on any machine. Variants: parser (sdk | slim) x transport (httpx's
   own | httpx-aiohttp, when importable) and the GC tuning (freeze + thresholds) on top.

Figures are printed (a Markdown table); nothing is asserted. Put httpx-aiohttp on PYTHONPATH
to include it, e.g. `pip install --target /tmp/extra httpx-aiohttp`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

PAGE = 100
BASE_MODELS = ("Qwen/Qwen3-8B", "Qwen/Qwen3-30B-A3B", "meta-llama/Llama-3.1-8B", "Qwen/Qwen3-4B")
OWNERS = ("alice", "bob", "team-research", "svc-train")
T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def _checkpoint(
    rng: random.Random, run_id: str, last: datetime, kind: str, segment: str, step: int
) -> dict[str, Any]:
    expires = None if rng.random() < 0.6 else (last + timedelta(days=7)).isoformat()
    return {
        "checkpoint_id": f"{segment}/{step:06d}",
        "checkpoint_type": kind,
        "time": (last - timedelta(seconds=rng.uniform(0, 600))).isoformat(),
        "tinker_path": f"tinker://{run_id}/{segment}/{step:06d}",
        "size_bytes": rng.randrange(10**8, 10**9),
        "public": False,
        "user_metadata": None,
        "expires_at": expires,
    }


def fleet(n: int, seed: int = 7) -> list[dict[str, Any]]:
    """Runs shaped like the emulator's wire output: microsecond timestamps, mostly a training
    checkpoint, half with metadata, some with a sampler checkpoint, a few corrupted."""
    rng = random.Random(seed)
    runs = []
    for i in range(n):
        run_id = f"{rng.getrandbits(64):016x}-{i}:train:{rng.randrange(3)}"
        last = T0 - timedelta(seconds=rng.uniform(0, 7 * 86400))

        step = rng.randrange(1, 400) * 10
        runs.append(
            {
                "training_run_id": run_id,
                "base_model": rng.choice(BASE_MODELS),
                "model_owner": rng.choice(OWNERS),
                "is_lora": True,
                "corrupted": rng.random() < 0.001,
                "lora_rank": rng.choice((8, 16, 32, 64)),
                "last_request_time": last.isoformat(),
                "last_checkpoint": None
                if rng.random() < 0.1
                else _checkpoint(rng, run_id, last, "training", "weights", step),
                "last_sampler_checkpoint": None
                if rng.random() < 0.7
                else _checkpoint(rng, run_id, last, "sampler", "sampler_weights", step),
                "user_metadata": None
                if rng.random() < 0.5
                else {"renderer_name": "qwen3", "project": f"p{rng.randrange(20)}"},
            }
        )
    return runs


def pages_of(runs: list[dict[str, Any]]) -> dict[int, bytes]:
    total = len(runs)
    out = {}
    for offset in range(0, max(total, 1), PAGE):
        body = {
            "training_runs": runs[offset : offset + PAGE],
            "cursor": {"offset": offset, "limit": PAGE, "total_count": total},
        }
        out[offset] = json.dumps(body, separators=(",", ":")).encode()
    return out


# ---- part 1: parsers in-process ------------------------------------------------------------


def time_parser(
    pages: Sequence[bytes], parse: Callable[[bytes], Any], repeats: int, *, keep: bool = True
) -> float:
    """Median CPU seconds for one pass over the pages. keep: the pass's results are kept, and
    the previous pass's too, as a watcher holds its views (so the collector's share is in the
    figure); not kept: each page's result is dropped at once (the bare parsing floor)."""
    kept: list[Any] = [parse(p) for p in pages] if keep else []  # the "previous cycle"
    samples = []
    for _ in range(repeats):
        cpu0 = time.process_time()
        if keep:
            now = [parse(p) for p in pages]
        else:
            for p in pages:
                parse(p)
        samples.append(time.process_time() - cpu0)
        if keep:
            kept = now
    del kept
    return statistics.median(samples)


def part_parse(n: int, repeats: int) -> dict[str, float]:
    from tinker_recovery.shell import gateway_base

    pages = list(pages_of(fleet(n)).values())
    floor = time_parser(pages, json.loads, repeats, keep=False) / n * 1e6
    figures = {"json.loads, each result dropped (the floor)": floor}
    parsers: dict[str, Callable[[bytes], Any]] = {"json.loads, results kept": json.loads}
    try:
        import orjson

        parsers["orjson.loads"] = orjson.loads
    except ImportError:
        pass
    parsers["sdk models + views"] = lambda body: gateway_base.parse_runs_page(
        body, use_projection=False
    )
    if gateway_base.projection_available():
        parsers["slim projection + views"] = gateway_base.parse_runs_page
    for name, fn in parsers.items():
        figures[name] = time_parser(pages, fn, repeats) / n * 1e6
    return figures


# ---- part 2: the page server and one client variant per process ----------------------------


async def serve(n: int, port_file: str) -> None:
    pages = pages_of(fleet(n))
    config = b'{"pjwt_auth_enabled": false}'

    def answer(body: bytes) -> bytes:
        head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
        return head.encode() + b"\r\n\r\n" + body

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line = head.split(b"\r\n", 1)[0].decode()
                length = 0
                for header in head.split(b"\r\n")[1:]:
                    if header.lower().startswith(b"content-length:"):
                        length = int(header.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                target = line.split(" ")[1]
                if "/training_runs" in target:
                    query = dict(
                        part.split("=", 1) for part in target.partition("?")[2].split("&") if part
                    )
                    body = pages.get(int(query.get("offset", "0")), pages[0])
                else:
                    body = config
                writer.write(answer(body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    Path(port_file + ".tmp").write_text(str(port))  # noqa: ASYNC240 - once, before serving
    os.replace(port_file + ".tmp", port_file)
    async with server:
        await server.serve_forever()


def peak_rss_mb() -> float:
    """This process's peak RSS. Not ru_maxrss: Linux carries that across fork+exec, so a child
    would report its parent's peak (here, the whole fleet the parent built)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gc_tune() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


async def client(port: int, n: int, cycles: int, parser: str, transport: str, tune: bool) -> None:
    from prometheus_client import CollectorRegistry
    from pydantic import SecretStr

    from tinker_recovery.obs.metrics import Metrics
    from tinker_recovery.settings import TinkerSettings
    from tinker_recovery.shell.clock import SystemClock
    from tinker_recovery.shell.gateway import TinkerGateway, make_http_client

    cfg = TinkerSettings(request_timeout=30.0, page_size=PAGE, max_concurrent_pages=8)
    http = make_http_client(cfg, transport=transport)  # what the daemon gets
    gateway = TinkerGateway(
        base_url=f"http://127.0.0.1:{port}",
        api_key=SecretStr("tml-bench"),
        http=http,
        cfg=cfg,
        clock=SystemClock(),
        metrics=Metrics(registry=CollectorRegistry()),
        projection=parser == "slim",
    )
    if tune:
        gc_tune()
    full = [0]
    gc.callbacks.append(
        lambda phase, info: full.__setitem__(
            0, full[0] + (phase == "start" and info["generation"] == 2)
        )
    )
    kept = await gateway.list_runs()  # warm-up: connections, imports, the "previous" fleet
    cpu, wall = [], []
    gc_full0 = full[0]
    for _ in range(cycles):
        w0, c0 = time.perf_counter(), time.process_time()
        runs = await gateway.list_runs()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
        assert len(runs) == n
        kept = runs
    del kept
    peak_mb = peak_rss_mb()  # before the floor's own allocations
    # The floor on the same pages, in this process: json.loads of every page body.
    bodies = []
    for offset in range(0, n, PAGE):
        response = await http.get(
            f"http://127.0.0.1:{port}/api/v1/training_runs", params={"offset": offset}
        )
        bodies.append(response.content)
    floor = time_parser(bodies, json.loads, max(3, cycles), keep=False)
    await http.aclose()
    print(
        json.dumps(
            {
                "cpu_s": statistics.median(cpu),
                "wall_s": statistics.median(wall),
                "json_loads_s": floor,
                "gc_full_per_cycle": (full[0] - gc_full0) / cycles,
                "max_rss_mb": peak_mb,
            }
        )
    )


def run_variant(
    port: int, n: int, cycles: int, parser: str, transport: str, tune: bool
) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--client", str(port), "--sizes", str(n)]
    argv += ["--cycles", str(cycles), "--parser", parser, "--transport", transport]
    argv += ["--gc-tune"] if tune else []
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def part_cycle(n: int, cycles: int, variants: list[tuple[str, str, bool]]) -> list[dict[str, Any]]:
    port_file = f"/tmp/bench-listing-{os.getpid()}.port"
    server = subprocess.Popen([sys.executable, __file__, "--serve", port_file, "--sizes", str(n)])
    try:
        while not os.path.exists(port_file):
            if server.poll() is not None:
                raise RuntimeError("page server died")
            time.sleep(0.05)
        port = int(Path(port_file).read_text())
        rows = []
        for parser, transport, tune in variants:
            row = run_variant(port, n, cycles, parser, transport, tune)
            rows.append({"parser": parser, "transport": transport, "gc_tune": tune, **row})
        return rows
    finally:
        server.terminate()
        server.wait()
        os.unlink(port_file)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--cycles", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5, help="passes per parser in part 1")
    ap.add_argument("--skip-parse", action="store_true")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--client", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--parser", default="slim", help=argparse.SUPPRESS)
    ap.add_argument("--transport", default="httpx", help=argparse.SUPPRESS)
    ap.add_argument("--gc-tune", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        asyncio.run(serve(args.sizes[0], args.serve))
        return
    if args.client:
        n = args.sizes[0]
        asyncio.run(client(args.client, n, args.cycles, args.parser, args.transport, args.gc_tune))
        return

    try:
        import httpx_aiohttp  # noqa: F401

        transports = ["httpx", "aiohttp"]
    except ImportError:
        transports = ["httpx"]
    variants = [(p, t, False) for p in ("sdk", "slim") for t in transports]
    variants += [("slim", t, True) for t in transports]
    print(
        f"# bench_listing on {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; "
        f"python {sys.version.split()[0]}"
    )
    for n in args.sizes:
        print(f"\n## {n:,} runs ({-(-n // PAGE):,} pages of {PAGE})\n")
        if not args.skip_parse:
            figures = part_parse(n, args.repeats)
            floor = next(iter(figures.values()))
            print("| parser (in-process, µs CPU per run) | µs/run | x json.loads |")
            print("|---|---:|---:|")
            for name, us in figures.items():
                print(f"| {name} | {us:.2f} | {us / floor:.2f} |")
        rows = part_cycle(n, args.cycles, variants)
        print(
            "\n| list_runs() client | CPU s/cycle | µs/run | x json.loads | wall s | "
            "full GCs/cycle | peak RSS MB |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for row in rows:
            name = f"{row['parser']} + {row['transport']}" + (
                " + gc tune" if row["gc_tune"] else ""
            )
            if "error" in row:
                print(f"| {name} | error: {row['error']} | | | | | |")
                continue
            ratio = row["cpu_s"] / row["json_loads_s"]
            print(
                f"| {name} | {row['cpu_s']:.3f} | {row['cpu_s'] / n * 1e6:.1f} | {ratio:.2f} | "
                f"{row['wall_s']:.3f} | {row['gc_full_per_cycle']:.1f} | {row['max_rss_mb']:.0f} |"
            )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
