"""Alert delivery benchmark: deadline → delivered delay to a local webhook receiver.

`measure_delivery(n)` hands `n` SLA breaches to a fresh outbox (each due the instant it is
handed over, as the engine does when the watermark passes a deadline) and runs the real
dispatcher against `LocalReceiver`, a threaded `http.server` on 127.0.0.1 that verifies every
signature. The watermark's allowed lateness (a policy setting, 1 s by default) and the
engine's tick are not part of this measurement: add them for the end-to-end figure.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson

from loopservice.domain.events import Priority
from loopservice.domain.policy import OncallRoute, OncallSection
from loopservice.domain.signals import Signal, SlaBreached
from loopservice.infra.alerts import DELIVERIES, Dispatcher, Outbox
from loopservice.infra.sqlite_log import open_datastore
from loopservice.policy_cli import default_policy
from loopservice.streams.clock import WallClock


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024


class LocalReceiver:
    """A webhook receiver on 127.0.0.1: checks `X-Loop-Signature` with its own HMAC, as a
    real receiver would, counts deliveries per `Idempotency-Key`, and answers 503 to the
    first `fail_first` requests."""

    def __init__(self, secret: bytes, fail_first: int = 0) -> None:
        self.secret = secret
        self.fail_first = fail_first
        self.requests = 0
        self.count = 0
        self.bad_signatures = 0
        self.duplicates = 0
        self.raw: list[bytes] = []
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.keys: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server: _Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/hook"

    def start(self) -> LocalReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                code = receiver.receive(body, dict(self.headers.items()))
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                body = orjson.dumps(receiver.stats())
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = _Server(("127.0.0.1", 0), Handler)
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def receive(self, body: bytes, headers: dict[str, str]) -> int:
        with self._lock:
            self.requests += 1
            if self.requests <= self.fail_first:
                return 503
            expected = "sha256=" + hmac.new(self.secret, body, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(expected, headers.get("X-Loop-Signature", "")):
                self.bad_signatures += 1
                return 401
            key = headers.get("Idempotency-Key", "")
            self.keys[key] = self.keys.get(key, 0) + 1
            if self.keys[key] > 1:
                self.duplicates += 1
                return 200
            self.count += 1
            self.raw.append(body)
            self.bodies.append(orjson.loads(body))
            self.headers.append(headers)
            return 200

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "requests": self.requests,
                "count": self.count,
                "bad_signatures": self.bad_signatures,
                "duplicates": self.duplicates,
            }

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def breach(i: int, at: datetime, tenant: str = "acme") -> SlaBreached:
    return SlaBreached(
        signal_id=f"bench:{i}",
        tenant_id=tenant,
        account_id=f"acct-{i % 500}",
        case_id=f"case-{i}",
        detected_at=at,
        caused_by=(f"ev-{i}",),
        metric="first_response",
        cycle=0,
        due_at=at,
        priority=Priority.P1,
    )


async def measure_delivery(
    n: int, *, rate: float | None = None, concurrency: int = 4
) -> dict[str, float]:
    """Seconds from deadline to delivery of `n` breaches: p50, p99, max, plus wall time and
    deliveries per second. All `n` come due at once, or `rate` per second. The receiver runs
    in a child process, as a real one would not share this process's GIL."""
    secret = "bench-secret"
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loopservice.bench_alerts",
        secret,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None and child.stdin is not None
    url = (await child.stdout.readline()).decode().strip()
    try:
        route = OncallRoute(name="bench", signal_types=["sla.breached"], sink=url)
        policy = default_policy().model_copy(update={"oncall": OncallSection(routes=[route])})
        clock = WallClock()
        with tempfile.TemporaryDirectory() as tmp:
            outbox = Outbox(open_datastore(Path(tmp) / "bench.db"), lambda _: policy, clock)
            dispatcher = Dispatcher(
                outbox,
                clock,
                secret=lambda _: secret.encode(),
                poll=timedelta(milliseconds=10),
                concurrency=concurrency,
            )
            stop = asyncio.Event()
            task = asyncio.create_task(dispatcher.run(stop))
            started = time.perf_counter()
            chunk = n if rate is None else max(1, int(rate / 50))
            for first in range(0, n, chunk):
                at = clock.now()
                signals: list[Signal] = [breach(i, at) for i in range(first, min(n, first + chunk))]
                await asyncio.to_thread(outbox.enqueue, signals)
                if rate is not None:
                    await asyncio.sleep(len(signals) / rate)
            delays: list[float] = []
            while len(delays) < n:
                await asyncio.sleep(0.05)
                delays = await asyncio.to_thread(_delays, outbox)
                failed = await asyncio.to_thread(_count, outbox, "failed")
                if failed or time.perf_counter() - started > 900:
                    raise RuntimeError(f"{len(delays)} of {n} delivered, {failed} failed")
            elapsed = time.perf_counter() - started
            stop.set()
            await task
            async with httpx.AsyncClient() as client:
                stats = (await client.get(url)).json()
    finally:
        child.stdin.close()
        await child.wait()
    delays.sort()
    return {
        "n": float(n),
        "p50_s": delays[len(delays) // 2],
        "p99_s": delays[min(len(delays) - 1, int(len(delays) * 0.99))],
        "max_s": delays[-1],
        "wall_s": elapsed,
        "per_s": n / elapsed,
        "received": float(stats["count"]),
        "bad_signatures": float(stats["bad_signatures"]),
        "duplicates": float(stats["duplicates"]),
    }


def _count(outbox: Outbox, status: str) -> int:
    with outbox.datastore.transaction(commit=False) as cursor:
        cursor.execute(f"SELECT COUNT(*) FROM {DELIVERIES} WHERE status = ?", (status,))
        return int(cursor.fetchone()[0])


def _delays(outbox: Outbox) -> list[float]:
    with outbox.datastore.transaction(commit=False) as cursor:
        cursor.execute(f"SELECT delivered_at - due_at FROM {DELIVERIES} WHERE status = 'delivered'")
        return [float(r[0]) for r in cursor.fetchall()]


if __name__ == "__main__":  # the benchmark's receiver: serves until stdin closes
    _receiver = LocalReceiver(sys.argv[1].encode()).start()
    print(_receiver.url, flush=True)
    sys.stdin.read()
    _receiver.stop()
