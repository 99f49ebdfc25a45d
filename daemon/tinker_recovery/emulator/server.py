"""Running the emulator: the ASGI factory, an in-process server for tests, and `serve()`.

`EmulatorServer` runs uvicorn on its own thread and event loop with a socket bound before
start-up, so `base_url` is known at once (port 0 picks a free port). `serve()` is the
blocking entry point behind `tinker-recovery emulate`.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import threading
import time
from types import FrameType, TracebackType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from tinker_recovery.emulator import api, control
from tinker_recovery.emulator.config import EmulatorConfig
from tinker_recovery.emulator.state import Emulator

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


async def _http_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, HTTPException):
        return api.error_response(exc.status_code, str(exc.detail), exc.headers)
    return api.error_response(500, "internal emulator error")


def create_app(config: EmulatorConfig, emulator: Emulator | None = None) -> Starlette:
    """The emulator as an ASGI app; its state is `app.state.emulator`."""
    emu = emulator if emulator is not None else Emulator(config)
    app = Starlette(
        routes=[*api.routes(emu), *control.routes(emu)],
        exception_handlers={HTTPException: _http_error, Exception: _http_error},
    )
    app.state.emulator = emu
    return app


class EmulatorServer:
    """Serve an emulator on `host:port` from a background thread; a context manager."""

    def __init__(
        self, config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.config = config if config is not None else EmulatorConfig()
        self.app = create_app(self.config)
        self.emulator: Emulator = self.app.state.emulator
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{shown}:{self.port}"
        uv_config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(uv_config)
        self._thread = threading.Thread(target=self._run, name=f"emulator-{self.port}", daemon=True)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._server.serve(sockets=[self._sock]))
            # uvicorn closes idle keep-alive connections on the way out; give their
            # transports a few loop turns to really close before the loop goes away.
            for _ in range(3):
                loop.run_until_complete(asyncio.sleep(0))
        finally:
            loop.close()

    @property
    def thread_ident(self) -> int:
        """The serving thread's id (benchmarks read its CPU clock); valid once started."""
        ident = self._thread.ident
        if ident is None:
            raise RuntimeError("the emulator server has not been started")
        return ident

    def start(self) -> EmulatorServer:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._sock.close()
                raise RuntimeError(f"emulator did not start on {self.base_url}")
            # Waiting for another thread's start-up; there is no event to wait on in uvicorn.
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self.emulator.release_hangs()
        if self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT_S)
        self._sock.close()

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> EmulatorServer:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc_info: Any) -> None:
        await asyncio.to_thread(self.stop)


def serve(host: str, port: int, runs: int, seed: int, page_max: int) -> int:
    """Serve until SIGINT or SIGTERM; print where to point the SDK. Returns the exit code."""
    config = EmulatorConfig(runs=runs, seed=seed, page_max=page_max)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with EmulatorServer(config, host=host, port=port) as server:
            sys.stdout.write(
                f"tinker emulator serving {runs} runs (seed {seed}, page max {page_max}) "
                f"at {server.base_url}\n"
                f"export TINKER_BASE_URL={server.base_url} TINKER_API_KEY=tml-emulator "
                "TINKER_TELEMETRY=0\n"
                f"control API: {server.base_url}/_emulator (see docs/emulator.md)\n"
            )
            sys.stdout.flush()
            while not stop.wait(0.5):
                pass  # a timed wait keeps the main thread responsive to signals
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
