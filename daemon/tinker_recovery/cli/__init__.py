"""The `tinker-recovery` command line (click + rich).

Exit codes everywhere: 0 done, 1 failed or refused (including "would do nothing"), 2 usage or
config. Tables go to stdout; refusals, warnings and errors to stderr. `-o json` (or `--json`)
prints one JSON document for scripts, `-o wide` (or `--wide`) every column without wrapping.
Shell completion: `eval "$(tinker-recovery completion bash)"` (or zsh, fish).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import click
from click.shell_completion import get_completion_class

from tinker_recovery import __version__
from tinker_recovery.cli import render
from tinker_recovery.errors import ConfigError, RecoveryError
from tinker_recovery.settings import Settings, parse_duration_s

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

PROG = "tinker-recovery"
COMPLETE_VAR = "_TINKER_RECOVERY_COMPLETE"
CONTEXT: dict[str, Any] = {
    "help_option_names": ["-h", "--help"],
    "show_default": True,
    "max_content_width": 100,
}


class DurationType(click.ParamType[float]):
    name = "DURATION"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_duration_s(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class RunIdType(click.ParamType[str]):
    """A run or lineage id as the daemon accepts them: 1-256 printable characters, no spaces."""

    name = "ID"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from tinker_recovery.core import lineage as core_lineage

        if not core_lineage.is_valid_lineage_id(value):
            self.fail(
                f"must be 1 to {core_lineage.MAX_LINEAGE_ID_CHARS} printable characters without "
                "whitespace",
                param,
                ctx,
            )
        return str(value)


def default_author() -> str:
    user = os.environ.get("USER") or os.environ.get("LOGNAME") or "unknown"
    return f"{user}@{socket.gethostname()}"


# -- shared options -------------------------------------------------------------------------


def output_options(func: F) -> F:
    func = click.option(
        "--wide", "wide", is_flag=True, help="Same as -o wide: every column, nothing wrapped."
    )(func)
    func = click.option("--json", "as_json", is_flag=True, help="Same as -o json.")(func)
    func = click.option(
        "-o",
        "--output",
        type=click.Choice(["table", "wide", "json"]),
        default="table",
        help="table (wraps long reasons), wide (every column, one line per row) or json.",
    )(func)
    return func


def store_options(func: F) -> F:
    func = click.option(
        "--state",
        metavar="URL",
        default=None,
        help="State store URL (sqlite:///PATH or postgresql://...); overrides the config's "
        "state.url.  [default: the config's, else $STATE_DIRECTORY/state.db]",
        show_default=False,
    )(func)
    func = click.option(
        "--config",
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        help="The daemon's YAML config (names the store and the daemon's HTTP port).  "
        "[default: embedded defaults]",
        show_default=False,
    )(func)
    return output_options(func)


def _output(output: str, as_json: bool, wide: bool) -> render.Output:
    if as_json:
        return "json"
    if wide:
        return "wide"
    return cast(render.Output, output)


def _load(config: Path | None) -> Settings:
    from tinker_recovery.shell import config_loader

    if config is None:
        return Settings()
    return config_loader.load_settings(config)


def _quiet_logs() -> None:
    """Commands that are not the daemon keep stdout for their answer: library and store log
    lines (a migration applied, a retried request) go to stderr, warnings and worse only."""
    from tinker_recovery.obs import logs

    logs.configure("console", "warning", sys.stderr, journal=False)


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _say_err(text: str) -> None:
    render.line(render.console("table", sys.stderr), text)


async def _on_store(
    config: Path | None, state: str | None, work: Callable[[Any, Settings], Awaitable[T]]
) -> T:
    from tinker_recovery import operator
    from tinker_recovery.shell.clock import SystemClock

    _quiet_logs()
    settings = _load(config)
    url = state or settings.state.url
    store = await operator.open_existing(url, SystemClock(), os.environ.get("STATE_DIRECTORY"))
    try:
        return await work(store, settings)
    finally:
        await store.close()


def _finish(result: Any, output: render.Output) -> int:
    """Print an operator.Result: JSON to stdout, or its lines (stderr when it failed)."""
    if output == "json":
        _emit_json(result.data)
    else:
        stream = sys.stdout if result.exit_code == 0 else sys.stderr
        out = render.console(output, stream)
        for text in result.lines:
            render.line(out, text)
    return int(result.exit_code)


# -- the group ------------------------------------------------------------------------------


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name=PROG, message="%(prog)s %(version)s")
def cli() -> None:
    """Watch Tinker training runs and recover corrupted ones from their best checkpoint.

    \b
    Examples:
      tinker-recovery run --config /etc/tinker-recovery/config.yaml
      tinker-recovery status --config /etc/tinker-recovery/config.yaml
      tinker-recovery doctor --config /etc/tinker-recovery/config.yaml

    Exit codes: 0 done, 1 failed or refused, 2 usage or config error.
    """


@cli.command()
@click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="YAML config.  [default: embedded defaults]",
    show_default=False,
)
def run(config: Path | None) -> int:
    """Run the daemon in the foreground (systemd Type=notify; SIGHUP reloads the config).

    \b
    Example:
      TINKER_API_KEY=... tinker-recovery run --config config.yaml
    """
    from tinker_recovery import __main__ as entry
    from tinker_recovery import app

    return entry._leave(app.run(_load(config), config_path=config))


@cli.command("check-config")
@click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="YAML config to validate.",
)
def check_config(config: Path) -> int:
    """Validate a config as `run` would and print it with secrets masked.

    Refusals are located (file:line:col: field: message, or the environment variable's name)
    and exit 2; warnings (facts of this machine, such as a handoff executable missing from
    PATH) go to stderr and do not change the exit code.

    \b
    Example:
      tinker-recovery check-config --config config.yaml
    """
    from tinker_recovery.shell import config_loader

    checked = config_loader.preflight(config)
    for warning in checked.warnings:
        sys.stderr.write(warning + "\n")
    sys.stdout.write(config_loader.render_effective(checked.settings))
    return 0


@cli.command()
@click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="The config the daemon runs with.",
)
@click.option(
    "--timeout",
    type=DurationType(),
    default="15s",
    help="Deadline for each network check (Tinker, webhooks).",
)
@output_options
def doctor(config: Path, timeout: float, output: str, as_json: bool, wide: bool) -> int:
    """Check everything `run` needs, on this machine, before starting it.

    Every check check-config makes, then: the API key accepted by Tinker (client config and
    one page of runs), the state store opens and takes a write (rolled back), each handoff's
    executable exists or webhook host resolves and accepts a connection, the HTTP port is
    free. One line per check (ok / warn / FAIL) and a verdict; exit 0 when nothing failed,
    1 when something did, 2 when the config itself is refused.

    \b
    Example:
      TINKER_API_KEY=... tinker-recovery doctor --config config.yaml
    """
    from tinker_recovery import doctor as doctor_checks

    mode = _output(output, as_json, wide)
    _quiet_logs()
    report = asyncio.run(doctor_checks.diagnose(config, timeout_s=timeout))
    if mode == "json":
        _emit_json(report.as_dict())
    else:
        out = render.console(mode)
        rows = [(check.level, check.name, check.detail) for check in report.checks]
        render.table(out, ("RESULT", "CHECK", "DETAIL"), rows, wrap=("DETAIL",))
        render.line(out, report.verdict)
    return report.exit_code


# -- operator commands ----------------------------------------------------------------------


@cli.command()
@store_options
@click.option(
    "--daemon-url",
    metavar="URL",
    default=None,
    help="The running daemon's HTTP root, for its /status.  [default: from the config's http]",
    show_default=False,
)
def status(
    config: Path | None,
    state: str | None,
    daemon_url: str | None,
    output: str,
    as_json: bool,
    wide: bool,
) -> int:
    """Fleet health first, then the lineages that need or needed attention, and the holds.

    Health (breaker, polls, dry run) comes from the running daemon's /status when it answers,
    else from the store and the config, with a note saying so. A lineage handed off to a
    successor reads "awaiting confirmation" until the successor is confirmed ("recovered").

    \b
    Examples:
      tinker-recovery status --config config.yaml
      tinker-recovery status --state sqlite:///var/lib/tinker-recovery/state.db -o wide
    """
    from tinker_recovery.cli import fleet

    mode = _output(output, as_json, wide)

    async def work(store: Any, settings: Settings) -> dict[str, Any]:
        from tinker_recovery import operator

        url = daemon_url or fleet.daemon_url(settings)
        daemon = await fleet.fetch_daemon_status(url)
        data = await operator.status_data(store)
        data["fleet"] = fleet.health(data, daemon, settings, _now())
        return data

    data = asyncio.run(_on_store(config, state, work))
    if mode == "json":
        _emit_json(data)
        return 0
    out = render.console(mode)
    render.table(
        out,
        ("HEALTH", "STATE", "DETAIL"),
        [(c["check"], c["state"], c["detail"]) for c in data["fleet"]["checks"]],
        wrap=("DETAIL",),
    )
    out.print()
    lineages = data["lineages"]
    if not lineages:
        render.line(out, "lineages: none needs or needed attention")
    else:
        header = ["LINEAGE", "STATE", "ATTEMPTS", "RUN", "UPDATED"]
        extra = ["ROOT RUN", "RULE", "DETECTED", "NEXT ATTEMPT"] if mode == "wide" else []
        rows = []
        for lin in lineages:
            row = [lin["lineage_id"], lin["display_state"], lin["attempts_total"]]
            row += [lin["current_run_id"], lin["updated_at"]]
            if extra:
                row += [lin["root_run_id"], lin["rule"], lin["detected_at"], lin["next_attempt_at"]]
            rows.append([*row, lin["reason"]])
        render.table(out, [*header, *extra, "REASON"], rows)
    if data["hold_details"]:
        out.print()
        render.table(
            out,
            ("HELD", "BY", "SINCE", "REASON"),
            [(h["scope"], h["by"], h["at"], h["reason"] or "") for h in data["hold_details"]],
        )
    return 0


@cli.command()
@click.argument("target", metavar="LINEAGE|RUN")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=200,
    help="Show at most this many events (the newest).",
)
@store_options
def history(
    target: str,
    limit: int,
    config: Path | None,
    state: str | None,
    output: str,
    as_json: bool,
    wide: bool,
) -> int:
    """Every recorded event of one lineage or run, oldest first (decisions, attempts,
    rejected checkpoints, operator requests and their refusals).

    \b
    Examples:
      tinker-recovery history run-7f3a:train:0 --config config.yaml
      tinker-recovery history my-lineage --limit 20 -o wide
    """
    from tinker_recovery import operator

    mode = _output(output, as_json, wide)

    async def work(store: Any, _: Settings) -> dict[str, Any]:
        return await operator.history_data(store, target, limit)

    data = asyncio.run(_on_store(config, state, work))
    if mode == "json":
        _emit_json(data)
        return 0
    out = render.console(mode)
    lineage = data["lineage"]
    if lineage is None:
        render.line(out, f"run {target}: no lineage in the store; events recorded for it:")
    else:
        render.line(
            out,
            f"lineage {lineage['lineage_id']}: {lineage['display_state']} ({lineage['reason']})",
        )
    header = ["AT", "EVENT", "RUN"]
    extra = ["SEQ", "ATTEMPT", "DATA"] if mode == "wide" else []
    rows = []
    for event in data["events"]:
        row = [event["at"], event["kind"], event["run_id"] or ""]
        if extra:
            row += [event["seq"], event["attempt_id"] or "", json.dumps(event["data"])]
        rows.append([*row, event["reason"]])
    render.table(out, [*header, *extra, "REASON"], rows)
    return 0


@cli.command()
@click.argument("run_id", metavar="RUN", type=RunIdType())
@click.option(
    "--checkpoint",
    metavar="TINKER_PATH",
    default=None,
    help="Restore from this tinker://RUN/... checkpoint.  [default: the best valid one]",
    show_default=False,
)
@click.option("--wait", is_flag=True, help="Follow the request until the leader settles it.")
@click.option(
    "--until",
    type=click.Choice(["started", "finished"]),
    default="started",
    help="With --wait: stop once the attempt started, or once it finished.",
)
@click.option(
    "--timeout", type=DurationType(), default="5m", help="With --wait: give up after this long."
)
@click.option("--by", default=None, help="Who asks (recorded).  [default: $USER@host]")
@store_options
def recover(
    run_id: str,
    checkpoint: str | None,
    wait: bool,
    until: str,
    timeout: float,
    by: str | None,
    config: Path | None,
    state: str | None,
    output: str,
    as_json: bool,
    wide: bool,
) -> int:
    """Ask the leader to recover RUN now, even if policy would not (yet).

    What can be checked without the Tinker key is checked at once: the checkpoint must be a
    tinker://RUN/... path not marked bad; a known run must be its lineage's current run with
    no attempt in flight; a run the store has never seen is queued only while a daemon holds
    the lease. A refusal exits 1 and is recorded, so `history RUN` shows it. The rest (is the
    run listed, does a rule hand it off) the leader decides: --wait reports its verdict
    (exit 0 started, or with --until finished succeeded; 1 refused, failed or timed out).

    \b
    Examples:
      tinker-recovery recover run-7f3a:train:0 --wait
      tinker-recovery recover run-7f3a:train:0 --wait --until finished --timeout 30m \\
          --checkpoint tinker://run-7f3a:train:0/weights/000040
    """
    from tinker_recovery import operator
    from tinker_recovery.shell.clock import SystemClock

    mode = _output(output, as_json, wide)
    author = by or default_author()

    async def work(store: Any, _: Settings) -> Any:
        clock = SystemClock()
        queued = await operator.recover(store, run_id, checkpoint, by=author, now=_now())
        if queued.exit_code != 0 or not wait:
            return queued
        if mode != "json":
            _finish(queued, mode)
        followed = await operator.wait_outcome(
            store,
            clock,
            queued.data["request_id"],
            run_id,
            timeout_s=timeout,
            until_finished=until == "finished",
        )
        if mode == "json":
            return operator.Result(
                {**queued.data, **followed.data}, followed.lines, followed.exit_code
            )
        return followed

    return _finish(asyncio.run(_on_store(config, state, work)), mode)


@cli.command()
@click.option(
    "--lineage",
    type=RunIdType(),
    default=None,
    help="Hold this lineage only.  [default: the whole fleet]",
    show_default=False,
)
@click.option("--reason", required=True, help="Why (shown in status and history).")
@click.option("--by", default=None, help="Who holds it (recorded).  [default: $USER@host]")
@store_options
def pause(
    lineage: str | None,
    reason: str,
    by: str | None,
    config: Path | None,
    state: str | None,
    output: str,
    as_json: bool,
    wide: bool,
) -> int:
    """Hold one lineage, or the whole fleet: corruption is still detected and recorded, but
    nothing is restarted until `resume`. Refuses a lineage the store does not know.

    \b
    Examples:
      tinker-recovery pause --reason "backend incident INC-123"
      tinker-recovery pause --lineage my-lineage --reason "bad data in shard 7" --by ana
    """
    from tinker_recovery import operator

    mode = _output(output, as_json, wide)

    async def work(store: Any, _: Settings) -> Any:
        return await operator.pause(
            store, lineage, reason=reason, by=by or default_author(), now=_now()
        )

    return _finish(asyncio.run(_on_store(config, state, work)), mode)


@cli.command()
@click.option(
    "--lineage",
    type=RunIdType(),
    default=None,
    help="Lift this lineage's hold.  [default: the fleet-wide hold]",
    show_default=False,
)
@click.option("--by", default=None, help="Who lifts it (recorded).  [default: $USER@host]")
@store_options
def resume(
    lineage: str | None,
    by: str | None,
    config: Path | None,
    state: str | None,
    output: str,
    as_json: bool,
    wide: bool,
) -> int:
    """Lift a hold set by `pause` (or by the incident breaker). Exits 1 if nothing is held.

    \b
    Examples:
      tinker-recovery resume
      tinker-recovery resume --lineage my-lineage
    """
    from tinker_recovery import operator

    mode = _output(output, as_json, wide)

    async def work(store: Any, _: Settings) -> Any:
        return await operator.resume(store, lineage, by=by or default_author(), now=_now())

    return _finish(asyncio.run(_on_store(config, state, work)), mode)


@cli.command()
@click.option(
    "--keep",
    type=click.IntRange(min=1),
    default=3,
    help="Usable training checkpoints to keep per lineage (the newest).",
)
@click.option(
    "--lineage",
    type=RunIdType(),
    default=None,
    help="Prune this lineage only.  [default: every lineage in the store]",
    show_default=False,
)
@click.option("--dry-run", is_flag=True, help="Show what would be deleted; delete nothing.")
@store_options
def prune(
    keep: int,
    lineage: str | None,
    dry_run: bool,
    config: Path | None,
    state: str | None,
    output: str,
    as_json: bool,
    wide: bool,
) -> int:
    """Delete old training checkpoints of the store's lineages (opt-in: only this does).

    Per lineage, over all its runs (root, current, corrupted and successor runs), keeps the
    newest KEEP usable training checkpoints, the current run's newest (the guard's), any
    checkpoint an attempt used or a pending `recover --checkpoint` names, and everything of a
    lineage that is held or has an attempt in flight. Sampler checkpoints are left alone.
    The rest are deleted one by one; a failure is reported, the others go on (exit 1 if any
    failed). --dry-run lists them with the storage they would free, and why each other one
    stays.

    \b
    Examples:
      tinker-recovery prune --config config.yaml --dry-run
      tinker-recovery prune --config config.yaml --keep 5 --lineage my-lineage
    """
    from tinker_recovery import prune as prune_mod

    mode = _output(output, as_json, wide)

    async def work(store: Any, settings: Settings) -> Any:
        return await prune_mod.prune_with_settings(
            store, settings, keep=keep, now=_now(), lineage_id=lineage, dry_run=dry_run
        )

    report = asyncio.run(_on_store(config, state, work))
    if mode == "json":
        _emit_json(report.as_dict())
        return int(report.exit_code)
    _render_prune(report.as_dict(), mode)
    return int(report.exit_code)


def _render_prune(data: dict[str, Any], mode: render.Output) -> None:
    out = render.console(mode)
    err = render.console(mode, sys.stderr)
    for lin in data["lineages"]:
        render.line(out, f"lineage {lin['lineage_id']}: runs {', '.join(lin['runs']) or '-'}")
        if lin["error"]:
            render.line(err, f"error: lineage {lin['lineage_id']}: {lin['error']}")
            continue
        header = ["CHECKPOINT", "ACTION", "SIZE"]
        extra = ["TIME", "EXPIRES"] if mode == "wide" else []
        rows = []
        for c in lin["checkpoints"]:
            action = c["result"] or c["action"]
            row = [c["tinker_path"], action.replace("_", " "), _size(c["size_bytes"])]
            if extra:
                row += [c["time"], c["expires_at"] or "never"]
            rows.append([*row, c["reason"] + (f": {c['detail']}" if c["detail"] else "")])
        if rows:
            render.table(out, [*header, *extra, "REASON"], rows)
        else:
            render.line(out, "  no checkpoints listed")
        for c in lin["checkpoints"]:
            if c["result"] == "failed":
                render.line(err, f"error: deleting {c['tinker_path']} failed: {c['detail']}")
    done = "would delete" if data["dry_run"] else "deleted"
    count = data["would_delete" if data["dry_run"] else "deleted"]
    unknown = f" ({data['unknown_sizes']} of unknown size)" if data["unknown_sizes"] else ""
    render.line(
        out,
        f"{'dry run: ' if data['dry_run'] else ''}{done} {count} checkpoint(s), "
        f"freeing {_size(data['frees_bytes'])}{unknown}; kept the newest {data['keep']} usable "
        "per lineage; sampler checkpoints are left alone",
    )
    if data["failed"]:
        render.line(err, f"{data['failed']} failure(s): see the errors above")


def _size(size_bytes: int | None) -> str:
    if size_bytes is None:
        return "unknown"
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size_bytes >= scale:
            return f"{size_bytes / scale:.1f} {unit}"
    return f"{size_bytes} B"


# -- tools ----------------------------------------------------------------------------------


@cli.command()
@click.option("--host", default="127.0.0.1", help="Bind address.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, help="Port (0: any).")
@click.option("--runs", type=click.IntRange(min=0), default=50, help="Seeded runs.")
@click.option("--seed", type=int, default=7, help="Seed of the fleet.")
@click.option("--page-max", type=click.IntRange(min=1), default=100, help="Runs per page cap.")
def emulate(host: str, port: int, runs: int, seed: int, page_max: int) -> int:
    """Serve a local Tinker API for rehearsals (control API under /_emulator/).

    \b
    Example:
      tinker-recovery emulate --port 8765 --runs 200
    """
    from tinker_recovery import emulator

    return emulator.serve(host, port, runs, seed, page_max)


@cli.command()
@click.option(
    "--workdir", type=click.Path(path_type=Path), default=Path(".demo"), help="Scratch dir."
)
@click.option("--jobs", type=click.IntRange(min=1), default=4, help="Training jobs to run.")
def demo(workdir: Path, jobs: int) -> int:
    """Emulator + daemon + a scripted incident, with embedded defaults.

    \b
    Example:
      tinker-recovery demo --jobs 4
    """
    from tinker_recovery.demo import run as run_demo

    return run_demo(workdir=workdir, jobs=jobs)


@cli.command(
    "exec",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.pass_context
def exec_(ctx: click.Context) -> int:
    """Run a training job under recovery (tags its runs, resumes cookbook jobs).

    tinker-recovery exec [options] -- CMD...; `tinker-recovery exec --help` for its options.
    """
    from tinker_recovery.jobside import exec as exec_command

    parser = argparse.ArgumentParser(
        prog=f"{PROG} exec",
        description=exec_command.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    exec_command.add_arguments(parser)
    return exec_command.run(parser.parse_args(ctx.args))


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> int:
    """Print the shell completion script for SHELL.

    \b
    Examples:
      eval "$(tinker-recovery completion bash)"     # in ~/.bashrc
      tinker-recovery completion fish > ~/.config/fish/completions/tinker-recovery.fish
    """
    found = get_completion_class(shell)
    assert found is not None  # every Choice above is a shell click knows
    sys.stdout.write(found(cli, {}, PROG, COMPLETE_VAR).source() + "\n")
    return 0


def _now() -> datetime:
    from tinker_recovery.shell.clock import SystemClock

    return SystemClock().now()


# -- entry ----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = cli.main(
            args=args, prog_name=PROG, complete_var=COMPLETE_VAR, standalone_mode=False
        )
    except click.UsageError as exc:
        exc.show()
        return 2
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        sys.stderr.write("aborted\n")
        return 1
    except ConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    except RecoveryError as exc:
        from tinker_recovery import operator

        prefix = "refused" if isinstance(exc, operator.OperatorRefused) else "error"
        _say_err(f"{prefix}: {exc}")
        return 1
    return result if isinstance(result, int) else 0


__all__ = ["cli", "main"]
