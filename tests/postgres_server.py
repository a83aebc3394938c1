"""A real PostgreSQL for tests, started by the project's own `infra/postgres/pg.sh`.

The `postgres_server` fixture is session-scoped: the first test that asks for it initdb's a
private cluster in a temporary directory, starts it on a free loopback port, and the end of the
session stops it and removes the directory. `postgres_server.database()` creates a fresh, empty
database and returns its URL, so tests never see each other's tables. Use it from a test module
with `from postgres_server import postgres_server`. The cluster runs with fsync off: it is thrown
away after the session, and the tests kill clients, never the server.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "infra" / "postgres" / "pg.sh"


@dataclass
class PostgresServer:
    dir: Path
    port: int
    _names: Iterator[int] = field(default_factory=itertools.count)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def database(self) -> str:
        """A new empty database; its URL."""
        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def up(self) -> None:
        self._run("up", "--port", str(self.port))

    def down(self) -> None:
        self._run("down")

    def _run(self, command: str, *args: str) -> None:
        env = {**os.environ, "PG_SERVER_OPTS": "-c fsync=off -c full_page_writes=off"}
        done = subprocess.run(
            [str(SCRIPT), command, "--dir", str(self.dir), *args],
            capture_output=True,
            text=True,
            timeout=900,  # a first run on a fresh machine installs postgresql with apt-get
            env=env,
        )
        if done.returncode != 0:
            raise RuntimeError(f"pg.sh {command} failed:\n{done.stdout}\n{done.stderr}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


_shared: PostgresServer | None = None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    global _shared
    owner = _shared is None
    if _shared is None:
        # Under /tmp, not pytest's tmp_path: when run as root the cluster runs as `postgres`,
        # which cannot enter root's 0700 pytest directories.
        server = PostgresServer(Path(tempfile.mkdtemp(prefix="loop-pg-")), free_port())
        server.up()
        _shared = server
    try:
        yield _shared
    finally:
        if owner and _shared is not None:
            server, _shared = _shared, None
            server.down()
            shutil.rmtree(server.dir, ignore_errors=True)
