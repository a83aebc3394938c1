"""The alerts API: list on-call alerts and acknowledge them.

- `GET /v1/alerts?limit=N` (scope `read`): the token's tenant's alerts, newest first, each
  with its delivery status per route (`pending`, `delivered`, `failed`, `stale`), attempts,
  escalation level and whether it was acknowledged.
- `POST /v1/alerts/{alert_id}/ack` (scope `admin`), optional JSON body `{"note": "..."}`:
  appends an `alert.acknowledged` event to the log and answers 202 once it is durable.
  Acknowledging stops escalation, which changes who gets paged: hence `admin`, not `read`
  (dashboards) or `ingest` (platforms). 404 for an unknown alert and for another tenant's
  (no difference is shown). A second acknowledgement is a duplicate event (`duplicate: true`);
  the first note stays.

The handlers only translate: the blocking outbox reads and the append run in worker threads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Query, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from loopservice.domain.events import Event
from loopservice.infra.alerts import Outbox, ack_event
from loopservice.infra.auth import Principal, require_scope
from loopservice.streams.clock import Clock
from loopservice.streams.log import Appended

AppendEvents = Callable[[Sequence[Event]], Sequence[Appended]]


class AckRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: str = Field(default="", max_length=2000)


def alerts_router(outbox: Outbox, append: AppendEvents, clock: Clock) -> APIRouter:
    """`append` writes events to the interactions log (e.g. `system.log.append`)."""
    router = APIRouter(prefix="/v1/alerts", tags=["alerts"])

    @router.get("")
    async def list_alerts(
        principal: Annotated[Principal, Depends(require_scope("read"))],
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
    ) -> dict[str, Any]:
        alerts = await run_in_threadpool(outbox.alerts, principal.tenant, limit)
        return {"alerts": [a.to_json() for a in alerts]}

    # `:path`: alert ids are signal identities, which contain slashes
    @router.post("/{alert_id:path}/ack", status_code=status.HTTP_202_ACCEPTED)
    async def acknowledge(
        alert_id: str,
        principal: Annotated[Principal, Depends(require_scope("admin"))],
        request: Annotated[AckRequest | None, Body()] = None,
    ) -> dict[str, Any]:
        alert = await run_in_threadpool(outbox.alert, alert_id)
        if alert is None or alert.tenant_id != principal.tenant:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such alert")
        note = request.note if request is not None else ""
        event = ack_event(alert, note, "api", clock.now())
        [appended] = await run_in_threadpool(append, [event])
        if not appended.duplicate:
            await run_in_threadpool(outbox.record_ack, event)
        return {
            "alert_id": alert_id,
            "event_id": event.event_id,
            "position": appended.position,
            "duplicate": appended.duplicate,
        }

    return router
