"""The dashboard: one static page (no build step) and the JSON it polls.

`/v1/board` lists the running SLA clocks of the caller's tenant with their deadlines and the
server's current time (and clock speed, so countdowns run right under the demo's fast clock);
`/v1/signals` the tenant's latest signals. Both need the `read` scope.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from importlib.resources import files
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse

from loopservice.infra.auth import Principal, require_scope

BoardSource = Callable[[str], list[dict[str, Any]]]
SignalSource = Callable[[str, int], list[dict[str, Any]]]


def dashboard_router(
    board: BoardSource, signals: SignalSource, now: Callable[[], datetime], speedup: float
) -> APIRouter:
    router = APIRouter()
    page = files("loopservice.infra").joinpath("static/dashboard.html").read_text("utf-8")

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @router.get("/v1/board", tags=["read"])
    async def get_board(
        principal: Annotated[Principal, Depends(require_scope("read"))],
    ) -> dict[str, Any]:
        rows = await run_in_threadpool(board, principal.tenant)
        return {"now": now().isoformat(), "speedup": speedup, "clocks": rows}

    @router.get("/v1/signals", tags=["read"])
    async def get_signals(
        principal: Annotated[Principal, Depends(require_scope("read"))],
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> dict[str, Any]:
        return {"signals": await run_in_threadpool(signals, principal.tenant, limit)}

    return router
