"""An engine as a Ray actor: the model work of the sessions the Ray ingress assigns to it.

``serve_ray.py`` starts ``SAM2_RAY_WORKERS`` of these, named ``sam2-worker-{i}`` in the Ray
namespace ``sam2``; ``ray_backend.py`` sends each session's calls to the one that holds it. The
actor is threaded, so reads (a frame being decoded, a mask being written, a job's progress) are
answered while model work runs; the engine's own locks and limits apply as in one process.
Errors a client caused come back as values, so the ingress raises them without a remote
traceback.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import time
from pathlib import Path

from config import Settings
from errors import JobNotFound, ManagerError
from jobs import JobCancelled
from sam2_manager import SAM2Manager

NAMESPACE = "sam2"
# The engine's methods an ingress may call by name (see Backend).
MODEL_CALLS = frozenset({"reserve", "release", "add_prompt", "clear_prompts", "remove_object",
                         "reset", "propagate", "export", "close_session", "cleanup_expired"})


def worker_name(index: int) -> str:
    return f"sam2-worker-{index}"


def _pin_cpus(count: float) -> list[int] | None:
    """Confine this process to ``count`` cores of its node: the lowest slot no live worker on
    the node holds (a lock held for the process's life), slot k being cores k*count.. of the
    ones it may use. Threads started later inherit it (torch's included)."""
    allowed = sorted(os.sched_getaffinity(0))
    per = max(1, int(count))
    slots = max(1, len(allowed) // per)
    lock_dir = Path(tempfile.gettempdir()) / "sam2-cpu-slots"
    lock_dir.mkdir(exist_ok=True)
    for slot in range(slots):
        handle = open(lock_dir / f"{slot}.lock", "w")  # noqa: SIM115 - held until exit
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _SLOT_LOCKS.append(handle)
        cores = allowed[slot * per:(slot + 1) * per]
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), cores)
        logging.getLogger(__name__).info("pinned to cores %s", cores)
        return cores
    return None  # more workers than slots on this node: left unpinned


_SLOT_LOCKS: list = []


def _answer(fn, *args, **kwargs) -> tuple[str, object]:
    try:
        return "ok", fn(*args, **kwargs)
    except (ManagerError, JobCancelled) as exc:  # JobCancelled: a blocking call cut short
        return "error", exc


class EngineWorker:
    """One engine (one predictor) and the live sessions of the ids routed to it."""

    def __init__(self, settings: Settings, index: int, ready_timeout_s: float = 900.0):
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.index = index
        self.name = worker_name(index)
        self.started_at = time.time()
        self.cores = _pin_cpus(settings.ray_cpus_per_worker) if settings.ray_pin_cpus else None
        self.engine = SAM2Manager(settings)
        self.engine.start_model_loader()
        # Calls sent meanwhile wait in Ray's queue until the constructor returns: a worker
        # restarted after a crash answers its next request with a mask, not a 503.
        self.engine.wait_ready(ready_timeout_s)

    def call(self, method: str, *args, **kwargs) -> tuple[str, object]:
        if method not in MODEL_CALLS:
            raise ValueError(f"not an engine call: {method}")
        return _answer(getattr(self.engine, method), *args, **kwargs)

    def create_session(self, session_id: str, video_path: str, filename: str,
                       owner: str | None, fps: str | None) -> tuple[str, object]:
        def create() -> None:
            self.engine.create_session(session_id, Path(video_path), filename, owner, fps)

        return _answer(create)

    # -- jobs ------------------------------------------------------------------------------
    def start_job(self, kind: str, session_id: str, *args, **kwargs) -> tuple[str, object]:
        def start() -> tuple[int, dict]:
            if kind == "propagate":
                job = self.engine.start_propagation_job(session_id, **kwargs)
            else:
                job = self.engine.start_export_job(session_id, *args)
            # On disk before its id is handed out, so every ingress replica finds it.
            self.engine.store.save_job(job)
            return job.version, job.snapshot()

        return _answer(start)

    def job(self, job_id: str, session_id: str) -> tuple[str, object]:
        """A job's (version, snapshot): live, or its record if it ran in a process now gone
        (read once the session is reopened here, which marks it ``interrupted``)."""
        job = self.engine.jobs.get(job_id)
        if job is not None:
            return "ok", (job.version, job.snapshot())

        def recorded() -> tuple[int, dict]:
            self.engine.get(session_id)  # reconciles what a dead worker left behind
            found = self.engine.store.job_record(job_id)
            if found is None:
                raise JobNotFound(f"no job {job_id}")
            return found.version, found.snapshot()

        return _answer(recorded)

    def wait_job(self, job_id: str, session_id: str, seen_version: int,
                 timeout: float) -> tuple[str, object]:
        """Return once the job changes after ``seen_version`` (or ``timeout`` passes)."""
        job = self.engine.jobs.get(job_id)
        if job is None:
            return self.job(job_id, session_id)
        job.wait_change(seen_version, timeout)
        return "ok", (job.version, job.snapshot())

    def cancel_job(self, job_id: str) -> tuple[str, object]:
        job = self.engine.jobs.get(job_id)
        if job is not None:
            job.cancel_event.set()
        return "ok", job is not None

    # -- what readers need from here -------------------------------------------------------
    def wait_frame(self, session_id: str, frame_idx: int) -> tuple[str, object]:
        """Return once the frame's JPEG is on disk (decoding it if the session was closed)."""
        def wait() -> None:
            self.engine.store.frame_path(self.engine.get(session_id), frame_idx)

        return _answer(wait)

    def flush_frame(self, session_id: str, frame_idx: int) -> tuple[str, object]:
        """Return once a mask write of the frame still in flight here has landed."""
        session = self.engine.sessions.get(session_id)
        if session is not None:
            # A failed write: the reader gets the file as it is (the writer logged it).
            with contextlib.suppress(Exception):
                session.wait_for_write(frame_idx)
        return "ok", None

    def describe(self, session_id: str) -> tuple[str, object]:
        return _answer(self.engine.store.describe, session_id)

    # -- the worker itself -----------------------------------------------------------------
    def health(self) -> dict:
        import ray

        sessions = list(self.engine.sessions.values())
        return self.engine.health() | {
            "worker": self.name, "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "busy": sum(1 for s in sessions if s.work_lock.locked()),
            "jobs_running": len(self.engine.jobs.running()),
            "up_s": round(time.time() - self.started_at, 1),
            "cores": self.cores,
        }

    def held(self) -> list[str]:
        return list(self.engine.sessions)

    def shutdown(self) -> None:
        """Stop running work (as a SIGTERM does), write every manifest, close every session."""
        self.engine.shutdown()
