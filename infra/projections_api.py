"""The projections read API: customer context and case views, per tenant.

Every route needs the `read` scope and answers only from the caller's tenant; an id the
tenant does not have is a 404 whether or not another tenant has it. Handlers only translate
HTTP to `ProjectionQueries` calls, run in a worker thread.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.concurrency import run_in_threadpool

from loopservice.infra.auth import Principal, require_scope
from loopservice.projections.queries import ProjectionQueries

Reader = Annotated[Principal, Depends(require_scope("read"))]
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=1_000_000_000)]  # bounded: SQL takes 64-bit ints


def _found(value: dict[str, Any] | None, what: str) -> dict[str, Any]:
    if value is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no {what}")
    return value


def projections_router(queries: ProjectionQueries) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["projections"])

    @router.get("/accounts")
    async def get_accounts(principal: Reader, limit: Limit = 50, offset: Offset = 0) -> Any:
        """The tenant's accounts with stage, owner, open cases and risk level."""
        return await run_in_threadpool(queries.accounts, principal.tenant, limit, offset)

    @router.get("/accounts/{account_id}/context")
    async def get_context(
        account_id: str, principal: Reader, as_of: datetime | None = None
    ) -> dict[str, Any]:
        """The customer context now, or with `as_of` (ISO 8601) as it stood at that instant."""
        if as_of is None:
            found = await run_in_threadpool(queries.account_context, principal.tenant, account_id)
        else:
            at = as_of if as_of.tzinfo is not None else as_of.replace(tzinfo=UTC)
            found = await run_in_threadpool(queries.as_of, principal.tenant, account_id, at)
        return _found(found, f"account {account_id!r}")

    @router.get("/cases")
    async def get_cases(
        principal: Reader,
        account_id: str | None = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> Any:
        """Cases newest first, of one account with `account_id`."""
        return await run_in_threadpool(queries.cases, principal.tenant, account_id, limit, offset)

    @router.get("/cases/{case_id}")
    async def get_case(case_id: str, principal: Reader) -> dict[str, Any]:
        """The case view: state, priority history, handoffs, SLA signals, earlier cases."""
        found = await run_in_threadpool(queries.case_view, principal.tenant, case_id)
        return _found(found, f"case {case_id!r}")

    @router.get("/cases/{case_id}/timeline")
    async def get_case_timeline(
        case_id: str, principal: Reader, limit: Limit = 100, offset: Offset = 0
    ) -> dict[str, Any]:
        """The case's timeline, oldest first."""
        found = await run_in_threadpool(
            queries.case_timeline, principal.tenant, case_id, limit, offset
        )
        return _found(found, f"case {case_id!r}")

    return router
