"""Several real daemon processes on one PostgreSQL schema and one emulator (issue 6).

`Cluster` starts `python -m tinker_recovery run` replicas (the e2e `DaemonProc`, each with its own
config, port, log and `replica_id`) that share a throwaway schema, and a `command` handoff that
behaves like a training job: it notes that it began, optionally waits, resumes the corrupted run
from its checkpoint with the official SDK (carrying TINKER_RECOVERY_USER_METADATA, so the
successor holds the idempotency key), saves state once and exits, then appends one JSON line.
`exactly_once` checks the two independent records: the handoff log's idempotency keys and the
emulator's successor runs. `BlackHole` is a TCP proxy to PostgreSQL that can stop moving bytes
without closing anything, the nastiest partition.

PostgreSQL must answer on 127.0.0.1:5432 (database `test`) or at TINKER_RECOVERY_TEST_PG_URL;
if it does not, these tests fail loudly: they are the proof that failover works.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import psycopg
import pytest

from e2e.harness import JOB_KEY, DaemonProc, Emu, daemon_config, rule, wait_until, with_store
from tinker_recovery.core.model import Attempt, Lineage
from tinker_recovery.shell.clock import SystemClock
from tinker_recovery.shell.store import open_store
from tinker_recovery.shell.store.base import Store

T = TypeVar("T")

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
LEASE_TTL_S = 2.0
RENEW_S = 0.5
LABEL = "ha"

_JOB_SCRIPT = """\
import json, os, sys, time
done_log, begin_log, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
key = os.environ["TINKER_RECOVERY_IDEMPOTENCY_KEY"]
row = {"key": key, "run": os.environ["TINKER_RECOVERY_CORRUPTED_RUN"],
       "replica": os.environ.get("HA_REPLICA"), "begin": time.time()}
with open(begin_log, "a") as out:
    out.write(json.dumps(row) + "\\n")
time.sleep(delay)  # a slow job start: the window in which its launcher may die
import tinker
service = tinker.ServiceClient()
client = service.create_training_client_from_state_with_optimizer(
    os.environ["TINKER_RECOVERY_CHECKPOINT"],
    user_metadata=json.loads(os.environ["TINKER_RECOVERY_USER_METADATA"]),
).result()
row["successor"] = client.model_id
row["saved"] = client.save_state("ha-resumed").result().path
service.close("success").result()
row["time"] = time.time()
with open(done_log, "a") as out:
    out.write(json.dumps(row) + "\\n")
# os._exit: the SDK's threads now and then abort the interpreter's finalisation (SIGABRT after
# the work is done), which the daemon would read as a failed handoff and try again.
os._exit(0)
"""


def pg_url() -> str:
    return os.environ.get("TINKER_RECOVERY_TEST_PG_URL", PG_URL)


@contextmanager
def pg_schema() -> Iterator[str]:
    """A fresh schema `ha_<random>`; yields a URL whose sessions use it; dropped on exit."""
    name = f"ha_{secrets.token_hex(6)}"
    try:
        admin = psycopg.connect(pg_url(), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is required for the HA tests and did not answer: {exc}")
    with admin:
        admin.execute(f'CREATE SCHEMA "{name}"')
    try:
        sep = "&" if "?" in pg_url() else "?"
        yield f"{pg_url()}{sep}options={quote(f'-csearch_path={name}')}"
    finally:
        # A fresh connection: the database may have been restarted by the test meanwhile.
        with psycopg.connect(pg_url(), autocommit=True, connect_timeout=10) as admin:
            admin.execute(f'DROP SCHEMA "{name}" CASCADE')


def via_proxy(url: str, port: int) -> str:
    parts = urlsplit(url)
    user, _, _ = parts.netloc.rpartition("@")
    netloc = f"{user}@127.0.0.1:{port}" if user else f"127.0.0.1:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Cluster:
    """Replicas sharing one schema, one emulator and one handoff log."""

    def __init__(
        self,
        emu: Emu,
        url: str,
        workdir: Path,
        *,
        handoff_delay_s: float = 0.0,
        confirm_deadline: str = "40s",
        debug: bool = False,
    ) -> None:
        """`handoff_delay_s`: how long the job waits between starting and creating its successor;
        `confirm_deadline`: how long an attempt waits for that successor before it fails."""
        self.emu = emu
        self.url = url
        self.workdir = workdir
        self.handoff_delay_s = handoff_delay_s
        self.confirm_deadline = confirm_deadline
        self.debug = debug
        self.done_log = workdir / "handoffs.jsonl"
        self.begin_log = workdir / "handoffs-begun.jsonl"
        self.script = workdir / "job_handoff.py"
        self.script.write_text(_JOB_SCRIPT)
        self.replicas: dict[str, DaemonProc] = {}
        self.corrupted: list[str] = []

    def config(self, name: str, url: str) -> dict[str, Any]:
        workdir = self.workdir / name
        workdir.mkdir(exist_ok=True)
        # The default confirm deadline is long: a handoff begun by a replica that then died
        # still lands well within it, even on a loaded machine.
        knobs = {"confirm_deadline": self.confirm_deadline, "backoff": {"base": "1s", "cap": "2s"}}
        rules = [rule("ha", LABEL, **knobs)]
        config = daemon_config(self.emu, workdir, rules)
        config["state"] = {
            "url": url,
            "replica_id": name,
            "lease_ttl": f"{LEASE_TTL_S}s",
            "lease_renew_interval": f"{RENEW_S}s",
        }
        argv = [sys.executable, str(self.script), str(self.done_log), str(self.begin_log)]
        config["handoffs"] = {
            "job": {
                "type": "command",
                "argv": [*argv, str(self.handoff_delay_s)],
                "timeout": "30s",
                "env": {
                    "TINKER_BASE_URL": self.emu.base_url,
                    "TINKER_API_KEY": JOB_KEY,
                    "TINKER_TELEMETRY": "0",
                    "HA_REPLICA": name,
                },
            }
        }
        if self.debug:
            config["log"]["level"] = "debug"  # poll_cycle lines: the failover figures read them
        return config

    def start(
        self, name: str, *, failpoint: str | None = None, url: str | None = None
    ) -> DaemonProc:
        """Start (or restart) replica `name`; returns once its /readyz answers 200."""
        replica = self.replicas.get(name)
        if replica is None:
            replica = DaemonProc(self.workdir / name, self.config(name, url or self.url))
            self.replicas[name] = replica
        return replica.start(failpoint=failpoint)

    def alive(self) -> dict[str, DaemonProc]:
        return {
            name: replica
            for name, replica in self.replicas.items()
            if replica.proc is not None and replica.proc.poll() is None
        }

    def roles(self) -> dict[str, str]:
        """Role per live replica from /status ("unreachable" if it does not answer)."""
        out = {}
        for name, replica in self.alive().items():
            try:
                out[name] = str(replica.status().get("role"))
            except (httpx.HTTPError, ValueError):  # no answer, or not JSON (store down)
                out[name] = "unreachable"
        return out

    def leaders(self) -> list[str]:
        return [name for name, role in self.roles().items() if role == "leader"]

    def wait_leader(self, *, not_: str | None = None, timeout_s: float = 20.0) -> str:
        def one() -> str | None:
            leading = [n for n in self.leaders() if n != not_]
            return leading[0] if len(leading) == 1 else None

        return str(wait_until(one, f"one leader other than {not_}", timeout_s, self.tails()))

    def leader_gauge(self, name: str) -> float:
        for line in self.replicas[name].get("/metrics").text.splitlines():
            if line.startswith("tinker_recovery_leader "):
                return float(line.split()[1])
        raise AssertionError(f"{name} exports no tinker_recovery_leader gauge")

    def corrupt_new_run(self) -> str:
        run_id = self.emu.create_run(user_metadata={"scenario": LABEL})
        return run_id

    def corrupt(self, run_id: str) -> None:
        self.emu.corrupt(run_id)
        self.corrupted.append(run_id)

    def begun(self) -> list[dict[str, Any]]:
        return read_lines(self.begin_log)

    def done(self) -> list[dict[str, Any]]:
        return read_lines(self.done_log)

    def tails(self) -> str:
        return "\n".join(f"--- {n}\n{r.tail(15)}" for n, r in self.replicas.items())

    def kill(self, name: str) -> float:
        """SIGKILL one replica; the wall time of the kill."""
        replica = self.replicas[name]
        assert replica.proc is not None
        killed_at = time.time()
        replica.proc.kill()
        replica.proc.wait()
        return killed_at

    def freeze(self, name: str) -> float:
        """SIGSTOP one replica (not its handoff jobs): a stalled VM, a GC pause, a debugger. Its
        lease lapses while its tasks stay where they were. The wall time of the freeze."""
        replica = self.replicas[name]
        assert replica.proc is not None
        frozen_at = time.time()
        replica.proc.send_signal(signal.SIGSTOP)
        return frozen_at

    def thaw(self, name: str) -> float:
        """SIGCONT: the replica carries on from where it stood, tasks and all."""
        replica = self.replicas[name]
        assert replica.proc is not None
        thawed_at = time.time()
        replica.proc.send_signal(signal.SIGCONT)
        return thawed_at

    def role(self, name: str) -> str:
        """One replica's role from /status, asked with a short timeout ("unreachable" if it
        does not answer, e.g. while frozen)."""
        try:
            response = httpx.get(self.replicas[name].url("/status"), timeout=1, trust_env=False)
            return str(response.json().get("role"))
        except (httpx.HTTPError, ValueError):
            return "unreachable"

    def wait_role(self, name: str, role: str, timeout_s: float = 20.0) -> None:
        wait_until(lambda: self.role(name) == role, f"{name} to be {role}", timeout_s, self.tails())

    def stop_all(self) -> None:
        for replica in self.replicas.values():
            replica.kill()

    # the store -----------------------------------------------------------------------------------
    def read(self, read: Callable[[Store], Awaitable[T]]) -> T:
        return with_store(self.url, read)

    def lineage(self, run_id: str) -> Lineage | None:
        return self.read(lambda s: s.lineage_for_run(run_id))

    def attempts(self, run_id: str) -> list[Attempt]:
        async def go(store: Store) -> list[Attempt]:
            lineage = await store.lineage_for_run(run_id)
            return [] if lineage is None else list(await store.attempts(lineage.lineage_id))

        return self.read(go)

    def recovered(self) -> bool:
        """Every corrupted run's lineage is healthy on a successor its job created."""
        made = {row["run"]: row["successor"] for row in self.done()}
        for run_id in self.corrupted:
            lineage = self.lineage(run_id)
            if lineage is None or lineage.state.value != "healthy":
                return False
            if lineage.current_run_id != made.get(run_id):
                return False
        return True

    def wait_recovered(self, timeout_s: float = 45.0) -> None:
        wait_until(self.recovered, "every corrupted run recovered", timeout_s, self.tails())

    def exactly_once(self) -> None:
        """Each corrupted run handed off exactly once: per the handoff log and per the emulator."""
        begun = Counter(row["key"] for row in self.begun())
        assert begun, "nothing was handed off"
        assert max(begun.values()) == 1, f"an idempotency key was handed off twice: {begun}"
        per_run = Counter(row["run"] for row in self.begun())
        assert per_run == Counter(self.corrupted), f"handoffs per corrupted run: {per_run}"
        runs = self.emu.all_runs()
        for run_id in self.corrupted:
            successors = [r["run_id"] for r in runs if r.get("recovered_from") == run_id]
            assert len(successors) == 1, f"{run_id} has successors {successors}"
        keys = {row["key"] for row in self.done()}
        assert keys == set(begun), "every handoff that began also finished"


class _Backdated(SystemClock):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def now(self) -> datetime:
        return super().now() - timedelta(seconds=self.seconds)


def watching_since(url: str, seconds_ago: float) -> None:
    """Migrate the schema and record that the deployment has watched since `seconds_ago`.

    A failover usually happens to a deployment that has been running for a while; the fresh
    case (both replicas starting on a new store) has a test of its own.
    """

    async def go() -> None:
        store = open_store(url, clock=_Backdated(seconds_ago), state_directory=None)
        await store.open()
        await store.close()

    with concurrent.futures.ThreadPoolExecutor(1) as worker:
        worker.submit(asyncio.run, go()).result()


@contextmanager
def cluster(
    emu: Emu, workdir: Path, *, watched_for_s: float | None = 3600.0, **knobs: Any
) -> Iterator[Cluster]:
    with pg_schema() as url:
        if watched_for_s is not None:
            watching_since(url, watched_for_s)
        made = Cluster(emu, url, workdir, **knobs)
        try:
            yield made
        finally:
            made.stop_all()


class BlackHole:
    """A threaded TCP proxy to PostgreSQL. Clearing `flowing` stops forwarding bytes while every
    connection stays open: the client hears nothing, no reset, no error."""

    def __init__(self, upstream: str) -> None:
        target = urlsplit(upstream)
        self.upstream = (target.hostname or "127.0.0.1", target.port or 5432)
        self.flowing = threading.Event()
        self.flowing.set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.sockets: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True, name="blackhole").start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            self.sockets += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self.flowing.wait()
                if self.closed:
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.closed = True
        self.flowing.set()  # release pumps waiting on the gate
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()
