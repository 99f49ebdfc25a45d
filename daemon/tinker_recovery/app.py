"""Wiring only: build the dependencies, run them in one TaskGroup, stop on one event.

`run(...)` is the daemon's entry point; `main(...)` takes already-built dependencies so whole-daemon
tests can inject fakes. Signals only set events: SIGTERM/SIGINT ask for a graceful stop (a second
one cancels everything), SIGHUP asks for a config reload.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import signal
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import structlog
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from tinker_recovery import __version__, operator
from tinker_recovery.core import attempt as attempt_rules
from tinker_recovery.core.model import LineageState
from tinker_recovery.errors import ConfigError, RecoveryError
from tinker_recovery.obs import logs
from tinker_recovery.obs.metrics import Metrics
from tinker_recovery.settings import Settings
from tinker_recovery.shell import config_loader, handoff, http, procs, sdnotify, secrets
from tinker_recovery.shell.clock import Clock, SystemClock
from tinker_recovery.shell.executor import Executor
from tinker_recovery.shell.gateway import TinkerGateway, make_http_client
from tinker_recovery.shell.guard import CheckpointGuard
from tinker_recovery.shell.poller import Poller
from tinker_recovery.shell.restore import SdkRestorer
from tinker_recovery.shell.store import open_store
from tinker_recovery.shell.store.base import Store
from tinker_recovery.shell.store.lease import LeaderGuard

log = structlog.get_logger(__name__)

SHUTDOWN_GRACE_S = 20.0


@dataclass
class Daemon:
    """Everything `main` runs. Built by `build` for real, or by tests with fakes."""

    settings: Settings
    store: Store
    poller: Poller
    executor: Executor
    guard: LeaderGuard
    metrics: Metrics
    health: http.Health
    clock: Clock
    notifier: sdnotify.Notifier
    http_client: httpx.AsyncClient | None = None
    config_path: Path | None = None
    on_port: Callable[[int], None] | None = None
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Builds the handoff actions for a reloaded config (None: handoffs cannot be reloaded).
    handoff_builder: Callable[[Settings], Mapping[str, handoff.HandoffAction]] | None = None
    # Checkpoint guard, work at risk and stalls (the poller runs it; /status reads it).
    checkpoint_guard: CheckpointGuard | None = None


def _daemon_registry() -> CollectorRegistry:
    """A registry per daemon (tests build several in one process), with the process and
    platform collectors the default registry would have had."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def replica_name(settings: Settings) -> str:
    return settings.state.replica_id or f"{socket.gethostname()}:{os.getpid()}"


async def build(
    settings: Settings,
    *,
    config_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    clock: Clock | None = None,
) -> Daemon:
    """Real dependencies for `settings`. Raises ConfigError for anything the operator must fix."""
    env = os.environ if env is None else env
    clock = clock or SystemClock()
    api_key = secrets.resolve_api_key(settings.tinker, env)
    if api_key is None:
        raise ConfigError(
            "no Tinker API key: set TINKER_API_KEY, tinker.api_key_file or a systemd credential "
            "named tinker_api_key"
        )
    metrics = Metrics(_daemon_registry())
    store = open_store(settings.state.url, clock=clock, state_directory=env.get("STATE_DIRECTORY"))
    http_client = make_http_client(settings.tinker)
    gateway = TinkerGateway(
        base_url=settings.tinker.base_url,
        api_key=api_key,
        http=http_client,
        cfg=settings.tinker,
        clock=clock,
        metrics=metrics,
    )
    needs_restorer = any(rule.restore == "sdk" for rule in settings.policy.rules)
    restorer = (
        SdkRestorer(
            base_url=settings.tinker.base_url,
            api_key=api_key,
            timeout_s=settings.tinker.restore_timeout,
        )
        if needs_restorer
        else None
    )
    runner = procs.SubprocessRunner()
    # Webhooks get their own client: they may need the environment's proxy settings, and each
    # handoff applies its own configured timeout rather than the Tinker request timeout.
    webhook_http = httpx.AsyncClient(timeout=None)

    def build_actions(config: Settings) -> dict[str, handoff.HandoffAction]:
        return {
            name: handoff.build_handoff(cfg, runner=runner, http=webhook_http, clock=clock)
            for name, cfg in config.handoffs.items()
        }

    actions = build_actions(settings)
    guard = LeaderGuard(
        store,
        replica_name(settings),
        settings.state.lease_ttl,
        settings.state.lease_renew_interval,
        clock,
    )
    executor = Executor(
        store=store,
        gateway=gateway,
        restorer=restorer,
        handoffs=actions,
        clock=clock,
        metrics=metrics,
        rand=random.random,
        max_concurrent=settings.policy.max_concurrent,
        rules=settings.policy.rules,
        dry_run=settings.policy.dry_run,
        may_act=lambda epoch: attempt_rules.may_hand_off(
            attempt_epoch=epoch, leader_epoch=guard.epoch, is_leader=guard.is_leader
        ),
    )
    health = http.Health(poll_interval_s=settings.poll.interval)
    checkpoint_guard = CheckpointGuard(
        gateway=gateway,
        store=store,
        metrics=metrics,
        call_timeout_s=settings.tinker.request_timeout * settings.tinker.retry_attempts,
    )
    poller = Poller(
        source=gateway,
        store=store,
        executor=executor,
        policy=settings.policy,
        poll=settings.poll,
        clock=clock,
        metrics=metrics,
        health=health,
        is_leader=lambda: guard.is_leader,
        lease_epoch=lambda: guard.epoch,
        retention=settings.state,
        guard=checkpoint_guard,
    )
    return Daemon(
        settings=settings,
        store=store,
        poller=poller,
        executor=executor,
        guard=guard,
        metrics=metrics,
        health=health,
        clock=clock,
        notifier=sdnotify.Notifier(env),
        http_client=http_client,
        config_path=config_path,
        handoff_builder=build_actions,
        closers=[webhook_http.aclose],
        checkpoint_guard=checkpoint_guard,
    )


def run(settings: Settings, *, config_path: Path | None = None) -> int:
    """The daemon's process entry point: 0 clean stop, 2 bad config, 1 runtime failure."""
    logs.configure(settings.log.format, settings.log.level)
    try:
        return asyncio.run(_build_and_run(settings, config_path))
    except ConfigError as exc:
        log.error("config_error", error=str(exc))
        return 2
    except KeyboardInterrupt:
        return 0
    except asyncio.CancelledError:
        # A second SIGTERM/SIGINT cancelled the graceful phase: in-flight steps were cut short
        # (unfinished attempts are reconciled on the next start). Not a clean stop.
        log.warning("daemon_forced_stop")
        return 1


async def _build_and_run(settings: Settings, config_path: Path | None) -> int:
    daemon = await build(settings, config_path=config_path)
    tune_gc()
    return await main(daemon)


def tune_gc() -> None:
    """Everything built at start-up (the SDK, pydantic models, settings) is frozen out of the
    collector's sight, and the young-generation threshold raised: a 100k-run listing allocates
    millions of small objects that are garbage a moment later, and the default thresholds ran
    2-3 full collections per listing. Measured in benchmarks/bench_listing.py (about a third of
    the 100k cycle's CPU, for 10-20 MB more peak RSS); docs/tinker-gateway.md has the figures."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


async def main(daemon: Daemon, *, stop: asyncio.Event | None = None) -> int:
    """Run the daemon until `stop` is set (by a signal or the caller). Returns the exit code."""
    stop = stop or asyncio.Event()
    reload_requested = asyncio.Event()
    current = asyncio.current_task()
    _install_signals(stop, reload_requested, daemon, current)
    settings = daemon.settings
    try:
        await daemon.store.open()
    except RecoveryError as exc:
        log.error("store_open_failed", error=str(exc))
        return 1
    daemon.health.config_loaded = True
    daemon.health.store_open = True
    daemon.metrics.build_info.info({"version": __version__})
    daemon.metrics.config_loaded(
        at_unix_s=daemon.clock.now().timestamp(), dry_run=settings.policy.dry_run
    )
    log.info("daemon_starting", version=__version__, replica=replica_name(settings))
    daemon.guard.add_listener(lambda leading: _on_leadership(daemon, leading))
    exit_code = 0
    # The lease outlives `stop` until in-flight attempts are drained: releasing it first would
    # fence their last writes (a finished handoff could not be recorded as handed off).
    release_lease = asyncio.Event()
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(daemon.guard.run(release_lease), name="leader")
            tg.create_task(_track_role(daemon, stop), name="role")
            tg.create_task(daemon.poller.run(stop, tg), name="poller")
            if settings.http.enabled:
                tg.create_task(_serve_http(daemon, stop), name="http")
            tg.create_task(
                daemon.notifier.watchdog_loop(stop, daemon.health.is_progressing, daemon.clock),
                name="watchdog",
            )
            tg.create_task(_reloader(daemon, stop, reload_requested), name="reloader")
            tg.create_task(daemon.health.heartbeat(stop, daemon.clock), name="heartbeat")
            daemon.notifier.ready(f"watching {settings.tinker.base_url}")
            await stop.wait()
            daemon.poller.wake.set()
            reload_requested.set()  # lets the reloader see `stop` and return
            daemon.notifier.stopping()
            log.info("daemon_stopping")
            await daemon.executor.drain(SHUTDOWN_GRACE_S)
            release_lease.set()
    except* RecoveryError as group:
        for error in group.exceptions:
            log.error("daemon_failed", error=str(error))
        exit_code = 1
    finally:
        await _close(daemon)
    log.info("daemon_stopped", exit_code=exit_code)
    return exit_code


async def _close(daemon: Daemon) -> None:
    for closer in daemon.closers:
        await closer()
    if daemon.guard.lease is not None:
        try:
            await daemon.guard.release()
        except RecoveryError as exc:
            log.warning("lease_release_failed", error=str(exc))
    await daemon.store.close()
    if daemon.http_client is not None:
        await daemon.http_client.aclose()


def _install_signals(
    stop: asyncio.Event,
    reload_requested: asyncio.Event,
    daemon: Daemon,
    main_task: asyncio.Task[Any] | None,
) -> None:
    loop = asyncio.get_running_loop()

    def on_stop() -> None:
        if stop.is_set() and main_task is not None:
            main_task.cancel()  # a second signal: stop waiting for in-flight steps
        stop.set()
        daemon.poller.wake.set()
        reload_requested.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, reload_requested.set)


def _on_leadership(daemon: Daemon, leading: bool) -> None:
    """Leadership changed: export it at once, and poll now rather than at the next interval
    (a new leader reconciles and takes over without waiting)."""
    daemon.metrics.leader.set(1 if leading else 0)
    daemon.health.role = "leader" if leading else "standby"
    daemon.executor.on_leadership(leading)
    daemon.poller.on_leadership(leading)


async def _track_role(daemon: Daemon, stop: asyncio.Event) -> None:
    """Export leadership as a gauge and a readiness role, once a second."""
    while not stop.is_set():
        is_leader = daemon.guard.is_leader
        daemon.metrics.leader.set(1 if is_leader else 0)
        daemon.health.role = "leader" if is_leader else "standby"
        daemon.notifier.status(
            f"{daemon.health.role}; {daemon.poller.last_cycle.get('runs', 0)} runs watched"
        )
        await daemon.clock.sleep(1.0, wakeup=stop)


async def _serve_http(daemon: Daemon, stop: asyncio.Event) -> None:
    settings = daemon.settings.http
    app = http.build_app(
        registry=daemon.metrics.registry,
        health=daemon.health,
        status=lambda: status_document(daemon),
        operator=OperatorActions(daemon) if settings.token is not None else None,
        token=settings.token,
    )
    await http.serve(app, host=settings.host, port=settings.port, stop=stop, bound=daemon.on_port)


async def _reloader(daemon: Daemon, stop: asyncio.Event, requested: asyncio.Event) -> None:
    """SIGHUP: re-read the config file and apply what can change live (policy, poll, logs)."""
    while not stop.is_set():
        # The stop path sets `requested` too, so one event is enough to wait on.
        await daemon.clock.sleep(3600.0, wakeup=requested)
        if stop.is_set() or not requested.is_set():
            continue
        requested.clear()
        daemon.notifier.reloading()
        # STATUS= is what `systemctl status` shows: a rejected file must not read as reloaded.
        outcome = "configuration reloaded"
        if daemon.config_path is None:
            log.info("config_reload_skipped", reason="running on embedded defaults")
            outcome = "reload skipped: running on embedded defaults"
        else:
            try:
                fresh = config_loader.load_settings(daemon.config_path)
            except ConfigError as exc:
                log.error("config_reload_failed", error=str(exc), kept="previous configuration")
                daemon.metrics.config_reload_failed()
                outcome = "reload failed: kept the previous configuration (see the log)"
            else:
                apply_reload(daemon, fresh)
                daemon.metrics.config_reloaded(
                    at_unix_s=daemon.clock.now().timestamp(), dry_run=fresh.policy.dry_run
                )
        daemon.notifier.ready(outcome)


def apply_reload(daemon: Daemon, fresh: Settings) -> None:
    old = daemon.settings
    daemon.poller.configure(policy=fresh.policy, poll=fresh.poll)
    daemon.poller.retention = fresh.state
    handoffs = None
    if fresh.handoffs != old.handoffs and daemon.handoff_builder is not None:
        handoffs = daemon.handoff_builder(fresh)
    daemon.executor.configure(
        rules=fresh.policy.rules, dry_run=fresh.policy.dry_run, handoffs=handoffs
    )
    daemon.health.poll_interval_s = fresh.poll.interval
    logs.configure(fresh.log.format, fresh.log.level)
    needs_restart = [
        section
        for section in ("tinker", "state", "http", "handoffs")
        if section != "handoffs" or daemon.handoff_builder is None
        if getattr(old, section) != getattr(fresh, section)
    ]
    daemon.settings = fresh
    log.info("config_reloaded", needs_restart=needs_restart)


class OperatorActions:
    """Pause, resume and manual recovery, through the store so every replica and the CLI agree."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    async def pause(self, lineage: str | None) -> None:
        await self._daemon.store.set_hold(lineage, True, by="http", at=self._daemon.clock.now())
        self._daemon.poller.wake.set()

    async def resume(self, lineage: str | None) -> None:
        await self._daemon.store.set_hold(lineage, False, by="http", at=self._daemon.clock.now())
        self._daemon.poller.wake.set()

    async def recover(self, run_id: str, checkpoint: str | None) -> int:
        request_id = await self._daemon.store.request_recovery(
            run_id, checkpoint, by="http", at=self._daemon.clock.now()
        )
        self._daemon.poller.wake.set()
        return request_id


async def status_document(daemon: Daemon) -> dict[str, Any]:
    """The /status body: role, last poll, breaker, non-healthy lineages, attempts in flight."""
    lineages = await daemon.store.list_lineages()
    return {
        "version": __version__,
        "replica": replica_name(daemon.settings),
        "role": daemon.health.role,
        "dry_run": daemon.settings.policy.dry_run,
        "last_cycle": daemon.poller.last_cycle,
        "incident_breaker_open": daemon.poller.breaker_open,
        "holds": sorted(h or "*" for h in await daemon.store.holds()),
        "lineages": [
            operator.lineage_dict(lineage)
            for lineage in lineages
            if lineage.state is not LineageState.HEALTHY or lineage.attempts_total
        ],
        "in_flight": daemon.executor.snapshot(),
        # Worst driven runs by work at risk, and stalled ones (from the last cycle).
        "guard": None if daemon.checkpoint_guard is None else daemon.checkpoint_guard.status(),
    }
