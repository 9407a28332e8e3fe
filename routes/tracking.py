"""Propagation, and the jobs that run it and exports in the background."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from deps import (
    CallerDep,
    ManagerDep,
    SessionDep,
    get_caller,
    in_model_pool,
    job_response,
)
from errors import InvalidRequest
from jobs import FINISHED
from schemas import (
    ERRORS,
    JobResponse,
    PropagateRequest,
    PropagateResponse,
)

router = APIRouter(dependencies=[Depends(get_caller)], responses=ERRORS)


@router.post("/propagate/{session_id}", response_model=PropagateResponse | JobResponse,
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
        return JSONResponse(status_code=202, content=job_response(job))
    return await in_model_pool(request, manager.propagate, session.id, **kwargs)


@router.get("/jobs/{job_id}", response_model=JobResponse, tags=["jobs"])
def get_job(job_id: str, manager: ManagerDep, caller: CallerDep):
    """Progress of a background job (frames done, total, fps, ETA) and its result; a job
    cut short by a server stop reads `interrupted`."""
    return job_response(manager.find_job(job_id, caller))


@router.post("/jobs/{job_id}/cancel", response_model=JobResponse,
          tags=["jobs"])
def cancel_job(job_id: str, manager: ManagerDep, caller: CallerDep):
    """Ask a job to stop; masks written so far stay, and the manifest lists exactly them."""
    job = manager.find_job(job_id, caller)
    job.cancel_event.set()
    return job_response(job)


@router.get("/jobs/{job_id}/events", tags=["jobs"],
         response_class=StreamingResponse)
async def job_events(job_id: str, manager: ManagerDep, caller: CallerDep):
    """Server-sent events: one `progress` event per change, then `end` with the final state."""
    job = await run_in_threadpool(manager.find_job, job_id, caller)

    async def stream():
        version = -1
        while True:
            version = await job.wait_change_async(version, 15.0)
            snap = job_response(job)  # one consistent reading: the end is sent as "end"
            finished = snap["status"] in FINISHED
            yield f"event: {'end' if finished else 'progress'}\ndata: {json.dumps(snap)}\n\n"
            if finished:
                return

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
