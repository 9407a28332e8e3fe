"""FastAPI app: routes, schemas, error handlers and lifespan of the SAM 2 video segmentation server."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import shutil
import threading
import uuid
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import cv2
import numpy as np
from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import exports
from config import Settings, get_settings
from jobs import Job
from sam2_manager import (
    ExportNotFound,
    FrameNotReady,
    FrameOutOfRange,
    InvalidPrompt,
    InvalidRequest,
    JobNotFound,
    ManagerError,
    MaskNotFound,
    ModelNotReady,
    NoMasks,
    NoPrompts,
    ObjectNotFound,
    SAM2Manager,
    Session,
    SessionBusy,
    SessionNotFound,
    TooManySessions,
    VideoInvalid,
)
from uploads_stream import UploadError, receive_file

logger = logging.getLogger("sam2_server")

STATUS_OF: dict[type[ManagerError], int] = {
    SessionNotFound: 404,
    MaskNotFound: 404,
    ObjectNotFound: 404,
    ExportNotFound: 404,
    JobNotFound: 404,
    FrameOutOfRange: 404,
    SessionBusy: 409,
    NoPrompts: 409,
    NoMasks: 409,
    InvalidPrompt: 422,
    InvalidRequest: 422,
    VideoInvalid: 422,
    TooManySessions: 429,
    ModelNotReady: 503,
    FrameNotReady: 503,
}


# ----------------------------------------------------------------------------- schemas
class ErrorResponse(BaseModel):
    error: str = Field(description="Machine-readable error code", examples=["session_not_found"])
    detail: str = Field(description="What went wrong and what to do about it")


class Point(BaseModel):
    x: float = Field(description="Column in the video's pixels (after rotation)", examples=[920])
    y: float = Field(description="Row in the video's pixels", examples=[470])
    label: Literal[0, 1] = Field(1, description="1 = include, 0 = exclude")


class PromptRequest(BaseModel):
    frame_idx: int = Field(ge=0, description="Frame the prompt is on", examples=[0])
    points: list[Point] = Field(default_factory=list, max_length=256)
    obj_id: int = Field(1, ge=1, le=255, description="Object to prompt (1..255)")
    box: list[float] | None = Field(None, min_length=4, max_length=4,
                                    description="[x0, y0, x1, y1] in video pixels",
                                    examples=[[100, 80, 400, 360]])
    mask_png_base64: str | None = Field(
        None, description="A PNG mask at video resolution, base64; non-zero pixels = object "
                          "(SAM 2's add_new_mask). Not combinable with points or box.")

    model_config = {"json_schema_extra": {"examples": [
        {"frame_idx": 0, "obj_id": 1,
         "points": [{"x": 920, "y": 470, "label": 1}, {"x": 900, "y": 450, "label": 0}]},
        {"frame_idx": 10, "obj_id": 2, "box": [100, 80, 400, 360]},
    ]}}

    @model_validator(mode="after")
    def _something_given(self):
        if not self.points and self.box is None and self.mask_png_base64 is None:
            raise ValueError("give at least one point, a box or mask_png_base64")
        return self


class PromptResponse(BaseModel):
    session_id: str
    frame_idx: int
    obj_id: int
    obj_ids: list[int] = Field(description="Every object in the session")
    mask_area: dict[int, int] = Field(description="Pixels per object on this frame")
    scores: dict[int, dict[str, Any]] = Field(
        description="Per object: object_score (logit; > 0 = visible), predicted iou, visible")
    mask_url: str
    overlay_url: str
    frame_url: str


class PropagateRequest(BaseModel):
    session_id: str | None = Field(None, description="Optional; must match the path if given")
    start_frame: int = Field(0, ge=0, examples=[0])
    end_frame: int | None = Field(
        None, ge=0, description="Inclusive; clamped to the last frame; below start_frame tracks "
                                "backwards. Alternative to direction/max_frames.", examples=[100])
    direction: Literal["forward", "backward", "both"] | None = Field(
        None, description="Default forward (or implied by end_frame)")
    max_frames: int | None = Field(None, ge=0,
                                   description="Frames to track after start_frame, per direction")
    background: bool = Field(False, description="Run as a job: answer 202 with a job id at once")


class PropagateResponse(BaseModel):
    session_id: str
    start_frame: int
    end_frame: int | None
    direction: str
    passes: list[dict]
    frames_processed: int
    first_frame: int | None
    last_frame: int | None
    cancelled: bool
    seconds: float
    fps: float | None
    objects: list[int]


class JobResponse(BaseModel):
    job_id: str
    kind: str
    session_id: str
    status: str
    frame_idx: int | None = None
    done: int = 0
    total: int = 0
    fps: float | None = None
    eta_s: float | None = None
    elapsed_s: float | None = None
    result: Any = None
    error: str | None = None
    events_url: str | None = None
    cancel_url: str | None = None


class UploadResponse(BaseModel):
    session_id: str
    filename: str
    num_frames: int
    width: int
    height: int
    fps: float
    fps_rational: str
    codec: str
    rotation: int
    duration_s: float
    frame_url: str


ExportFormatName = Literal[tuple(exports.FORMATS)]  # type: ignore[valid-type]


class ExportRequest(BaseModel):
    format: ExportFormatName = Field("overlay_mp4", description="See GET /export")
    start_frame: int | None = Field(None, ge=0)
    end_frame: int | None = Field(None, ge=0)
    polygons: bool = False


class ClearPromptsRequest(BaseModel):
    frame_idx: int = Field(ge=0)
    obj_id: int = Field(1, ge=1, le=255)


MAX_MASK_BYTES = 64 * 1024 * 1024
ERRORS = {code: {"model": ErrorResponse} for code in (404, 409, 422, 503)}


# ----------------------------------------------------------------------------- app
def create_app(settings: Settings | None = None, manager: SAM2Manager | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        mgr = manager or SAM2Manager(settings)
        app.state.manager = mgr
        if not mgr.ready:
            threading.Thread(target=mgr.load_model, name="model-loader", daemon=True).start()
        cleaner = asyncio.create_task(_cleanup_loop(mgr, settings.cleanup_interval_s))
        try:
            yield
        finally:
            cleaner.cancel()
            await run_in_threadpool(mgr.shutdown)

    app = FastAPI(
        title="SAM 2 interactive video segmentation",
        version="1.0.0",
        description="Upload a video, click points on any frame, propagate, refine, export.",
        lifespan=lifespan,
    )
    app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins,
                       allow_methods=["*"], allow_headers=["*"])
    _install_error_handlers(app)
    _add_routes(app, settings)
    return app


async def _cleanup_loop(manager: SAM2Manager, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            expired = await run_in_threadpool(manager.cleanup_expired)
            if expired:
                logger.info("closed idle sessions: %s", ", ".join(expired))
        except Exception:
            logger.exception("session cleanup failed")


def _error(status: int, code: str, detail: str, **extra) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": code, "detail": detail, **extra})


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ManagerError)
    async def _manager_error(request: Request, exc: ManagerError):
        return _error(STATUS_OF.get(type(exc), 400), exc.code, str(exc))

    @app.exception_handler(UploadError)
    async def _upload_error(request: Request, exc: UploadError):
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        # Without the offending input: it can be a whole base64 mask.
        errors = json.loads(json.dumps([{k: v for k, v in err.items() if k != "input"}
                                        for err in exc.errors()], default=str))
        return _error(422, "validation_error", "; ".join(problems) or "invalid request",
                      errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, "internal_error", "unexpected server error; see the server log")


def get_manager(request: Request) -> SAM2Manager:
    return request.app.state.manager


ManagerDep = Annotated[SAM2Manager, Depends(get_manager)]


def get_session(session_id: uuid.UUID, manager: ManagerDep) -> Session:
    return manager.get(str(session_id))


SessionDep = Annotated[Session, Depends(get_session)]


def _urls(session_id: str, frame_idx: int) -> dict:
    return {"mask_url": f"/mask/{session_id}/{frame_idx}",
            "overlay_url": f"/overlay/{session_id}/{frame_idx}",
            "frame_url": f"/frame/{session_id}/{frame_idx}"}


def _decode_mask(b64: str) -> np.ndarray:
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidPrompt(f"mask_png_base64 is not valid base64 ({exc})") from exc
    img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise InvalidPrompt("mask_png_base64 is not a readable image")
    return img


def _job_response(job: Job) -> dict:
    return job.snapshot() | {"events_url": f"/jobs/{job.id}/events",
                             "cancel_url": f"/jobs/{job.id}/cancel"}


def _add_routes(app: FastAPI, settings: Settings) -> None:
    @app.get("/health", responses={503: {"model": dict}}, tags=["server"])
    def health(manager: ManagerDep):
        """Model, device and load state; 503 until the model can serve requests."""
        info = manager.health()
        return JSONResponse(status_code=200 if manager.ready else 503, content=info)

    @app.post("/upload-video", response_model=UploadResponse, status_code=200,
              responses={413: {"model": ErrorResponse}, 415: {"model": ErrorResponse},
                         422: {"model": ErrorResponse}, 429: {"model": ErrorResponse}},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "multipart/form-data": {"schema": {
                      "type": "object", "required": ["file"],
                      "properties": {"file": {"type": "string", "format": "binary",
                                              "description": "The video (mp4, mov, webm, mkv, "
                                                             "avi...)"}}}}}}},
              tags=["session"])
    async def upload_video(request: Request, manager: ManagerDep):
        """Upload a video (multipart field `file`); answers once frame 0 can be served."""
        manager.check_capacity()
        session_id = manager.new_session_id()
        try:
            path, filename = await receive_file(
                request, "file", lambda name: manager.upload_path_for(session_id, name),
                settings.max_upload_bytes)
        except BaseException:
            shutil.rmtree(settings.upload_dir / session_id, ignore_errors=True)
            raise
        session = await run_in_threadpool(manager.create_session, session_id, path, filename)
        info = session.info.as_dict()
        return {"session_id": session.id, "filename": session.filename,
                **{k: info[k] for k in ("num_frames", "width", "height", "fps", "fps_rational",
                                        "codec", "rotation", "duration_s")},
                "frame_url": f"/frame/{session.id}/0"}

    @app.get("/frame/{session_id}/{frame_idx}", response_class=FileResponse,
             responses={**ERRORS, 200: {"content": {"image/jpeg": {}}}}, tags=["frames"])
    def get_frame(session: SessionDep, frame_idx: int, manager: ManagerDep):
        """JPEG of the frame at the video's resolution (waits while it is being decoded)."""
        return FileResponse(manager.frame_path(session, frame_idx), media_type="image/jpeg")

    @app.get("/overlay/{session_id}/{frame_idx}", response_class=FileResponse,
             responses={**ERRORS, 200: {"content": {"image/jpeg": {}}}}, tags=["frames"])
    def get_overlay(session: SessionDep, frame_idx: int, manager: ManagerDep):
        """JPEG of the frame with every object's mask in its colour (the plain frame if none)."""
        return FileResponse(manager.overlay_path(session, frame_idx), media_type="image/jpeg",
                            headers={"Cache-Control": "no-cache"})

    @app.get("/mask/{session_id}/{frame_idx}", response_class=FileResponse,
             responses={**ERRORS, 200: {"content": {"image/png": {}}}}, tags=["frames"])
    def get_mask(session: SessionDep, frame_idx: int, manager: ManagerDep):
        """8-bit PNG at video resolution: pixel = obj_id, 0 = background."""
        return FileResponse(manager.mask_path(session, frame_idx), media_type="image/png",
                            headers={"Cache-Control": "no-cache"})

    def _prompt(session: Session, body: PromptRequest, manager: SAM2Manager, append: bool):
        mask = _decode_mask(body.mask_png_base64) if body.mask_png_base64 else None
        result = manager.add_prompt(
            session.id, body.frame_idx, body.obj_id,
            points=[[p.x, p.y] for p in body.points], labels=[p.label for p in body.points],
            box=body.box, mask=mask, append=append)
        return result | {"obj_id": body.obj_id} | _urls(session.id, body.frame_idx)

    @app.post("/annotate-frame/{session_id}", response_model=PromptResponse,
              responses=ERRORS, tags=["prompts"])
    def annotate_frame(session: SessionDep, body: PromptRequest, manager: ManagerDep):
        """Set an object's prompts on a frame (replacing its earlier ones there); returns the mask."""
        return _prompt(session, body, manager, append=False)

    @app.post("/refine-mask/{session_id}", response_model=PromptResponse,
              responses=ERRORS, tags=["prompts"])
    def refine_mask(session: SessionDep, body: PromptRequest, manager: ManagerDep):
        """Add points to an object's prompts on a frame, keeping the earlier ones."""
        return _prompt(session, body, manager, append=True)

    @app.post("/mask-prompt/{session_id}", response_model=PromptResponse,
              responses={**ERRORS, 413: {"model": ErrorResponse}}, tags=["prompts"])
    def mask_prompt(session: SessionDep, manager: ManagerDep,
                    file: Annotated[UploadFile, File(description="PNG (or any image) mask at "
                                                     "video resolution; non-zero = object")],
                    frame_idx: Annotated[int, Form(ge=0)],
                    obj_id: Annotated[int, Form(ge=1, le=255)] = 1):
        """Prompt an object on a frame with a mask image (SAM 2's add_new_mask), as multipart."""
        data = file.file.read(MAX_MASK_BYTES + 1)
        if len(data) > MAX_MASK_BYTES:
            raise UploadError(413, "upload_too_large",
                              f"a mask image may be at most {MAX_MASK_BYTES} bytes")
        mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise InvalidPrompt("the mask file is not a readable image")
        result = manager.add_prompt(session.id, frame_idx, obj_id, mask=mask)
        return result | {"obj_id": obj_id} | _urls(session.id, frame_idx)

    @app.post("/clear-prompts/{session_id}", responses=ERRORS, tags=["prompts"])
    def clear_prompts(session: SessionDep, body: ClearPromptsRequest, manager: ManagerDep):
        """Remove one object's prompts on one frame (the object goes if it has no other)."""
        result = manager.clear_prompts(session.id, body.obj_id, body.frame_idx)
        return result | _urls(session.id, body.frame_idx)

    @app.delete("/object/{session_id}/{obj_id}", responses=ERRORS, tags=["prompts"])
    def remove_object(session: SessionDep, obj_id: int, manager: ManagerDep):
        """Remove an object: its prompts go and its pixels leave every mask."""
        return manager.remove_object(session.id, obj_id)

    @app.post("/reset/{session_id}", responses=ERRORS, tags=["prompts"])
    def reset_session(session: SessionDep, manager: ManagerDep):
        """Drop every prompt, object and mask; keep the video."""
        return manager.reset(session.id)

    @app.post("/propagate/{session_id}", response_model=PropagateResponse | JobResponse,
              responses={**ERRORS, 202: {"model": JobResponse}}, tags=["tracking"])
    def propagate(session: SessionDep, body: PropagateRequest, manager: ManagerDep):
        """Track every object over a range of frames, writing masks and overlays.

        Blocking by default; with `"background": true` it answers 202 with a job to follow.
        """
        if body.session_id is not None and body.session_id != session.id:
            raise InvalidRequest(f"body session_id {body.session_id} does not match the path "
                                 f"{session.id}")
        kwargs = {"start_frame": body.start_frame, "end_frame": body.end_frame,
                  "direction": body.direction, "max_frames": body.max_frames}
        if body.background:
            job = manager.start_propagation_job(session.id, **kwargs)
            return JSONResponse(status_code=202, content=_job_response(job))
        return manager.propagate(session.id, **kwargs)

    @app.get("/export/{session_id}", response_class=FileResponse,
             responses={**ERRORS, 200: {"content": {f.media_type: {} for f in
                                                     exports.FORMATS.values()}}},
             tags=["export"])
    def export(session: SessionDep, manager: ManagerDep,
               format: Annotated[ExportFormatName, Query(
                   description="; ".join(f"{f.name}: {f.description}"
                                         for f in exports.FORMATS.values()))] = "overlay_mp4",
               start_frame: Annotated[int | None, Query(ge=0)] = None,
               end_frame: Annotated[int | None, Query(ge=0)] = None,
               polygons: Annotated[bool, Query(description="coco_json: add polygons")] = False):
        """Export the session (blocking). Default: the overlay MP4 (H.264, yuv420p, faststart)."""
        path = manager.export(session.id, format, start_frame, end_frame, polygons)
        return FileResponse(path, media_type=exports.FORMATS[format].media_type,
                            filename=f"{session.id}_{path.name}")

    @app.post("/export/{session_id}", status_code=202, response_model=JobResponse,
              responses=ERRORS, tags=["export"])
    def export_job(session: SessionDep, body: ExportRequest, manager: ManagerDep):
        """Start an export as a job; its result has the `download_url`."""
        job = manager.start_export_job(session.id, body.format, body.start_frame,
                                       body.end_frame, body.polygons)
        return JSONResponse(status_code=202, content=_job_response(job))

    @app.get("/exports/{session_id}/{name}", response_class=FileResponse, responses=ERRORS,
             tags=["export"])
    def download_export(session: SessionDep, name: str, manager: ManagerDep):
        """Download a file an export job wrote."""
        path = manager.export_file(session.id, name)
        media = next((f.media_type for f in exports.FORMATS.values()
                      if path.suffix == f".{f.extension}"), "application/octet-stream")
        return FileResponse(path, media_type=media, filename=f"{session.id}_{path.name}")

    @app.get("/session/{session_id}", tags=["session"], responses=ERRORS)
    def get_session_info(session: SessionDep, manager: ManagerDep):
        """Metadata, objects, prompts in order, frames with masks, scores, propagations."""
        return manager.describe(session.id)

    @app.get("/sessions", tags=["session"])
    def list_sessions(manager: ManagerDep):
        """Open sessions."""
        return [{"session_id": s.id, "filename": s.filename, "num_frames": s.info.num_frames,
                 "busy_with": s.busy_with, "last_access": s.last_access}
                for s in list(manager.sessions.values())]

    @app.delete("/session/{session_id}", tags=["session"], responses=ERRORS)
    def delete_session(session: SessionDep, manager: ManagerDep):
        """Close the session and delete its upload and outputs."""
        manager.close_session(session.id, delete_files=True)
        return {"session_id": session.id, "deleted": True}

    # -- jobs ------------------------------------------------------------------------------
    def _job(job_id: str, manager: SAM2Manager) -> Job:
        job = manager.jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id}; jobs are kept in memory until a restart")
        return job

    @app.get("/jobs/{job_id}", response_model=JobResponse, responses=ERRORS, tags=["jobs"])
    def get_job(job_id: str, manager: ManagerDep):
        """Progress of a background job (frames done, total, fps, ETA) and its result."""
        return _job_response(_job(job_id, manager))

    @app.post("/jobs/{job_id}/cancel", response_model=JobResponse, responses=ERRORS,
              tags=["jobs"])
    def cancel_job(job_id: str, manager: ManagerDep):
        """Ask a job to stop; masks written so far stay, and the manifest lists exactly them."""
        job = _job(job_id, manager)
        job.cancel_event.set()
        return _job_response(job)

    @app.get("/jobs/{job_id}/events", tags=["jobs"], responses=ERRORS,
             response_class=StreamingResponse)
    async def job_events(job_id: str, manager: ManagerDep):
        """Server-sent events: one `progress` event per change, then `end` with the final state."""
        job = _job(job_id, manager)

        async def stream():
            version = -1
            while True:
                version = await run_in_threadpool(job.wait_change, version, 15.0)
                snap = _job_response(job)  # one consistent reading: the end is sent as "end"
                finished = snap["status"] in ("succeeded", "failed", "cancelled")
                yield f"event: {'end' if finished else 'progress'}\ndata: {json.dumps(snap)}\n\n"
                if finished:
                    return

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})


def main() -> None:
    """``python main.py``; with the uvicorn CLI: ``uvicorn --factory main:create_app``."""
    import uvicorn

    settings = get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port)


if __name__ == "__main__":
    main()
