"""FastAPI app: routes, schemas, error handlers and lifespan of the SAM 2 video segmentation server."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import exports
import masks as mask_ops
from auth import Caller, KeyRing, Unauthorized
from config import Settings, get_settings
from disk import is_disk_full
from http_limits import BodyLimit
from jobs import FINISHED, Job
from layout import PARTIAL_SUFFIX
from observability import Metrics, RequestContext
from sam2_manager import (
    DiskFull,
    ExportNotFound,
    FileMissing,
    FrameNotReady,
    FrameOutOfRange,
    InvalidPrompt,
    InvalidRequest,
    JobNotFound,
    ManagerError,
    MaskNotFound,
    ModelNotReady,
    ModelOutOfMemory,
    NoMasks,
    NoPrompts,
    NotAVideo,
    ObjectNotFound,
    SAM2Manager,
    Session,
    SessionBusy,
    SessionNotFound,
    TooManySessions,
    VideoInvalid,
    VideoSizeRefused,
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
    FileMissing: 409,
    NotAVideo: 415,
    InvalidPrompt: 422,
    InvalidRequest: 422,
    VideoInvalid: 422,
    VideoSizeRefused: 422,
    TooManySessions: 429,
    ModelNotReady: 503,
    ModelOutOfMemory: 503,
    FrameNotReady: 503,
    DiskFull: 507,
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
    colors: dict[int, str] = Field(description="Each object's colour in overlays, #rrggbb")
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


ERROR_CODES = (401, 404, 409, 413, 422, 429, 503, 507)
# Every route may answer these (the JSON error shape); declared once, on the router.
ERRORS = {code: {"model": ErrorResponse, "description": text} for code, text in (
    (400, "Malformed request (a body that is not UTF-8 JSON, a broken multipart body)"),
    (401, "Missing or invalid access key (only when the server has keys)"),
    (404, "Unknown session, frame, mask, object, job or export (or another key's)"),
    (409, "The session is busy (see Retry-After), or has nothing to do yet, or a file it "
          "needs is missing"),
    (413, "The body passes SAM2_MAX_JSON_MB (SAM2_MAX_UPLOAD_MB for videos)"),
    (415, "Not a video"),
    (422, "Invalid input: the detail names the field"),
    (429, "Every open session is busy (see Retry-After)"),
    (503, "The model is not ready, ran out of memory, or a frame is still decoding (see "
          "Retry-After)"),
    (507, "The disk quota (SAM2_MAX_DISK_GB) or the disk is full"),
)}
LOOPBACK = ("127.0.0.1", "localhost", "::1")
WEB_DIR = Path(__file__).resolve().parent / "web"
# Without keys the server is one person's tool: pages on their own machine may call it.
LOCAL_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"


# ----------------------------------------------------------------------------- app
def create_app(settings: Settings | None = None, manager: SAM2Manager | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.check_deployment()
    keyring = KeyRing(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        mgr = manager or SAM2Manager(settings)
        app.state.manager = mgr
        await run_in_threadpool(mgr.recover)
        mgr.start_model_loader()
        # Model work (clicks, blocking propagations and exports, deletes) runs on its own
        # threads, sized so that requests queued on busy sessions can never take them all:
        # reads, /health and every other session keep the default pool to themselves.
        app.state.model_pool = ThreadPoolExecutor(
            settings.max_sessions * (settings.session_queue + 1) + 4,
            thread_name_prefix="model-work")
        cleaner = asyncio.create_task(_cleanup_loop(mgr, settings.cleanup_interval_s))
        try:
            yield
        finally:
            cleaner.cancel()
            await run_in_threadpool(mgr.shutdown)
            app.state.model_pool.shutdown(wait=False, cancel_futures=True)

    # /docs with Swagger UI served from the package, not a CDN: it works offline.
    app = FastAPIOffline(
        title="SAM 2 interactive video segmentation",
        version="1.0.0",
        description="Upload a video, click points on any frame, propagate, refine, export. With "
                    "access keys configured, send `Authorization: Bearer <key>` (or "
                    "`X-API-Key`) on every request but `GET /health`.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.keyring = keyring
    app.state.scrub = _path_scrubber(settings)
    metrics = Metrics(lambda: getattr(app.state, "manager", None))
    app.state.metrics = metrics
    cors: dict[str, Any] = {"allow_origins": settings.allowed_origins}
    if not keyring.enabled and not settings.allowed_origins:
        cors = {"allow_origin_regex": LOCAL_ORIGINS}
    app.add_middleware(CORSMiddleware, **cors, allow_methods=["GET", "POST", "DELETE"],
                       allow_headers=["Authorization", "X-API-Key", "Content-Type",
                                      "X-Request-ID"],
                       expose_headers=["X-Request-ID", "Retry-After", "Content-Disposition"])
    upload_limit = settings.max_upload_bytes + 1024 * 1024  # the file plus multipart framing
    # Every body but a video upload: JSON prompts (a base64 mask included) and mask images.
    app.add_middleware(BodyLimit, limit_for=lambda scope: upload_limit if scope["path"] ==
                       "/upload-video" else settings.max_json_bytes)
    app.add_middleware(RequestContext, metrics=metrics)
    _install_error_handlers(app)
    app.include_router(_public_routes())
    app.include_router(_routes(settings))
    # The web page: plain files, no build step; it uses only the public API (and asks for a
    # key when the server has keys).
    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
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


# ----------------------------------------------------------------------------- errors
def _path_scrubber(settings: Settings):
    """Error texts go to clients without the server's own paths (its folders, home, Python)."""
    roots = {str(p.resolve()) for p in (settings.output_dir, settings.upload_dir,
                                        settings.checkpoint_dir, settings.checkpoint_path.parent,
                                        Path.cwd(), Path.home(), Path(sys.prefix),
                                        Path(tempfile.gettempdir()))}
    roots |= {str(p) for p in (settings.output_dir, settings.upload_dir)}
    ordered = sorted((r for r in roots if len(r) > 1), key=len, reverse=True)
    anywhere = re.compile(r"(?<![\w.])/(?:[\w.@+-]+/)+[\w.@+-]*")

    def scrub(text: str) -> str:
        for root in ordered:
            text = text.replace(root, "…")
        return anywhere.sub("…", text)

    return scrub


def _error(request: Request, status: int, code: str, detail: str,
           headers: dict | None = None, **extra) -> JSONResponse:
    scrub = getattr(request.app.state, "scrub", lambda t: t)
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": code, "detail": scrub(detail), **extra})


def _retry_header(seconds: float | None) -> dict | None:
    return None if seconds is None else {"Retry-After": str(max(1, round(seconds)))}


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ManagerError)
    async def _manager_error(request: Request, exc: ManagerError):
        return _error(request, STATUS_OF.get(type(exc), 400), exc.code, str(exc),
                      _retry_header(exc.retry_after))

    @app.exception_handler(UploadError)
    async def _upload_error(request: Request, exc: UploadError):
        return _error(request, exc.status, exc.code, exc.message)

    @app.exception_handler(Unauthorized)
    async def _unauthorized(request: Request, exc: Unauthorized):
        return _error(request, 401, "unauthorized", str(exc),
                      {"WWW-Authenticate": 'Bearer realm="sam2"'})

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        # Without the offending input: it can be a whole base64 mask.
        errors = json.loads(json.dumps([{k: v for k, v in err.items() if k not in ("input", "ctx")}
                                        for err in exc.errors()], default=str))
        return _error(request, 422, "validation_error", "; ".join(problems) or "invalid request",
                      errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 413:
            return _error(request, 413, "request_too_large", f"{exc.detail} (SAM2_MAX_JSON_MB "
                          f"for prompts and masks, SAM2_MAX_UPLOAD_MB for videos)")
        code = {400: "malformed_request", 404: "not_found",
                405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(request, exc.status_code, code, str(exc.detail))

    @app.exception_handler(OSError)
    async def _storage_error(request: Request, exc: OSError):
        if is_disk_full(exc):
            return _error(request, 507, "insufficient_storage", "the server's disk is full; "
                          "delete sessions you no longer need (DELETE /session/{id})")
        logger.exception("storage error on %s %s", request.method, request.url.path)
        return _error(request, 503, "storage_error", "the server could not read or write a file; "
                      "try again, and tell its operator if it persists", {"Retry-After": "5"},
                      request_id=request.state.request_id)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(request, 500, "internal_error", "unexpected server error; the server log "
                      "has the details under this request id",
                      request_id=getattr(request.state, "request_id", None))


# ----------------------------------------------------------------------------- dependencies
_bearer = HTTPBearer(auto_error=False, description="An access key (when the server has keys)")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False,
                        description="An access key, as an alternative to the bearer token")


def get_caller(request: Request,
               bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
               api_key: Annotated[str | None, Depends(_api_key)]) -> Caller:
    """Who is asking: 401 without a valid key when the server has keys."""
    caller = request.app.state.keyring.authenticate(bearer.credentials if bearer else api_key)
    request.state.key_id = caller.owner
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]


def get_manager(request: Request) -> SAM2Manager:
    return request.app.state.manager


ManagerDep = Annotated[SAM2Manager, Depends(get_manager)]


async def get_session(session_id: uuid.UUID, manager: ManagerDep, caller: CallerDep) -> Session:
    """The caller's session; 404 for another key's session, exactly as for a missing one."""
    sid = str(session_id)
    session = manager.get_open(sid, caller)
    if session is None:  # closed: reopening it reads its folder, off the event loop
        session = await run_in_threadpool(manager.get, sid, caller)
    return session


SessionDep = Annotated[Session, Depends(get_session)]


async def in_model_pool(request: Request, fn, *args, **kwargs):
    """Run blocking model work on the model-work threads (never on the event loop)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(request.app.state.model_pool,
                                      functools.partial(fn, *args, **kwargs))


def _urls(session_id: str, frame_idx: int) -> dict:
    return {"mask_url": f"/mask/{session_id}/{frame_idx}",
            "overlay_url": f"/overlay/{session_id}/{frame_idx}",
            "frame_url": f"/frame/{session_id}/{frame_idx}"}


def _decode_mask(raw: bytes, session: Session):
    try:
        return mask_ops.decode_mask_image(raw, session.info.width, session.info.height)
    except ValueError as exc:
        raise InvalidPrompt(str(exc)) from exc


def _decode_mask_b64(b64: str, session: Session):
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidPrompt("mask_png_base64 is not valid base64") from exc
    return _decode_mask(raw, session)


def _job_response(job: Job) -> dict:
    return job.snapshot() | {"events_url": f"/jobs/{job.id}/events",
                             "cancel_url": f"/jobs/{job.id}/cancel"}


# ----------------------------------------------------------------------------- routes
def _public_routes() -> APIRouter:
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def index():
        """The web page."""
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @router.get("/health", responses={503: {"model": dict}}, tags=["server"])
    async def health(request: Request, manager: ManagerDep):
        """Model, device and load state; 503 until the model can serve requests. Needs no key."""
        info = manager.health() | {"auth": request.app.state.keyring.enabled}
        info["detail"] = info["detail"] and _path_scrubber(manager.settings)(info["detail"])
        info["checkpoint"] = Path(info["checkpoint"]).name
        headers = None if manager.ready else _retry_header(manager._retry_in() or 5)
        return JSONResponse(status_code=200 if manager.ready else 503, content=info,
                            headers=headers)

    return router


def _routes(settings: Settings) -> APIRouter:
    api = APIRouter(dependencies=[Depends(get_caller)], responses=ERRORS)

    @api.get("/export-formats", tags=["export"])
    async def export_formats() -> list[dict]:
        """Every export format: name, file extension, media type, description."""
        return [{"name": f.name, "extension": f.extension, "media_type": f.media_type,
                 "description": f.description} for f in exports.FORMATS.values()]

    @api.get("/metrics", tags=["server"], response_class=Response)
    async def metrics(request: Request):
        """Prometheus metrics: requests and latencies by route, sessions, jobs, queues, model."""
        body, content_type = await run_in_threadpool(request.app.state.metrics.render)
        return Response(body, media_type=content_type)

    @api.post("/upload-video", response_model=UploadResponse, status_code=200,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "multipart/form-data": {"schema": {
                      "type": "object", "required": ["file"],
                      "properties": {
                          "file": {"type": "string", "format": "binary",
                                   "description": "The video (mp4, mov, webm, mkv, avi...), "
                                                  "or a ZIP of JPEG/PNG frames sorted by name"},
                          "fps": {"type": "string", "examples": ["25", "30000/1001"],
                                  "description": "Frame rate of a ZIP of frames (default "
                                                 "30); not for videos"}}}}}}},
              tags=["session"])
    async def upload_video(request: Request, manager: ManagerDep, caller: CallerDep):
        """Upload a video, or a ZIP of frames with `fps` (multipart field `file`); answers once
        frame 0 can be served."""
        declared = request.headers.get("content-length", "")
        incoming = int(declared) if declared.isdigit() else 0
        await run_in_threadpool(manager.check_accepting, caller.owner, incoming)
        session_id = manager.new_session_id()
        await run_in_threadpool(manager.reserve, session_id)
        try:
            path, filename, fields = await receive_file(
                request, "file",
                lambda name: manager.partial_path(manager.upload_path_for(session_id, name)),
                settings.max_upload_bytes, disk_room=manager.disk.room())
            final = path.with_name(path.name.removesuffix(PARTIAL_SUFFIX))
            os.replace(path, final)
            session = await run_in_threadpool(manager.create_session, session_id, final,
                                              filename, caller.owner, fields.get("fps"))
        except BaseException:
            manager.release(session_id)
            shutil.rmtree(settings.upload_dir / session_id, ignore_errors=True)
            raise
        info = session.info.as_dict()
        return {"session_id": session.id, "filename": session.filename,
                **{k: info[k] for k in ("num_frames", "width", "height", "fps", "fps_rational",
                                        "codec", "rotation", "duration_s")},
                "frame_url": f"/frame/{session.id}/0"}

    @api.get("/frame/{session_id}/{frame_idx}", response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}}, tags=["frames"])
    async def get_frame(session: SessionDep, frame_idx: int, manager: ManagerDep):
        """JPEG of the frame at the video's resolution (waits while it is being decoded)."""
        path = await manager.frame_file(session, frame_idx)
        return Response(await manager.read_file(session, path, frame_idx, "file"),
                        media_type="image/jpeg")

    @api.get("/overlay/{session_id}/{frame_idx}", response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}}, tags=["frames"])
    async def get_overlay(session: SessionDep, frame_idx: int, manager: ManagerDep):
        """JPEG of the frame with every object's mask in its colour (the plain frame if none)."""
        path = await manager.overlay_file(session, frame_idx)
        return Response(await manager.read_file(session, path, frame_idx, "overlay"),
                        media_type="image/jpeg", headers={"Cache-Control": "no-cache"})

    @api.get("/mask/{session_id}/{frame_idx}", response_class=Response,
             responses={200: {"content": {"image/png": {}}}}, tags=["frames"])
    async def get_mask(session: SessionDep, frame_idx: int, manager: ManagerDep):
        """8-bit PNG at video resolution: pixel = obj_id, 0 = background."""
        path = await manager.mask_file(session, frame_idx)
        return Response(await manager.read_file(session, path, frame_idx, "mask"),
                        media_type="image/png", headers={"Cache-Control": "no-cache"})

    def _prompt(session: Session, body: PromptRequest, manager: SAM2Manager, append: bool):
        mask = _decode_mask_b64(body.mask_png_base64, session) if body.mask_png_base64 else None
        result = manager.add_prompt(
            session.id, body.frame_idx, body.obj_id,
            points=[[p.x, p.y] for p in body.points], labels=[p.label for p in body.points],
            box=body.box, mask=mask, append=append)
        return result | {"obj_id": body.obj_id} | _urls(session.id, body.frame_idx)

    @api.post("/annotate-frame/{session_id}", response_model=PromptResponse,
              tags=["prompts"])
    async def annotate_frame(request: Request, session: SessionDep, body: PromptRequest,
                             manager: ManagerDep):
        """Set an object's prompts on a frame (replacing its earlier ones there); returns the mask."""
        return await in_model_pool(request, _prompt, session, body, manager, append=False)

    @api.post("/refine-mask/{session_id}", response_model=PromptResponse,
              tags=["prompts"])
    async def refine_mask(request: Request, session: SessionDep, body: PromptRequest,
                          manager: ManagerDep):
        """Add points to an object's prompts on a frame, keeping the earlier ones."""
        return await in_model_pool(request, _prompt, session, body, manager, append=True)

    @api.post("/mask-prompt/{session_id}", response_model=PromptResponse,
              tags=["prompts"])
    async def mask_prompt(request: Request, session: SessionDep, manager: ManagerDep,
                          file: Annotated[UploadFile, File(description="PNG (or any image) mask "
                                                           "at video resolution; non-zero = "
                                                           "object")],
                          frame_idx: Annotated[int, Form(ge=0)],
                          obj_id: Annotated[int, Form(ge=1, le=255)] = 1):
        """Prompt an object on a frame with a mask image (SAM 2's add_new_mask), as multipart."""
        data = await file.read()

        def work():
            mask = _decode_mask(data, session)
            result = manager.add_prompt(session.id, frame_idx, obj_id, mask=mask)
            return result | {"obj_id": obj_id} | _urls(session.id, frame_idx)

        return await in_model_pool(request, work)

    @api.post("/clear-prompts/{session_id}", tags=["prompts"])
    async def clear_prompts(request: Request, session: SessionDep, body: ClearPromptsRequest,
                            manager: ManagerDep):
        """Remove one object's prompts on one frame (the object goes if it has no other)."""
        result = await in_model_pool(request, manager.clear_prompts, session.id, body.obj_id,
                                     body.frame_idx)
        return result | _urls(session.id, body.frame_idx)

    @api.delete("/object/{session_id}/{obj_id}", tags=["prompts"])
    async def remove_object(request: Request, session: SessionDep, obj_id: int,
                            manager: ManagerDep):
        """Remove an object: its prompts go and its pixels leave every mask."""
        return await in_model_pool(request, manager.remove_object, session.id, obj_id)

    @api.post("/reset/{session_id}", tags=["prompts"])
    async def reset_session(request: Request, session: SessionDep, manager: ManagerDep):
        """Drop every prompt, object and mask; keep the video."""
        return await in_model_pool(request, manager.reset, session.id)

    @api.post("/propagate/{session_id}", response_model=PropagateResponse | JobResponse,
              responses={202: {"model": JobResponse}},
              tags=["tracking"])
    async def propagate(request: Request, session: SessionDep, body: PropagateRequest,
                        manager: ManagerDep):
        """Track every object over a range of frames, writing masks and overlays.

        Blocking by default; with `"background": true` it answers 202 with a job to follow.
        """
        if body.session_id is not None and body.session_id != session.id:
            raise InvalidRequest(f"body session_id {body.session_id} does not match the path "
                                 f"{session.id}")
        kwargs = {"start_frame": body.start_frame, "end_frame": body.end_frame,
                  "direction": body.direction, "max_frames": body.max_frames}
        if body.background:
            job = await run_in_threadpool(manager.start_propagation_job, session.id, **kwargs)
            return JSONResponse(status_code=202, content=_job_response(job))
        return await in_model_pool(request, manager.propagate, session.id, **kwargs)

    @api.get("/export/{session_id}", response_class=FileResponse,
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

    @api.post("/export/{session_id}", status_code=202, response_model=JobResponse,
              tags=["export"])
    async def export_job(session: SessionDep, body: ExportRequest, manager: ManagerDep):
        """Start an export as a job; its result has the `download_url`."""
        job = await run_in_threadpool(manager.start_export_job, session.id, body.format,
                                      body.start_frame, body.end_frame, body.polygons)
        return JSONResponse(status_code=202, content=_job_response(job))

    @api.get("/exports/{session_id}/{name}", response_class=FileResponse,
             tags=["export"])
    def download_export(session: SessionDep, name: str, manager: ManagerDep):
        """Download a file an export job wrote."""
        path = manager.export_file(session.id, name)
        media = next((f.media_type for f in exports.FORMATS.values()
                      if path.suffix == f".{f.extension}"), "application/octet-stream")
        return FileResponse(path, media_type=media, filename=f"{session.id}_{path.name}")

    @api.get("/session/{session_id}", tags=["session"])
    def get_session_info(session: SessionDep, manager: ManagerDep):
        """Metadata, objects, prompts in order, frames with masks, scores, propagations."""
        return manager.describe(session.id)

    @api.get("/sessions", tags=["session"])
    def list_sessions(manager: ManagerDep, caller: CallerDep):
        """The caller's sessions, open or on disk (reopened on their next use), newest first."""
        return manager.list_sessions(caller)

    @api.delete("/session/{session_id}", tags=["session"])
    async def delete_session(request: Request, session: SessionDep, manager: ManagerDep):
        """Close the session and delete its upload and outputs."""
        await in_model_pool(request, manager.close_session, session.id, delete_files=True)
        return {"session_id": session.id, "deleted": True}

    # -- jobs ------------------------------------------------------------------------------
    @api.get("/jobs/{job_id}", response_model=JobResponse, tags=["jobs"])
    def get_job(job_id: str, manager: ManagerDep, caller: CallerDep):
        """Progress of a background job (frames done, total, fps, ETA) and its result; a job
        cut short by a server stop reads `interrupted`."""
        return _job_response(manager.find_job(job_id, caller))

    @api.post("/jobs/{job_id}/cancel", response_model=JobResponse,
              tags=["jobs"])
    def cancel_job(job_id: str, manager: ManagerDep, caller: CallerDep):
        """Ask a job to stop; masks written so far stay, and the manifest lists exactly them."""
        job = manager.find_job(job_id, caller)
        job.cancel_event.set()
        return _job_response(job)

    @api.get("/jobs/{job_id}/events", tags=["jobs"],
             response_class=StreamingResponse)
    async def job_events(job_id: str, manager: ManagerDep, caller: CallerDep):
        """Server-sent events: one `progress` event per change, then `end` with the final state."""
        job = await run_in_threadpool(manager.find_job, job_id, caller)

        async def stream():
            version = -1
            while True:
                version = await job.wait_change_async(version, 15.0)
                snap = _job_response(job)  # one consistent reading: the end is sent as "end"
                finished = snap["status"] in FINISHED
                yield f"event: {'end' if finished else 'progress'}\ndata: {json.dumps(snap)}\n\n"
                if finished:
                    return

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return api


# ----------------------------------------------------------------------------- server
class _Server(uvicorn.Server):
    """uvicorn, telling the manager at the first SIGTERM/SIGINT so running work stops at once."""

    def __init__(self, config: uvicorn.Config, on_exit):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)


def main() -> None:
    """``python main.py``; with the uvicorn CLI: ``uvicorn --factory main:create_app``."""
    settings = get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    host = settings.listen_host
    if not settings.auth_enabled and host not in LOOPBACK:
        logger.warning("listening on %s without access keys: anyone who can reach this address "
                       "can read, change and delete every session. Set SAM2_API_KEYS (see the "
                       "README, 'Running it for a team')", host)
    config = uvicorn.Config(app, host=host, port=settings.port, access_log=False,
                            timeout_graceful_shutdown=int(settings.shutdown_timeout_s))

    def stop_work() -> None:
        manager = getattr(app.state, "manager", None)
        if manager is not None:
            manager.begin_shutdown()

    _Server(config, stop_work).run()


if __name__ == "__main__":
    main()
