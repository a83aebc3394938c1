"""The dashboard: one static page, no build step, polling the read API with a read token."""

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

    return router
