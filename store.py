"""Sessions on disk: their folders, manifests, frames, masks, overlays, exports and job records.

Needs no model: the engine writes what it computes through the store, and anything that only
reads a session (a request for a frame, a mask, an overlay, the manifest, an export) asks the
store, in whatever process serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

import exports
import manifest
import masks as mask_ops
import recovery
from auth import LOCAL_USER, Caller
from config import Settings
from deferred import DeferredRunner
from disk import DiskQuota, is_disk_full
from errors import (
    DiskFull,
    ExportNotFound,
    FileMissing,
    FrameNotReady,
    FrameOutOfRange,
    InvalidRequest,
    MaskNotFound,
    NotAVideo,
    SessionNotFound,
    VideoInvalid,
    VideoSizeRefused,
)
from jobs import Job, Progress, job_from_record
from layout import PARTIAL_SUFFIX, SessionFiles, is_job_id, is_session_id
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

JOURNAL_MAX_LINES = 500  # then the journal is folded into a manifest snapshot
CLICK_WRITE_DELAY_S = 0.25  # a click's mask file is written then, or when first asked for


def video_info_of(video: dict) -> VideoInfo:
    """The video's description as the manifest keeps it."""
    return VideoInfo(num_frames=video["num_frames"], width=video["width"], height=video["height"],
                     fps=Fraction(video["fps_rational"]), codec=video["codec"],
                     container=video["container"], rotation=video["rotation"])


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

    def needed_write(self, frame_idx: int) -> Future | None:
        """The frame's write still in flight, if any, started now if it was waiting."""
        with self.meta_lock:
            future = self.pending_writes.get(frame_idx)
        expedite = getattr(future, "expedite", None)
        if expedite is not None:  # a click's write, not started yet: needed now
            expedite()
        return future

    def wait_for_write(self, frame_idx: int) -> None:
        """Return once the frame's mask and overlay files are written (re-raising a failure)."""
        future = self.needed_write(frame_idx)
        if future is not None:
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


class SessionStore:
    """The sessions' folders under SAM2_OUTPUT_DIR and SAM2_UPLOAD_DIR, and the file writes.

    ``reopen`` (set by the engine) gives a session that was closed meanwhile back, open; the
    store alone can only read one from its folder.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.disk = DiskQuota((settings.upload_dir, settings.output_dir), settings.max_disk_bytes)
        self._writer = ThreadPoolExecutor(settings.writer_workers, thread_name_prefix="writer")
        # One thread: manifest writes land in the order they were asked for.
        self._manifest_writer = ThreadPoolExecutor(1, thread_name_prefix="manifest")
        self._click_writes = DeferredRunner(CLICK_WRITE_DELAY_S, name="click-writes")
        self.model_image_size: int | None = None  # told by the engine, for the manifest
        self.reopen: Callable[[str], Session] = self.load_or_raise
        settings.upload_dir.mkdir(parents=True, exist_ok=True)
        settings.output_dir.mkdir(parents=True, exist_ok=True)

    def shutdown(self) -> None:
        self._click_writes.shutdown()
        self._writer.shutdown(wait=True)
        self._manifest_writer.shutdown(wait=True)

    # -- sessions ------------------------------------------------------------------------
    def create(self, session_id: str, video_path: Path, filename: str,
               owner: str | None = None, fps: str | None = None) -> Session:
        """Probe the stored upload (a video, or a ZIP of frames played at ``fps``), start
        writing its frames, return once frame 0 is on disk. On failure nothing is left."""
        s = self.settings
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
            self.save_manifest(session)
        except BaseException as exc:
            shutil.rmtree(session_dir, ignore_errors=True)
            shutil.rmtree(video_path.parent, ignore_errors=True)
            if isinstance(exc, VideoUnreadable):
                raise VideoInvalid(f"{exc}; upload a video file FFmpeg can decode (mp4, mov, "
                                   f"webm, mkv, avi...) or a ZIP of JPEG/PNG frames") from exc
            if is_disk_full(exc):
                raise DiskFull("the disk is full: the upload could not be stored") from exc
            raise
        logger.info("session %s: %s, %d frames %dx%d @ %.3f fps", session_id, session.filename,
                    info.num_frames, info.width, info.height, float(info.fps))
        return session

    def load(self, session_id: str) -> Session | None:
        """Rebuild a session closed by a restart, idle expiry or eviction from its folder."""
        files = SessionFiles(self.settings.output_dir / session_id)
        try:
            if files.open_marker.exists():
                recovery.reconcile(files)  # the process that had it open died
            data = manifest.read(files)
            v = data["video"]
            info = video_info_of(v)
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

    def load_or_raise(self, session_id: str) -> Session:
        session = self.load(session_id)
        if session is None:
            raise SessionNotFound(f"no session {session_id}; upload a video to start one")
        return session

    def close(self, session: Session, delete_files: bool) -> None:
        """Write what is pending and stop decoding; then the files stay (a clean close) or go."""
        try:
            session.drain_writes()
            if session.journal_lines and not delete_files:
                self.save_manifest(session)  # closed sessions keep a snapshot only
        except Exception:  # e.g. a full disk: what could not be written is not listed
            logger.exception("session %s: writes failed while closing", session.id)
        session.extractor.stop()
        shutil.rmtree(session.state_dir, ignore_errors=True)
        if delete_files:
            shutil.rmtree(session.dir, ignore_errors=True)
            shutil.rmtree(session.upload_path.parent, ignore_errors=True)
        else:
            session.open_marker.unlink(missing_ok=True)  # closed cleanly

    def list_sessions(self, caller: Caller = LOCAL_USER,
                      open_sessions: list[Session] = ()) -> list[dict]:
        """The caller's sessions, open or on disk, newest first."""
        found: dict[str, dict] = {}
        for session in open_sessions:
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

    def job_record(self, job_id: str) -> Job | None:
        """A job recorded with its session by this or an earlier process (an unfinished one
        from an earlier process reads ``interrupted``)."""
        if not is_job_id(job_id):
            return None
        for path in self.settings.output_dir.glob(f"*/jobs/{job_id}.json"):
            try:
                return job_from_record(json.loads(path.read_text()))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return None

    def write_export(self, session: Session, fmt: str, first: int, last: int, polygons: bool,
                     progress: Progress) -> Path:
        """Write an export of the session's frames ``first``..``last``; return its path. The
        caller keeps the session's masks from changing meanwhile."""
        with session.meta_lock:
            mask_frames = set(session.mask_frames)
            scores = {f: dict(v) for f, v in session.scores.items()}
            objects = dict(session.objects)
        if fmt == "overlay_mp4" and (first, last) == (0, session.info.num_frames - 1):
            out = session.export_path  # the seed's outputs/{id}/output_video.mp4
        else:
            session.exports_dir.mkdir(exist_ok=True)
            ext = exports.FORMATS[fmt].extension
            out = session.exports_dir / f"{fmt}_{first:05d}-{last:05d}.{ext}"

        def report(frame_idx: int, done: int, total: int) -> None:
            self.check_disk(session.owner)  # a cached figure: cheap
            progress.update(frame_idx, done, total)

        src = exports.ExportSource(
            first=first, last=last, width=session.info.width, height=session.info.height,
            fps=session.info.fps, mask_frames=mask_frames,
            frame_rgb=lambda f: self.frame_rgb(session, f),
            overlay_rgb=lambda f: self.overlay_rgb(session, f),
            label_map=lambda f: self.read_label_map(session, f),
            objects=objects, scores=scores, report=report)
        exports.write_export(fmt, out, src, polygons=polygons)
        return out

    def recover(self) -> dict:
        """Clean up after a process that died (call before serving): see ``recovery.sweep``."""
        t0 = time.perf_counter()
        counts = recovery.sweep(self.settings.upload_dir, self.settings.output_dir,
                                self.settings.checkpoint_dir / f"{self.settings.checkpoint_filename}.*.part")
        if any(counts.values()):
            logger.info("recovered the folders in %.2fs: %s", time.perf_counter() - t0, counts)
        return counts

    def check_disk(self, owner: str | None, incoming_bytes: int = 0) -> None:
        room = self.disk.room(incoming_bytes)
        if room is None or room >= 0:
            return
        usage = self.disk.usage()
        limit = self.disk.limit or 0
        mine = sorted(((size, sid) for sid, size in usage.per_session.items()
                       if is_session_id(sid) and self.stored_owner(sid)[1] == owner),
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

    @staticmethod
    def _info(session: Session) -> dict:
        return {"session_id": session.id, "filename": session.filename, "owner": session.owner,
                "created_at": session.created_at, "num_frames": session.info.num_frames,
                "width": session.info.width, "height": session.info.height}

    def stored_owner(self, session_id: str) -> tuple[bool, str | None]:
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

    def write_click_mask(self, session: Session, frame_idx: int, labels_map: np.ndarray) -> None:
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
        with self._frame_wait():
            try:
                path = session.extractor.wait_for(frame_idx, timeout)
            except ExtractorStopped:  # closed meanwhile: it reopens, or is gone (404)
                session = self.reopen(session.id)
                path = session.extractor.wait_for(frame_idx, timeout)
        return self._existing_frame(session, path, frame_idx)

    async def frame_file(self, session: Session, frame_idx: int) -> Path:
        """``frame_path`` for a request handler: waits for the decoder without a thread."""
        self.check_frame(session, frame_idx)
        timeout = self.settings.frame_wait_timeout_s
        with self._frame_wait():
            try:
                path = await session.extractor.wait_for_async(frame_idx, timeout)
            except ExtractorStopped:  # closed meanwhile: it reopens, or is gone (404)
                session = await asyncio.get_running_loop().run_in_executor(
                    None, self.reopen, session.id)
                path = await session.extractor.wait_for_async(frame_idx, timeout)
        return self._existing_frame(session, path, frame_idx)

    @staticmethod
    @contextlib.contextmanager
    def _frame_wait():
        """What a wait for the background decoder can end in, as the client's errors."""
        try:
            yield
        except TimeoutError as exc:
            raise FrameNotReady(f"{exc}; try again shortly", retry_after=2) from exc
        except (RuntimeError, ExtractorStopped) as exc:
            raise VideoInvalid(str(exc)) from exc

    async def _await_write(self, session: Session, frame_idx: int) -> None:
        future = session.needed_write(frame_idx)
        if future is not None:
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
        self.save_manifest(session, wait=False)
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
            # Again after: an overlay drawn meanwhile by another process (a Ray ingress) from
            # the old mask goes too (that process checks the mask did not change under it).
            session.overlay_path(frame_idx).unlink(missing_ok=True)
            return True

    def write_tracked_mask(self, session: Session, frame_idx: int, labels_map: np.ndarray,
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

    def erase_object(self, session: Session, frame_idx: int, obj_id: int) -> None:
        labels_map = cv2.imread(str(session.mask_path(frame_idx)), cv2.IMREAD_UNCHANGED)
        if labels_map is None or not (labels_map == obj_id).any():
            return
        labels_map[labels_map == obj_id] = 0
        self._write_frame(session, frame_idx, labels_map, session.claim_write(frame_idx))

    def run_writes(self, session: Session, frames: list[int], fn) -> None:
        for fut in [self._writer.submit(fn, f) for f in frames]:
            fut.result()

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

    def export_file(self, session_id: str, name: str) -> Path:
        """A file written by an earlier export of the session, by its bare name."""
        session = self.reopen(session_id)
        candidates = {session.export_path.name: session.export_path}
        if session.exports_dir.is_dir():
            candidates |= {p.name: p for p in session.exports_dir.iterdir()
                           if p.is_file() and not p.name.startswith(".")}
        path = candidates.get(name)
        if path is None:
            raise ExportNotFound(f"no export named {name!r} in session {session.id}")
        return path

    # -- jobs ------------------------------------------------------------------------------
    def save_job(self, job: Job) -> None:
        """Keep the job's record with its session (``jobs/{id}.json``), to outlive the process."""
        files = SessionFiles(self.settings.output_dir / job.session_id)
        try:
            files.jobs_dir.mkdir(exist_ok=True)
            atomic_write_bytes(files.job_path(job.id),
                               json.dumps(job.record(), default=str).encode())
        except FileNotFoundError:  # the session was deleted meanwhile
            pass

    # -- manifest --------------------------------------------------------------------------
    def describe(self, session_id: str) -> dict:
        """What the manifest holds (once any write in flight has landed, so the two agree)."""
        session = self.reopen(session_id)
        session.drain_writes()
        return self.manifest_of(session)

    def manifest_of(self, session: Session) -> dict:
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
                "model": {"name": self.settings.model,
                          "image_size": self.model_image_size or self.settings.image_size},
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
    def scores_json(frame_scores: dict) -> dict:
        return {str(o): v for o, v in frame_scores.items()}

    def journal(self, session: Session, ops: list) -> None:
        """Record a small change (a click) as one journal line instead of a rewrite of the whole
        manifest, whose size grows with the tracked frames; call with ``meta_lock`` held, right
        after the change, so a snapshot holds either both or neither. A long journal is folded
        into a snapshot."""
        with session.meta_lock:
            session.journal_seq += 1
            session.journal_lines += 1
            if session.journal_lines > JOURNAL_MAX_LINES:
                self.save_manifest(session, wait=False)
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

    def save_manifest(self, session: Session, wait: bool = True) -> None:
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
            data = self.manifest_of(session)
        try:
            with STAGES("manifest"):
                manifest.write_snapshot(session, data)
        except OSError:  # nobody may wait on this write: say it here too
            logger.exception("session %s: the manifest could not be written", session.id)
            raise
