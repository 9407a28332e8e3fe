"""Background jobs (propagation, export) with progress that can be polled, streamed and cancelled."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

logger = logging.getLogger(__name__)

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobCancelled(Exception):
    """Raised inside a job's work when its cancel flag is seen; may carry the partial result."""

    def __init__(self, result: Any = None):
        super().__init__("cancelled")
        self.result = result


@dataclass
class Progress:
    """Handed to long work: report frames done, and check for cancellation."""

    job: Job | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)

    def update(self, frame_idx: int | None, done: int, total: int) -> None:
        if self.job is not None:
            self.job.report(frame_idx, done, total)
        if self.cancel_event.is_set():
            raise JobCancelled()


@dataclass
class Job:
    kind: str
    session_id: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: JobStatus = "queued"
    frame_idx: int | None = None
    done: int = 0
    total: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    result: Any = None
    error: str | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    version: int = 0
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def report(self, frame_idx: int | None, done: int, total: int) -> None:
        with self._cond:
            self.frame_idx, self.done, self.total = frame_idx, done, total
            self.version += 1
            self._cond.notify_all()

    def _finish(self, status: JobStatus, result: Any = None, error: str | None = None) -> None:
        with self._cond:
            self.status, self.result, self.error = status, result, error
            self.finished_at = time.time()
            self.version += 1
            self._cond.notify_all()

    @property
    def finished(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")

    def wait_change(self, seen_version: int, timeout: float) -> int:
        """Block until the job changes after ``seen_version`` (or timeout); return the new version."""
        with self._cond:
            self._cond.wait_for(lambda: self.version != seen_version or self.finished, timeout)
            return self.version

    def snapshot(self) -> dict:
        with self._cond:  # status, counts and result from the same moment
            return self._snapshot()

    def _snapshot(self) -> dict:
        elapsed = None
        if self.started_at is not None:
            elapsed = (self.finished_at or time.time()) - self.started_at
        fps = self.done / elapsed if elapsed and self.done else None
        eta = (self.total - self.done) / fps if fps and not self.finished else None
        return {
            "job_id": self.id,
            "kind": self.kind,
            "session_id": self.session_id,
            "status": self.status,
            "frame_idx": self.frame_idx,
            "done": self.done,
            "total": self.total,
            "fps": round(fps, 3) if fps else None,
            "eta_s": round(eta, 3) if eta is not None else None,
            "elapsed_s": round(elapsed, 3) if elapsed is not None else None,
            "result": self.result,
            "error": self.error,
        }


class JobRunner:
    """Runs each job in its own thread and remembers recent ones."""

    def __init__(self, keep: int = 200):
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._keep = keep

    def start(self, job: Job, work: Callable[[Progress], Any]) -> Job:
        with self._lock:
            self._jobs[job.id] = job
            finished = [j for j in self._jobs.values() if j.finished]
            for old in finished[: max(0, len(self._jobs) - self._keep)]:
                self._jobs.pop(old.id, None)
        thread = threading.Thread(target=self._run, args=(job, work), name=f"job-{job.kind}",
                                  daemon=True)
        thread.start()
        return job

    def _run(self, job: Job, work: Callable[[Progress], Any]) -> None:
        with job._cond:
            job.started_at = time.time()
            job.status = "running"
            job.version += 1
            job._cond.notify_all()
        try:
            result = work(Progress(job=job, cancel_event=job.cancel_event))
        except JobCancelled as exc:
            job._finish("cancelled", result=exc.result)
        except Exception as exc:  # a job's failure is reported through the job, not raised
            if not getattr(exc, "expected", False):
                logger.exception("job %s (%s) failed", job.id, job.kind)
            job._finish("failed", error=str(exc))
        else:
            job._finish("succeeded", result=result)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def for_session(self, session_id: str) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if j.session_id == session_id]
