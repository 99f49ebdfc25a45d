"""The whole daemon in-process: real wiring against the emulator, stopped by its stop event."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from tinker_recovery import app
from tinker_recovery.emulator import EmulatorConfig, EmulatorServer
from tinker_recovery.settings import Settings


def settings_for(base_url: str, tmp_path: Path, **policy: object) -> Settings:
    return Settings.model_validate(
        {
            "tinker": {"base_url": base_url, "request_timeout": "5s"},
            "poll": {"interval": "0.2s"},
            "state": {"url": f"sqlite:///{tmp_path / 'state.db'}"},
            "policy": {"rules": [{"name": "all", "action": "alert"}], **policy},
            "http": {"port": 0},
        }
    )


async def test_main_polls_serves_and_stops_cleanly(tmp_path: Path) -> None:
    with EmulatorServer(EmulatorConfig(runs=30, seed=3)) as emulator:
        daemon = await app.build(
            settings_for(emulator.base_url, tmp_path),
            env={"TINKER_API_KEY": "tml-in-process-test"},
        )
        ports: list[int] = []
        daemon.on_port = ports.append
        stop = asyncio.Event()
        main = asyncio.create_task(app.main(daemon, stop=stop))
        async with asyncio.timeout(20):
            while not daemon.poller.last_cycle or not ports:  # noqa: ASYNC110 - polls another task's progress
                await asyncio.sleep(0.05)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[0]}") as client:
                ready = await client.get("/readyz")
                status = (await client.get("/status")).json()
        stop.set()
        async with asyncio.timeout(20):
            code = await main

    assert code == 0
    assert ready.status_code == 200
    assert status["role"] == "leader"
    assert status["last_cycle"]["runs"] == 30


async def test_reload_applies_policy_and_reports_what_needs_a_restart(tmp_path: Path) -> None:
    with EmulatorServer(EmulatorConfig(runs=5, seed=3)) as emulator:
        daemon = await app.build(
            settings_for(emulator.base_url, tmp_path),
            env={"TINKER_API_KEY": "tml-in-process-test"},
        )
        fresh = settings_for(emulator.base_url, tmp_path, dry_run=True)
        fresh = fresh.model_copy(update={"http": fresh.http.model_copy(update={"port": 9999})})

        app.apply_reload(daemon, fresh)

        assert daemon.poller.policy.dry_run is True
        assert daemon.settings.http.port == 9999
        await daemon.store.close()
        assert daemon.http_client is not None
        await daemon.http_client.aclose()
        for closer in daemon.closers:
            await closer()


async def test_a_reload_that_adds_a_handoff_is_used_by_the_next_attempt(tmp_path: Path) -> None:
    """Issue 9, defect 7: a reload adding a handoff passed validation, but the executor kept
    its start-up handoffs, so attempts under the new rule failed 'handoff not configured'."""
    with EmulatorServer(EmulatorConfig(runs=2, seed=3)) as emulator:
        daemon = await app.build(
            settings_for(emulator.base_url, tmp_path),
            env={"TINKER_API_KEY": "tml-in-process-test"},
        )
        fresh = Settings.model_validate(
            {
                **settings_for(emulator.base_url, tmp_path).model_dump(mode="json"),
                "handoffs": {"restart": {"type": "command", "argv": ["true"]}},
            }
        )

        app.apply_reload(daemon, fresh)

        assert "restart" in daemon.executor.handoff_names()
        await daemon.store.close()
        assert daemon.http_client is not None
        await daemon.http_client.aclose()
        for closer in daemon.closers:
            await closer()
