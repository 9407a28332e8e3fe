"""Server status for people and monitors: the web page, /health (no key) and /metrics."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from deps import ManagerDep, get_caller
from http_errors import retry_header
from schemas import ERRORS

WEB_DIR = Path(__file__).resolve().parents[1] / "web"

public = APIRouter()  # no key needed
router = APIRouter(dependencies=[Depends(get_caller)], responses=ERRORS)


@public.get("/", include_in_schema=False)
async def index():
    """The web page."""
    return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@public.get("/health", responses={503: {"model": dict}}, tags=["server"])
async def health(request: Request, manager: ManagerDep):
    """Model, device and load state; 503 until the model can serve requests. Needs no key."""
    info = manager.health() | {"auth": request.app.state.keyring.enabled}
    info["detail"] = info["detail"] and request.app.state.scrub(info["detail"])
    info["checkpoint"] = Path(info["checkpoint"]).name
    headers = None if manager.ready else retry_header(manager.retry_in() or 5)
    return JSONResponse(status_code=200 if manager.ready else 503, content=info,
                        headers=headers)


@router.get("/metrics", tags=["server"], response_class=Response)
async def metrics(request: Request):
    """Prometheus metrics: requests and latencies by route, sessions, jobs, queues, model."""
    body, content_type = await run_in_threadpool(request.app.state.metrics.render)
    return Response(body, media_type=content_type)
