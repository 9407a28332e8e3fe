"""A session's frames, masks and overlays, read from its folder."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from deps import (
    ManagerDep,
    SessionDep,
    get_caller,
)
from schemas import (
    ERRORS,
)

router = APIRouter(dependencies=[Depends(get_caller)], responses=ERRORS)


@router.get("/frame/{session_id}/{frame_idx}", response_class=Response,
         responses={200: {"content": {"image/jpeg": {}}}}, tags=["frames"])
async def get_frame(session: SessionDep, frame_idx: int, manager: ManagerDep):
    """JPEG of the frame at the video's resolution (waits while it is being decoded)."""
    path = await manager.store.frame_file(session, frame_idx)
    return Response(await manager.store.read_file(session, path, frame_idx, "file"),
                    media_type="image/jpeg")


@router.get("/overlay/{session_id}/{frame_idx}", response_class=Response,
         responses={200: {"content": {"image/jpeg": {}}}}, tags=["frames"])
async def get_overlay(session: SessionDep, frame_idx: int, manager: ManagerDep):
    """JPEG of the frame with every object's mask in its colour (the plain frame if none)."""
    path = await manager.store.overlay_file(session, frame_idx)
    return Response(await manager.store.read_file(session, path, frame_idx, "overlay"),
                    media_type="image/jpeg", headers={"Cache-Control": "no-cache"})


@router.get("/mask/{session_id}/{frame_idx}", response_class=Response,
         responses={200: {"content": {"image/png": {}}}}, tags=["frames"])
async def get_mask(session: SessionDep, frame_idx: int, manager: ManagerDep):
    """8-bit PNG at video resolution: pixel = obj_id, 0 = background."""
    path = await manager.store.mask_file(session, frame_idx)
    return Response(await manager.store.read_file(session, path, frame_idx, "mask"),
                    media_type="image/png", headers={"Cache-Control": "no-cache"})
