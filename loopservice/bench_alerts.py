"""Alert delivery benchmark: deadline → delivered delay to a local webhook receiver.

`measure_delivery(n)` spreads `n` SLA breach deadlines uniformly over a window of the wall
clock (60 s by default), hands each breach to a fresh outbox once its deadline passes (as the
engine does when the watermark passes a deadline) and runs the real dispatcher, which batches
per route, against `LocalReceiver`, a threaded `http.server` on 127.0.0.1 that verifies every
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
    real receiver would, answers 503 to the first `fail_first` requests, and deduplicates
    batches on `Idempotency-Key` and alerts on (alert_id, route, escalation_level).

    `count` is the accepted batches, `alerts` the distinct alerts received, `duplicates` the
    alerts received again (in a repeated batch or another one); `keys` counts every signed
    request per key, `attempt_keys` lists the key of every request, refused or not."""

    def __init__(self, secret: bytes, fail_first: int = 0) -> None:
        self.secret = secret
        self.fail_first = fail_first
        self.requests = 0
        self.count = 0
        self.alerts = 0
        self.bad_signatures = 0
        self.duplicates = 0
        self.raw: list[bytes] = []
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.keys: dict[str, int] = {}
        self.attempt_keys: list[str] = []
        self.received: list[tuple[str, str, int]] = []
        self._seen: set[tuple[str, str, int]] = set()
        self._keep = True
        self._lock = threading.Lock()
        self._server: _Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/hook"

    def start(self, *, keep: bool = True) -> LocalReceiver:
        """`keep=False` keeps no bodies (a long benchmark), only the counts."""
        receiver = self
        self._keep = keep

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
        expected = "sha256=" + hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        signed = hmac.compare_digest(expected, headers.get("X-Loop-Signature", ""))
        parsed = orjson.loads(body) if signed else None
        with self._lock:
            self.requests += 1
            key = headers.get("Idempotency-Key", "")
            self.attempt_keys.append(key)
            if self.requests <= self.fail_first:
                return 503
            if parsed is None:
                self.bad_signatures += 1
                return 401
            self.keys[key] = self.keys.get(key, 0) + 1
            route = parsed["route"]
            for a in parsed["alerts"]:
                one = (a["alert_id"], route, a["escalation_level"])
                if one in self._seen:
                    self.duplicates += 1
                    continue
                self._seen.add(one)
                self.alerts += 1
                if self._keep:
                    self.received.append(one)
            if self.keys[key] > 1:
                return 200
            self.count += 1
            if self._keep:
                self.raw.append(body)
                self.bodies.append(parsed)
                self.headers.append(headers)
            return 200

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "requests": self.requests,
                "count": self.count,
                "alerts": self.alerts,
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
    n: int,
    *,
    window_s: float = 60.0,
    rate: float | None = None,
    concurrency: int = 4,
    max_batch: int = 500,
    timeout_s: float = 900.0,
) -> dict[str, float]:
    """Seconds from deadline to delivery of `n` SLA breaches: p50, p99, max, plus wall time,
    deliveries per second and what the receiver saw (bad signatures, duplicates).

    Deadlines are spread uniformly over `window_s` seconds of the wall clock (the dispatcher's
    clock): deadline `i` is `start + i * window_s / n`, and each breach is handed to the outbox
    once its deadline has passed, as the engine does when its watermark passes it. `rate`
    (per second) sets `window_s = n / rate`; `window_s=0` makes them all due at once. The
    receiver runs in a child process, as a real one would not share this process's GIL."""
    if rate is not None:
        window_s = n / rate
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
                concurrency=concurrency,
                max_batch=max_batch,
            )
            stop = asyncio.Event()
            task = asyncio.create_task(dispatcher.run(stop))
            started = time.perf_counter()
            start = clock.now() + timedelta(milliseconds=100)
            step = window_s / n if n else 0.0
            handed = 0
            while handed < n:  # the engine's side: each breach as its deadline passes
                now = clock.now()
                passed = (now - start).total_seconds()
                if passed < 0:
                    upto = 0
                elif step == 0:
                    upto = n
                else:
                    upto = min(n, int(passed / step) + 1)
                if upto > handed:
                    signals: list[Signal] = [
                        breach(i, start + timedelta(seconds=i * step)) for i in range(handed, upto)
                    ]
                    await asyncio.to_thread(outbox.enqueue, signals)
                    handed = upto
                await asyncio.sleep(0.005)
            while True:
                await asyncio.sleep(0.1)
                delivered = await asyncio.to_thread(_count, outbox, "delivered")
                if delivered >= n:
                    break
                failed, error = await asyncio.to_thread(_errors, outbox)
                if failed or time.perf_counter() - started > timeout_s:
                    raise RuntimeError(
                        f"{delivered} of {n} delivered, {failed} failed or retried ({error})"
                    )
            elapsed = time.perf_counter() - started
            stop.set()
            await task
            delays = await asyncio.to_thread(_delays, outbox)
            async with httpx.AsyncClient() as client:
                stats = (await client.get(url)).json()
    finally:
        child.stdin.close()
        await child.wait()
    delays.sort()
    return {
        "n": float(n),
        "window_s": float(window_s),
        "p50_s": delays[len(delays) // 2],
        "p99_s": delays[min(len(delays) - 1, int(len(delays) * 0.99))],
        "max_s": delays[-1],
        "wall_s": elapsed,
        "per_s": n / elapsed,
        "requests": float(stats["requests"]),
        "received": float(stats["alerts"]),
        "bad_signatures": float(stats["bad_signatures"]),
        "duplicates": float(stats["duplicates"]),
    }


def _count(outbox: Outbox, status: str) -> int:
    with outbox.datastore.transaction(commit=False) as cursor:
        cursor.execute(f"SELECT COUNT(*) FROM {DELIVERIES} WHERE status = ?", (status,))
        return int(cursor.fetchone()[0])


def _errors(outbox: Outbox) -> tuple[int, str | None]:
    """Rows that failed or are waiting to retry (the benchmark expects none), and one error."""
    with outbox.datastore.transaction(commit=False) as cursor:
        cursor.execute(
            f"SELECT COUNT(*), MAX(last_error) FROM {DELIVERIES} "
            "WHERE status = 'failed' OR last_error IS NOT NULL"
        )
        count, error = cursor.fetchone()
        return int(count), error


def _delays(outbox: Outbox) -> list[float]:
    with outbox.datastore.transaction(commit=False) as cursor:
        cursor.execute(f"SELECT delivered_at - due_at FROM {DELIVERIES} WHERE status = 'delivered'")
        return [float(r[0]) for r in cursor.fetchall()]


if __name__ == "__main__":  # the benchmark's receiver: serves until stdin closes
    _receiver = LocalReceiver(sys.argv[1].encode()).start(keep=False)
    print(_receiver.url, flush=True)
    sys.stdin.read()
    _receiver.stop()
