"""Exports: the formats, blocking and background exports, and their downloads."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

import exports
from deps import (
    ManagerDep,
    SessionDep,
    get_caller,
    in_model_pool,
    job_response,
)
from schemas import (
    ERRORS,
    ExportFormatName,
    ExportRequest,
    JobResponse,
)

router = APIRouter(dependencies=[Depends(get_caller)], responses=ERRORS)


@router.get("/export-formats", tags=["export"])
async def export_formats() -> list[dict]:
    """Every export format: name, file extension, media type, description."""
    return [{"name": f.name, "extension": f.extension, "media_type": f.media_type,
             "description": f.description} for f in exports.FORMATS.values()]


@router.get("/export/{session_id}", response_class=FileResponse,
         responses={200: {"content": {f.media_type: {} for f in exports.FORMATS.values()}}},
         tags=["export"])
async def export(request: Request, session: SessionDep, manager: ManagerDep,
                 format: Annotated[ExportFormatName, Query(
                     description="; ".join(f"{f.name}: {f.description}"
                                           for f in exports.FORMATS.values()))] = "overlay_mp4",
                 start_frame: Annotated[int | None, Query(ge=0)] = None,
                 end_frame: Annotated[int | None, Query(ge=0)] = None,
                 polygons: Annotated[bool, Query(description="coco_json: add polygons")] = False):
    """Export the session (blocking). Default: the overlay MP4 (H.264, yuv420p, faststart)."""
    path = await in_model_pool(request, manager.export, session.id, format, start_frame,
                               end_frame, polygons)
    return FileResponse(path, media_type=exports.FORMATS[format].media_type,
                        filename=f"{session.id}_{path.name}")


@router.post("/export/{session_id}", status_code=202, response_model=JobResponse,
          tags=["export"])
async def export_job(session: SessionDep, body: ExportRequest, manager: ManagerDep):
    """Start an export as a job; its result has the `download_url`."""
    job = await run_in_threadpool(manager.start_export_job, session.id, body.format,
                                  body.start_frame, body.end_frame, body.polygons)
    return JSONResponse(status_code=202, content=job_response(job))


@router.get("/exports/{session_id}/{name}", response_class=FileResponse,
         tags=["export"])
def download_export(session: SessionDep, name: str, manager: ManagerDep):
    """Download a file an export job wrote."""
    path = manager.store.export_file(session.id, name)
    media = next((f.media_type for f in exports.FORMATS.values()
                  if path.suffix == f".{f.extension}"), "application/octet-stream")
    return FileResponse(path, media_type=media, filename=f"{session.id}_{path.name}")
