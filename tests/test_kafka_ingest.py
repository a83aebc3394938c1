"""HTTP ingest in front of a real broker (`LOOP_ENGINE=kafka loopservice run`): an event is
acknowledged only once the broker has it; while the broker is down the API answers 503; a broker
stopped and restarted in the middle of ingest loses no acknowledged event."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from kafka_broker import KafkaBroker, kafka_broker  # noqa: F401
from loopservice.infra.kafka_log import INTERACTIONS, interaction_log

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

TOKEN = "ingest-token-0123456789"
PREFIX = "ingest."


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def api(kafka_broker: KafkaBroker, tmp_path: Path) -> Iterator[str]:  # noqa: F811
    port = free_port()
    env = {
        **os.environ,
        "LOOP_ENGINE": "kafka",
        "LOOP_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
        "LOOP_KAFKA_TOPIC_PREFIX": PREFIX,
        "LOOP_DATA_DIR": str(tmp_path),
        "LOOP_TOKENS": f'[{{"token": "{TOKEN}", "tenant": "acme", "scopes": ["ingest"]}}]',
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "loopservice", "run", "--port", str(port)],
        env=env,
        stdout=open(tmp_path / "api.log", "ab"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        process.kill()
        raise AssertionError((tmp_path / "api.log").read_text())
    yield url
    process.terminate()
    process.wait(30)


def events(batch: int, size: int) -> list[dict[str, object]]:
    at = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    return [
        {
            "event_id": f"ev-{batch}-{i}",
            "type": "case.customer_message",
            "occurred_at": at,
            "tenant_id": "acme",
            "account_id": f"acct-{i % 17}",
            "case_id": f"case-{batch}",
            "source": {"platform": "web", "channel": "chat"},
            "actor": {"kind": "customer", "id": "u-1"},
            "body": "hello",
        }
        for i in range(size)
    ]


def test_a_broker_restart_during_ingest_loses_no_acknowledged_event(
    kafka_broker: KafkaBroker,  # noqa: F811
    api: str,
) -> None:
    acknowledged: set[str] = set()
    codes: list[int] = []
    stop = threading.Event()

    def publish() -> None:
        batch = 0
        with httpx.Client(headers={"authorization": f"Bearer {TOKEN}"}, timeout=30) as client:
            while not stop.is_set():
                body = events(batch, 20)
                try:
                    response = client.post(f"{api}/v1/events", json=body)
                except httpx.HTTPError:
                    codes.append(0)
                    continue
                codes.append(response.status_code)
                if response.is_success:
                    acknowledged.update(str(e["event_id"]) for e in body)
                batch += 1
                time.sleep(0.05)

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        time.sleep(3)
        kafka_broker.down()
        time.sleep(8)  # requests in this window time out at the broker and get 503
        kafka_broker.up()
        time.sleep(10)
    finally:
        stop.set()
        publisher.join(60)
    assert 503 in codes, codes
    assert codes[-1] in (200, 202), codes[-20:]
    assert len(acknowledged) > 100
    with interaction_log(kafka_broker.bootstrap, topic=PREFIX + INTERACTIONS) as log:
        stored = {
            r.value.event_id
            for p, head in log.heads().items()
            for r in log.read_partition(p, 1, head + 1)
        }
    assert acknowledged <= stored, sorted(acknowledged - stored)[:10]
