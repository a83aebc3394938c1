"""The outer-loop read API: knowledge view, weekly trends, loop maturity scorecard.

Every `/v1` route needs the `read` scope and answers only with the caller's tenant's data.
Handlers only translate HTTP to `LoopQueries` calls, run in a worker thread. `/maturity` is the
dashboard page of the scorecard (static, no build step, `/maturity#token=<read token>`).
"""

from __future__ import annotations

from importlib.resources import files
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse

from loopservice.infra.auth import Principal, require_scope
from loopservice.projections.loop_queries import LoopQueries

Reader = Annotated[Principal, Depends(require_scope("read"))]


def loop_router(queries: LoopQueries) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["outer loop"])

    @router.get("/knowledge")
    async def get_knowledge(
        principal: Reader, limit: Annotated[int, Query(ge=1, le=500)] = 20
    ) -> dict[str, Any]:
        """Knowledge candidates with what they would save, articles, coverage, deflection."""
        return await run_in_threadpool(queries.knowledge, principal.tenant, limit)

    @router.get("/trends")
    async def get_trends(
        principal: Reader,
        dimension: Literal["topic", "area", "channel"] = "topic",
        weeks: Annotated[int, Query(ge=1, le=104)] = 8,
        week: Annotated[str | None, Query(pattern=r"^\d{4}-\d{2}-\d{2}$")] = None,
    ) -> dict[str, Any]:
        """Weekly volume, CSAT, breach and reopen rates; rising topics; improvement effects."""
        try:
            return await run_in_threadpool(queries.trends, principal.tenant, dimension, weeks, week)
        except ValueError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None

    @router.get("/maturity")
    async def get_maturity(principal: Reader) -> dict[str, Any]:
        """The loop maturity scorecard: four stages, their metrics, ratings and thresholds."""
        return await run_in_threadpool(queries.maturity, principal.tenant)

    return router


def maturity_page_router() -> APIRouter:
    router = APIRouter()
    page = files("loopservice.infra").joinpath("static/maturity.html").read_text("utf-8")

    @router.get("/maturity", response_class=HTMLResponse, include_in_schema=False)
    async def maturity_page() -> str:
        return page

    return router
