"""`tinker-recovery exec`: run an unmodified tinker-SDK job under recovery.

    tinker-recovery exec [--log-path DIR] [--handoff-file FILE] [--detach [--output FILE]]
                         [--progress-timeout DURATION] -- CMD...
    tinker-recovery exec --write-handoff FILE [-- CMD...]

Job side: the attempt comes from TINKER_RECOVERY_* (a command handoff) or, when those are
absent, from --handoff-file (the relay). With --log-path, a cookbook job is made to resume from
the attempt's checkpoint (resume.py). CMD then runs with the in-job hook on PYTHONPATH, which
tags every training client it creates and reports its first progress. Foreground (default):
signals are forwarded, exit status is CMD's. --detach (as the daemon's handoff command): exit 0
once the job made progress and leave it running; if it exits first, exit non-zero with its status.

Daemon side: --write-handoff FILE stores the TINKER_RECOVERY_* values of the handoff in FILE
(atomically), then runs CMD (e.g. `systemctl restart train.service`) and returns its status.
A job side with --handoff-file FILE applies it once: the file is renamed to FILE.applied when
the job made progress under it, so a later restart does not roll the job back.

Exit status: CMD's (128+N when killed by signal N); 1 refused or failed before CMD ran, or a
detached job that ended (with status 0) or stalled before progress; 2 usage.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from tinker_recovery.jobside import attempt, resume, supervise
from tinker_recovery.jobside.attempt import Handoff, HandoffInvalid
from tinker_recovery.jobside.supervise import say

DEFAULT_PROGRESS_TIMEOUT_S = 900.0
APPLIED_SUFFIX = ".applied"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration_s(text: str) -> float:
    match = _DURATION.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 15m or 1h")
    return float(match.group(1)) * _UNIT_S[match.group(2) or "s"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-path",
        type=Path,
        metavar="DIR",
        help="the job's tinker-cookbook log_path: before CMD starts, append to "
        "DIR/checkpoints.jsonl the record that makes the job resume from the handed-off "
        "checkpoint with that checkpoint's loop state (default: leave resuming to the job)",
    )
    parser.add_argument(
        "--handoff-file",
        type=Path,
        metavar="FILE",
        help="take the attempt from FILE (written by --write-handoff, or a saved webhook body) "
        "when TINKER_RECOVERY_* are not set; renamed to FILE.applied once the job made "
        "progress under it (default: environment only)",
    )
    parser.add_argument(
        "--detach",
        action="store_true",
        help="for use as the daemon's handoff command: start CMD in its own session, exit 0 "
        "when it made progress (first optim_step or save_state) leaving it running; exit "
        "non-zero with its status if it ends first (default: run CMD in the foreground)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="with --detach: append CMD's stdout and stderr here "
        "(default: DIR/exec-output.log with --log-path, else ./exec-output.log)",
    )
    parser.add_argument(
        "--progress-timeout",
        type=duration_s,
        default=DEFAULT_PROGRESS_TIMEOUT_S,
        metavar="DURATION",
        help="with --detach: stop the job and fail if it made no progress within this; keep it "
        "below the handoff's timeout (default: 15m)",
    )
    parser.add_argument(
        "--write-handoff",
        type=Path,
        metavar="FILE",
        help="daemon side of a relay: write this handoff's TINKER_RECOVERY_* values to FILE, "
        "then run CMD (e.g. the launcher's restart) and return its status",
    )
    parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...")


def run(args: argparse.Namespace) -> int:
    cmd: list[str] = list(args.cmd)
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    if args.write_handoff is not None:
        if args.handoff_file or args.log_path or args.detach:
            say("--write-handoff runs on the daemon's side; it takes no job options")
            return 2
        return _write_handoff(args.write_handoff, cmd)
    if not cmd:
        say("no command given: tinker-recovery exec [options] -- CMD...")
        return 2
    try:
        handoff, from_file = _find_handoff(args.handoff_file)
        if handoff is not None and args.log_path is not None:
            outcome = resume.apply(args.log_path, handoff)
            say(outcome.detail)
    except (HandoffInvalid, resume.ResumeRefused) as exc:
        say(f"refused: {exc}")
        return 1
    except OSError as exc:
        say(f"refused: {exc}")
        return 1
    extra = handoff.environment() if (handoff is not None and from_file) else {}
    return _run_job(args, cmd, handoff, extra, args.handoff_file if from_file else None)


def _find_handoff(handoff_file: Path | None) -> tuple[Handoff | None, bool]:
    handoff = attempt.from_environment()
    if handoff is not None or handoff_file is None:
        return handoff, False
    from_file = attempt.read_file(handoff_file)
    return from_file, from_file is not None


def _write_handoff(path: Path, cmd: list[str]) -> int:
    try:
        handoff = attempt.from_environment()
    except HandoffInvalid as exc:
        say(f"refused: {exc}")
        return 1
    if handoff is None:
        say("refused: TINKER_RECOVERY_CHECKPOINT is not set; run this as a handoff command")
        return 1
    try:
        attempt.write_file(path, handoff)
    except OSError as exc:
        say(f"cannot write {path}: {exc.strerror or exc}")
        return 1
    say(f"attempt {handoff.attempt} of {handoff.lineage_id} written to {path}")
    if not cmd:
        return 0
    try:
        return supervise.exit_status(subprocess.run(cmd, check=False).returncode)
    except OSError as exc:
        say(f"cannot run {cmd[0]!r}: {exc.strerror or exc}")
        return 127


def _run_job(
    args: argparse.Namespace,
    cmd: list[str],
    handoff: Handoff | None,
    extra: dict[str, str],
    consume: Path | None,
) -> int:
    def on_progress(event: dict[str, Any]) -> None:
        if consume is not None and handoff is not None:
            _consume(consume, handoff)

    output = args.output
    if args.detach and output is None:
        output = (args.log_path or Path.cwd()) / "exec-output.log"
    env = {**os.environ, **extra}
    job = supervise.Supervisor(
        cmd, env=env, detached=args.detach, output=output, on_progress=on_progress
    )
    try:
        try:
            pid = job.start()
        except OSError as exc:
            say(f"cannot run {cmd[0]!r}: {exc.strerror or exc}")
            return 127
        if args.detach:
            return _detached(job, pid, args.progress_timeout, output)
        job.forward_signals()
        ended = job.wait(until_progress=False, timeout_s=None)
        assert ended.returncode is not None
        return supervise.exit_status(ended.returncode)
    finally:
        job.close()


def _detached(job: supervise.Supervisor, pid: int, timeout_s: float, output: Path | None) -> int:
    job.stop_on_signals()
    try:
        ended = job.wait(until_progress=True, timeout_s=timeout_s)
    except supervise.Interrupted as stopped:
        job.stop()  # the handoff was abandoned before progress: leave nothing behind
        name = supervise.signal_name(stopped.signum)
        say(f"got {name} before job {pid} made progress; stopped it")
        return 128 + stopped.signum
    why = f" (last error: {ended.watch.last_failure})" if ended.watch.last_failure else ""
    if ended.returncode is not None:
        say(f"job {pid} {supervise.how_it_ended(ended.returncode)} before making progress{why}")
        return supervise.exit_status(ended.returncode) or 1
    if ended.timed_out:
        job.stop()
        say(f"job {pid} made no progress within {timeout_s:g}s; stopped it{why}")
        return 1
    progress = ended.watch.progress or {}
    say(
        f"job {pid} made progress ({progress.get('call')} on {progress.get('model_id')}); "
        f"left running, output in {output}"
    )
    return 0


def _consume(path: Path, applied: Handoff) -> None:
    """The job progressed under this relay file: move it aside so it is applied only once.

    Only if it still holds the attempt we applied: a newer one written since stays for the next
    start (the daemon's next attempt, which this job's progress does not answer)."""
    try:
        current = attempt.read_file(path)
    except HandoffInvalid:
        current = None
    if current is None or current.idempotency_key != applied.idempotency_key:
        return
    try:
        os.replace(path, path.with_name(path.name + APPLIED_SUFFIX))
    except FileNotFoundError:
        return
    except OSError as exc:
        say(f"could not rename {path} after progress: {exc.strerror or exc}")
        return
    attempt.fsync_directory(path.parent)
    say(f"{path} applied; renamed to {path.name}{APPLIED_SUFFIX}")
