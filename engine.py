"""The model and the live sessions: Meta's SAM 2 video predictor, each open session's inference
state, prompts, propagation and exports, with the limits on open sessions and on waiting.

What it computes it writes through the store. No web framework here: it raises the domain errors
of ``errors.py``, which the HTTP layer maps to statuses, and the CLI drives it directly.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import shutil
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch

import exports
import masks as mask_ops
from auth import LOCAL_USER, Caller
from checkpoints import ensure_checkpoint
from config import Settings
from disk import is_disk_full
from errors import (
    DiskFull,
    InvalidPrompt,
    InvalidRequest,
    JobNotFound,
    ModelNotReady,
    ModelOutOfMemory,
    NoMasks,
    NoPrompts,
    ObjectNotFound,
    SessionBusy,
    SessionNotFound,
    TooManySessions,
)
from jobs import Job, JobCancelled, JobRunner, Progress
from layout import is_session_id
from predictor import LazyFrames, build_predictor, new_inference_state, resolve_device, warm_up
from state_store import finish_spills
from store import PromptRecord, Session, SessionStore
from timing import STAGES
from video_io import write_png

logger = logging.getLogger(__name__)

Direction = Literal["forward", "backward", "both"]
MAX_OBJ_ID = 255
MAX_POINTS = 256


def _free_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- manager
MAX_RETRY_S = 600.0


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


class Engine:
    """Owns the predictor and every open session's live state; files go through ``store``."""

    def __init__(self, settings: Settings, store: SessionStore, predictor: Any = None):
        self.settings = settings
        self.store = store
        store.reopen = self.get  # a session closed while a reader waited comes back open
        self.sessions: dict[str, Session] = {}
        # Guards `sessions`, `_reserved` and `_transit`: the open-session count is exact.
        self._sessions_lock = threading.Lock()
        self._reserved: set[str] = set()  # uploads and reopenings under way: they hold a slot
        self._transit: dict[str, threading.Event] = {}  # sessions being opened or closed
        self.predictor = predictor
        self.model_status = "ready" if predictor is not None else "not_loaded"
        if predictor is not None:
            store.model_image_size = predictor.image_size
        self.warm_up_s: float | None = None
        self.model_detail: str | None = None
        self.download: dict | None = None
        self.next_retry_at: float | None = None  # after a failed load: when the next try is
        self._retry_delay = settings.model_retry_s
        self.load_failures = 0
        self._retry_now = threading.Event()
        self._ready = threading.Event()
        if predictor is not None:
            self._ready.set()
        self._loader: threading.Thread | None = None
        self.stopping = threading.Event()  # SIGTERM: running work ends as `interrupted`
        self.counters = {"frames_propagated": 0, "sessions_evicted": 0, "out_of_memory": 0}
        self.jobs = JobRunner(on_change=store.save_job)
        self.jobs.stop_event = self.stopping
        self._prefetcher = ThreadPoolExecutor(settings.prefetch_workers,
                                              thread_name_prefix="prefetch")

    def check_accepting(self, owner: str | None = None, incoming_bytes: int = 0) -> None:
        """Refuse new work the server cannot take: a failed model or no room on disk."""
        if self.model_status == "error":
            self._require_model()
        if self.stopping.is_set():
            raise ModelNotReady("the server is shutting down", retry_after=10)
        self.store.check_disk(owner, incoming_bytes)

    def _finish_close(self, session: Session, delete_files: bool) -> None:
        """Free a session taken out of ``sessions`` (its work lock held); files stay or go."""
        try:
            finish_spills(session.state)
            session.state = None
            self.store.close(session, delete_files)
        finally:
            with self._sessions_lock:
                event = self._transit.pop(session.id, None)
            if event is not None:
                event.set()
            _free_device_memory()

    def create_session(self, session_id: str, video_path: Path, filename: str,
                       owner: str | None = None, fps: str | None = None) -> Session:
        """A new session from a stored upload (a video, or a ZIP of frames played at ``fps``),
        in a slot of its own; answers once frame 0 is on disk."""
        with self._sessions_lock:
            reserved = session_id in self._reserved
        if not reserved:
            self.reserve(session_id)
        try:
            session = self.store.create(session_id, video_path, filename, owner, fps)
        except BaseException:
            self.release(session_id)
            raise
        with self._sessions_lock:
            self._reserved.discard(session_id)
            self.sessions[session_id] = session
        return session

    def list_sessions(self, caller: Caller = LOCAL_USER) -> list[dict]:
        """The caller's sessions, open or on disk, newest first."""
        return self.store.list_sessions(caller, list(self.sessions.values()))

    def export(self, session_id: str, fmt: str = "overlay_mp4", start_frame: int | None = None,
               end_frame: int | None = None, polygons: bool = False,
               progress: Progress | None = None) -> Path:
        """Write an export of the session over a frame range (its masks held still meanwhile);
        return its path."""
        session = self.get(session_id)
        if fmt not in exports.FORMATS:
            raise InvalidRequest(f"unknown export format {fmt!r}; use one of "
                                 f"{', '.join(exports.FORMATS)}")
        first, last = self.store.export_range(session, start_frame, end_frame)
        progress = progress or Progress(stop_event=self.stopping)
        with self._working(session, "export") as session:
            self.store.check_disk(session.owner)
            if not session.mask_frames:
                raise NoMasks("no masks to export yet: annotate a frame and propagate first")
            return self.store.write_export(session, fmt, first, last, polygons, progress)

    def find_job(self, job_id: str, caller: Caller = LOCAL_USER) -> Job:
        """A job of this process, or one recorded on disk by an earlier one (which then reads
        ``interrupted`` if it never finished); 404 for a job of a session the caller cannot see."""
        job = self.jobs.get(job_id) or self.store.job_record(job_id)
        if job is not None:
            exists, owner = self._owner_of(job.session_id)
            if not (exists and caller.may_access(owner)):
                job = None
        if job is None:
            raise JobNotFound(f"no job {job_id}")
        return job

    def shutdown(self) -> None:
        """Stop running work (bounded by SAM2_SHUTDOWN_TIMEOUT_S), write every manifest, close."""
        self.begin_shutdown()
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        for job in self.jobs.running():
            while not job.finished and time.monotonic() < deadline:
                job.wait_change(job.version, max(0.0, deadline - time.monotonic()))
        taken = [s for s in list(self.sessions.values())
                 if s.work_lock.acquire(timeout=max(0.0, deadline - time.monotonic()))]
        with self._sessions_lock:
            for s in taken:
                self.sessions.pop(s.id, None)
                s.closed = True
        for session in taken:
            try:
                self._finish_close(session, delete_files=False)
            finally:
                session.work_lock.release()
        self.store.shutdown()
        self._prefetcher.shutdown(wait=True, cancel_futures=True)
        self.predictor = None
        _free_device_memory()

    # -- model ---------------------------------------------------------------------------
    def start_model_loader(self) -> None:
        """Load the model in a background thread, retrying a failure with growing waits."""
        if self.predictor is not None or (self._loader is not None and self._loader.is_alive()):
            return
        self._loader = threading.Thread(target=self._load_with_retries, name="model-loader",
                                        daemon=True)
        self._loader.start()

    def _load_with_retries(self) -> None:
        while not self.stopping.is_set():
            if self.model_status == "error":
                # A request that needs the model, with the checkpoint now in place, cuts the
                # wait short (``_require_model``).
                self._retry_now.wait(max(0.0, (self.next_retry_at or 0) - time.time()))
                self._retry_now.clear()
                if self.stopping.is_set():
                    return
            self.load_model()
            if self.ready:
                return

    def load_model(self) -> None:
        """Download the checkpoint if needed and build the predictor; errors end in ``health``."""
        s = self.settings
        try:
            if not s.checkpoint_path.is_file():
                self.model_status = "downloading"
            path = ensure_checkpoint(s, progress=self._on_download)
            self.model_status = "loading"
            device = resolve_device(s.device)
            if s.torch_threads:
                torch.set_num_threads(s.torch_threads)
            t0 = time.perf_counter()
            self.predictor = build_predictor(
                s.model_config_file, path, device, s.image_size, s.fill_hole_area,
                s.batch_objects, s.window_padding)
            self.store.model_image_size = self.predictor.image_size
            logger.info("SAM 2 %s loaded on %s in %.1fs", s.model, device,
                        time.perf_counter() - t0)
            if s.warm_up:
                self.model_status = "warming_up"
                t0 = time.perf_counter()
                with self._model_ctx():
                    warm_up(self.predictor)
                self.warm_up_s = round(time.perf_counter() - t0, 3)
                logger.info("model calls warmed up in %.2fs", self.warm_up_s)
            # The model, torch and every module loaded so far live as long as the process:
            # keep the garbage collector from walking them again on every full collection
            # (each model call allocates thousands of small objects).
            gc.collect()
            gc.freeze()
            self.model_status = "ready"
            self.model_detail = None
            self.next_retry_at = None
            self._ready.set()
            logger.info("model ready")
        except Exception as exc:  # surfaced by /health, retried; the server keeps serving files
            logger.error("model not loaded: %s", exc)
            self.predictor = None
            self.load_failures += 1
            self.model_status = "error"
            self.model_detail = str(exc)
            self.next_retry_at = time.time() + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, MAX_RETRY_S)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the model serves requests (or the timeout passes)."""
        return self._ready.wait(timeout)

    def _on_download(self, done: int, total: int | None) -> None:
        self.download = {"bytes": done, "total_bytes": total}

    @property
    def ready(self) -> bool:
        return self.predictor is not None and self.model_status == "ready"

    def health(self) -> dict:
        s = self.settings
        detail = self.model_detail
        if self.model_status == "downloading":
            detail = f"downloading {s.checkpoint_download_url} to {s.checkpoint_path}"
        elif self.model_status in ("loading", "not_loaded"):
            detail = "the model is loading"
        elif self.model_status == "warming_up":
            detail = "the model is running its warm-up calls"
        return {
            "status": "ok" if self.ready else "unavailable",
            "model": s.model,
            "model_status": self.model_status,
            "detail": detail,
            "download": self.download,
            "checkpoint": str(s.checkpoint_path),
            "device": str(self.predictor.device) if self.predictor is not None else s.device,
            "image_size": self.predictor.image_size if self.predictor is not None else s.image_size,
            "object_batching": getattr(self.predictor, "object_batching", None),
            "window_padding": getattr(self.predictor, "window_padding", None),
            "warm_up_s": self.warm_up_s,
            "load_failures": self.load_failures,
            "next_retry_in_s": self.retry_in(),
            "sessions": len(self.sessions),
            "max_sessions": s.max_sessions,
        }

    def retry_in(self) -> float | None:
        at = self.next_retry_at
        return None if at is None else round(max(0.0, at - time.time()), 1)

    def _require_model(self):
        if not self.ready:
            if self.model_status == "error" and self.settings.checkpoint_path.is_file():
                self._retry_now.set()  # the file was put in place: try again now, not later
            raise ModelNotReady(
                f"the model is not usable yet ({self.model_status}"
                + (f": {self.model_detail}" if self.model_detail else "")
                + "); see GET /health", retry_after=self.retry_in() or 5)
        return self.predictor

    @contextlib.contextmanager
    def _model_ctx(self):
        # inference_mode and autocast are per thread: entered here, in the thread doing the work.
        with torch.inference_mode():
            if self.predictor is not None and self.predictor.device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    yield
            else:
                yield

    # -- sessions --------------------------------------------------------------------------
    def new_session_id(self) -> str:
        return str(uuid.uuid4())

    def reserve(self, session_id: str) -> None:
        """Hold a slot for a session about to be made, closing the least recently used idle
        session if every slot is taken (its work is on disk and it reopens on its next use)."""
        with self._sessions_lock:
            victims = self._make_room()
            self._reserved.add(session_id)
        self._close_taken(victims)

    def release(self, session_id: str) -> None:
        with self._sessions_lock:
            self._reserved.discard(session_id)

    def _take_idle(self, session: Session) -> bool:
        """With ``_sessions_lock`` held: take an idle session out of the open ones, keeping its
        work lock until ``_close_taken`` has closed it."""
        if session.waiting or not session.work_lock.acquire(blocking=False):
            return False
        self.sessions.pop(session.id, None)
        session.closed = True
        self._transit[session.id] = threading.Event()
        return True

    def _make_room(self) -> list[Session]:
        """With ``_sessions_lock`` held: free one slot; 429 when every open session is busy."""
        need = len(self.sessions) + len(self._reserved) - self.settings.max_sessions + 1
        if need <= 0:
            return []
        idle = [s for s in sorted(self.sessions.values(), key=lambda s: s.last_access)
                if not s.waiting and not s.work_lock.locked()]
        if len(idle) < need:
            raise TooManySessions(
                f"all {len(self.sessions)} open sessions are busy (SAM2_MAX_SESSIONS="
                f"{self.settings.max_sessions}); try again when one finishes", retry_after=5)
        taken = []
        for session in idle:
            if len(taken) == need:
                break
            if self._take_idle(session):
                taken.append(session)
        if len(taken) < need:  # one turned busy meanwhile: give the others back untouched
            for session in taken:
                session.closed = False
                self.sessions[session.id] = session
                self._transit.pop(session.id, None)
                session.work_lock.release()
            raise TooManySessions("every open session is busy; try again shortly", retry_after=2)
        self.counters["sessions_evicted"] += len(taken)
        return taken

    def _close_taken(self, sessions: list[Session]) -> None:
        for session in sessions:
            try:
                self._finish_close(session, delete_files=False)
            finally:
                session.work_lock.release()

    def get(self, session_id: str, caller: Caller = LOCAL_USER) -> Session:
        """An open session, reopened from disk if needed; 404 for a session the caller may not
        see, exactly as for one that does not exist."""
        if not is_session_id(session_id):
            raise SessionNotFound(f"no session {session_id}; upload a video to start one")
        session = self.sessions.get(session_id)
        if session is None:
            exists, owner = self.store.stored_owner(session_id)
            if exists and caller.may_access(owner):
                session = self._reopen(session_id)
        elif not caller.may_access(session.owner):
            session = None
        if session is None:
            raise SessionNotFound(f"no session {session_id}; upload a video to start one")
        session.last_access = time.time()
        return session

    def get_open(self, session_id: str, caller: Caller = LOCAL_USER) -> Session | None:
        """The session if it is open, else None; never touches the disk (for the event loop)."""
        session = self.sessions.get(session_id)
        if session is None:
            return None
        if not caller.may_access(session.owner):
            raise SessionNotFound(f"no session {session_id}; upload a video to start one")
        session.last_access = time.time()
        return session

    def _reopen(self, session_id: str) -> Session:
        """Open a session that is on disk, making room for it; one thread does it, others wait."""
        while True:
            with self._sessions_lock:
                session = self.sessions.get(session_id)
                if session is not None:
                    return session
                event = self._transit.get(session_id)
                if event is None:
                    victims = self._make_room()
                    self._reserved.add(session_id)
                    event = self._transit[session_id] = threading.Event()
                    break
            if not event.wait(max(self.settings.session_lock_timeout_s, 1.0)):
                raise SessionBusy(f"session {session_id} is being opened or closed; try again",
                                  retry_after=2)
        session = None
        try:
            self._close_taken(victims)
            session = self.store.load(session_id)
        finally:
            with self._sessions_lock:
                self._reserved.discard(session_id)
                if session is not None:
                    self.sessions[session_id] = session
                self._transit.pop(session_id, None)
            event.set()
        if session is None:
            raise SessionNotFound(f"session {session_id} cannot be reopened from its folder; "
                                  f"see the server log")
        return session

    def _working_enter(self, session: Session) -> None:
        with session.meta_lock:
            self._check_queue(session)
            session.waiting += 1
        try:
            acquired = session.work_lock.acquire(timeout=self.settings.session_lock_timeout_s)
        finally:
            with session.meta_lock:
                session.waiting -= 1
        if not acquired:
            raise SessionBusy(
                f"session {session.id} is busy ({session.busy_with}); wait for it to finish or "
                f"cancel its job", retry_after=self._retry_after(session))

    def _retry_after(self, session: Session) -> float:
        etas = [j.snapshot()["eta_s"] for j in self.jobs.for_session(session.id)
                if not j.finished]
        etas = [e for e in etas if e]
        return min(60.0, max(1.0, min(etas))) if etas else 2.0

    @contextlib.contextmanager
    def _working(self, session: Session, what: str, drain: bool = True):
        """Hold the session for model work, file rewrites or an export; yields the live session.

        At most SAM2_SESSION_QUEUE requests wait for a busy session; more get SessionBusy at
        once. A session closed while this waited (evicted, expired) is reopened. A CUDA
        out-of-memory error drops the session's model state, which is rebuilt from its prompts
        on the next call, and becomes ModelOutOfMemory; a full disk becomes DiskFull.
        """
        for _ in range(3):
            self._working_enter(session)
            if not session.closed:
                break
            session.work_lock.release()
            session = self.get(session.id)
        else:
            raise SessionBusy(f"session {session.id} is being reopened; try again", retry_after=2)
        session.busy_with = what
        try:
            # Work that reads or deletes mask files waits for writes in flight; clicks and
            # propagation only queue writes, ordered per frame (Session.claim_write). Manifest
            # rewrites need no wait: they run in order on one thread, each from a fresh snapshot.
            if drain:
                session.drain_writes(manifest=False)
            yield session
        except Exception as exc:
            if _is_out_of_memory(exc):
                session.state = None
                _free_device_memory()
                self.counters["out_of_memory"] += 1
                logger.warning("session %s: out of memory during %s", session.id, what)
                raise ModelOutOfMemory(
                    "the model ran out of GPU memory. The session is intact: try again with "
                    "fewer objects or a shorter range, or run the server with a smaller model "
                    "(SAM2_MODEL=tiny) or a smaller SAM2_IMAGE_SIZE", retry_after=5) from exc
            if is_disk_full(exc):
                raise DiskFull("the disk is full: delete sessions you no longer need (DELETE "
                               "/session/{id}); files already written are intact") from exc
            raise
        finally:
            session.busy_with = None
            session.last_access = time.time()
            session.work_lock.release()

    def close_session(self, session_id: str, delete_files: bool) -> None:
        session = self.get(session_id)
        for job in self.jobs.for_session(session_id):
            job.cancel_event.set()
        with self._working(session, "closing") as session:
            with self._sessions_lock:
                self.sessions.pop(session.id, None)
                session.closed = True
                self._transit[session.id] = threading.Event()
            self._finish_close(session, delete_files)
        logger.info("session %s closed%s", session_id, " and deleted" if delete_files else "")

    def cleanup_expired(self, now: float | None = None) -> list[str]:
        """Close sessions idle longer than the TTL (their files stay on disk)."""
        now = time.time() if now is None else now
        with self._sessions_lock:
            taken = [s for s in sorted(self.sessions.values(), key=lambda s: s.last_access)
                     if now - s.last_access > self.settings.session_ttl_s
                     and self._take_idle(s)]
        self._close_taken(taken)
        return [s.id for s in taken]

    def begin_shutdown(self) -> None:
        """SIGTERM: propagations and exports stop at their next frame and are recorded as
        interrupted; new work is refused."""
        self.stopping.set()
        self._retry_now.set()

    def _frame_prefetcher(self, predictor) -> ThreadPoolExecutor | None:
        """Threads preparing upcoming frames, or None to prepare each frame when the model asks.
        A model on the CPU already keeps every core busy with its own threads: a frame decoded
        beside it stalls them more than decoding it in turn (propagation 3-4% faster on 2
        cores), so by default frames are prefetched only for a GPU."""
        if predictor.device.type == "cpu" and not self.settings.prefetch_threads:
            return None
        return self._prefetcher

    def _state(self, session: Session) -> dict:
        predictor = self._require_model()
        if session.state is None:
            fast = self.settings.frame_resize == "device"
            images = LazyFrames(session.info.num_frames, predictor.image_size,
                                lambda i: self.store.frame_path(session, i),
                                self._frame_prefetcher(predictor),
                                resize_on=predictor.device if fast else None,
                                normalise_on=predictor.device
                                if predictor.device.type == "cuda" else None,
                                exact_resize_on=predictor.device
                                if self.settings.frame_resize == "exact-device" else None)
            shutil.rmtree(session.state_dir, ignore_errors=True)
            state = new_inference_state(
                predictor, images, session.info.height, session.info.width,
                spill_dir=session.state_dir, state_window=self.settings.state_window,
                kept_features=self.settings.feature_cache_frames)
            if session.has_prompts():
                # A session restored from disk (restart, or idle expiry): give the model back
                # its prompts. Tracking resumes with the next propagation.
                with self._model_ctx():
                    for obj_id, per_frame in sorted(session.prompts.items()):
                        for frame_idx, record in sorted(per_frame.items()):
                            self._apply_record(state, session, frame_idx, obj_id, record)
                logger.info("session %s: replayed prompts of %d objects", session.id,
                            len(session.prompts))
            session.state = state
        return session.state

    def _apply_record(self, state: dict, session: Session, frame_idx: int, obj_id: int,
                      record: PromptRecord, mask: np.ndarray | None = None):
        """Give the predictor one object's prompts on one frame; returns (obj_ids, masks)."""
        if record.mask:
            if mask is None:
                mask = cv2.imread(str(session.prompt_mask_path(obj_id, frame_idx)),
                                  cv2.IMREAD_GRAYSCALE)
            _, obj_ids, video_masks = self.predictor.add_new_mask(
                state, frame_idx, obj_id, torch.from_numpy(mask > 0))
        else:
            # The whole record is resent with clear_old_points: the same point inputs as an
            # appending call, and it lets a box join existing points.
            _, obj_ids, video_masks = self.predictor.add_new_points_or_box(
                state, frame_idx, obj_id,
                points=np.array(record.points, np.float32).reshape(-1, 2),
                labels=np.array(record.labels, np.int32),
                box=record.box, clear_old_points=True, normalize_coords=True)
        return obj_ids, video_masks

    # -- prompts ---------------------------------------------------------------------------
    def _validate_prompt(self, session: Session, frame_idx: int, obj_id: int,
                         points: list[list[float]], labels: list[int], box: list[float] | None,
                         mask: np.ndarray | None) -> None:
        # Everything is checked before the predictor sees it: a failed call with a new obj_id
        # would leave an object without prompts, which breaks every later propagation.
        self.store.check_frame(session, frame_idx, "frame_idx")
        if not 1 <= obj_id <= MAX_OBJ_ID:
            raise InvalidPrompt(f"obj_id must be between 1 and {MAX_OBJ_ID}, got {obj_id}")
        w, h = session.info.width, session.info.height
        if len(points) != len(labels):
            raise InvalidPrompt(f"{len(points)} points but {len(labels)} labels")
        if len(points) > MAX_POINTS:
            raise InvalidPrompt(f"at most {MAX_POINTS} points per request")
        for i, (pt, label) in enumerate(zip(points, labels, strict=True)):
            x, y = pt
            if not (0 <= x <= w and 0 <= y <= h):
                raise InvalidPrompt(f"point {i} ({x}, {y}) lies outside the {w}x{h} frame")
            if label not in (0, 1):
                raise InvalidPrompt(f"point {i} has label {label}; use 1 (include) or 0 (exclude)")
        if box is not None:
            x0, y0, x1, y1 = box
            if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
                raise InvalidPrompt(f"box {box} must satisfy 0 <= x0 < x1 <= {w} and "
                                    f"0 <= y0 < y1 <= {h}")
        if mask is not None:
            if mask.shape != (h, w):
                raise InvalidPrompt(f"mask is {mask.shape[1]}x{mask.shape[0]}, the video is {w}x{h}")
            if points or box is not None:
                raise InvalidPrompt("a mask prompt cannot be combined with points or a box")
        if not points and box is None and mask is None:
            raise InvalidPrompt("give at least one point, a box or a mask")

    def add_prompt(self, session_id: str, frame_idx: int, obj_id: int = 1,
                   points: list[list[float]] | None = None, labels: list[int] | None = None,
                   box: list[float] | None = None, mask: np.ndarray | None = None,
                   append: bool = False) -> dict:
        """Prompt one object on one frame; ``append`` keeps the frame's earlier points (refine)."""
        session = self.get(session_id)
        points = [[float(x), float(y)] for x, y in (points or [])]
        labels = [int(v) for v in (labels or [])]
        self._validate_prompt(session, frame_idx, obj_id, points, labels, box, mask)
        with self._working(session, "prompt", drain=False) as session:
            predictor = self._require_model()
            state = self._state(session)
            old = session.prompts.get(obj_id, {}).get(frame_idx)
            if mask is not None:
                record = PromptRecord(mask=True)
            elif append and old is not None and not old.mask:
                record = PromptRecord(points=old.points + points, labels=old.labels + labels,
                                      box=box if box is not None else old.box)
            else:
                record = PromptRecord(points=points, labels=labels, box=box)
            if mask is not None:  # the input is stored before the model takes it
                session.prompt_mask_path(obj_id, frame_idx).parent.mkdir(exist_ok=True)
                write_png(session.prompt_mask_path(obj_id, frame_idx),
                          ((mask > 0) * 255).astype(np.uint8))
            is_new_obj = obj_id not in state["obj_id_to_idx"]
            try:
                with self._model_ctx():
                    obj_ids, video_masks = self._apply_record(state, session, frame_idx, obj_id,
                                                              record, mask)
                    labels_map = mask_ops.label_map(video_masks, obj_ids)
                    frame_scores = self._frame_scores(state, frame_idx, temp=True)
            except Exception:
                if is_new_obj and obj_id in state["obj_id_to_idx"]:
                    with self._model_ctx():
                        predictor.remove_object(state, obj_id, need_output=False)
                raise
            with session.meta_lock:
                session.prompts.setdefault(obj_id, {})[frame_idx] = record
                obj = session.objects.setdefault(obj_id, {"obj_id": obj_id,
                                                          "color": mask_ops.color_of(obj_id)})
                session.mask_frames.add(frame_idx)
                session.scores[frame_idx] = frame_scores
                entry = {
                    "seq": len(session.history) + 1,
                    "action": "mask" if record.mask else ("refine" if append else "annotate"),
                    "frame_idx": frame_idx, "obj_id": obj_id, "points": points,
                    "labels": labels, "box": box, "mask": mask is not None, "at": time.time(),
                }
                session.history.append(entry)
                # Listed and queued in one step: a reader sees the frame only with its write.
                self.store.write_click_mask(session, frame_idx, labels_map)
                self.store.journal(session, [
                    ["set", ["current_prompts", str(obj_id), str(frame_idx)], record.as_dict()],
                    ["object", obj], ["add", "mask_frames", frame_idx],
                    ["set", ["scores", str(frame_idx)], self.store.scores_json(frame_scores)],
                    ["append", "prompts", entry]])
        return self._frame_result(session, frame_idx, labels_map, frame_scores)

    def clear_prompts(self, session_id: str, obj_id: int, frame_idx: int) -> dict:
        """Remove one object's prompts on one frame (removing the object if none remain)."""
        session = self.get(session_id)
        self.store.check_frame(session, frame_idx, "frame_idx")
        with self._working(session, "prompt", drain=False) as session:
            if frame_idx not in session.prompts.get(obj_id, {}):
                raise InvalidPrompt(f"object {obj_id} has no prompts on frame {frame_idx}")
            if len(session.prompts[obj_id]) == 1:
                # An object left without any prompted frame makes every propagation raise.
                return self._remove_object_locked(session, obj_id) | {"object_removed": True}
            predictor = self._require_model()
            state = self._state(session)
            with self._model_ctx():
                _, obj_ids, video_masks = predictor.clear_all_prompts_in_frame(
                    state, frame_idx, obj_id)
                labels_map = mask_ops.label_map(video_masks, obj_ids)
                frame_scores = self._frame_scores(state, frame_idx, temp=True)
            self.store.write_click_mask(session, frame_idx, labels_map)
            with session.meta_lock:
                del session.prompts[obj_id][frame_idx]
                session.scores[frame_idx] = frame_scores
                entry = {"seq": len(session.history) + 1, "action": "clear",
                         "frame_idx": frame_idx, "obj_id": obj_id, "at": time.time()}
                session.history.append(entry)
                self.store.journal(session, [
                    ["del", ["current_prompts", str(obj_id), str(frame_idx)]],
                    ["set", ["scores", str(frame_idx)], self.store.scores_json(frame_scores)],
                    ["append", "prompts", entry]])
        return self._frame_result(session, frame_idx, labels_map, frame_scores) | {
            "object_removed": False}

    def remove_object(self, session_id: str, obj_id: int) -> dict:
        session = self.get(session_id)
        with self._working(session, "prompt") as session:
            return self._remove_object_locked(session, obj_id)

    def _remove_object_locked(self, session: Session, obj_id: int) -> dict:
        if obj_id not in session.objects:
            raise ObjectNotFound(f"session has no object {obj_id}; objects: "
                                 f"{sorted(session.objects)}")
        session.drain_writes(manifest=False)  # its masks are read back below
        predictor = self._require_model()
        state = self._state(session)
        with self._model_ctx():
            predictor.remove_object(state, obj_id, need_output=False)
        with session.meta_lock:
            session.prompts.pop(obj_id, None)
            session.objects.pop(obj_id, None)
            frames = sorted(session.mask_frames)
            for per_obj in session.scores.values():
                per_obj.pop(obj_id, None)
            session.history.append({"seq": len(session.history) + 1, "action": "remove_object",
                                    "obj_id": obj_id, "at": time.time()})
        # Its pixel value goes from every mask; where it covered another object, that object's
        # pixels come back only with a new propagation.
        self.store.run_writes(session, frames, lambda f: self.store.erase_object(session, f, obj_id))
        self.store.save_manifest(session)
        return {"session_id": session.id, "obj_id": obj_id, "removed": True,
                "frames_rewritten": len(frames), "objects": sorted(session.objects)}

    def reset(self, session_id: str) -> dict:
        """Drop every prompt, object and mask of the session; the video stays."""
        session = self.get(session_id)
        with self._working(session, "prompt") as session:
            if session.state is not None and self.predictor is not None:
                with self._model_ctx():
                    self.predictor.reset_state(session.state)
            with session.meta_lock:
                frames = sorted(session.mask_frames)
                session.prompts.clear()
                session.objects.clear()
                session.mask_frames.clear()
                session.scores.clear()
                session.history.append({"seq": len(session.history) + 1, "action": "reset",
                                        "at": time.time()})
            for f in frames:
                session.mask_path(f).unlink(missing_ok=True)
                session.overlay_path(f).unlink(missing_ok=True)
            session.export_path.unlink(missing_ok=True)
            shutil.rmtree(session.exports_dir, ignore_errors=True)
            shutil.rmtree(session.prompt_mask_path(1, 0).parent, ignore_errors=True)
            self.store.save_manifest(session)
        _free_device_memory()
        return {"session_id": session.id, "reset": True, "masks_deleted": len(frames)}

    # -- propagation -----------------------------------------------------------------------
    def plan_propagation(self, session: Session, start_frame: int, end_frame: int | None,
                         direction: Direction | None, max_frames: int | None
                         ) -> list[tuple[bool, int, int]]:
        """Validate a propagation request; return passes as (reverse, first, last) frames."""
        n = session.info.num_frames
        self.store.check_frame(session, start_frame, "start_frame")
        if end_frame is not None and max_frames is not None:
            raise InvalidRequest("give end_frame or max_frames, not both")
        if end_frame is not None:
            end = min(max(end_frame, 0), n - 1)
            implied = "backward" if end < start_frame else "forward"
            if direction not in (None, implied):
                raise InvalidRequest(f"end_frame {end_frame} lies {implied} of start_frame "
                                     f"{start_frame} but direction is {direction}")
            return [(implied == "backward", start_frame, end)]
        direction = direction or "forward"
        span = n if max_frames is None else max_frames
        passes = []
        if direction in ("forward", "both"):
            passes.append((False, start_frame, min(start_frame + span, n - 1)))
        if direction in ("backward", "both"):
            passes.append((True, start_frame, max(start_frame - span, 0)))
        return passes

    def propagate(self, session_id: str, start_frame: int, end_frame: int | None = None,
                  direction: Direction | None = None, max_frames: int | None = None,
                  progress: Progress | None = None) -> dict:
        """Track every object from ``start_frame`` over the range, writing masks."""
        session = self.get(session_id)
        passes = self.plan_propagation(session, start_frame, end_frame, direction, max_frames)
        progress = progress or Progress(stop_event=self.stopping)
        with self._working(session, "propagation", drain=False) as session:
            predictor = self._require_model()
            if not session.has_prompts():
                raise NoPrompts("nothing to propagate: add points, a box or a mask on a frame "
                                "first (POST /annotate-frame)")
            self.store.check_disk(session.owner)
            state = self._state(session)
            total = sum(abs(last - first) + 1 for _, first, last in passes)
            written: list[int] = []
            t0 = time.perf_counter()
            last_save = t0
            # Listed from the start as running, so a crash leaves a trace (recovery.reconcile).
            record = {"start_frame": start_frame, "passes": [], "at": time.time(),
                      "status": "running",
                      "job_id": progress.job_id}
            with session.meta_lock:
                session.propagations.append(record)
            self.store.save_manifest(session, wait=False)
            pending: deque[Future] = deque()
            try:
                for reverse, first, last in passes:
                    with session.meta_lock:
                        record["passes"].append({"direction": "backward" if reverse
                                                 else "forward", "from": first, "to": last})
                    if reverse and first == 0:
                        continue  # sam2 does not track backwards from frame 0
                    gen = predictor.propagate_in_video(
                        state, start_frame_idx=first, max_frame_num_to_track=abs(last - first),
                        reverse=reverse)
                    with contextlib.closing(gen), self._model_ctx():
                        for frame_idx, obj_ids, video_masks in gen:
                            with STAGES("label_map"):
                                labels_map = mask_ops.label_map(video_masks, obj_ids)
                            with STAGES("scores"):
                                scores = self._frame_scores(state, frame_idx, temp=False)
                            pending.append(self.store.write_tracked_mask(session, frame_idx,
                                                                     labels_map, scores))
                            while len(pending) > 2 * self.settings.writer_workers + 2:
                                pending.popleft().result()
                            written.append(frame_idx)
                            with session.meta_lock:
                                record["passes"][-1]["last"] = frame_idx
                            self.counters["frames_propagated"] += 1
                            self.store.check_disk(session.owner)  # a cached figure: cheap
                            if time.perf_counter() - last_save > 5:
                                last_save = time.perf_counter()
                                self.store.save_manifest(session, wait=False)
                            progress.update(frame_idx, len(written), total)
                    # The next pass rewrites the start frame: its earlier write must land first.
                    while pending:
                        pending.popleft().result()
            except JobCancelled as exc:
                self._finish_propagation(session, record, written, pending, t0, exc.status)
                raise type(exc)(
                    self._propagation_result(session, record, written, t0, True)) from None
            except BaseException:
                self._finish_propagation(session, record, written, pending, t0, "failed")
                raise
            self._finish_propagation(session, record, written, pending, t0, "done")
            return self._propagation_result(session, record, written, t0, False)

    def _finish_propagation(self, session: Session, record: dict, written: list[int],
                            pending: deque[Future], t0: float, status: str) -> None:
        failed = None
        for fut in pending:
            try:
                fut.result()
            except Exception as exc:  # e.g. a full disk: the frame is not listed
                failed = exc
        with session.meta_lock:
            done = sorted(f for f in set(written) if f in session.mask_frames)
            record.update(frames=len(done), cancelled=status != "done", status=status,
                          first_frame=done[0] if done else None,
                          last_frame=written[-1] if written else None,
                          seconds=round(time.perf_counter() - t0, 3))
        self.store.save_manifest(session)
        if failed is not None and status == "done":
            raise failed

    def _propagation_result(self, session: Session, record: dict, written: list[int], t0: float,
                            cancelled: bool) -> dict:
        elapsed = time.perf_counter() - t0
        unique = sorted(set(written))
        passes = record["passes"]
        return {
            "session_id": session.id,
            "start_frame": record["start_frame"],
            "end_frame": passes[0]["to"] if len(passes) == 1 else None,
            "direction": passes[0]["direction"] if len(passes) == 1 else "both",
            "passes": passes,
            "frames_processed": len(unique),
            "first_frame": unique[0] if unique else None,
            "last_frame": unique[-1] if unique else None,
            "cancelled": cancelled,
            "seconds": round(elapsed, 3),
            "fps": round(len(written) / elapsed, 3) if elapsed > 0 else None,
            "objects": sorted(session.objects),
        }

    def start_propagation_job(self, session_id: str, **kwargs) -> Job:
        session = self.get(session_id)
        self.plan_propagation(session, kwargs["start_frame"], kwargs.get("end_frame"),
                              kwargs.get("direction"), kwargs.get("max_frames"))
        if not session.has_prompts():
            raise NoPrompts("nothing to propagate: add points, a box or a mask on a frame first")
        self._check_queue(session)
        self.store.check_disk(session.owner)
        job = Job(kind="propagate", session_id=session.id, params=kwargs)
        return self.jobs.start(job, lambda p: self.propagate(session_id, progress=p, **kwargs))

    def _check_queue(self, session: Session) -> None:
        """Refuse at once work that would only wait behind a full queue (jobs check this before
        their thread starts, so the client gets the 409, not a failed job)."""
        with session.meta_lock:
            if session.work_lock.locked() and session.waiting >= self.settings.session_queue:
                raise SessionBusy(f"session {session.id} is busy ({session.busy_with}) and "
                                  f"{session.waiting} requests already wait for it",
                                  retry_after=self._retry_after(session))

    # -- outputs ---------------------------------------------------------------------------
    def _frame_scores(self, state: dict, frame_idx: int, temp: bool) -> dict[int, dict]:
        """Object score logit and predicted IoU of each object on the frame, where it has output."""
        found = []
        for obj_idx, obj_id in enumerate(state["obj_ids"]):
            out = None
            if temp:
                temp_dict = state["temp_output_dict_per_obj"][obj_idx]
                out = (temp_dict["cond_frame_outputs"].get(frame_idx)
                       or temp_dict["non_cond_frame_outputs"].get(frame_idx))
            if out is None:
                obj_dict = state["output_dict_per_obj"][obj_idx]
                out = (obj_dict["cond_frame_outputs"].get(frame_idx)
                       or obj_dict["non_cond_frame_outputs"].get(frame_idx))
            if out is not None:
                found.append((obj_id, out))
        if not found:
            return {}
        # One device->host copy for the whole frame.
        values = torch.stack([
            torch.stack([out["object_score_logits"].reshape(()).float(),
                         (out.get("iou") if out.get("iou") is not None
                          else torch.tensor(float("nan"), device=out["object_score_logits"].device)
                          ).reshape(()).float()])
            for _, out in found]).cpu().tolist()
        return {
            obj_id: {"object_score": round(score, 4),
                     "iou": None if iou != iou else round(iou, 4),
                     "visible": score > 0}
            for (obj_id, _), (score, iou) in zip(found, values, strict=True)
        }

    def _frame_result(self, session: Session, frame_idx: int, labels_map: np.ndarray,
                      frame_scores: dict) -> dict:
        return {
            "session_id": session.id,
            "frame_idx": frame_idx,
            "obj_ids": sorted(session.objects),
            "colors": {oid: obj["color"] for oid, obj in sorted(session.objects.items())},
            "mask_area": mask_ops.areas(labels_map, sorted(session.objects)),
            "scores": frame_scores,
        }

    def start_export_job(self, session_id: str, fmt: str, start_frame: int | None,
                         end_frame: int | None, polygons: bool) -> Job:
        session = self.get(session_id)
        if fmt not in exports.FORMATS:
            raise InvalidRequest(f"unknown export format {fmt!r}; use one of "
                                 f"{', '.join(exports.FORMATS)}")
        self.store.export_range(session, start_frame, end_frame)
        if not session.mask_frames:
            raise NoMasks("no masks to export yet: annotate a frame and propagate first")
        self._check_queue(session)
        self.store.check_disk(session.owner)
        job = Job(kind="export", session_id=session.id,
                  params={"format": fmt, "start_frame": start_frame, "end_frame": end_frame,
                          "polygons": polygons})

        def work(progress: Progress) -> dict:
            path = self.export(session_id, fmt, start_frame, end_frame, polygons, progress)
            return {"format": fmt, "file": path.name, "bytes": path.stat().st_size,
                    "download_url": f"/exports/{session_id}/{path.name}"}

        return self.jobs.start(job, work)

    def _owner_of(self, session_id: str) -> tuple[bool, str | None]:
        session = self.sessions.get(session_id)
        if session is not None:
            return True, session.owner
        return self.store.stored_owner(session_id)
