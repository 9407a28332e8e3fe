"""Request dependencies: who is calling, the back end, the caller's session, the model pool."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import uuid
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

import masks as mask_ops
from auth import Caller
from backend import Backend
from errors import InvalidPrompt
from jobs import Job
from store import Session

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


def get_manager(request: Request) -> Backend:
    return request.app.state.manager


ManagerDep = Annotated[Backend, Depends(get_manager)]


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


def urls(session_id: str, frame_idx: int) -> dict:
    return {"mask_url": f"/mask/{session_id}/{frame_idx}",
            "overlay_url": f"/overlay/{session_id}/{frame_idx}",
            "frame_url": f"/frame/{session_id}/{frame_idx}"}


def decode_mask(raw: bytes, session: Session):
    try:
        return mask_ops.decode_mask_image(raw, session.info.width, session.info.height)
    except ValueError as exc:
        raise InvalidPrompt(str(exc)) from exc


def decode_mask_b64(b64: str, session: Session):
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidPrompt("mask_png_base64 is not valid base64") from exc
    return decode_mask(raw, session)


def job_response(job: Job) -> dict:
    return job.snapshot() | {"events_url": f"/jobs/{job.id}/events",
                             "cancel_url": f"/jobs/{job.id}/cancel"}
