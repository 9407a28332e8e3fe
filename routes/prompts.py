"""Prompts on a frame (points, boxes, masks), and removing objects and prompts."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile

from backend import Backend
from deps import (
    ManagerDep,
    SessionDep,
    decode_mask,
    decode_mask_b64,
    get_caller,
    in_model_pool,
    urls,
)
from schemas import (
    ERRORS,
    ClearPromptsRequest,
    PromptRequest,
    PromptResponse,
)
from store import Session

router = APIRouter(dependencies=[Depends(get_caller)], responses=ERRORS)


def _prompt(session: Session, body: PromptRequest, manager: Backend, append: bool):
    mask = decode_mask_b64(body.mask_png_base64, session) if body.mask_png_base64 else None
    result = manager.add_prompt(
        session.id, body.frame_idx, body.obj_id,
        points=[[p.x, p.y] for p in body.points], labels=[p.label for p in body.points],
        box=body.box, mask=mask, append=append)
    return result | {"obj_id": body.obj_id} | urls(session.id, body.frame_idx)


@router.post("/annotate-frame/{session_id}", response_model=PromptResponse,
          tags=["prompts"])
async def annotate_frame(request: Request, session: SessionDep, body: PromptRequest,
                         manager: ManagerDep):
    """Set an object's prompts on a frame (replacing its earlier ones there); returns the mask."""
    return await in_model_pool(request, _prompt, session, body, manager, append=False)


@router.post("/refine-mask/{session_id}", response_model=PromptResponse,
          tags=["prompts"])
async def refine_mask(request: Request, session: SessionDep, body: PromptRequest,
                      manager: ManagerDep):
    """Add points to an object's prompts on a frame, keeping the earlier ones."""
    return await in_model_pool(request, _prompt, session, body, manager, append=True)


@router.post("/mask-prompt/{session_id}", response_model=PromptResponse,
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
        mask = decode_mask(data, session)
        result = manager.add_prompt(session.id, frame_idx, obj_id, mask=mask)
        return result | {"obj_id": obj_id} | urls(session.id, frame_idx)

    return await in_model_pool(request, work)


@router.post("/clear-prompts/{session_id}", tags=["prompts"])
async def clear_prompts(request: Request, session: SessionDep, body: ClearPromptsRequest,
                        manager: ManagerDep):
    """Remove one object's prompts on one frame (the object goes if it has no other)."""
    result = await in_model_pool(request, manager.clear_prompts, session.id, body.obj_id,
                                 body.frame_idx)
    return result | urls(session.id, body.frame_idx)


@router.delete("/object/{session_id}/{obj_id}", tags=["prompts"])
async def remove_object(request: Request, session: SessionDep, obj_id: int,
                        manager: ManagerDep):
    """Remove an object: its prompts go and its pixels leave every mask."""
    return await in_model_pool(request, manager.remove_object, session.id, obj_id)


@router.post("/reset/{session_id}", tags=["prompts"])
async def reset_session(request: Request, session: SessionDep, manager: ManagerDep):
    """Drop every prompt, object and mask; keep the video."""
    return await in_model_pool(request, manager.reset, session.id)
