"""The back end of a Ray Serve ingress: each session's model work goes to the worker holding it,
reads come from the shared folders.

Affinity is a file: ``outputs/{id}/worker.json`` names the worker (``ray_worker.py``) that
holds the session, written once when the session is made (on the least loaded worker with
room) and read by every ingress replica, so two workers never hold the same session. A worker
that dies comes back (Ray restarts it) with no live state; its sessions reopen there from their
folders on their next call, as after a restart of the single process.

Frames, masks, overlays and export downloads are read from disk here; a worker is asked only
for what it still has in flight (a frame not yet decoded, a mask write not yet landed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError, RayActorError

import manifest
from auth import LOCAL_USER, Caller
from config import Settings
from errors import (
    JobNotFound,
    ManagerError,
    SessionNotFound,
    TooManySessions,
    WorkerUnavailable,
)
from jobs import FINISHED
from layout import SessionFiles, is_session_id
from ray_worker import NAMESPACE, worker_name
from store import Session, SessionStore, video_info_of
from timing import STAGES
from video_io import atomic_write_bytes, write_jpeg

logger = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 5.0   # a reader waits this long for a worker's write in flight, then reads
HEALTH_TIMEOUT_S = 2.0
HEALTH_INTERVAL_S = 1.0
# Worker calls that only read or wait: safe to run again, so after a worker died they wait for
# its restart instead of failing (model calls are not retried: a click must not apply twice).
RETRIED = frozenset({"job", "wait_job", "describe", "wait_frame", "flush_frame", "cancel_job"})
VIEWS_KEPT = 4096  # sessions (and jobs) an ingress remembers; the rest are read from disk


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _record_once(path: Path, index: int) -> int:
    """Write ``{"worker": index}`` at ``path`` unless a record is there already; the index the
    record holds. The file appears whole (linked into place), so a reader never sees it empty."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps({"worker": index}))
    try:
        os.link(tmp, path)
    except FileExistsError:
        return json.loads(path.read_text())["worker"]
    finally:
        tmp.unlink(missing_ok=True)
    return index


class SharedStore(SessionStore):
    """The sessions' folders as an ingress reads them: no live state here, so what is still in
    flight is asked of the session's worker."""

    def __init__(self, settings: Settings, backend: RayBackend):
        super().__init__(settings)
        self._backend = backend
        self.reopen = backend.view

    def recover(self) -> dict:
        # The start-up sweep runs once, in serve_ray.py, before any worker holds a session;
        # from a replica it would close sessions live on the workers.
        return {}

    def frame_path(self, session: Session, frame_idx: int) -> Path:
        self.check_frame(session, frame_idx)
        path = session.frame_file(frame_idx)
        if not path.is_file():
            self._backend.call_worker(session.id, "wait_frame", session.id, frame_idx)
        return self._existing_frame(session, path, frame_idx)

    async def frame_file(self, session: Session, frame_idx: int) -> Path:
        self.check_frame(session, frame_idx)
        path = session.frame_file(frame_idx)
        if not path.is_file():
            await self._backend.call_worker_async(session.id, "wait_frame", session.id,
                                                  frame_idx)
        return self._existing_frame(session, path, frame_idx)

    async def _await_write(self, session: Session, frame_idx: int) -> None:
        await self._backend.flush(session.id, frame_idx)

    def _listed_mask(self, session: Session, frame_idx: int) -> Path | None:
        path = session.mask_path(frame_idx)  # written whole (renamed into place) or not at all
        return path if path.is_file() else None

    def _cached_overlay(self, session: Session, frame_idx: int) -> None:
        """Draw the overlay file if missing. The worker may write a new mask meanwhile (it
        removes the overlay after writing): an overlay drawn from a mask that changed under us
        is removed and drawn again."""
        path, mask = session.overlay_path(frame_idx), session.mask_path(frame_idx)
        for _ in range(3):
            before = _stamp(mask)
            if path.is_file() or before is None:
                return
            with STAGES("overlay"):
                write_jpeg(path, self._overlay_of(session, frame_idx),
                           self.settings.jpeg_quality)
            if _stamp(mask) == before:
                return
            path.unlink(missing_ok=True)

    def describe(self, session_id: str) -> dict:
        index = self._backend.worker_of(session_id)
        try:
            data = self._backend.call_worker(session_id, "describe", session_id,
                                             timeout=HEALTH_TIMEOUT_S * 5)
        except WorkerUnavailable:  # the record on disk, as the worker last wrote it
            data = manifest.read(SessionFiles(self.settings.output_dir / session_id))
        return data | {"worker": worker_name(index)}


class RemoteJob:
    """A job running on a worker, as the routes use a local ``Job``."""

    def __init__(self, backend: RayBackend, session_id: str, version: int, snapshot: dict):
        self._backend = backend
        self.id = snapshot["job_id"]
        self.session_id = session_id
        self.version = version
        self._snapshot = snapshot
        self.cancel_event = _RemoteCancel(self)

    @property
    def finished(self) -> bool:
        return self._snapshot["status"] in FINISHED

    def snapshot(self) -> dict:
        return dict(self._snapshot)

    async def wait_change_async(self, seen_version: int, timeout: float) -> int:
        if self.version != seen_version or self.finished:
            return self.version
        try:
            self.version, self._snapshot = await self._backend.call_worker_async(
                self.session_id, "wait_job", self.id, self.session_id, seen_version, timeout,
                timeout=timeout + 60)
        except WorkerUnavailable:  # the worker died: its restarted self reads the record
            self.version, self._snapshot = await self._backend.call_worker_async(
                self.session_id, "job", self.id, self.session_id)
        return self.version

    def cancel(self) -> None:
        self._backend.call_worker(self.session_id, "cancel_job", self.id)


class _RemoteCancel:
    def __init__(self, job: RemoteJob):
        self._job = job

    def set(self) -> None:
        self._job.cancel()


class _NoJobs:
    """Jobs run on the workers; an ingress runs none (for metrics)."""

    @staticmethod
    def running() -> list:
        return []


class RayBackend:
    """``backend.Backend`` for a Ray Serve ingress replica."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = SharedStore(settings, self)
        self.sessions: dict[str, Session] = {}  # none live here
        self.jobs = _NoJobs()
        self.counters = {"frames_propagated": 0, "sessions_evicted": 0, "out_of_memory": 0}
        self.load_failures = 0
        self.stopping = threading.Event()
        n = settings.ray_workers
        self._workers = [ray.get_actor(worker_name(i), namespace=NAMESPACE) for i in range(n)]
        self._health: list[dict | None] = [None] * n
        self._gone: set[int] = set()  # workers dead for good (killed without restart)
        self._restarting: set[int] = set()  # seen dying: model calls wait for them first
        self._health_changed = threading.Event()
        self._views: OrderedDict[str, Session] = OrderedDict()
        self._assigned: dict[str, int] = {}
        self._job_sessions: OrderedDict[str, str] = OrderedDict()  # recent job -> session
        self._lock = threading.Lock()
        self._monitor: threading.Thread | None = None
        # Each model call holds an ingress thread while a worker runs it.
        self.model_threads = n * settings.max_sessions * (settings.session_queue + 1) + 4

    # -- the workers' state ----------------------------------------------------------------
    def start_model_loader(self) -> None:
        """Watch the workers (their models load in their own processes)."""
        if self._monitor is None:
            self._monitor = threading.Thread(target=self._watch, name="worker-health",
                                             daemon=True)
            self._monitor.start()

    def _watch(self) -> None:
        while True:
            self._poll()
            if self.stopping.wait(HEALTH_INTERVAL_S):
                return

    def _poll(self) -> None:
        refs = [w.health.remote() for w in self._workers]
        for i, ref in enumerate(refs):
            try:
                self._health[i] = ray.get(ref, timeout=HEALTH_TIMEOUT_S)
                self._restarting.discard(i)
            except (GetTimeoutError, RayActorError) as exc:
                if isinstance(exc, RayActorError):
                    self._restarting.add(i)
                if isinstance(exc, RayActorError) and self._is_gone(i):
                    self._health[i] = {"worker": worker_name(i), "status": "gone",
                                       "model_status": "gone", "sessions": 0,
                                       "detail": "the worker is dead and will not restart; "
                                                 "its sessions moved to the others"}
                    continue
                self._health[i] = {"worker": worker_name(i), "status": "unavailable",
                                   "model_status": "restarting", "sessions": 0,
                                   "detail": "the worker does not answer (restarting, or "
                                             "its node is gone)"}
        self._health_changed.set()

    def _healths(self) -> list[dict]:
        if not all(self._health):
            self._poll()
        return [h for h in self._health if h]

    @property
    def ready(self) -> bool:
        return any(h.get("status") == "ok" for h in self._healths())

    @property
    def model_status(self) -> str:
        statuses = [h.get("model_status") for h in self._healths()]
        return "ready" if "ready" in statuses else (statuses[0] if statuses else "not_loaded")

    def health(self) -> dict:
        """The first ready worker's model state, and each worker's state and load."""
        healths = self._healths()
        base = next((h for h in healths if h.get("status") == "ok"), healths[0])
        per_worker = ("worker", "status", "model_status", "device", "sessions", "busy",
                      "jobs_running", "node_id", "pid", "up_s", "cores", "detail")
        own = ("worker", "busy", "jobs_running", "node_id", "pid", "up_s", "cores")
        return {k: v for k, v in base.items() if k not in own} | {
            "status": "ok" if self.ready else "unavailable",
            "mode": "ray",
            "checkpoint": base.get("checkpoint", str(self.settings.checkpoint_path)),
            "detail": base.get("detail"),
            "sessions": sum(h.get("sessions", 0) for h in healths),
            "max_sessions": self.settings.max_sessions * len(self._workers),
            "workers": [{k: h.get(k) for k in per_worker} for h in healths],
        }

    def retry_in(self) -> float | None:
        return None if self.ready else 5.0

    # -- calls to workers ------------------------------------------------------------------
    def _is_gone(self, index: int) -> bool:
        """Whether the worker is dead for good: Ray forgets the name of an actor that will not
        restart (one restarting keeps it)."""
        if index in self._gone:
            return True
        try:
            ray.get_actor(worker_name(index), namespace=NAMESPACE)
        except ValueError:
            logger.warning("%s is gone for good: its sessions move to the other workers",
                           worker_name(index))
            self._gone.add(index)
            return True
        return False

    def _submit(self, index: int, method: str, args: tuple, kwargs: dict):
        handle = getattr(self._workers[index], method)
        if method in RETRIED:
            handle = handle.options(max_task_retries=-1)
        elif index in self._restarting:  # a model call: once the worker is back
            try:
                ray.get(self._workers[index].health.options(max_task_retries=-1).remote(),
                        timeout=self.settings.ray_call_timeout_s)
            except (RayActorError, GetTimeoutError) as exc:
                raise self._unavailable(index, exc) from None
            self._restarting.discard(index)
        return handle.remote(*args, **kwargs)

    def _unavailable(self, index: int, exc: BaseException) -> WorkerUnavailable:
        logger.warning("%s: %s", worker_name(index), type(exc).__name__)
        if isinstance(exc, RayActorError):
            self._restarting.add(index)
        if isinstance(exc, RayActorError) and self._is_gone(index):
            return WorkerUnavailable(
                f"{worker_name(index)}, which held this session, is gone; the session moves to "
                f"another worker and reopens there from disk: try again", retry_after=2)
        return WorkerUnavailable(
            f"{worker_name(index)}, which holds this session, stopped or does not answer; "
            f"it is restarting and reopens the session from disk: try again", retry_after=5)

    def _invoke(self, index: int, method: str, *args, timeout: float | None = None, **kwargs):
        ref = self._submit(index, method, args, kwargs)
        try:
            status, value = ray.get(ref, timeout=timeout or self.settings.ray_call_timeout_s)
        except (RayActorError, GetTimeoutError) as exc:
            raise self._unavailable(index, exc) from None
        if status == "error":
            raise value
        return value

    def call_worker(self, session_id: str, method: str, *args, timeout: float | None = None,
                    **kwargs):
        return self._invoke(self.worker_of(session_id), method, *args, timeout=timeout, **kwargs)

    async def call_worker_async(self, session_id: str, method: str, *args,
                                timeout: float | None = None, **kwargs):
        loop = asyncio.get_running_loop()
        index = await loop.run_in_executor(None, self.worker_of, session_id)
        ref = await loop.run_in_executor(None, self._submit, index, method, args, kwargs)
        try:
            status, value = await asyncio.wait_for(
                ref, timeout or self.settings.ray_call_timeout_s)
        except (RayActorError, asyncio.TimeoutError) as exc:
            raise self._unavailable(index, exc) from None
        if status == "error":
            raise value
        return value

    def _call(self, session_id: str, method: str, *args, **kwargs):
        return self.call_worker(session_id, "call", method, *args, **kwargs)

    async def flush(self, session_id: str, frame_idx: int) -> None:
        """Let a mask write of the frame still in flight on the worker land (best effort: a
        worker that does not answer leaves the file as it is on disk)."""
        with contextlib.suppress(WorkerUnavailable):
            await self.call_worker_async(session_id, "flush_frame", session_id, frame_idx,
                                         timeout=FLUSH_TIMEOUT_S)

    # -- which worker holds a session ------------------------------------------------------
    def _loads(self) -> list[tuple[int, int]]:
        """(open sessions, index) of the workers that answer, least loaded first."""
        loads = []
        for i, h in enumerate(self._healths()):
            if h.get("status") == "ok":
                loads.append((h.get("sessions", 0), i))
        if loads:
            return sorted(loads)
        alive = [(0, i) for i in range(len(self._workers)) if i not in self._gone]
        if not alive:
            raise WorkerUnavailable("every worker is gone; restart serve_ray.py", retry_after=30)
        return alive

    def _write_assignment(self, session_id: str, index: int, replace: bool = False) -> int:
        """Record the session's worker; if another replica recorded one first, that one."""
        files = SessionFiles(self.settings.output_dir / session_id)
        files.dir.mkdir(parents=True, exist_ok=True)
        if replace:
            atomic_write_bytes(files.worker_path, json.dumps({"worker": index}).encode())
            return index
        return _record_once(files.worker_path, index)

    def _read_assignment(self, files: SessionFiles) -> int | None:
        try:
            index = json.loads(files.worker_path.read_text())["worker"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return index if isinstance(index, int) and 0 <= index < len(self._workers) else None

    def worker_of(self, session_id: str) -> int:
        """The index of the worker holding the session (one is chosen for a session on disk
        that has none yet, e.g. made by a cluster with more workers)."""
        index = self._assigned.get(session_id)
        if index is not None and index not in self._gone:
            return index
        files = SessionFiles(self.settings.output_dir / session_id)
        if not files.dir.is_dir():
            raise SessionNotFound(f"no session {session_id}; upload a video to start one")
        index = self._read_assignment(files)
        if index is not None and index in self._gone:
            index = self._move(session_id, files, index)
        elif index is None:
            stale = files.worker_path.exists()
            index = self._write_assignment(session_id, self._loads()[0][1], replace=stale)
        self._assigned[session_id] = index
        return index

    def _move(self, session_id: str, files: SessionFiles, gone: int) -> int:
        """Give a session whose worker is gone for good to a live one. The first replica to
        record the move decides; the others follow that record, so it lands on one worker."""
        target = _record_once(files.dir / f"worker-after-{gone}.json", self._loads()[0][1])
        logger.warning("session %s: %s is gone, moved to %s", session_id, worker_name(gone),
                       worker_name(target))
        self._write_assignment(session_id, target, replace=True)
        return target

    # -- sessions --------------------------------------------------------------------------
    def new_session_id(self) -> str:
        return str(uuid.uuid4())

    def check_accepting(self, owner: str | None = None, incoming_bytes: int = 0) -> None:
        if self.stopping.is_set():
            raise WorkerUnavailable("the server is shutting down", retry_after=10)
        if not any(h.get("status") == "ok" for h in self._healths()):
            raise WorkerUnavailable("no worker is ready; see GET /health", retry_after=5)
        self.store.check_disk(owner, incoming_bytes)

    def reserve(self, session_id: str) -> None:
        """Hold a slot for a new session on the least loaded worker with room; 429 when every
        worker's sessions are all busy."""
        refused: ManagerError | None = None
        self._poll()  # fresh loads: another replica may have placed a session a moment ago
        for _, index in self._loads():
            try:
                self._invoke(index, "call", "reserve", session_id)
            except (TooManySessions, WorkerUnavailable) as exc:
                refused = exc
                continue
            self._assigned[session_id] = self._write_assignment(session_id, index)
            health = self._health[index]
            if health is not None:  # counted at once: the next upload may come before a poll
                health["sessions"] = health.get("sessions", 0) + 1
            return
        if isinstance(refused, TooManySessions) or refused is None:
            raise TooManySessions("every worker's sessions are busy; try again when one "
                                  "finishes", retry_after=5)
        raise refused

    def release(self, session_id: str) -> None:
        index = self._assigned.pop(session_id, None)
        if index is not None:
            with contextlib.suppress(ManagerError):
                self._invoke(index, "call", "release", session_id)
        files = SessionFiles(self.settings.output_dir / session_id)
        if not files.manifest_path.exists():  # never made: only its assignment is there
            shutil.rmtree(files.dir, ignore_errors=True)

    def create_session(self, session_id: str, video_path: Path, filename: str,
                       owner: str | None = None, fps: str | None = None) -> Session:
        self.call_worker(session_id, "create_session", session_id, str(video_path), filename,
                         owner, fps)
        return self.view(session_id)

    def view(self, session_id: str) -> Session:
        """The session as read from its folder (its video, owner and files; no live state)."""
        with self._lock:
            session = self._views.get(session_id)
        if session is not None and session.dir.is_dir():
            return session
        files = SessionFiles(self.settings.output_dir / session_id)
        try:
            data = manifest.read(files)
            info = video_info_of(data["video"])
        except (OSError, ValueError, KeyError, TypeError):
            raise SessionNotFound(f"no session {session_id}; upload a video to start one") \
                from None
        session = Session(dir=files.dir, id=session_id,
                          upload_path=self.settings.upload_dir / session_id / data.get(
                              "upload", "video.bin"),
                          filename=data.get("filename", ""), info=info, owner=data.get("owner"),
                          created_at=data.get("created_at", 0.0))
        with self._lock:
            self._views[session_id] = session
            while len(self._views) > VIEWS_KEPT:
                self._views.popitem(last=False)
        return session

    def get(self, session_id: str, caller: Caller = LOCAL_USER) -> Session:
        if not is_session_id(session_id):
            raise SessionNotFound(f"no session {session_id}; upload a video to start one")
        session = self.view(session_id)
        if not caller.may_access(session.owner):
            raise SessionNotFound(f"no session {session_id}; upload a video to start one")
        return session

    def get_open(self, session_id: str, caller: Caller = LOCAL_USER) -> Session | None:
        with self._lock:
            session = self._views.get(session_id)
        if session is None or not session.dir.is_dir():
            return None
        if not caller.may_access(session.owner):
            raise SessionNotFound(f"no session {session_id}; upload a video to start one")
        return session

    def list_sessions(self, caller: Caller = LOCAL_USER) -> list[dict]:
        return self.store.list_sessions(caller, [])

    def close_session(self, session_id: str, delete_files: bool) -> None:
        self._call(session_id, "close_session", session_id, delete_files)
        with self._lock:
            self._views.pop(session_id, None)
        if delete_files:
            self._assigned.pop(session_id, None)

    def cleanup_expired(self) -> list[str]:
        closed: list[str] = []
        for index in range(len(self._workers)):
            if index in self._gone:
                continue
            try:
                closed += self._invoke(index, "call", "cleanup_expired",
                                       timeout=HEALTH_TIMEOUT_S * 15)
            except WorkerUnavailable:
                continue
        return closed

    # -- model work ------------------------------------------------------------------------
    def add_prompt(self, session_id: str, frame_idx: int, obj_id: int = 1, points=None,
                   labels=None, box=None, mask=None, append: bool = False) -> dict:
        return self._call(session_id, "add_prompt", session_id, frame_idx, obj_id,
                          points=points, labels=labels, box=box, mask=mask, append=append)

    def clear_prompts(self, session_id: str, obj_id: int, frame_idx: int) -> dict:
        return self._call(session_id, "clear_prompts", session_id, obj_id, frame_idx)

    def remove_object(self, session_id: str, obj_id: int) -> dict:
        return self._call(session_id, "remove_object", session_id, obj_id)

    def reset(self, session_id: str) -> dict:
        return self._call(session_id, "reset", session_id)

    def propagate(self, session_id: str, start_frame: int, end_frame: int | None = None,
                  direction: str | None = None, max_frames: int | None = None) -> dict:
        return self._call(session_id, "propagate", session_id, start_frame, end_frame,
                          direction, max_frames)

    def export(self, session_id: str, fmt: str, start_frame: int | None,
               end_frame: int | None, polygons: bool) -> Path:
        return self._call(session_id, "export", session_id, fmt, start_frame, end_frame,
                          polygons)

    def _remember_job(self, job_id: str, session_id: str) -> None:
        with self._lock:
            self._job_sessions[job_id] = session_id
            while len(self._job_sessions) > VIEWS_KEPT:  # older ones are found on disk
                self._job_sessions.popitem(last=False)

    def _started(self, session_id: str, started: tuple[int, dict]) -> RemoteJob:
        version, snapshot = started
        self._remember_job(snapshot["job_id"], session_id)
        return RemoteJob(self, session_id, version, snapshot)

    def start_propagation_job(self, session_id: str, **kwargs) -> RemoteJob:
        return self._started(session_id, self.call_worker(
            session_id, "start_job", "propagate", session_id, **kwargs))

    def start_export_job(self, session_id: str, fmt: str, start_frame: int | None,
                         end_frame: int | None, polygons: bool) -> RemoteJob:
        return self._started(session_id, self.call_worker(
            session_id, "start_job", "export", session_id, fmt, start_frame, end_frame,
            polygons))

    def find_job(self, job_id: str, caller: Caller = LOCAL_USER) -> RemoteJob:
        """A job of any worker, by its record on disk; 404 for another key's job."""
        session_id = self._job_sessions.get(job_id)
        if session_id is None:
            record = self.store.job_record(job_id)
            if record is None:
                raise JobNotFound(f"no job {job_id}")
            session_id = record.session_id
        exists, owner = self.store.stored_owner(session_id)
        if not (exists and caller.may_access(owner)):
            raise JobNotFound(f"no job {job_id}")
        self._remember_job(job_id, session_id)
        version, snapshot = self.call_worker(session_id, "job", job_id, session_id)
        return RemoteJob(self, session_id, version, snapshot)

    # -- stopping --------------------------------------------------------------------------
    def begin_shutdown(self) -> None:
        self.stopping.set()

    def shutdown(self) -> None:
        """Stop this replica (the workers are stopped by serve_ray.py)."""
        self.stopping.set()
        self.store.shutdown()
