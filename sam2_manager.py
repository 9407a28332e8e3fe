"""Sessions and the model: prompts, propagation and exports on Meta's SAM 2 video predictor.

No web framework here: the manager raises domain exceptions that ``main.py`` maps to HTTP codes,
and the CLI drives the same manager directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import shutil
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch

import exports
import manifest
import masks as mask_ops
import recovery
from auth import LOCAL_USER, Caller
from checkpoints import ensure_checkpoint
from config import Settings
from deferred import DeferredRunner
from disk import DiskQuota, is_disk_full
from jobs import Job, JobCancelled, JobRunner, Progress, job_from_record
from layout import PARTIAL_SUFFIX, SessionFiles, is_job_id, is_session_id
from predictor import LazyFrames, build_predictor, new_inference_state, resolve_device, warm_up
from timing import STAGES
from video_io import (
    ExtractorStopped,
    FrameExtractor,
    StillImage,
    VideoInfo,
    VideoUnreadable,
    atomic_write_bytes,
    probe_upload,
    read_rgb,
    write_jpeg,
    write_png,
)
from video_io import (
    VideoSizeRefused as VideoSizeOutOfLimits,
)

logger = logging.getLogger(__name__)

Direction = Literal["forward", "backward", "both"]
MAX_OBJ_ID = 255
MAX_POINTS = 256
JOURNAL_MAX_LINES = 500  # then the journal is folded into a manifest snapshot
CLICK_WRITE_DELAY_S = 0.25  # a click's mask file is written then, or when first asked for


# ----------------------------------------------------------------------------- errors
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


# ----------------------------------------------------------------------------- session
@dataclass
class PromptRecord:
    """What the model currently holds for one object on one frame."""

    points: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    box: list[float] | None = None
    mask: bool = False  # a mask prompt (add_new_mask); excludes points and box

    def as_dict(self) -> dict:
        return {"points": self.points, "labels": self.labels, "box": self.box, "mask": self.mask}


@dataclass
class Session(SessionFiles):
    id: str = ""
    upload_path: Path = Path()
    filename: str = ""
    info: VideoInfo | None = None
    extractor: FrameExtractor | None = None
    owner: str | None = None  # id of the access key that made it (None: no keys)
    created_at: float = field(default_factory=time.time)
    last_access: float = field(default_factory=time.time)
    # Held for the whole of any model call, propagation or export on this session.
    work_lock: threading.Lock = field(default_factory=threading.Lock)
    waiting: int = 0  # requests waiting for work_lock (bounded by SAM2_SESSION_QUEUE)
    closed: bool = False  # closed (evicted, expired, deleted): work must look it up again
    # Guards the bookkeeping below, which readers snapshot while work runs.
    meta_lock: threading.RLock = field(default_factory=threading.RLock)
    state: dict | None = None
    prompts: dict[int, dict[int, PromptRecord]] = field(default_factory=dict)
    objects: dict[int, dict] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    mask_frames: set[int] = field(default_factory=set)
    scores: dict[int, dict[int, dict]] = field(default_factory=dict)
    propagations: list[dict] = field(default_factory=list)
    busy_with: str | None = None
    # Mask/overlay writes of a click still in flight: readers of that frame wait for them.
    pending_writes: dict[int, Future] = field(default_factory=dict)
    # Each write of a frame's files takes a number; a write overtaken by a later one for the
    # same frame is skipped, so nothing has to wait for an earlier write before queueing one.
    write_seq: dict[int, int] = field(default_factory=dict)
    write_locks: tuple = field(default_factory=lambda: tuple(threading.Lock() for _ in range(16)))
    manifest_write: Future | None = None   # the last manifest write (rewrite or journal line)
    journal_seq: int = 0    # the last journal line recorded (manifest.py)
    journal_lines: int = 0  # journal lines since the last snapshot
    manifest_queued: Future | None = None  # one submitted but not yet started: it will see
                                           # every change made before it starts

    def has_prompts(self) -> bool:
        return any(self.prompts.values())

    def wait_for_write(self, frame_idx: int) -> None:
        """Return once the frame's mask and overlay files are written (re-raising a failure)."""
        with self.meta_lock:
            future = self.pending_writes.get(frame_idx)
        if future is not None:
            expedite = getattr(future, "expedite", None)
            if expedite is not None:  # a click's write, not started yet: needed now
                expedite()
            try:
                future.result()  # a failed write is reported once; then the earlier file serves
            finally:
                self.forget_write(frame_idx, future)

    def forget_write(self, frame_idx: int, future: Future) -> None:
        with self.meta_lock:
            if self.pending_writes.get(frame_idx) is future:
                del self.pending_writes[frame_idx]

    def claim_write(self, frame_idx: int) -> int:
        """The number of a new write of the frame's files; earlier ones not yet done are skipped."""
        with self.meta_lock:
            seq = self.write_seq.get(frame_idx, 0) + 1
            self.write_seq[frame_idx] = seq
            return seq

    def drain_writes(self, manifest: bool = True) -> None:
        """Wait for every file write of the session still in flight (masks, overlays and, with
        ``manifest``, the manifest)."""
        with self.meta_lock:
            frames = list(self.pending_writes)
            manifest_write = self.manifest_write if manifest else None
        for frame_idx in frames:
            self.wait_for_write(frame_idx)
        if manifest_write is not None:
            manifest_write.result()


def _free_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- manager
MAX_RETRY_S = 600.0


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


class SAM2Manager:
    """Owns the predictor and every open session."""

    def __init__(self, settings: Settings, predictor: Any = None):
        self.settings = settings
        self.sessions: dict[str, Session] = {}
        # Guards `sessions`, `_reserved` and `_transit`: the open-session count is exact.
        self._sessions_lock = threading.Lock()
        self._reserved: set[str] = set()  # uploads and reopenings under way: they hold a slot
        self._transit: dict[str, threading.Event] = {}  # sessions being opened or closed
        self.predictor = predictor
        self.model_status = "ready" if predictor is not None else "not_loaded"
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
        self.jobs = JobRunner(on_change=self._save_job)
        self.jobs.stop_event = self.stopping
        self.disk = DiskQuota((settings.upload_dir, settings.output_dir), settings.max_disk_bytes)
        self._writer = ThreadPoolExecutor(settings.writer_workers, thread_name_prefix="writer")
        self._prefetcher = ThreadPoolExecutor(settings.prefetch_workers,
                                              thread_name_prefix="prefetch")
        # One thread: manifest writes land in the order they were asked for.
        self._manifest_writer = ThreadPoolExecutor(1, thread_name_prefix="manifest")
        self._click_writes = DeferredRunner(CLICK_WRITE_DELAY_S, name="click-writes")
        settings.upload_dir.mkdir(parents=True, exist_ok=True)
        settings.output_dir.mkdir(parents=True, exist_ok=True)

    def recover(self) -> dict:
        """Clean up after a process that died (call before serving): see ``recovery.sweep``."""
        t0 = time.perf_counter()
        counts = recovery.sweep(self.settings.upload_dir, self.settings.output_dir,
                                self.settings.checkpoint_dir / f"{self.settings.checkpoint_filename}.*.part")
        if any(counts.values()):
            logger.info("recovered the folders in %.2fs: %s", time.perf_counter() - t0, counts)
        return counts

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
            batch = s.batch_objects == "on" or (s.batch_objects == "auto"
                                                and device.type == "cuda")
            self.predictor = build_predictor(
                s.model_config_file, path, device, s.image_size, s.fill_hole_area, batch)
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
            "warm_up_s": self.warm_up_s,
            "load_failures": self.load_failures,
            "next_retry_in_s": self._retry_in(),
            "sessions": len(self.sessions),
            "max_sessions": s.max_sessions,
        }

    def _retry_in(self) -> float | None:
        at = self.next_retry_at
        return None if at is None else round(max(0.0, at - time.time()), 1)

    def _require_model(self):
        if not self.ready:
            if self.model_status == "error" and self.settings.checkpoint_path.is_file():
                self._retry_now.set()  # the file was put in place: try again now, not later
            raise ModelNotReady(
                f"the model is not usable yet ({self.model_status}"
                + (f": {self.model_detail}" if self.model_detail else "")
                + "); see GET /health", retry_after=self._retry_in() or 5)
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

    def check_accepting(self, owner: str | None = None, incoming_bytes: int = 0) -> None:
        """Refuse new work the server cannot take: a failed model or no room on disk."""
        if self.model_status == "error":
            self._require_model()
        if self.stopping.is_set():
            raise ModelNotReady("the server is shutting down", retry_after=10)
        self.check_disk(owner, incoming_bytes)

    def check_disk(self, owner: str | None, incoming_bytes: int = 0) -> None:
        room = self.disk.room(incoming_bytes)
        if room is None or room >= 0:
            return
        usage = self.disk.usage()
        limit = self.disk.limit or 0
        mine = sorted(((size, sid) for sid, size in usage.per_session.items()
                       if is_session_id(sid) and self._stored_owner(sid)[1] == owner),
                      reverse=True)[:5]
        advice = ", ".join(f"{sid} ({size / 2**20:.0f} MiB)" for size, sid in mine)
        raise DiskFull(
            f"the server's folders hold {usage.total / 2**30:.2f} GiB of the "
            f"{limit / 2**30:.2f} GiB allowed (SAM2_MAX_DISK_GB)"
            + (f"; {incoming_bytes / 2**20:.0f} MiB more do not fit" if incoming_bytes else "")
            + ". Delete sessions you no longer need with DELETE /session/{id}"
            + (f"; your largest: {advice}" if advice else ""))

    def upload_path_for(self, session_id: str, filename: str | None) -> Path:
        suffix = Path(filename or "").suffix.lower()
        if not (suffix[1:].isalnum() and 1 < len(suffix) <= 6):
            suffix = ".bin"
        folder = self.settings.upload_dir / session_id
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"video{suffix}"

    @staticmethod
    def partial_path(path: Path) -> Path:
        """Where an upload is written while it arrives (removed at start-up if never finished)."""
        return path.with_name(path.name + PARTIAL_SUFFIX)

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

    def _finish_close(self, session: Session, delete_files: bool) -> None:
        """Free a session taken out of ``sessions`` (its work lock held); files stay or go."""
        try:
            try:
                session.drain_writes()
                if session.journal_lines and not delete_files:
                    self._save_manifest(session)  # closed sessions keep a snapshot only
            except Exception:  # e.g. a full disk: what could not be written is not listed
                logger.exception("session %s: writes failed while closing", session.id)
            session.extractor.stop()
            session.state = None
            shutil.rmtree(session.state_dir, ignore_errors=True)
            if delete_files:
                shutil.rmtree(session.dir, ignore_errors=True)
                shutil.rmtree(session.upload_path.parent, ignore_errors=True)
            else:
                session.open_marker.unlink(missing_ok=True)  # closed cleanly
        finally:
            with self._sessions_lock:
                event = self._transit.pop(session.id, None)
            if event is not None:
                event.set()
            _free_device_memory()

    def create_session(self, session_id: str, video_path: Path, filename: str,
                       owner: str | None = None, fps: str | None = None) -> Session:
        """Probe the stored upload (a video, or a ZIP of frames played at ``fps``), start
        writing its frames, return once frame 0 is on disk."""
        s = self.settings
        with self._sessions_lock:
            reserved = session_id in self._reserved
        if not reserved:
            self.reserve(session_id)
        session_dir = s.output_dir / session_id
        try:
            try:
                info = probe_upload(video_path, fps, max_frames=s.max_frames,
                                    max_pixels=s.max_video_pixels, min_side=s.min_video_side)
            except StillImage as exc:
                raise NotAVideo(f"{exc}; upload a video file (mp4, mov, webm, mkv, avi...)") \
                    from exc
            except VideoSizeOutOfLimits as exc:
                raise VideoSizeRefused(str(exc)) from exc
            for sub in ("frames", "masks", "overlays"):
                (session_dir / sub).mkdir(parents=True, exist_ok=True)
            extractor = FrameExtractor(video_path, session_dir / "frames", info, s.jpeg_quality,
                                       s.max_video_pixels)
            extractor.start()
            try:
                extractor.wait_for(0, s.frame_wait_timeout_s)
            except (RuntimeError, TimeoutError) as exc:
                extractor.stop()
                raise VideoUnreadable(f"the first frame cannot be decoded ({exc})") from exc
            session = Session(dir=session_dir, id=session_id, upload_path=video_path,
                              filename=Path(filename or "video").name, info=info,
                              extractor=extractor, owner=owner)
            session.open_marker.touch()
            atomic_write_bytes(session.info_path, json.dumps(self._info(session)).encode())
            self._save_manifest(session)
        except BaseException as exc:
            self.release(session_id)
            shutil.rmtree(session_dir, ignore_errors=True)
            shutil.rmtree(video_path.parent, ignore_errors=True)
            if isinstance(exc, VideoUnreadable):
                raise VideoInvalid(f"{exc}; upload a video file FFmpeg can decode (mp4, mov, "
                                   f"webm, mkv, avi...) or a ZIP of JPEG/PNG frames") from exc
            if is_disk_full(exc):
                raise DiskFull("the disk is full: the upload could not be stored") from exc
            raise
        with self._sessions_lock:
            self._reserved.discard(session_id)
            self.sessions[session_id] = session
        logger.info("session %s: %s, %d frames %dx%d @ %.3f fps", session_id, session.filename,
                    info.num_frames, info.width, info.height, float(info.fps))
        return session

    @staticmethod
    def _info(session: Session) -> dict:
        return {"session_id": session.id, "filename": session.filename, "owner": session.owner,
                "created_at": session.created_at, "num_frames": session.info.num_frames,
                "width": session.info.width, "height": session.info.height}

    def _stored_owner(self, session_id: str) -> tuple[bool, str | None]:
        """(whether the session exists on disk, the key id that owns it), without opening it."""
        files = SessionFiles(self.settings.output_dir / session_id)
        for path in (files.info_path, files.manifest_path):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict):
                return True, data.get("owner")
        return False, None

    def get(self, session_id: str, caller: Caller = LOCAL_USER) -> Session:
        """An open session, reopened from disk if needed; 404 for a session the caller may not
        see, exactly as for one that does not exist."""
        if not is_session_id(session_id):
            raise SessionNotFound(f"no session {session_id}; upload a video to start one")
        session = self.sessions.get(session_id)
        if session is None:
            exists, owner = self._stored_owner(session_id)
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

    def list_sessions(self, caller: Caller = LOCAL_USER) -> list[dict]:
        """The caller's sessions, open or on disk, newest first."""
        found: dict[str, dict] = {}
        for session in list(self.sessions.values()):
            if caller.may_access(session.owner):
                found[session.id] = self._info(session) | {
                    "open": True, "busy_with": session.busy_with,
                    "last_access": session.last_access}
        for folder in self.settings.output_dir.iterdir():
            if folder.name in found or not is_session_id(folder.name):
                continue
            try:
                info = json.loads(SessionFiles(folder).info_path.read_text())
            except (OSError, ValueError):
                continue
            if caller.may_access(info.get("owner")):
                found[folder.name] = info | {"open": False, "busy_with": None,
                                             "last_access": None}
        return sorted(found.values(), key=lambda i: i.get("created_at") or 0, reverse=True)

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
            session = self._restore(session_id)
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

    def _write_later(self, session: Session, frame_idx: int, labels_map: np.ndarray) -> None:
        """Write a clicked frame's mask off the request path, a moment later (a burst of clicks
        does not share the CPU with it) or as soon as a reader needs it; readers wait for it."""
        def write() -> bool:
            try:
                return self._write_frame(session, frame_idx, labels_map, seq)
            except BaseException:
                # Not written (a full disk): the frame stays listed only if an earlier mask
                # file is still there, intact; readers of this write get the error.
                with session.meta_lock:
                    if not session.mask_path(frame_idx).is_file():
                        session.mask_frames.discard(frame_idx)
                raise

        with session.meta_lock:
            seq = session.claim_write(frame_idx)
            session.pending_writes[frame_idx] = self._click_writes.submit(write)

    def _restore(self, session_id: str) -> Session | None:
        """Rebuild a session closed by a restart, idle expiry or eviction from its folder."""
        files = SessionFiles(self.settings.output_dir / session_id)
        try:
            if files.open_marker.exists():
                recovery.reconcile(files)  # the process that had it open died
            data = manifest.read(files)
            v = data["video"]
            info = VideoInfo(num_frames=v["num_frames"], width=v["width"], height=v["height"],
                             fps=Fraction(v["fps_rational"]), codec=v["codec"],
                             container=v["container"], rotation=v["rotation"])
            upload = self.settings.upload_dir / session_id / data.get("upload", "video.bin")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("session %s cannot be restored: %s", session_id, exc)
            return None
        extractor = FrameExtractor(upload, files.frames_dir, info, self.settings.jpeg_quality,
                                   self.settings.max_video_pixels)
        if v.get("frames_decoded") == info.num_frames and files.frame_file(
                info.num_frames - 1).is_file():
            extractor.mark_complete()
        elif upload.is_file():
            extractor.start()
        else:
            logger.warning("session %s: frames incomplete and upload missing", session_id)
            return None
        session = Session(dir=files.dir, id=session_id, upload_path=upload,
                          filename=data.get("filename", upload.name), info=info,
                          extractor=extractor, owner=data.get("owner"),
                          created_at=data.get("created_at", time.time()),
                          journal_seq=data.get("journal_seq", 0))
        for oid, per_frame in data.get("current_prompts", {}).items():
            session.prompts[int(oid)] = {int(f): PromptRecord(**rec)
                                         for f, rec in per_frame.items()}
        session.objects = {o["obj_id"]: {"obj_id": o["obj_id"], "color": o["color"]}
                           for o in data.get("objects", [])}
        session.history = list(data.get("prompts", []))
        session.mask_frames = {f for f in data.get("mask_frames", [])
                               if session.mask_path(f).is_file()}
        session.scores = {int(f): {int(o): sc for o, sc in per.items()}
                          for f, per in data.get("scores", {}).items()}
        session.propagations = list(data.get("propagations", []))
        if not files.info_path.is_file():  # made before info.json existed
            atomic_write_bytes(files.info_path, json.dumps(self._info(session)).encode())
        files.open_marker.touch()
        logger.info("session %s reopened from its folder", session_id)
        return session

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
        self._click_writes.shutdown()
        self._writer.shutdown(wait=True)
        self._manifest_writer.shutdown(wait=True)
        self._prefetcher.shutdown(wait=True, cancel_futures=True)
        self.predictor = None
        _free_device_memory()

    # -- frames ----------------------------------------------------------------------------
    def check_frame(self, session: Session, frame_idx: int, field: str | None = None) -> None:
        """404 for a frame named in the URL; 422 (``field`` named) for one in a request body."""
        n = session.info.num_frames
        if not 0 <= frame_idx < n:
            if field is None:
                raise FrameOutOfRange(f"frame {frame_idx} is out of range: the video has frames "
                                      f"0..{n - 1}")
            raise InvalidRequest(f"{field} {frame_idx} is out of range: the video has frames "
                                 f"0..{n - 1}")

    def _existing_frame(self, session: Session, path: Path, frame_idx: int) -> Path:
        if not path.is_file():
            self._raise_gone(session, frame_idx, "file")
        return path

    def _raise_gone(self, session: Session, frame_idx: int, what: str) -> None:
        if not session.dir.is_dir():  # deleted while the request ran
            raise SessionNotFound(f"no session {session.id}; it was deleted")
        raise FileMissing(f"the {what} of frame {frame_idx} is missing on the server; for a mask "
                          f"or an overlay, ask again or propagate over the frame again; for a "
                          f"frame, upload the video again")

    async def read_file(self, session: Session, path: Path, frame_idx: int, what: str) -> bytes:
        """The bytes of one of the session's files, read at once: a file removed meanwhile (a
        reset, a deleted session) is a 404 or 409, never a response cut short."""
        try:
            return await asyncio.get_running_loop().run_in_executor(None, path.read_bytes)
        except FileNotFoundError:
            self._raise_gone(session, frame_idx, what)
            raise

    def frame_path(self, session: Session, frame_idx: int) -> Path:
        """Path of the frame's JPEG, waiting while the background decoder gets there."""
        self.check_frame(session, frame_idx)
        timeout = self.settings.frame_wait_timeout_s
        try:
            try:
                path = session.extractor.wait_for(frame_idx, timeout)
            except ExtractorStopped:  # closed meanwhile: it reopens, or is gone (404)
                session = self.get(session.id)
                path = session.extractor.wait_for(frame_idx, timeout)
        except TimeoutError as exc:
            raise FrameNotReady(f"{exc}; try again shortly", retry_after=2) from exc
        except (RuntimeError, ExtractorStopped) as exc:
            raise VideoInvalid(str(exc)) from exc
        return self._existing_frame(session, path, frame_idx)

    async def frame_file(self, session: Session, frame_idx: int) -> Path:
        """``frame_path`` for a request handler: waits for the decoder without a thread."""
        self.check_frame(session, frame_idx)
        timeout = self.settings.frame_wait_timeout_s
        try:
            try:
                path = await session.extractor.wait_for_async(frame_idx, timeout)
            except ExtractorStopped:  # closed meanwhile: it reopens, or is gone (404)
                session = await asyncio.get_running_loop().run_in_executor(
                    None, self.get, session.id)
                path = await session.extractor.wait_for_async(frame_idx, timeout)
        except TimeoutError as exc:
            raise FrameNotReady(f"{exc}; try again shortly", retry_after=2) from exc
        except (RuntimeError, ExtractorStopped) as exc:
            raise VideoInvalid(str(exc)) from exc
        return self._existing_frame(session, path, frame_idx)

    async def _await_write(self, session: Session, frame_idx: int) -> None:
        with session.meta_lock:
            future = session.pending_writes.get(frame_idx)
        if future is not None:
            expedite = getattr(future, "expedite", None)
            if expedite is not None:  # a click's write, not started yet: needed now
                expedite()
            try:
                await asyncio.wrap_future(future)
            finally:
                session.forget_write(frame_idx, future)

    def _listed_mask(self, session: Session, frame_idx: int) -> Path | None:
        """The frame's mask file if it has one; a listed mask whose file is gone is unlisted
        (409 this time, so the client learns why it disappeared)."""
        with session.meta_lock:
            if frame_idx not in session.mask_frames:
                return None
        path = session.mask_path(frame_idx)
        if path.is_file():
            return path
        with session.meta_lock:
            session.mask_frames.discard(frame_idx)
            session.scores.pop(frame_idx, None)
        self._save_manifest(session, wait=False)
        raise FileMissing(f"the mask file of frame {frame_idx} is missing on the server; annotate "
                          f"the frame or propagate over it again to rebuild it")

    async def mask_file(self, session: Session, frame_idx: int) -> Path:
        self.check_frame(session, frame_idx)
        await self._await_write(session, frame_idx)
        path = self._listed_mask(session, frame_idx)
        if path is None:
            raise MaskNotFound(f"frame {frame_idx} has no mask yet: annotate it or propagate "
                               f"over it first")
        return path

    async def overlay_file(self, session: Session, frame_idx: int) -> Path:
        """The frame with its masks drawn; the plain frame if it has none. Overlays are made
        on their first read and kept until the mask changes."""
        self.check_frame(session, frame_idx)
        await self._await_write(session, frame_idx)
        if self._listed_mask(session, frame_idx) is None:
            return await self.frame_file(session, frame_idx)
        path = session.overlay_path(frame_idx)
        if not path.is_file():
            await self.frame_file(session, frame_idx)
            await asyncio.get_running_loop().run_in_executor(
                self._writer, self._cached_overlay, session, frame_idx)
        return path

    def _overlay_of(self, session: Session, frame_idx: int) -> np.ndarray:
        return mask_ops.overlay(self.frame_rgb(session, frame_idx),
                                self.read_label_map(session, frame_idx))

    def _cached_overlay(self, session: Session, frame_idx: int) -> None:
        """Write the frame's overlay file if it is missing. Under the frame's write lock: a
        mask written meanwhile removes the overlay after this, never before."""
        with session.write_locks[frame_idx % len(session.write_locks)]:
            path = session.overlay_path(frame_idx)
            if not path.is_file():
                with STAGES("overlay"):
                    write_jpeg(path, self._overlay_of(session, frame_idx),
                               self.settings.jpeg_quality)

    def overlay_rgb(self, session: Session, frame_idx: int) -> np.ndarray:
        """The overlay as RGB for exports, through its JPEG file (made now if missing, or
        remade if damaged), so an export is the same whenever the overlay was made."""
        for _ in range(2):
            self._cached_overlay(session, frame_idx)
            try:
                return read_rgb(session.overlay_path(frame_idx))
            except OSError:
                session.overlay_path(frame_idx).unlink(missing_ok=True)
        raise FileMissing(f"the overlay of frame {frame_idx} cannot be made; see the server log")

    def overlay_path(self, session: Session, frame_idx: int) -> Path:
        self.check_frame(session, frame_idx)
        session.wait_for_write(frame_idx)
        if self._listed_mask(session, frame_idx) is None:
            return self.frame_path(session, frame_idx)
        self._cached_overlay(session, frame_idx)
        return session.overlay_path(frame_idx)

    def mask_path(self, session: Session, frame_idx: int) -> Path:
        self.check_frame(session, frame_idx)
        session.wait_for_write(frame_idx)
        path = self._listed_mask(session, frame_idx)
        if path is None:
            raise MaskNotFound(f"frame {frame_idx} has no mask yet: annotate it or propagate "
                               f"over it first")
        return path

    def _state(self, session: Session) -> dict:
        predictor = self._require_model()
        if session.state is None:
            fast = self.settings.frame_resize == "device" or (
                self.settings.frame_resize == "auto" and predictor.device.type == "cuda")
            images = LazyFrames(session.info.num_frames, predictor.image_size,
                                lambda i: self.frame_path(session, i), self._prefetcher,
                                resize_on=predictor.device if fast else None)
            shutil.rmtree(session.state_dir, ignore_errors=True)
            state = new_inference_state(
                predictor, images, session.info.height, session.info.width,
                spill_dir=session.state_dir, state_window=self.settings.state_window)
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
        self.check_frame(session, frame_idx, "frame_idx")
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
                self._write_later(session, frame_idx, labels_map)
                self._journal(session, [
                    ["set", ["current_prompts", str(obj_id), str(frame_idx)], record.as_dict()],
                    ["object", obj], ["add", "mask_frames", frame_idx],
                    ["set", ["scores", str(frame_idx)], self._scores_json(frame_scores)],
                    ["append", "prompts", entry]])
        return self._frame_result(session, frame_idx, labels_map, frame_scores)

    def clear_prompts(self, session_id: str, obj_id: int, frame_idx: int) -> dict:
        """Remove one object's prompts on one frame (removing the object if none remain)."""
        session = self.get(session_id)
        self.check_frame(session, frame_idx, "frame_idx")
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
            self._write_later(session, frame_idx, labels_map)
            with session.meta_lock:
                del session.prompts[obj_id][frame_idx]
                session.scores[frame_idx] = frame_scores
                entry = {"seq": len(session.history) + 1, "action": "clear",
                         "frame_idx": frame_idx, "obj_id": obj_id, "at": time.time()}
                session.history.append(entry)
                self._journal(session, [
                    ["del", ["current_prompts", str(obj_id), str(frame_idx)]],
                    ["set", ["scores", str(frame_idx)], self._scores_json(frame_scores)],
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
        self._run_writes(session, frames, lambda f: self._erase_object(session, f, obj_id))
        self._save_manifest(session)
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
            self._save_manifest(session)
        _free_device_memory()
        return {"session_id": session.id, "reset": True, "masks_deleted": len(frames)}

    # -- propagation -----------------------------------------------------------------------
    def plan_propagation(self, session: Session, start_frame: int, end_frame: int | None,
                         direction: Direction | None, max_frames: int | None
                         ) -> list[tuple[bool, int, int]]:
        """Validate a propagation request; return passes as (reverse, first, last) frames."""
        n = session.info.num_frames
        self.check_frame(session, start_frame, "start_frame")
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
            self.check_disk(session.owner)
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
            self._save_manifest(session, wait=False)
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
                            pending.append(self._queue_tracked_write(session, frame_idx,
                                                                     labels_map, scores))
                            while len(pending) > 2 * self.settings.writer_workers + 2:
                                pending.popleft().result()
                            written.append(frame_idx)
                            with session.meta_lock:
                                record["passes"][-1]["last"] = frame_idx
                            self.counters["frames_propagated"] += 1
                            self.check_disk(session.owner)  # a cached figure: cheap
                            if time.perf_counter() - last_save > 5:
                                last_save = time.perf_counter()
                                self._save_manifest(session, wait=False)
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
        self._save_manifest(session)
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
        self.check_disk(session.owner)
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

    def _write_frame(self, session: Session, frame_idx: int, labels_map: np.ndarray,
                     seq: int | None = None) -> bool:
        """Write the frame's mask, unless a later write (``seq``) overtook this one. Its
        overlay, now stale, goes: it is drawn again on its next read (``overlay_file``)."""
        with session.write_locks[frame_idx % len(session.write_locks)]:
            if seq is not None and session.write_seq.get(frame_idx) != seq:
                return False
            session.overlay_path(frame_idx).unlink(missing_ok=True)
            with STAGES("mask_png"):
                write_png(session.mask_path(frame_idx), labels_map)
            return True

    def _queue_tracked_write(self, session: Session, frame_idx: int, labels_map: np.ndarray,
                             scores: dict) -> Future:
        """Write a tracked frame's mask on a writer thread. Until it lands, readers of that
        frame wait for it (a progress event may name the frame before its file exists)."""
        with session.meta_lock:
            future = self._writer.submit(self._write_and_record, session, frame_idx,
                                         labels_map, scores, session.claim_write(frame_idx))
            session.pending_writes[frame_idx] = future
        # Written and listed: nothing left to wait for (a failure ends the propagation itself).
        future.add_done_callback(lambda done: session.forget_write(frame_idx, done))
        return future

    def _write_and_record(self, session: Session, frame_idx: int, labels_map: np.ndarray,
                          scores: dict, seq: int) -> None:
        # Recorded only once its files exist, so a reader never gets a listed but missing mask.
        if not self._write_frame(session, frame_idx, labels_map, seq):
            return  # a later pass writes and records this frame
        with session.meta_lock:
            session.mask_frames.add(frame_idx)
            session.scores[frame_idx] = scores

    def _erase_object(self, session: Session, frame_idx: int, obj_id: int) -> None:
        labels_map = cv2.imread(str(session.mask_path(frame_idx)), cv2.IMREAD_UNCHANGED)
        if labels_map is None or not (labels_map == obj_id).any():
            return
        labels_map[labels_map == obj_id] = 0
        self._write_frame(session, frame_idx, labels_map, session.claim_write(frame_idx))

    def _run_writes(self, session: Session, frames: list[int], fn) -> None:
        for fut in [self._writer.submit(fn, f) for f in frames]:
            fut.result()

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

    def read_label_map(self, session: Session, frame_idx: int) -> np.ndarray:
        labels_map = cv2.imread(str(session.mask_path(frame_idx)), cv2.IMREAD_UNCHANGED)
        if labels_map is None or labels_map.shape != (session.info.height, session.info.width):
            raise FileMissing(f"the mask file of frame {frame_idx} is missing or damaged on the "
                              f"server; annotate the frame or propagate over it again")
        return labels_map

    def frame_rgb(self, session: Session, frame_idx: int) -> np.ndarray:
        try:
            return read_rgb(self.frame_path(session, frame_idx))
        except OSError as exc:
            if is_disk_full(exc):
                raise
            raise FileMissing(f"the file of frame {frame_idx} is damaged on the server; upload "
                              f"the video again to rebuild the session") from exc

    def export_range(self, session: Session, start_frame: int | None,
                     end_frame: int | None) -> tuple[int, int]:
        n = session.info.num_frames
        first = 0 if start_frame is None else start_frame
        last = n - 1 if end_frame is None else min(end_frame, n - 1)
        self.check_frame(session, first, "start_frame")
        if last < first:
            raise InvalidRequest(f"end_frame {end_frame} is before start_frame {first}")
        return first, last

    def export(self, session_id: str, fmt: str = "overlay_mp4", start_frame: int | None = None,
               end_frame: int | None = None, polygons: bool = False,
               progress: Progress | None = None) -> Path:
        """Write an export of the session over a frame range; return its path."""
        session = self.get(session_id)
        if fmt not in exports.FORMATS:
            raise InvalidRequest(f"unknown export format {fmt!r}; use one of "
                                 f"{', '.join(exports.FORMATS)}")
        first, last = self.export_range(session, start_frame, end_frame)
        progress = progress or Progress(stop_event=self.stopping)
        with self._working(session, "export") as session:
            self.check_disk(session.owner)
            with session.meta_lock:
                mask_frames = set(session.mask_frames)
                scores = {f: dict(v) for f, v in session.scores.items()}
                objects = dict(session.objects)
            if not mask_frames:
                raise NoMasks("no masks to export yet: annotate a frame and propagate first")
            whole = (first, last) == (0, session.info.num_frames - 1)
            if fmt == "overlay_mp4" and whole:
                out = session.export_path  # the seed's outputs/{id}/output_video.mp4
            else:
                session.exports_dir.mkdir(exist_ok=True)
                ext = exports.FORMATS[fmt].extension
                out = session.exports_dir / f"{fmt}_{first:05d}-{last:05d}.{ext}"
            src = exports.ExportSource(
                first=first, last=last, width=session.info.width, height=session.info.height,
                fps=session.info.fps, mask_frames=mask_frames,
                frame_rgb=lambda f: self.frame_rgb(session, f),
                overlay_rgb=lambda f: self.overlay_rgb(session, f),
                label_map=lambda f: self.read_label_map(session, f),
                objects=objects, scores=scores,
                report=lambda f, done, total: self._export_progress(session, progress, f, done,
                                                                    total))
            exports.write_export(fmt, out, src, polygons=polygons)
        return out

    def _export_progress(self, session: Session, progress: Progress, frame_idx: int, done: int,
                         total: int) -> None:
        self.check_disk(session.owner)  # a cached figure: cheap
        progress.update(frame_idx, done, total)

    def export_file(self, session_id: str, name: str) -> Path:
        """A file written by an earlier export of the session, by its bare name."""
        session = self.get(session_id)
        candidates = {session.export_path.name: session.export_path}
        if session.exports_dir.is_dir():
            candidates |= {p.name: p for p in session.exports_dir.iterdir()
                           if p.is_file() and not p.name.startswith(".")}
        path = candidates.get(name)
        if path is None:
            raise ExportNotFound(f"no export named {name!r} in session {session.id}")
        return path

    def start_export_job(self, session_id: str, fmt: str, start_frame: int | None,
                         end_frame: int | None, polygons: bool) -> Job:
        session = self.get(session_id)
        if fmt not in exports.FORMATS:
            raise InvalidRequest(f"unknown export format {fmt!r}; use one of "
                                 f"{', '.join(exports.FORMATS)}")
        self.export_range(session, start_frame, end_frame)
        if not session.mask_frames:
            raise NoMasks("no masks to export yet: annotate a frame and propagate first")
        self._check_queue(session)
        self.check_disk(session.owner)
        job = Job(kind="export", session_id=session.id,
                  params={"format": fmt, "start_frame": start_frame, "end_frame": end_frame,
                          "polygons": polygons})

        def work(progress: Progress) -> dict:
            path = self.export(session_id, fmt, start_frame, end_frame, polygons, progress)
            return {"format": fmt, "file": path.name, "bytes": path.stat().st_size,
                    "download_url": f"/exports/{session_id}/{path.name}"}

        return self.jobs.start(job, work)

    # -- jobs ------------------------------------------------------------------------------
    def _save_job(self, job: Job) -> None:
        """Keep the job's record with its session (``jobs/{id}.json``), to outlive the process."""
        files = SessionFiles(self.settings.output_dir / job.session_id)
        try:
            files.jobs_dir.mkdir(exist_ok=True)
            atomic_write_bytes(files.job_path(job.id),
                               json.dumps(job.record(), default=str).encode())
        except FileNotFoundError:  # the session was deleted meanwhile
            pass

    def _owner_of(self, session_id: str) -> tuple[bool, str | None]:
        session = self.sessions.get(session_id)
        if session is not None:
            return True, session.owner
        return self._stored_owner(session_id)

    def find_job(self, job_id: str, caller: Caller = LOCAL_USER) -> Job:
        """A job of this process, or one recorded on disk by an earlier one (which then reads
        ``interrupted`` if it never finished); 404 for a job of a session the caller cannot see."""
        job = self.jobs.get(job_id)
        if job is None and is_job_id(job_id):
            for path in self.settings.output_dir.glob(f"*/jobs/{job_id}.json"):
                try:
                    job = job_from_record(json.loads(path.read_text()))
                except (OSError, ValueError, KeyError, TypeError):
                    continue
                break
        if job is not None:
            exists, owner = self._owner_of(job.session_id)
            if not (exists and caller.may_access(owner)):
                job = None
        if job is None:
            raise JobNotFound(f"no job {job_id}")
        return job

    # -- manifest --------------------------------------------------------------------------
    def describe(self, session_id: str) -> dict:
        """What the manifest holds (once any write in flight has landed, so the two agree)."""
        session = self.get(session_id)
        session.drain_writes()
        return self._manifest(session)

    def _manifest(self, session: Session) -> dict:
        with session.meta_lock:
            return {
                "session_id": session.id,
                "filename": session.filename,
                "owner": session.owner,
                "upload": session.upload_path.name,
                "created_at": session.created_at,
                "last_access": session.last_access,
                "busy_with": session.busy_with,
                "video": session.info.as_dict() | {
                    "frames_decoded": session.extractor.written,
                    "frames_padded": session.extractor.padded,
                },
                "model": {"name": self.settings.model, "image_size": self.predictor.image_size
                          if self.predictor is not None else self.settings.image_size},
                "objects": [
                    obj | {"prompted_frames": sorted(session.prompts.get(oid, {}))}
                    for oid, obj in sorted(session.objects.items())
                ],
                "prompts": [dict(h) for h in session.history],
                "current_prompts": {
                    str(oid): {str(f): rec.as_dict() for f, rec in sorted(per_frame.items())}
                    for oid, per_frame in sorted(session.prompts.items())
                },
                "mask_frames": sorted(session.mask_frames),
                "num_mask_frames": len(session.mask_frames),
                "scores": {str(f): {str(o): v for o, v in per.items()}
                           for f, per in sorted(session.scores.items())},
                "propagations": [p | {"passes": [dict(x) for x in p.get("passes", [])]}
                                 for p in session.propagations],
                "journal_seq": session.journal_seq,
            }

    @staticmethod
    def _scores_json(frame_scores: dict) -> dict:
        return {str(o): v for o, v in frame_scores.items()}

    def _journal(self, session: Session, ops: list) -> None:
        """Record a small change (a click) as one journal line instead of a rewrite of the whole
        manifest, whose size grows with the tracked frames; call with ``meta_lock`` held, right
        after the change, so a snapshot holds either both or neither. A long journal is folded
        into a snapshot."""
        with session.meta_lock:
            session.journal_seq += 1
            session.journal_lines += 1
            if session.journal_lines > JOURNAL_MAX_LINES:
                self._save_manifest(session, wait=False)
                return
            session.manifest_write = self._manifest_writer.submit(
                self._append_journal, session, session.journal_seq, ops)

    def _append_journal(self, session: Session, seq: int, ops: list) -> None:
        try:
            with STAGES("manifest"):
                manifest.append(session, seq, ops)
        except OSError:
            logger.exception("session %s: the journal could not be written", session.id)
            raise

    def _save_manifest(self, session: Session, wait: bool = True) -> None:
        """Rewrite the manifest snapshot (and drop the journal it then holds); a caller that
        does not need it on disk does not wait.

        Rewrites coalesce: while one is queued and not yet started, it will take in this change
        too, so a burst of changes costs one rewrite, not one each.
        """
        with session.meta_lock:
            future = session.manifest_queued
            if future is None:
                future = self._manifest_writer.submit(self._write_manifest, session)
                session.manifest_queued = session.manifest_write = future
        if wait:
            future.result()

    def _write_manifest(self, session: Session) -> None:
        with session.meta_lock:
            session.manifest_queued = None  # a change from now on queues another rewrite
            session.journal_lines = 0
            data = self._manifest(session)
        try:
            with STAGES("manifest"):
                manifest.write_snapshot(session, data)
        except OSError:  # nobody may wait on this write: say it here too
            logger.exception("session %s: the manifest could not be written", session.id)
            raise
