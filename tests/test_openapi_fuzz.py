"""Schemathesis against the whole app's `/openapi.json`, in process: no input gives a 5xx.

The app is the one `loopservice run` serves (`bootstrap.build_app`), with a token holding every
scope and a log that already has cases, signals, alerts and built projections, so generated
requests reach real documents as well as unknown ids. Examples per operation are capped (25, or
`LOOP_FUZZ_EXAMPLES`) to keep the run well under a minute.
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from factories import T0, event, message, opened
from loopservice.bootstrap import build_app, build_system
from loopservice.infra.settings import Settings, TokenGrant
from loopservice.streams.clock import FixedClock

TOKEN = "fuzz-token-with-every-scope-01"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _app() -> Any:
    tmp = Path(tempfile.mkdtemp(prefix="loop-fuzz-"))
    grant = TokenGrant.model_validate(
        {"token": TOKEN, "tenant": "acme", "scopes": ["ingest", "read", "admin"]}
    )
    system = build_system(
        Settings(data_dir=tmp, log_url=f"sqlite:///{tmp / 'loop.db'}", tokens=(grant,)),
        FixedClock(T0 + timedelta(days=3)),
    )
    system.log.append(
        [
            event("account.updated", 1, case=None, name="Initech", plan="pro", tier="enterprise",
                  owner_id="csm-1"),
            opened(2, impact="critical", urgency="critical"),
            message(3),
        ]
    )  # fmt: skip
    system.engine.catch_up()
    system.projections.catch_up()
    return build_app(system)


# Built at import: schemathesis parametrises the test from the schema when pytest collects it.
schema = schemathesis.openapi.from_asgi("/openapi.json", _app())


@schema.parametrize()
@settings(
    max_examples=int(os.environ.get("LOOP_FUZZ_EXAMPLES", "25")),
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_no_input_makes_a_server_error(case: Any) -> None:
    case.call_and_validate(headers=AUTH, checks=[not_a_server_error])
