"""Issue 3, test 11: the API key (and every other secret) never leaves the daemon.

A distinctive key drives a full recovery, failed polls, a failing webhook handoff and operator
calls; then every output is searched for it: each log line, /status, /metrics, HTTP error
answers, the CLI's output and errors, the handoff log, and the SQLite files byte by byte.
"""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path

import httpx
import pytest

from e2e.harness import DaemonProc, Emu, cli, daemon_config, free_port, rule

pytestmark = pytest.mark.slow


def test_no_secret_appears_in_logs_status_metrics_errors_or_the_store(
    emu: Emu, tmp_path: Path
) -> None:
    marker = uuid.uuid4().hex
    api_key = f"tml-SENTINEL-{marker}"
    token = f"TOKEN-SENTINEL-{marker}"
    hook_secret = f"HOOK-SENTINEL-{marker}"
    secrets = [api_key, token, hook_secret, marker]
    rules = [
        rule("jobs", "a"),
        rule("hooked", "hook", handoff="hook", max_attempts=1),
    ]
    config = daemon_config(emu, tmp_path, rules)
    config["http"]["token"] = token
    config["handoffs"]["hook"] = {
        "type": "webhook",
        "url": f"http://127.0.0.1:{free_port()}/nobody-listens",
        "secret": hook_secret,
        "timeout": "1s",
        "max_attempts": 2,
    }
    daemon = DaemonProc(tmp_path, config, api_key=api_key)
    try:  # not through the `daemons` fixture: this one runs with its own key
        daemon.start()
        good = emu.create_run(user_metadata={"scenario": "a"})
        hooked = emu.create_run(user_metadata={"scenario": "hook"})
        daemon.wait_polls(1)
        fault = emu.add_fault(kind="error", status=503, endpoints=["list_training_runs"], times=3)
        emu.corrupt(good)
        emu.corrupt(hooked)
        daemon.wait_for(lambda: daemon.events("poll_failed"), "a failed poll")
        emu.http.delete(f"/_emulator/faults/{fault}")
        emu.add_fault(kind="malformed", endpoints=["list_checkpoints"], times=1)

        def settled() -> bool:
            lineage = daemon.lineage_for_run(good)
            return (
                lineage is not None
                and lineage.current_run_id != good
                and lineage.state.value == "healthy"
                and daemon.lineage_state(hooked) == "exhausted"
            )

        daemon.wait_for(settled, "one recovery and one exhausted webhook lineage", 30)
        outputs: dict[str, str] = {}
        outputs["/status"] = daemon.get("/status").text
        outputs["/metrics"] = daemon.get("/metrics").text
        wrong = httpx.post(
            daemon.url("/pause"), headers={"Authorization": "Bearer wrong"}, timeout=5
        )
        assert wrong.status_code in (401, 403)
        outputs["/pause wrong token"] = wrong.text
        right = httpx.post(
            daemon.url("/pause"), headers={"Authorization": f"Bearer {token}"}, json={}, timeout=5
        )
        assert right.status_code == 200, right.text
        outputs["/pause"] = right.text
        for args in (("status",), ("status", "--json"), ("history", good, "--json")):
            answer = cli(*args, "--config", str(daemon.config_path))
            outputs[" ".join(args)] = answer.stdout + answer.stderr
        store_bytes = b"".join(p.read_bytes() for p in tmp_path.glob("state.db*"))
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0
    finally:
        daemon.kill()

    inline = dict(config, tinker={**config["tinker"], "api_key": api_key})
    (tmp_path / "inline.yaml").write_text(json.dumps(inline))
    checked = cli("check-config", "--config", str(tmp_path / "inline.yaml"))
    assert checked.returncode == 0, checked.stderr
    outputs["check-config"] = checked.stdout + checked.stderr
    # Secrets in secret fields that fail validation, and under a misspelt key: the located
    # error names the field, never the value.
    broken = dict(
        inline,
        tinker={**config["tinker"], "api_key": [api_key], "api_keyy": api_key},
        http={**config["http"], "token": {"value": token}},
    )
    (tmp_path / "broken.yaml").write_text(json.dumps(broken))
    refused = cli("check-config", "--config", str(tmp_path / "broken.yaml"))
    assert refused.returncode == 2
    assert "tinker.api_key" in refused.stderr
    outputs["check-config error"] = refused.stderr

    outputs["daemon log"] = daemon.log_path.read_text()
    outputs["handoff log"] = (tmp_path / "handoffs.jsonl").read_text()
    store_bytes += b"".join(p.read_bytes() for p in tmp_path.glob("state.db*"))
    for where, text in outputs.items():
        for secret in secrets:
            assert secret not in text, f"{secret[:14]}... leaked into {where}"
    for secret in secrets:
        assert secret.encode() not in store_bytes, f"{secret[:14]}... is in the store file"
    # The searches looked at real material: the webhook failed and the recovery went through.
    assert "webhook" in outputs["daemon log"]
    assert daemon.handoff_calls()
    assert len(store_bytes) > 10_000
