"""The errors a client can cause, named by a code; the HTTP layer maps each to a status."""

from __future__ import annotations


class ManagerError(Exception):
    """Base of the errors a client can cause; ``code`` names it in the JSON error."""

    code = "error"
    expected = True  # not logged as a crash when it ends a job

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after  # seconds, for a Retry-After header


class SessionNotFound(ManagerError):
    code = "session_not_found"


class SessionBusy(ManagerError):
    code = "session_busy"


class TooManySessions(ManagerError):
    code = "too_many_sessions"


class InvalidPrompt(ManagerError):
    code = "invalid_prompt"


class InvalidRequest(ManagerError):
    code = "invalid_request"


class FrameOutOfRange(ManagerError):
    code = "frame_out_of_range"


class ObjectNotFound(ManagerError):
    code = "object_not_found"


class NoPrompts(ManagerError):
    code = "no_prompts"


class MaskNotFound(ManagerError):
    code = "mask_not_found"


class NoMasks(ManagerError):
    code = "no_masks"


class ModelNotReady(ManagerError):
    code = "model_not_ready"


class FrameNotReady(ManagerError):
    code = "frame_not_ready"


class JobNotFound(ManagerError):
    code = "job_not_found"


class ExportNotFound(ManagerError):
    code = "export_not_found"


class VideoInvalid(ManagerError):
    code = "video_unreadable"


class NotAVideo(ManagerError):
    code = "not_a_video"


class VideoSizeRefused(ManagerError):
    code = "video_size_refused"


class DiskFull(ManagerError):
    code = "insufficient_storage"


class ModelOutOfMemory(ManagerError):
    code = "out_of_memory"


class FileMissing(ManagerError):
    code = "file_missing"


class WorkerUnavailable(ManagerError):
    code = "worker_unavailable"
