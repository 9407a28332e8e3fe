"""Sessions: upload a video, read a session's record, list and delete sessions."""

from __future__ import annotations

import os
import shutil

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from deps import (
    CallerDep,
    ManagerDep,
    SessionDep,
    get_caller,
    in_model_pool,
)
from layout import PARTIAL_SUFFIX
from schemas import (
    ERRORS,
    UploadResponse,
)
from uploads_stream import receive_file

router = APIRouter(dependencies=[Depends(get_caller)], responses=ERRORS)


@router.post("/upload-video", response_model=UploadResponse, status_code=200,
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
    settings = request.app.state.settings
    declared = request.headers.get("content-length", "")
    incoming = int(declared) if declared.isdigit() else 0
    await run_in_threadpool(manager.check_accepting, caller.owner, incoming)
    session_id = manager.new_session_id()
    await run_in_threadpool(manager.reserve, session_id)
    try:
        path, filename, fields = await receive_file(
            request, "file",
            lambda name: manager.store.partial_path(manager.store.upload_path_for(session_id, name)),
            settings.max_upload_bytes, disk_room=manager.store.disk.room())
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


@router.get("/session/{session_id}", tags=["session"])
def get_session_info(session: SessionDep, manager: ManagerDep):
    """Metadata, objects, prompts in order, frames with masks, scores, propagations."""
    return manager.store.describe(session.id)


@router.get("/sessions", tags=["session"])
def list_sessions(manager: ManagerDep, caller: CallerDep):
    """The caller's sessions, open or on disk (reopened on their next use), newest first."""
    return manager.list_sessions(caller)


@router.delete("/session/{session_id}", tags=["session"])
async def delete_session(request: Request, session: SessionDep, manager: ManagerDep):
    """Close the session and delete its upload and outputs."""
    await in_model_pool(request, manager.close_session, session.id, delete_files=True)
    return {"session_id": session.id, "deleted": True}

# -- jobs ------------------------------------------------------------------------------
