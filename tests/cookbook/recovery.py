"""Recovery scenarios with the real tinker-cookbook: shared by test_cookbook_recovery.py and
benchmarks/cookbook_scenarios.py.

Every scenario runs real processes: the emulator (in this process, on 127.0.0.1), a real
`tinker-recovery run` daemon (e2e harness `DaemonProc`, SQLite store, JSON log) and
tinker-cookbook 0.6.1's `supervised.train.main`, unmodified (`sl_job.py` in .venv-cookbook),
started by `relaunch.py`, the launcher, which the daemon's `command` handoff also calls
(`relaunch.py restart UNIT`, what `systemctl restart` would be). The job holds at a known
batch (`--hold-at-batch`), the scenario corrupts its run through the emulator's control API,
and the daemon recovers it. Each scenario checks its own claims with `assert` and returns its
figures (`Figures`): handoffs, healthy jobs killed, the checkpoint resumed from, the time from
corruption to the attempt's verdict.

Waits are bounded and event-driven: job output (`SLJOB` lines in the job's output file), the
launcher's log, the daemon's store rows; no fixed sleeps.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cookbook.harness import (
    EVENT_WAIT_S,
    REPO,
    cookbook_python,
    job_env,
    read_records,
    run_id_of,
    sl_job_command,
)
from e2e.harness import DaemonProc, Emu, daemon_config, rule, wait_until
from tinker_recovery.core.model import (
    TAG_ATTEMPT,
    TAG_IDEMPOTENCY_KEY,
    TAG_LINEAGE,
    TAG_RECOVERED_FROM,
    Attempt,
    AttemptOutcome,
)
from tinker_recovery.emulator import EmulatorConfig, EmulatorServer

RELAUNCH = Path(__file__).with_name("relaunch.py")
COOKBOOK_KEY = "tml-cookbook-recovery-job-key"
RENDERER = "role_colon"
READY_MARKER = 'SLJOB {"event": "batch"'
DAEMON_WAIT_S = 240.0
"""Handoff to verdict: the launcher stops the job, the cookbook imports torch again (about
10 s of CPU, longer when the machine is shared), resumes and trains a few batches."""
CONFIRM_DEADLINE = "30s"


def exec_binary() -> Path:
    """`tinker-recovery exec` as installed next to the cookbook (the job's own environment)."""
    return cookbook_python().with_name("tinker-recovery")


@dataclass
class Figures:
    scenario: str
    handoffs: int  # daemon handoffs (attempts that reached the handoff) for the one corruption
    restarts: int  # launcher restarts the daemon caused
    healthy_killed: int  # live processes stopped that were not driving the corrupted run
    resumed_from: str  # checkpoint name (and batch) the resumed job continued from
    outcome: str  # the attempts' outcomes, in order
    recovery_s: float | None  # corruption -> the daemon's verdict (succeeded / failed)
    notes: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "handoffs": self.handoffs,
            "restarts": self.restarts,
            "healthy_killed": self.healthy_killed,
            "resumed_from": self.resumed_from,
            "outcome": self.outcome,
            "recovery_s": None if self.recovery_s is None else round(self.recovery_s, 1),
        }


# job output ---------------------------------------------------------------------------------


def job_events(output: Path, offset: int = 0) -> list[dict[str, Any]]:
    """`SLJOB` events in a job's output file from byte `offset` on."""
    if not output.exists():
        return []
    with output.open("rb") as out:
        out.seek(offset)
        text = out.read().decode(errors="replace")
    events = []
    for line in text.splitlines():
        if line.startswith("SLJOB "):
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line[len("SLJOB ") :]))
    return events


def wait_job_event(output: Path, event: str, offset: int = 0, count: int = 1) -> dict[str, Any]:
    """The `count`-th `event` in the job's output after `offset`."""

    def found() -> dict[str, Any] | None:
        hits = [e for e in job_events(output, offset) if e["event"] == event]
        return hits[count - 1] if len(hits) >= count else None

    try:
        got: dict[str, Any] = wait_until(found, f"job event {event!r} in {output}", EVENT_WAIT_S)
    except BaseException as exc:  # pytest's Failed: add what the job printed last
        tail = output.read_text(errors="replace")[-2000:] if output.exists() else ""
        raise AssertionError(f"{exc}\n{tail}") from None
    return got


# the rig ------------------------------------------------------------------------------------


@dataclass
class Job:
    name: str
    log_path: Path
    argv: list[str]
    output: Path
    pidfile: Path

    def unit_entry(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "argv": self.argv,
            "cwd": str(REPO),
            "output": str(self.output),
            "pidfile": str(self.pidfile),
        }

    def pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None


class Rig:
    """Emulator + daemon + launcher unit for one scenario under `workdir`."""

    def __init__(self, workdir: Path, server: EmulatorServer) -> None:
        self.workdir = workdir
        self.server = server
        self.emu = Emu(server)
        self.state = server.emulator
        self.env = job_env(server.base_url, COOKBOOK_KEY)
        self.unit_path = workdir / "unit.json"
        self.launcher_log = workdir / "launcher.jsonl"
        self.jobs: list[Job] = []
        self.daemon: DaemonProc | None = None
        self.corrupted_at: datetime | None = None

    # jobs
    def add_job(
        self,
        name: str,
        *,
        through_exec: bool,
        save_every: int = 2,
        rolling_save_every: int = 0,
        hold_at_batch: int = 7,
        batches: int = 12,
    ) -> Job:
        log_path = self.workdir / name
        command = sl_job_command(
            log_path,
            batches=batches,
            save_every=save_every,
            rolling_save_every=rolling_save_every,
            hold_at_batch=hold_at_batch,
        )
        if through_exec:
            command = [str(exec_binary()), "exec", "--log-path", str(log_path), "--", *command]
        job = Job(
            name, log_path, command, self.workdir / f"{name}.out", self.workdir / f"{name}.pid"
        )
        self.jobs.append(job)
        unit = {
            "jobs": [j.unit_entry() for j in self.jobs],
            "log": str(self.launcher_log),
            "ready_marker": READY_MARKER,
            "ready_timeout_s": DAEMON_WAIT_S - 40,
        }
        self.unit_path.write_text(json.dumps(unit, indent=2))
        return job

    def launch(self) -> None:
        """Start the unit's jobs as its launcher would on boot (not through the daemon)."""
        done = subprocess.run(
            [sys.executable, str(RELAUNCH), "start", str(self.unit_path)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=DAEMON_WAIT_S,
            check=False,
        )
        assert done.returncode == 0, done.stderr + self.outputs()

    def outputs(self) -> str:
        return "\n".join(
            f"--- {j.output}\n{j.output.read_text(errors='replace')[-3000:]}"
            for j in self.jobs
            if j.output.exists()
        )

    def launcher_events(self, event: str | None = None) -> list[dict[str, Any]]:
        if not self.launcher_log.exists():
            return []
        rows = [json.loads(line) for line in self.launcher_log.read_text().splitlines() if line]
        return [r for r in rows if event is None or r["event"] == event]

    def started_pids(self) -> list[int]:
        return [int(r["pid"]) for r in self.launcher_events("start")]

    # daemon
    def start_daemon(self, **knobs: Any) -> DaemonProc:
        body = rule("cookbook", "unused", **knobs)
        body["match"] = {"labels": {"renderer_name": RENDERER}}
        body.setdefault("confirm_deadline", CONFIRM_DEADLINE)
        config = daemon_config(self.emu, self.workdir, [body])
        # The job's environment without what the daemon passes on by itself: the emulator's
        # URL and the job's own key, telemetry off, HF offline, outbound HTTP(S) refused.
        extra = {k: v for k, v in self.env.items() if os.environ.get(k) != v}
        config["handoffs"] = {
            "job": {
                "type": "command",
                "argv": [sys.executable, str(RELAUNCH), "restart", str(self.unit_path)],
                "timeout": f"{DAEMON_WAIT_S:g}s",
                "env": extra,
            }
        }
        config["tinker"]["restore_timeout"] = "60s"
        self.daemon = DaemonProc(self.workdir, config)
        self.daemon.start()
        return self.daemon

    def corrupt(self, run_id: str) -> None:
        assert self.daemon is not None
        # The daemon must have watched the run healthy first (two listings after the job's
        # last request), or the corruption could read as older than the watch.
        self.daemon.wait_polls(2)
        self.corrupted_at = datetime.now(UTC)
        self.emu.corrupt(run_id)

    def attempts(self, run_id: str) -> list[Attempt]:
        assert self.daemon is not None
        return self.daemon.attempts_for_run(run_id)

    def wait_attempts_done(self, run_id: str, predicate: Any, what: str) -> list[Attempt]:
        assert self.daemon is not None
        daemon = self.daemon

        def check() -> list[Attempt] | None:
            attempts = daemon.attempts_for_run(run_id)
            return attempts if attempts and predicate(attempts) else None

        got: list[Attempt] = daemon.wait_for(check, what, timeout_s=DAEMON_WAIT_S * 2)
        return got

    def healthy_killed(self, corrupted_pids: set[int]) -> int:
        """Live processes the launcher stopped that were not the corrupted run's job."""
        return sum(
            1
            for r in self.launcher_events("stop")
            if r["alive"] and int(r["pid"]) not in corrupted_pids
        )

    def restarts(self) -> int:
        """Launcher starts made on a handoff (they carry the attempt number)."""
        return len(
            {(r["attempt"], r["job"]) for r in self.launcher_events("start") if r["attempt"]}
        )

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.kill()
        for pid in self.started_pids():  # only the processes our launcher started
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        self.emu.http.close()


@contextlib.contextmanager
def rig(workdir: Path) -> Iterator[Rig]:
    workdir.mkdir(parents=True, exist_ok=True)
    with EmulatorServer(EmulatorConfig(runs=0, seed=5)) as server:
        made = Rig(workdir, server)
        try:
            yield made
        finally:
            made.close()


def seconds_since(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (end - start).total_seconds()


def record_for(log_path: Path, state_path: str) -> dict[str, Any]:
    """The first checkpoints.jsonl record that saved `state_path`."""
    for record in read_records(log_path):
        if record.get("state_path") == state_path:
            return record
    raise AssertionError(f"{state_path} is not in {log_path}/checkpoints.jsonl")


def first_batch_after(output: Path, offset: int) -> dict[str, Any]:
    """The first batch the job started after `offset` (a restart) asked for."""
    return wait_job_event(output, "batch", offset)


def restart_offset(r: Rig, job: Job, attempt_number: int) -> int:
    """Where the job's output stood when the launcher started it for attempt N."""
    starts = [
        s
        for s in r.launcher_events("start")
        if s["job"] == job.name and s["attempt"] == str(attempt_number)
    ]
    assert starts, f"no restart of {job.name} for attempt {attempt_number}"
    return int(starts[-1]["offset"])


def tags_of(attempt: Attempt) -> dict[str, str]:
    return {
        TAG_IDEMPOTENCY_KEY: attempt.attempt_id,
        TAG_LINEAGE: attempt.lineage_id,
        TAG_ATTEMPT: str(attempt.number),
        TAG_RECOVERED_FROM: attempt.corrupted_run_id,
    }


def outcomes(attempts: list[Attempt]) -> str:
    return ",".join(a.outcome.value if a.outcome else a.step.value for a in attempts)


# scenarios ----------------------------------------------------------------------------------


def through_exec(workdir: Path) -> Figures:
    """(i) The job runs under `tinker-recovery exec --log-path`: its last checkpoints.jsonl
    line is a rolling save (2 h TTL) that the rule's `min_ttl: 3h` skips (checkpoint guard
    off), so the daemon picks the periodic save before it and the resumed job must start from
    that one's batch, not from its last line."""
    with rig(workdir) as r:
        # The checkpoint guard would extend the rolling save's TTL (it guards a driven run's
        # newest checkpoint), which makes it the daemon's choice too: off here.
        daemon = r.start_daemon(
            checkpoint={"min_ttl": "3h", "protect_ttl": "1d"}, guard={"enabled": False}
        )
        job = r.add_job(
            "sft", through_exec=True, save_every=4, rolling_save_every=2, hold_at_batch=9
        )
        r.launch()
        wait_job_event(job.output, "hold")
        records = read_records(job.log_path)
        assert [(x["batch"], bool(x.get("rolling"))) for x in records] == [
            (2, True),
            (4, False),
            (6, True),
        ], r.outputs()
        [run_id] = {run_id_of(x["state_path"]) for x in records}
        first_pid = job.pid()
        assert first_pid is not None
        r.corrupt(run_id)

        attempts = r.wait_attempts_done(
            run_id, lambda a: a[-1].outcome is not None, "the attempt's verdict"
        )
        [attempt] = attempts
        assert attempt.outcome is AttemptOutcome.SUCCEEDED, (attempt, daemon.tail())
        chosen = record_for(job.log_path, str(attempt.checkpoint_path))
        assert chosen["batch"] == 4
        assert not chosen.get("rolling")
        resumed = first_batch_after(job.output, restart_offset(r, job, attempt.number))
        assert resumed["batch"] == chosen["batch"] != records[-1]["batch"]
        successor = r.state.runs[str(attempt.successor_run_id)]
        assert successor.loaded_from == attempt.handed_off_path == attempt.checkpoint_path
        assert successor.user_metadata == {**tags_of(attempt), "renderer_name": RENDERER}
        # Nothing more happens: no second handoff, the resumed job keeps its place.
        daemon.wait_polls(3)
        assert len(r.attempts(run_id)) == 1
        figures = Figures(
            "i exec, rolling last line",
            handoffs=len(attempts),
            restarts=r.restarts(),
            healthy_killed=r.healthy_killed({first_pid}),
            resumed_from=f"{chosen['name']} (batch {resumed['batch']})",
            outcome=outcomes(attempts),
            recovery_s=seconds_since(r.corrupted_at, attempt.finished_at),
        )
        assert (figures.restarts, figures.healthy_killed) == (1, 0), r.launcher_events()
        return figures


def no_integration(workdir: Path) -> Figures:
    """(ii) The job's command line is the cookbook job alone: it resumes from its own last
    checkpoints.jsonl line as an untagged run with renderer_name; the daemon matches it."""
    with rig(workdir) as r:
        daemon = r.start_daemon()
        job = r.add_job("sft", through_exec=False)
        r.launch()
        wait_job_event(job.output, "hold")
        records = read_records(job.log_path)
        assert [x["batch"] for x in records] == [2, 4], r.outputs()
        [run_id] = {run_id_of(x["state_path"]) for x in records}
        first_pid = job.pid()
        assert first_pid is not None
        r.corrupt(run_id)

        attempts = r.wait_attempts_done(
            run_id, lambda a: a[-1].outcome is not None, "the attempt's verdict"
        )
        [attempt] = attempts
        assert attempt.outcome is AttemptOutcome.SUCCEEDED, (attempt, daemon.tail())
        offset = restart_offset(r, job, attempt.number)
        resumed = first_batch_after(job.output, offset)
        assert resumed["batch"] == records[-1]["batch"]  # the job's own choice: its last line
        successor = r.state.runs[str(attempt.successor_run_id)]
        assert successor.user_metadata == {"renderer_name": RENDERER}  # untagged
        assert successor.loaded_from == records[-1]["state_path"]
        matched = [
            e
            for e in daemon.store_events(run_id)
            if e.attempt_id == attempt.attempt_id and "matched without tags" in e.reason
        ]
        assert matched, daemon.tail()
        # The resumed job keeps training to its hold; nobody restarts it again.
        wait_job_event(job.output, "hold", offset)
        daemon.wait_polls(3)
        assert len(r.attempts(run_id)) == 1
        figures = Figures(
            "ii no integration",
            handoffs=len(attempts),
            restarts=r.restarts(),
            healthy_killed=r.healthy_killed({first_pid}),
            resumed_from=f"{record_for(job.log_path, str(successor.loaded_from))['name']} "
            f"(batch {resumed['batch']})",
            outcome=outcomes(attempts),
            recovery_s=seconds_since(r.corrupted_at, attempt.finished_at),
        )
        assert (figures.restarts, figures.healthy_killed) == (1, 0), r.launcher_events()
        return figures


def ambiguous(workdir: Path) -> Figures:
    """(ii, ambiguous) Two jobs of the same shape in one unit (two workers restarted together):
    job B died, A's run is corrupted, the handoff restarts the unit and both resume as untagged
    runs matching A's. The daemon must not guess: successor_ambiguous, attempt failed at the
    deadline, lineage held, no second handoff, no job killed."""
    with rig(workdir) as r:
        daemon = r.start_daemon()
        a = r.add_job("a", through_exec=False)
        b = r.add_job("b", through_exec=False)
        r.launch()
        wait_job_event(a.output, "hold")
        wait_job_event(b.output, "hold")
        [run_a] = {run_id_of(x["state_path"]) for x in read_records(a.log_path)}
        pid_a, pid_b = a.pid(), b.pid()
        assert pid_a is not None
        assert pid_b is not None
        os.killpg(pid_b, signal.SIGKILL)  # B's node went away; its run is idle, not corrupted
        wait_until(lambda: not _alive(pid_b), "job B to die")
        r.corrupt(run_a)

        attempts = r.wait_attempts_done(
            run_a, lambda x: x[-1].outcome is not None, "the attempt's verdict"
        )
        [attempt] = attempts
        assert attempt.outcome is AttemptOutcome.FAILED, (attempt, daemon.tail())
        assert "ambiguous" in attempt.reason
        assert attempt.successor_run_id is None
        assert daemon.events("successor_ambiguous"), daemon.tail()
        lineage = daemon.lineage_for_run(run_a)
        assert lineage is not None
        assert lineage.held_by_operator
        # Both resumed jobs are alive and train on; nothing hands off again.
        for job in (a, b):
            wait_job_event(job.output, "hold", restart_offset(r, job, attempt.number))
        daemon.wait_polls(3)
        assert len(r.attempts(run_a)) == 1
        figures = Figures(
            "ii ambiguous (2 jobs)",
            handoffs=len(attempts),
            restarts=r.restarts(),
            healthy_killed=r.healthy_killed({pid_a}),
            resumed_from="none chosen (held)",
            outcome=outcomes(attempts),
            recovery_s=seconds_since(r.corrupted_at, attempt.finished_at),
        )
        assert (figures.restarts, figures.healthy_killed) == (2, 0), r.launcher_events()
        return figures


def unloadable(workdir: Path, restore: str) -> Figures:
    """(iii) The newest checkpoint cannot be loaded; the job runs under exec. The daemon (or the
    job dying on the load) learns it and the next handoff uses the checkpoint before it."""
    with rig(workdir) as r:
        daemon = r.start_daemon(restore=restore)
        job = r.add_job("sft", through_exec=True)
        r.launch()
        wait_job_event(job.output, "hold")
        records = read_records(job.log_path)
        assert [x["batch"] for x in records] == [2, 4], r.outputs()
        [run_id] = {run_id_of(x["state_path"]) for x in records}
        newest, older = records[-1], records[-2]
        r.emu.unloadable(newest["state_path"])
        first_pid = job.pid()
        assert first_pid is not None
        r.corrupt(run_id)

        attempts = r.wait_attempts_done(
            run_id,
            lambda x: (
                x[-1].outcome is AttemptOutcome.SUCCEEDED
                or len([y for y in x if y.outcome is not None]) >= 3
            ),
            "an attempt to succeed",
        )
        final = attempts[-1]
        handed_names = [str(x.handed_off_path).rsplit("/", 1)[-1] for x in attempts]
        assert final.outcome is AttemptOutcome.SUCCEEDED, (
            f"attempts {outcomes(attempts)}, handed off {handed_names}; last reason: "
            f"{final.reason}\n{daemon.tail()}"
        )
        assert final.checkpoint_path == older["state_path"]
        resumed = first_batch_after(job.output, restart_offset(r, job, final.number))
        assert resumed["batch"] == older["batch"]
        successor = r.state.runs[str(final.successor_run_id)]
        assert successor.loaded_from == final.handed_off_path
        assert (successor.user_metadata or {}).get(TAG_IDEMPOTENCY_KEY) == final.attempt_id
        if restore == "sdk":
            # One handoff, of the daemon's one proven copy of the older checkpoint; exec's
            # record in checkpoints.jsonl points the cookbook at it with the older loop state.
            assert len(attempts) == 1
            copy = str(final.handed_off_path)
            assert copy.endswith(older["name"] + "-recovery-1")
            assert run_id_of(copy) != run_id
            [resume_record] = [x for x in read_records(job.log_path) if x["state_path"] == copy]
            assert resume_record["batch"] == older["batch"]
            assert resume_record["tinker_recovery"]["resumed_from"] == older["state_path"]
        daemon.wait_polls(3)
        assert len(r.attempts(run_id)) == len(attempts)
        handed = [x for x in attempts if x.handed_off_path is not None]
        figures = Figures(
            f"iii unloadable newest, restore: {restore}",
            handoffs=len(handed),
            restarts=r.restarts(),
            healthy_killed=r.healthy_killed({first_pid}),
            resumed_from=f"{older['name']} (batch {resumed['batch']})",
            outcome=outcomes(attempts),
            recovery_s=seconds_since(r.corrupted_at, final.finished_at),
        )
        assert figures.healthy_killed == 0, r.launcher_events()
        return figures


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"
