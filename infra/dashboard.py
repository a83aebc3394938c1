"""The dashboard: static pages, no build step, polling the read API with a read token.

`/` is the SLA board (live countdowns, signals, alerts with an acknowledge button);
`/customer#account=ID` is one customer's context and timeline, linked from the board.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse


def dashboard_router() -> APIRouter:
    router = APIRouter()
    page = files("loopservice.infra").joinpath("static/dashboard.html").read_text("utf-8")

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    customer = files("loopservice.infra").joinpath("static/customer.html").read_text("utf-8")

    @router.get("/customer", response_class=HTMLResponse, include_in_schema=False)
    async def customer_page() -> str:
        return customer

    return router
