"""Domain errors as HTTP answers: one JSON shape, statuses, Retry-After, no server paths."""

from __future__ import annotations

import json
import logging
import re
import sys
import tempfile
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from auth import Unauthorized
from config import Settings
from disk import is_disk_full
from errors import (
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
    SessionBusy,
    SessionNotFound,
    TooManySessions,
    VideoInvalid,
    VideoSizeRefused,
    WorkerUnavailable,
)
from jobs import JobCancelled
from uploads_stream import UploadError

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
    WorkerUnavailable: 503,
    DiskFull: 507,
}


def path_scrubber(settings: Settings):
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


def retry_header(seconds: float | None) -> dict | None:
    return None if seconds is None else {"Retry-After": str(max(1, round(seconds)))}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ManagerError)
    async def _manager_error(request: Request, exc: ManagerError):
        return _error(request, STATUS_OF.get(type(exc), 400), exc.code, str(exc),
                      retry_header(exc.retry_after))

    @app.exception_handler(JobCancelled)
    async def _work_stopped(request: Request, exc: JobCancelled):
        # A blocking propagation or export cut short by a server stop: what was written stays.
        return _error(request, 503, exc.status, "the server is stopping; the frames done so far "
                      "are kept (see GET /session): send the request again once it is back",
                      {"Retry-After": "10"}, result=exc.result)

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
