"""The `tinker-recovery` command: parse argv, load settings, hand over to the right entry point.

Exit codes: 0 success, 2 bad config or usage, 1 runtime failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tinker_recovery import __version__
from tinker_recovery.errors import ConfigError, RecoveryError
from tinker_recovery.settings import Settings


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]  # argparse's is NoReturn too
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tinker-recovery", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", type=Path, help="YAML config (default: embedded defaults)")

    check = sub.add_parser("check-config", help="validate a config and print it, secrets masked")
    check.add_argument("--config", type=Path, required=True)

    for name, text in (
        ("status", "lineages that need or needed attention"),
        ("history", "every event of one lineage or run"),
        ("recover", "ask the leader to recover a run now"),
        ("pause", "hold one lineage, or the whole fleet"),
        ("resume", "lift a hold"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--config", type=Path, help="config naming the state store")
        cmd.add_argument("--state", help="state URL (overrides the config)")
        cmd.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "history":
            cmd.add_argument("target", metavar="LINEAGE|RUN")
            cmd.add_argument("--limit", type=int, default=200)
        if name == "recover":
            cmd.add_argument("run_id", metavar="RUN")
            cmd.add_argument("--checkpoint", metavar="TINKER_PATH")
        if name in ("pause", "resume"):
            cmd.add_argument("--lineage", help="one lineage (default: the whole fleet)")

    emulate = sub.add_parser("emulate", help="serve a local Tinker API for rehearsals")
    emulate.add_argument("--host", default="127.0.0.1")
    emulate.add_argument("--port", type=int, default=8765)
    emulate.add_argument("--runs", type=int, default=50)
    emulate.add_argument("--seed", type=int, default=7)
    emulate.add_argument("--page-max", type=int, default=100)

    demo = sub.add_parser("demo", help="emulator + daemon + a scripted incident")
    demo.add_argument("--workdir", type=Path, default=Path(".demo"))
    demo.add_argument("--jobs", type=int, default=4)

    from tinker_recovery.jobside import exec as exec_command

    job = sub.add_parser(
        "exec",
        help="run a training job under recovery (tags its runs, resumes cookbook jobs)",
        description=exec_command.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    exec_command.add_arguments(job)
    return parser


def _load(config: Path | None) -> Settings:
    from tinker_recovery.shell import config_loader

    if config is None:
        return Settings()
    return config_loader.load_settings(config)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    except RecoveryError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    command: str = args.command
    if command == "run":
        from tinker_recovery import app

        return _leave(app.run(_load(args.config), config_path=args.config))
    if command == "check-config":
        from tinker_recovery.shell import config_loader

        settings = config_loader.load_settings(args.config)
        sys.stdout.write(config_loader.render_effective(settings))
        return 0
    if command == "emulate":
        from tinker_recovery import emulator

        return emulator.serve(args.host, args.port, args.runs, args.seed, args.page_max)
    if command == "exec":
        from tinker_recovery.jobside import exec as exec_command

        return exec_command.run(args)
    if command == "demo":
        from tinker_recovery.demo import run as run_demo

        return run_demo(workdir=args.workdir, jobs=args.jobs)
    from tinker_recovery import operator

    settings = _load(args.config)
    url = args.state or settings.state.url
    result = asyncio.run(operator.execute(command, args, url, os.environ.get("STATE_DIRECTORY")))
    if args.json:
        sys.stdout.write(json.dumps(result.data, indent=2, default=str) + "\n")
    else:
        sys.stdout.write(result.text)
    return result.exit_code


def _leave(code: int) -> int:
    """Exit the daemon process with `code` now, skipping interpreter finalisation, if the SDK's
    Rust HTTP transport (pyqwest) was loaded by a `restore: sdk`.

    On CPython 3.11 a pyqwest thread still handing its last response to Python while the
    interpreter finalises aborts the process (SIGABRT), even after the SDK session was closed
    and waited for: a clean stop would then exit 134. Nothing is lost by leaving early: the
    store and clients are closed by now, and the log streams are flushed here.
    """
    if "pyqwest" not in sys.modules:
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
