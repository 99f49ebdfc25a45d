"""`serve()`, the blocking entry point behind `tinker-recovery emulate`, in a real process."""

from __future__ import annotations

import signal
import subprocess
import sys

import httpx
import pytest

SCRIPT = (
    "from tinker_recovery.emulator import serve; "
    "raise SystemExit(serve('127.0.0.1', 0, runs=12, seed=3, page_max=5))"
)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_serve_prints_where_to_point_the_sdk_and_exits_zero_on_signal(sig: signal.Signals) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        exports = proc.stdout.readline()
        base_url = banner.rsplit(" at ", 1)[1].strip()
        assert base_url.startswith("http://127.0.0.1:")
        assert f"export TINKER_BASE_URL={base_url} TINKER_API_KEY=tml-" in exports

        page = httpx.get(
            f"{base_url}/api/v1/training_runs", params={"limit": 50}, headers={"X-API-Key": "tml-x"}
        ).json()
        assert page["cursor"] == {"offset": 0, "limit": 5, "total_count": 12}

        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
