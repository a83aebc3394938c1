"""The HTTP API: a FastAPI app assembled from routers, so the read API, /metrics and the
dashboard plug into the same app.

`POST /v1/events` takes `application/json` (one event or an array) or `application/x-ndjson`
and is all or nothing per request (see `streams.ingest`):

- 202 `{"results": [{"index", "event_id", "position", "duplicate"}]}`, sent only after the
  append has returned, i.e. the events are durable;
- 400 unreadable body (bad JSON, no events), 413 too many events or bytes, 415 other
  content types;
- 401 no or unknown bearer token; 403 token without the `ingest` scope, or an event whose
  `tenant_id` is not the token's tenant (`errors` name the indexes);
- 422 `{"errors": [{"index", "event_id", "field", "reason"}]}` listing every invalid event;
  nothing was appended;
- 503 the log could not be written; retrying the same request is safe (idempotent ids).

Handlers only translate HTTP to `IngestService` calls; the blocking append runs in a worker
thread. Neither request bodies nor tokens are logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from loopservice.domain.events import Event
from loopservice.infra.auth import Principal, TokenRegistry, require_scope
from loopservice.infra.metrics import Metrics, type_label
from loopservice.infra.settings import Settings, load_tokens
from loopservice.streams.clock import Clock, WallClock
from loopservice.streams.ingest import (
    GroupCommitLog,
    IngestService,
    Outcome,
    PayloadError,
    UnsupportedMediaType,
    parse_payload,
)
from loopservice.streams.log import Log

logger = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    log: Log[Event],
    *,
    tokens: TokenRegistry | None = None,
    metrics: Metrics | None = None,
    clock: Clock | None = None,
    routers: Sequence[APIRouter] = (),
) -> FastAPI:
    """The app; `tokens` defaults to `load_tokens(settings)`, `clock` to the log's clock."""
    if tokens is None:
        source = load_tokens(settings)
        notice = source.notice()
        if notice:
            logger.warning(notice)
        tokens = TokenRegistry(source.grants)
    metrics = metrics or Metrics()
    clock = clock or getattr(log, "clock", None) or WallClock()
    app = FastAPI(title="Loop Service", version="0.1.0")
    app.state.settings = settings
    app.state.log = log
    app.state.tokens = tokens
    app.state.metrics = metrics
    app.state.ingest = IngestService(GroupCommitLog(log), clock, settings.clock_skew_tolerance)
    app.include_router(health_router())
    app.include_router(metrics_router())
    app.include_router(ingest_router())
    for router in routers:
        app.include_router(router)
    return app


def health_router() -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/healthz")
    async def healthz(request: Request) -> dict[str, Any]:
        head = await run_in_threadpool(request.app.state.log.head)
        return {"status": "ok", "log_head": head}

    return router


def metrics_router() -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/metrics", include_in_schema=False)
    async def metrics_endpoint(request: Request) -> Response:
        body, content_type = request.app.state.metrics.render()
        return Response(body, media_type=content_type)

    return router


def ingest_router() -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["ingest"])

    @router.post("/events", status_code=status.HTTP_202_ACCEPTED)
    async def post_events(
        request: Request, principal: Annotated[Principal, Depends(require_scope("ingest"))]
    ) -> JSONResponse:
        started = time.perf_counter()
        metrics: Metrics = request.app.state.metrics
        response = await _ingest(request, principal)
        metrics.ingest_requests.labels("http", str(response.status_code)).inc()
        metrics.ingest_latency.labels("http").observe(time.perf_counter() - started)
        return response

    return router


def _error(code: int, detail: str, errors: list[dict[str, Any]] | None = None) -> JSONResponse:
    content: dict[str, Any] = {"detail": detail}
    if errors is not None:
        content["errors"] = errors
    return JSONResponse(content, status_code=code)


async def _ingest(request: Request, principal: Principal) -> JSONResponse:
    settings: Settings = request.app.state.settings
    metrics: Metrics = request.app.state.metrics
    service: IngestService = request.app.state.ingest
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > settings.max_request_bytes:
        return _too_large(settings)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > settings.max_request_bytes:
            return _too_large(settings)
    try:
        items = parse_payload(bytes(body), request.headers.get("content-type"))
    except UnsupportedMediaType as exc:
        return _error(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, str(exc))
    except PayloadError as exc:
        return _error(status.HTTP_400_BAD_REQUEST, str(exc))
    if not items:
        return _error(status.HTTP_400_BAD_REQUEST, "the body holds no events")
    if len(items) > settings.max_batch_events:
        return _error(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"{len(items)} events in one request; at most {settings.max_batch_events}",
        )
    metrics.ingest_batch_size.observe(len(items))
    foreign = [
        {
            "index": i,
            "event_id": _event_id(item),
            "field": "tenant_id",
            "reason": "not the tenant of this token",
        }
        for i, item in enumerate(items)
        if isinstance(item, dict) and "tenant_id" in item and item["tenant_id"] != principal.tenant
    ]
    if foreign:
        indexes = ", ".join(str(e["index"]) for e in foreign[:20])
        return _error(
            status.HTTP_403_FORBIDDEN,
            f"events at index {indexes} belong to another tenant; nothing was appended",
            foreign,
        )
    try:
        outcome: Outcome = await run_in_threadpool(service.submit_all_or_nothing, items)
    except Exception:
        logger.exception("ingest: appending %d events failed", len(items))
        for item in items:
            metrics.events_ingested.labels(type_label(_type(item)), "not_appended").inc()
        return JSONResponse(
            {"detail": "the log is unavailable; nothing was acknowledged, retry the request"},
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": "1"},
        )
    if outcome.rejections:
        rejected = {r.index for r in outcome.rejections}
        for i, item in enumerate(items):
            result = "rejected" if i in rejected else "not_appended"
            metrics.events_ingested.labels(type_label(_type(item)), result).inc()
        errors = [
            {"index": r.index, "event_id": r.event_id, "field": e.field, "reason": e.reason}
            for r in outcome.rejections
            for e in r.errors
        ]
        return _error(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"{len(outcome.rejections)} of {len(items)} events are invalid; nothing was appended",
            errors,
        )
    for r in outcome.results:
        metrics.events_ingested.labels(r.type, "duplicate" if r.duplicate else "accepted").inc()
    if outcome.results:
        metrics.log_head.set(max(r.position for r in outcome.results))
    return JSONResponse(
        {
            "results": [
                {
                    "index": r.index,
                    "event_id": r.event_id,
                    "position": r.position,
                    "duplicate": r.duplicate,
                }
                for r in outcome.results
            ]
        },
        status_code=status.HTTP_202_ACCEPTED,
    )


def _too_large(settings: Settings) -> JSONResponse:
    return _error(
        status.HTTP_413_CONTENT_TOO_LARGE,
        f"the body exceeds {settings.max_request_bytes} bytes; send smaller batches",
    )


def _event_id(item: object) -> str | None:
    value = item.get("event_id") if isinstance(item, dict) else None
    return value if isinstance(value, str) else None


def _type(item: object) -> object:
    return item.get("type") if isinstance(item, dict) else None
