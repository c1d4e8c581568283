"""Operations surface: /metrics (Prometheus), /healthz, and the placeholder viewer at /."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from server.state import get_state

__all__ = ["router"]

router = APIRouter(tags=["ops"])


class Health(BaseModel):
    status: str
    ready: bool
    models: dict[str, str]


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus exposition of this app's own registry."""
    state = get_state(request)
    for device, batcher in state.batchers.items():
        state.metrics.queue_depth.labels(device).set(batcher.depth)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz", response_model=Health)
async def healthz(request: Request) -> Health:
    """Liveness with detail: always 200 while the process serves; `ready` and each
    model's status (loading / ready / failed) for humans and dashboards."""
    state = get_state(request)
    return Health(status="ok", ready=state.ready, models=dict(state.status))


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index() -> HTMLResponse:
    """The browser viewer (a placeholder until the viewer lands)."""
    html = resources.files("server").joinpath("static/index.html").read_text(encoding="utf-8")
    return HTMLResponse(html)
