"""Request and response models of the HTTP API (what /docs shows)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

import exports


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
