"""The real daemon under a fake systemd: what it says on `$NOTIFY_SOCKET`, and when it goes quiet.

systemd's `Type=notify` + `WatchdogSec=` contract, checked end to end against the emulator:
READY=1 once serving, STATUS= lines, WATCHDOG=1 at half of WATCHDOG_USEC, no WATCHDOG=1 while the
process is frozen (SIGSTOP) or while a poll cycle is stuck (a hanging Tinker endpoint), so systemd
would restart it; SIGHUP gives RELOADING=1 with MONOTONIC_USEC then READY=1; SIGTERM gives
STOPPING=1 and exit 0. Counts have generous bounds: the box may be slow, never fast.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from daemon_proc import free_port
from live_daemon import Datagram, LiveDaemon, NotifySocket, base_config, process_state
from prometheus_client.parser import text_string_to_metric_families

from tinker_recovery.emulator import EmulatorConfig, EmulatorServer

WATCHDOG_USEC = 1_000_000  # pings expected every 0.5 s
POLL_INTERVAL_S = 0.5  # base_config's; the watchdog's progress window is 3 intervals
HANG_S = 5.0  # minus the 1.5 s progress window: ~3.5 s without pings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorServer]:
    with EmulatorServer(EmulatorConfig(runs=6, seed=11, page_max=100)) as server:
        yield server


def pings(datagrams: list[Datagram]) -> list[Datagram]:
    return [d for d in datagrams if d.has("WATCHDOG", "1")]


def longest_gap(times: list[float]) -> float:
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def start(
    tmp_path: Path,
    emulator: EmulatorServer,
    address: str,
    *,
    pid_is_self: bool = False,
    watchdog_pid: int | None = None,
) -> tuple[LiveDaemon, NotifySocket]:
    notify = NotifySocket(address)
    config = base_config(emulator.base_url, tmp_path, free_port())
    # A stuck request must stay stuck (no client timeout, no cycle timeout) for the hang check.
    config["tinker"].update(request_timeout="60s", retry_attempts=1)
    config["poll"]["cycle_timeout"] = "60s"
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    if watchdog_pid is not None:
        env["WATCHDOG_PID"] = str(watchdog_pid)
    daemon = LiveDaemon(tmp_path, config, env=env, watchdog_pid_is_self=pid_is_self)
    return daemon, notify


def test_notify_sequence_watchdog_and_stalls(tmp_path: Path, emulator: EmulatorServer) -> None:
    daemon, notify = start(tmp_path, emulator, str(tmp_path / "notify.sock"), pid_is_self=True)
    control = httpx.Client(base_url=emulator.base_url, timeout=10)
    try:
        # READY=1 (with a STATUS) once the daemon serves; STATUS= lines and pings follow.
        startup = notify.wait_for(lambda d: d.has("READY", "1"), daemon)
        assert startup[-1].fields.get("STATUS", "").startswith("watching ")
        steady = notify.collect(2.5)
        assert len(pings(steady)) >= 3, [str(d) for d in steady]  # 5 at the nominal cadence
        assert len(pings(steady)) <= 8  # half of WATCHDOG_USEC, not a busy loop
        assert any(d.fields.get("STATUS", "").startswith("leader; ") for d in steady)

        # Frozen process: not one datagram while stopped; pings resume after SIGCONT.
        daemon.signal(signal.SIGSTOP)
        daemon.wait_until(lambda: process_state(daemon.proc.pid) == "T", "SIGSTOP")
        notify.drain()  # sent before the stop took hold
        frozen = notify.collect(1.5)
        daemon.signal(signal.SIGCONT)
        assert frozen == [], [str(d) for d in frozen]
        notify.wait_for(lambda d: d.has("WATCHDOG", "1"), daemon, timeout_s=5)

        # A poll cycle stuck on a hanging endpoint: the loop is alive (STATUS keeps coming) but
        # the watchdog is withheld once the progress window passes; pings resume after it ends.
        fault = control.post(
            "/_emulator/faults",
            json={"kind": "hang", "endpoints": ["list_training_runs"], "hang_s": HANG_S},
        )
        fault.raise_for_status()
        hung_from = time.monotonic()
        stuck = notify.collect(HANG_S - 0.5)
        control.delete(f"/_emulator/faults/{fault.json()['id']}").raise_for_status()
        stuck += notify.wait_for(lambda d: d.has("WATCHDOG", "1"), daemon, timeout_s=10)
        stuck += notify.collect(1.5)
        ping_times = [hung_from, *(d.at for d in pings(stuck))]
        gap = longest_gap(ping_times)
        assert gap >= 2.0, f"pings kept coming while the poll was stuck: {ping_times}"
        quiet_start = next(a for a, b in itertools.pairwise(ping_times) if b - a == gap)
        statuses = [
            d for d in stuck if "STATUS" in d.fields and quiet_start < d.at < quiet_start + gap
        ]
        assert statuses, "the event loop should keep reporting STATUS while the poll is stuck"
        assert len(pings(stuck)) >= 2  # resumed
        events = [e["event"] for e in daemon.log_events()]
        assert "watchdog_withheld" in events
        assert "watchdog_resumed" in events

        # SIGHUP: RELOADING=1 stamped with CLOCK_MONOTONIC between our send and receipt, then
        # READY=1 again.
        notify.drain()
        before_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        daemon.signal(signal.SIGHUP)
        reload_seen = notify.wait_for(lambda d: d.has("RELOADING", "1"), daemon, timeout_s=10)
        after_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        stamp = int(reload_seen[-1].fields["MONOTONIC_USEC"])
        assert before_us <= stamp <= after_us
        ready_again = notify.wait_for(lambda d: d.has("READY", "1"), daemon, timeout_s=10)
        assert ready_again[-1].fields.get("STATUS") == "configuration reloaded"
        assert "config_reloaded" in [e["event"] for e in daemon.log_events()]
        assert _metric(daemon, "tinker_recovery_config_reloads_total", outcome="success") == 1
        assert _metric(daemon, "tinker_recovery_config_last_reload_successful") == 1

        # A file that no longer validates: still RELOADING=1 then READY=1 (systemd waits for
        # it), but STATUS says the old configuration was kept, and the daemon carries on.
        daemon.config_path.write_text('{"poll": {"interval": "soon"}}')
        daemon.signal(signal.SIGHUP)
        notify.wait_for(lambda d: d.has("RELOADING", "1"), daemon, timeout_s=10)
        refused = notify.wait_for(lambda d: d.has("READY", "1"), daemon, timeout_s=10)
        assert refused[-1].fields.get("STATUS", "").startswith("reload failed: kept the previous")
        assert "config_reload_failed" in [e["event"] for e in daemon.log_events()]
        # What the ConfigReloadFailed alert reads; the time of the running config stays.
        assert _metric(daemon, "tinker_recovery_config_reloads_total", outcome="failure") == 1
        assert _metric(daemon, "tinker_recovery_config_last_reload_successful") == 0
        assert _metric(daemon, "tinker_recovery_config_last_reload_success_timestamp_seconds") > 0
        notify.wait_for(lambda d: d.has("WATCHDOG", "1"), daemon, timeout_s=5)

        # SIGTERM: STOPPING=1, then a clean exit.
        daemon.signal(signal.SIGTERM)
        notify.wait_for(lambda d: d.has("STOPPING", "1"), daemon, timeout_s=10)
        assert daemon.wait_exit() == 0, describe(notify.seen)
        after_stop = notify.drain()
        assert pings(after_stop) == [], describe(notify.seen)
    finally:
        control.delete("/_emulator/faults")  # the emulator is shared with the next tests
        control.close()
        daemon.close()
        notify.close()


def test_abstract_socket_without_watchdog_pid(tmp_path: Path, emulator: EmulatorServer) -> None:
    # `@name` is Linux's abstract namespace; with WATCHDOG_PID unset the pings are ours to send.
    address = f"@tinker-recovery-test-{free_port()}"
    daemon, notify = start(tmp_path, emulator, address)
    try:
        notify.wait_for(lambda d: d.has("READY", "1"), daemon)
        steady = notify.collect(2.0)
        assert len(pings(steady)) >= 2, [str(d) for d in steady]
        daemon.signal(signal.SIGTERM)
        notify.wait_for(lambda d: d.has("STOPPING", "1"), daemon, timeout_s=10)
        assert daemon.wait_exit() == 0
    finally:
        daemon.close()
        notify.close()


def test_watchdog_meant_for_another_process_is_not_fed(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    # systemd sets WATCHDOG_PID to the main pid; if that is some other process (a wrapper that
    # did not exec us), the daemon must not feed a watchdog that is not its own.
    foreign = os.getpid()  # this test process: alive, and certainly not the daemon
    daemon, notify = start(tmp_path, emulator, str(tmp_path / "notify.sock"), watchdog_pid=foreign)
    try:
        notify.wait_for(lambda d: d.has("READY", "1"), daemon)
        steady = notify.collect(2.0)
        assert pings(steady) == [], [str(d) for d in steady]
        assert any("STATUS" in d.fields for d in steady)  # it is alive, just not pinging
        assert daemon.stop() == 0
        assert any(d.has("STOPPING", "1") for d in notify.drain())
    finally:
        daemon.close()
        notify.close()


def test_sigterm_during_a_poll_cycle_stops_promptly(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    # systemd sends SIGTERM whenever it likes, often mid-cycle; it SIGKILLs after
    # TimeoutStopSec. Finishing the current cycle is fine; sleeping a whole interval is not.
    daemon, notify = start(tmp_path, emulator, str(tmp_path / "notify.sock"))
    control = httpx.Client(base_url=emulator.base_url, timeout=10)
    try:
        notify.wait_for(lambda d: d.has("READY", "1"), daemon)
        notify.wait_for(lambda d: d.fields.get("STATUS", "").startswith("leader; "), daemon)
        control.post(
            "/_emulator/faults",
            json={"kind": "hang", "endpoints": ["list_training_runs"], "hang_s": 5.0},
        ).raise_for_status()
        daemon.wait_until(lambda: "watchdog_withheld" in _events(daemon), "a stuck cycle", 10)
        # While it is stuck, make the interval long: after this cycle the loop would sleep 60 s.
        config = daemon.config_path.read_text()
        daemon.config_path.write_text(config.replace('"500ms"', '"60s"'))  # poll.interval
        daemon.signal(signal.SIGHUP)
        notify.wait_for(lambda d: d.fields.get("STATUS") == "configuration reloaded", daemon)
        daemon.signal(signal.SIGTERM)
        notify.wait_for(lambda d: d.has("STOPPING", "1"), daemon, timeout_s=10)
        try:
            code = daemon.proc.wait(timeout=10)  # the rest of the hang, shutdown, and slack
        except subprocess.TimeoutExpired:
            pytest.fail("still running 10 s after SIGTERM: waiting out the poll interval?")
        assert code == 0
    finally:
        control.delete("/_emulator/faults")
        control.close()
        daemon.close()
        notify.close()


def _metric(daemon: LiveDaemon, name: str, **labels: str) -> float:
    text = daemon.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"{name}{labels} not in the scrape")


def _events(daemon: LiveDaemon) -> list[str]:
    return [str(e.get("event")) for e in daemon.log_events()]


def describe(seen: list[Datagram]) -> str:
    """The datagrams so far, one a line with its time, consecutive repeats folded."""
    if not seen:
        return "(nothing received)"
    t0 = seen[0].at
    folded: list[tuple[float, str, int]] = []
    for d in seen:
        text = str(d)
        if folded and folded[-1][1] == text:
            folded[-1] = (folded[-1][0], text, folded[-1][2] + 1)
        else:
            folded.append((d.at - t0, text, 1))
    return "\n".join(
        f"t+{at:5.2f}s  {text}" + (f"  (x{count})" if count > 1 else "")
        for at, text, count in folded
    )
