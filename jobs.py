"""Background jobs (propagation, export) with progress that can be polled, streamed and cancelled."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from notify import Notifier

logger = logging.getLogger(__name__)

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]
FINISHED: tuple[str, ...] = ("succeeded", "failed", "cancelled", "interrupted")


class JobCancelled(Exception):
    """Raised inside a job's work when its cancel flag is seen; may carry the partial result."""

    status: JobStatus = "cancelled"

    def __init__(self, result: Any = None):
        super().__init__(self.status)
        self.result = result


class JobInterrupted(JobCancelled):
    """Raised inside long work when the server is stopping; the job ends as ``interrupted``."""

    status: JobStatus = "interrupted"


@dataclass
class Progress:
    """Handed to long work: report frames done, and check for cancellation and shutdown."""

    job: Job | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    stop_event: threading.Event | None = None  # the server is shutting down

    @property
    def job_id(self) -> str | None:
        return getattr(self.job, "id", None)  # any reporter will do (the CLI's progress bar)

    def update(self, frame_idx: int | None, done: int, total: int) -> None:
        if self.job is not None:
            self.job.report(frame_idx, done, total)
        self.check()

    def check(self) -> None:
        if self.stop_event is not None and self.stop_event.is_set():
            raise JobInterrupted()
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
    params: dict = field(default_factory=dict)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    version: int = 0
    _notify: Notifier = field(default_factory=Notifier)

    def report(self, frame_idx: int | None, done: int, total: int) -> None:
        with self._notify.cond:
            self.frame_idx, self.done, self.total = frame_idx, done, total
            self.version += 1
            self._notify.notify()

    def _set(self, **changes) -> None:
        with self._notify.cond:
            for name, value in changes.items():
                setattr(self, name, value)
            self.version += 1
            self._notify.notify()

    def _finish(self, status: JobStatus, result: Any = None, error: str | None = None) -> None:
        self._set(status=status, result=result, error=error, finished_at=time.time())

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def wait_change(self, seen_version: int, timeout: float) -> int:
        """Block until the job changes after ``seen_version`` (or timeout); return the new version."""
        self._notify.wait(lambda: self.version != seen_version or self.finished, timeout)
        return self.version

    async def wait_change_async(self, seen_version: int, timeout: float) -> int:
        """``wait_change`` for a request handler: waits without holding a thread."""
        await self._notify.wait_async(
            lambda: self.version != seen_version or self.finished, timeout)
        return self.version

    def snapshot(self) -> dict:
        with self._notify.cond:  # status, counts and result from the same moment
            return self._snapshot()

    def record(self) -> dict:
        """What is kept on disk with the session, so the job outlives the process."""
        with self._notify.cond:
            return self._snapshot() | {"params": self.params, "started_at": self.started_at,
                                       "finished_at": self.finished_at}

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


def job_from_record(record: dict) -> Job:
    """A job read back from disk, written by a process that is gone: unfinished means interrupted."""
    job = Job(kind=record["kind"], session_id=record["session_id"], id=record["job_id"],
              status=record["status"], frame_idx=record.get("frame_idx"),
              done=record.get("done", 0), total=record.get("total", 0),
              started_at=record.get("started_at"), finished_at=record.get("finished_at"),
              result=record.get("result"), error=record.get("error"),
              params=record.get("params") or {})
    if not job.finished:
        job.status = "interrupted"
        job.error = job.error or "the server stopped while this job ran; work done so far is kept"
    return job


class JobRunner:
    """Runs each job in its own thread and remembers recent ones.

    ``on_change`` is called (in the job's thread) when a job starts and when it ends, so the
    owner can keep a record of it that outlives the process.
    """

    def __init__(self, keep: int = 200, on_change: Callable[[Job], None] | None = None):
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._keep = keep
        self.on_change = on_change
        self.stop_event = threading.Event()  # set when the server stops: work ends `interrupted`

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
        job._set(started_at=time.time(), status="running")
        self._changed(job)
        try:
            result = work(Progress(job=job, cancel_event=job.cancel_event,
                                   stop_event=self.stop_event))
        except JobCancelled as exc:
            job._finish(exc.status, result=exc.result)
        except Exception as exc:  # a job's failure is reported through the job, not raised
            if getattr(exc, "expected", False):
                job._finish("failed", error=str(exc))
            else:
                logger.exception("job %s (%s) failed", job.id, job.kind)
                job._finish("failed", error="the job failed on an internal error; the server "
                                            "log has the details")
        else:
            job._finish("succeeded", result=result)
        self._changed(job)

    def _changed(self, job: Job) -> None:
        if self.on_change is not None:
            try:
                self.on_change(job)
            except Exception:  # the job itself is done; only its record on disk is stale
                logger.exception("job %s: its record could not be written", job.id)

    def running(self) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if not j.finished]

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def for_session(self, session_id: str) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if j.session_id == session_id]
