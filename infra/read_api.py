"""The read API: live SLA board, latest signals and case explanations, per tenant.

Each route needs the `read` scope and answers only with the caller's tenant's data. The data
comes from callables the composition root wires (engine state, signal log, log replay), so this
module stays an adapter that only translates HTTP.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.concurrency import run_in_threadpool

from loopservice.domain.events import Team
from loopservice.infra.auth import Principal, require_scope

BoardSource = Callable[[str, Team | None], list[dict[str, Any]]]
QueueSource = Callable[[str], list[dict[str, Any]]]
SignalSource = Callable[[str, int], list[dict[str, Any]]]
Explainer = Callable[[str, str], dict[str, Any] | None]

Reader = Annotated[Principal, Depends(require_scope("read"))]


def read_router(
    board: BoardSource,
    queues: QueueSource,
    signals: SignalSource,
    explain: Explainer,
    now: Callable[[], datetime],
    speedup: float,
) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["read"])

    @router.get("/board")
    async def get_board(principal: Reader, team: Team | None = None) -> dict[str, Any]:
        """Running SLA clocks (of one team if given), nearest deadline first, with the
        server's now and clock speed."""
        rows = await run_in_threadpool(board, principal.tenant, team)
        return {"now": now().isoformat(), "speedup": speedup, "clocks": rows}

    @router.get("/queues")
    async def get_queues(principal: Reader) -> dict[str, Any]:
        """Each team's queue: cases with a running SLA clock, by priority, how many have
        breached, and the team's nearest deadline."""
        return {
            "now": now().isoformat(),
            "queues": await run_in_threadpool(queues, principal.tenant),
        }

    @router.get("/signals")
    async def get_signals(
        principal: Reader, limit: Annotated[int, Query(ge=1, le=500)] = 50
    ) -> dict[str, Any]:
        """The latest derived signals, newest first."""
        return {"signals": await run_in_threadpool(signals, principal.tenant, limit)}

    @router.get("/cases/{case_id}/explain")
    async def get_explanation(case_id: str, principal: Reader) -> dict[str, Any]:
        """The priority rule, deadlines, pauses and calendar segments of a case."""
        found = await run_in_threadpool(explain, principal.tenant, case_id)
        if found is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no case {case_id!r}")
        return found

    return router
