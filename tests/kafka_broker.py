"""A real single-node Kafka broker for tests, started by the project's own `infra/kafka/kafka.sh`.

The `kafka_broker` fixture is session-scoped and shared: the first test that asks for it starts
one broker on a free loopback port in a temporary directory, and the end of the session stops
it. Use it from a test module with `from kafka_broker import kafka_broker` (the module is on
pytest's `pythonpath`), or for the whole suite with `pytest_plugins = ["kafka_broker"]` in a
root `conftest.py`. Tests that stop the broker must start it again before they end.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "infra" / "kafka" / "kafka.sh"


@dataclass
class KafkaBroker:
    dir: Path
    port: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def up(self) -> None:
        self._run("up", "--port", str(self.port))

    def down(self) -> None:
        self._run("down")

    def _run(self, command: str, *args: str) -> None:
        started = time.monotonic()
        done = subprocess.run(
            [str(SCRIPT), command, "--dir", str(self.dir), *args],
            capture_output=True,
            text=True,
            timeout=600,  # a first run downloads the broker's jars
        )
        self.timings[command] = time.monotonic() - started
        if done.returncode != 0:
            raise RuntimeError(f"kafka.sh {command} failed:\n{done.stdout}\n{done.stderr}")


def free_port_pair() -> int:
    """A loopback port P with P+1 free too (the broker's controller listens there)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port < 65535 and all(_free(p) for p in (port, port + 1)):
            return port
    raise RuntimeError("no two adjacent free ports on 127.0.0.1")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_shared: KafkaBroker | None = None


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    global _shared
    owner = _shared is None
    if _shared is None:
        broker = KafkaBroker(Path(tempfile.mkdtemp(prefix="loop-kafka-")), free_port_pair())
        broker.up()
        _shared = broker
    try:
        yield _shared
    finally:
        if owner and _shared is not None:
            broker, _shared = _shared, None
            broker.down()
            shutil.rmtree(broker.dir, ignore_errors=True)
