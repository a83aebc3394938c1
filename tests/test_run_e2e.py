"""`loopservice run` as a user starts it: a real process, real HTTP, the wall clock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from factories import raw_event

TOKEN = "e2e-token-with-every-scope-0001"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_run_serves_ingest_and_fires_a_breach_on_the_wall_clock(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "LOOP_TOKENS": json.dumps(
            [{"token": TOKEN, "tenant": "acme", "scopes": ["ingest", "read", "admin"]}]
        ),
        "LOOP_DATA_DIR": str(tmp_path),
    }
    cmd = [sys.executable, "-m", "loopservice", "run", "--port", str(port),
           "--db", str(tmp_path / "loop.db")]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, "loopservice run exited early"
            assert time.monotonic() < deadline, "loopservice run did not come up"
            time.sleep(0.2)
        # a case opened ten days ago and never answered: its first response is long overdue
        ten_days_ago = datetime.now(UTC) - timedelta(days=10)
        fields = {"subject": "Down", "topic": "outage", "impact": "critical", "urgency": "critical"}
        opened = raw_event("case.opened", 1, at=ten_days_ago, **fields)
        r = httpx.post(f"{base}/v1/events", json=opened, headers=headers, timeout=10)
        assert r.status_code == 202, r.text
        breached: list[dict[str, object]] = []
        deadline = time.monotonic() + 20
        while not breached and time.monotonic() < deadline:
            signals = httpx.get(f"{base}/v1/signals", headers=headers, timeout=5).json()["signals"]
            breached = [s for s in signals if s["type"] == "sla.breached"]
            time.sleep(0.3)
        assert {s["metric"] for s in breached} >= {"first_response"}
        assert "loop_sla_signals_total" in httpx.get(f"{base}/metrics", timeout=5).text
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught
    assert proc.returncode in (0, -15), out.decode(errors="replace")[-2000:]
    assert TOKEN not in out.decode(errors="replace")  # no secrets in the logs
