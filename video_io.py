"""Video probing, background decoding to JPEG frames, and H.264 encoding (PyAV + OpenCV)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

import image_sequence
from notify import Notifier

logger = logging.getLogger(__name__)

# Containers FFmpeg opens for a single picture: a still image is not a video.
_STILL_CONTAINERS = ("image2", "image2pipe")
_STILL_CODECS = ("png", "mjpeg", "jpeg2000", "webp", "bmp", "tiff", "gif", "apng", "qoi")


class VideoUnreadable(ValueError):
    """The upload is not a video FFmpeg can decode (or has no frames)."""


class ExtractorStopped(LookupError):
    """The frame was waited for while its session closed."""


class StillImage(VideoUnreadable):
    """The upload is a picture, not a video."""


class VideoSizeRefused(VideoUnreadable):
    """The video's frame size is outside the accepted limits (known from its header)."""


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    width: int  # as displayed, i.e. after rotation
    height: int
    fps: Fraction
    codec: str
    container: str
    rotation: int  # counter-clockwise degrees applied to the decoded frames

    @property
    def fps_float(self) -> float:
        return float(self.fps)

    def as_dict(self) -> dict:
        return {
            "num_frames": self.num_frames,
            "width": self.width,
            "height": self.height,
            "fps": round(float(self.fps), 6),
            "fps_rational": f"{self.fps.numerator}/{self.fps.denominator}",
            "codec": self.codec,
            "container": self.container,
            "rotation": self.rotation,
            "duration_s": round(self.num_frames / float(self.fps), 6),
        }


def _rotate(rgb: np.ndarray, rotation: int) -> np.ndarray:
    k = (rotation // 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, k=k)) if k else rgb


def _frame_rate(stream: av.video.stream.VideoStream) -> Fraction:
    for rate in (stream.average_rate, stream.base_rate, stream.guessed_rate):
        if rate and rate > 0:
            return Fraction(rate.numerator, rate.denominator).limit_denominator(1_000_000)
    return Fraction(30)


def _decoder_limits(max_pixels: int | None) -> dict[str, str] | None:
    """FFmpeg's own cap on a decoded picture: opening a file decodes a few frames to learn its
    parameters, and a stream announcing a huge picture must not get that far."""
    return None if max_pixels is None else {"max_pixels": str(max_pixels)}


def check_size(width: int, height: int, max_pixels: int | None, min_side: int) -> None:
    """Refuse a frame size outside the limits (from a header, before anything is decoded)."""
    if width <= 0 or height <= 0:
        raise VideoUnreadable("the video's frame size cannot be read from its header")
    if max_pixels is not None and width * height > max_pixels:
        raise VideoSizeRefused(
            f"the video is {width}x{height} ({width * height} pixels); the limit is {max_pixels} "
            f"pixels (SAM2_MAX_VIDEO_PIXELS): scale it down first")
    if min(width, height) < min_side:
        raise VideoSizeRefused(f"the video is {width}x{height}; each side must be at least "
                               f"{min_side} pixels")


def probe(path: Path, max_frames: int | None = None, max_pixels: int | None = None,
          min_side: int = 1) -> VideoInfo:
    """Read the container's video stream: frame count (by demuxing), size, rotation, exact fps.

    The frame size is checked from the stream header before any frame is decoded, so a tiny
    file announcing a huge picture costs nothing.
    """
    try:
        with av.open(str(path), options=_decoder_limits(max_pixels)) as container:
            if not container.streams.video:
                raise VideoUnreadable("the file has no video stream")
            stream = container.streams.video[0]
            fmt, codec = container.format.name, stream.codec_context.name
            if fmt.endswith("_pipe") or fmt in _STILL_CONTAINERS:
                raise StillImage(f"this is a still image ({codec}), not a video")
            check_size(stream.codec_context.width, stream.codec_context.height, max_pixels,
                       min_side)
            first = None
            for frame in container.decode(stream):
                first = frame
                break
            if first is None:
                raise VideoUnreadable("the video stream has no decodable frame")
            check_size(first.width, first.height, max_pixels, min_side)
            rotation = int(getattr(first, "rotation", 0) or 0) % 360
            container.seek(0)
            count = 0
            for packet in container.demux(stream):
                if packet.size:
                    count += 1
                    if max_frames is not None and count > max_frames:
                        raise VideoUnreadable(f"the video has more than {max_frames} frames")
            if count <= 1 and codec in _STILL_CODECS:
                raise StillImage(f"this is a single {codec} picture, not a video")
            width, height = first.width, first.height
            if rotation in (90, 270):
                width, height = height, width
            return VideoInfo(
                num_frames=max(count, 1),
                width=width,
                height=height,
                fps=_frame_rate(stream),
                codec=stream.codec_context.name,
                container=container.format.name,
                rotation=rotation,
            )
    except VideoUnreadable:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError) as exc:
        reason = getattr(exc, "strerror", None) or exc.__class__.__name__
        raise VideoUnreadable(f"not a readable video ({reason})") from exc


def probe_upload(path: Path, fps: str | None = None, max_frames: int | None = None,
                 max_pixels: int | None = None, min_side: int = 1) -> VideoInfo:
    """Probe an upload: a video file, or a ZIP of image frames played at ``fps``."""
    if not image_sequence.is_zip(path):
        if fps:
            raise VideoUnreadable("fps is only for a ZIP of frames: a video has its own")
        return probe(path, max_frames, max_pixels, min_side)
    try:
        names, width, height = image_sequence.probe(path, max_frames)
        rate = image_sequence.parse_fps(fps)
    except image_sequence.SequenceUnreadable as exc:
        raise VideoUnreadable(str(exc)) from exc
    check_size(width, height, max_pixels, min_side)
    return VideoInfo(num_frames=len(names), width=width, height=height, fps=rate,
                     codec=image_sequence.CODEC, container=image_sequence.CONTAINER, rotation=0)


def iter_rgb_frames(path: Path, rotation: int, max_pixels: int | None = None
                    ) -> Iterable[np.ndarray]:
    """Decode every frame as an RGB array, rotated for display. Stops quietly at a corrupt tail,
    or at a frame larger than ``max_pixels`` (a stream that grows past its header)."""
    with av.open(str(path), options=_decoder_limits(max_pixels)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if max_pixels is not None:
            stream.codec_context.options = _decoder_limits(max_pixels)
        try:
            for frame in container.decode(stream):
                if max_pixels is not None and frame.width * frame.height > max_pixels:
                    logger.warning("decoding %s stopped: a %dx%d frame passes the pixel limit",
                                   path.name, frame.width, frame.height)
                    return
                yield _rotate(frame.to_ndarray(format="rgb24"), rotation)
        except (av.FFmpegError, OSError) as exc:
            logger.warning("decoding %s stopped early: %s", path.name, exc)


def write_jpeg(path: Path, rgb: np.ndarray, quality: int) -> None:
    """Encode an RGB array to JPEG, written atomically."""
    ok, buf = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise OSError(f"JPEG encoding failed for {path}")
    atomic_write_bytes(path, buf.tobytes())


def write_png(path: Path, array: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise OSError(f"PNG encoding failed for {path}")
    atomic_write_bytes(path, buf.tobytes())


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"cannot read image {path}")
    return bgr[..., ::-1]


def tmp_path_for(path: Path) -> Path:
    """Where a file is written before it is renamed into place (``recovery`` sweeps these)."""
    return path.with_name(f".{path.name}.{threading.get_ident()}.tmp")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: a full disk leaves the previous file in place."""
    tmp = tmp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class FrameExtractor:
    """Writes ``frames/{i:05d}.jpg`` in a background thread; readers wait for the frame they need."""

    def __init__(self, video_path: Path, frames_dir: Path, info: VideoInfo, jpeg_quality: int,
                 max_pixels: int | None = None):
        self.video_path = video_path
        self.frames_dir = frames_dir
        self.info = info
        self.jpeg_quality = jpeg_quality
        self.max_pixels = max_pixels
        self.written = 0
        self.padded = 0  # frames the container announced but the decoder could not produce
        self.error: str | None = None
        self.stopped = False
        self._notify = Notifier()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="frame-extractor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def mark_complete(self) -> None:
        """The frames are already on disk (a restored session): nothing to decode."""
        self._publish(self.info.num_frames)

    def stop(self) -> None:
        """Stop decoding (the session is closing); readers still waiting are told at once."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        with self._notify.cond:
            self.stopped = True
            self._notify.notify()

    @property
    def done(self) -> bool:
        return self.written >= self.info.num_frames or self.error is not None

    def frame_path(self, frame_idx: int) -> Path:
        return self.frames_dir / f"{frame_idx:05d}.jpg"

    def wait_for(self, frame_idx: int, timeout: float) -> Path:
        """Block until frame ``frame_idx`` is on disk; raise TimeoutError or RuntimeError otherwise."""
        self._notify.wait(lambda: self._settled(frame_idx), timeout)
        return self._frame_or_raise(frame_idx)

    async def wait_for_async(self, frame_idx: int, timeout: float) -> Path:
        """``wait_for`` for a request handler: waits without holding a thread."""
        await self._notify.wait_async(lambda: self._settled(frame_idx), timeout)
        return self._frame_or_raise(frame_idx)

    def _settled(self, frame_idx: int) -> bool:
        return self.written > frame_idx or self.error is not None or self.stopped

    def _frame_or_raise(self, frame_idx: int) -> Path:
        if self.written > frame_idx:
            return self.frame_path(frame_idx)
        if self.error is not None:
            raise RuntimeError(f"frame extraction failed: {self.error}")
        if self.stopped:
            raise ExtractorStopped(f"frame {frame_idx}: its session was closed")
        raise TimeoutError(f"frame {frame_idx} is still being decoded")

    def _publish(self, count: int) -> None:
        with self._notify.cond:
            self.written = count
            self._notify.notify()

    def _run(self) -> None:
        # Decoding ahead must not slow the user's clicks: on Linux a thread has its own nice
        # value (FFmpeg's decoder threads, started from here, inherit it).
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        n = self.info.num_frames
        last: np.ndarray | None = None
        i = 0
        try:
            if self.info.container == image_sequence.CONTAINER:
                frames = image_sequence.iter_rgb_frames(self.video_path, self.max_pixels)
            else:
                frames = iter_rgb_frames(self.video_path, self.info.rotation, self.max_pixels)
            for rgb in frames:
                if i >= n or self._stop.is_set():
                    break
                if rgb.shape[:2] != (self.info.height, self.info.width):
                    # Mid-stream resolution change: keep every frame at the announced size.
                    rgb = cv2.resize(rgb, (self.info.width, self.info.height))
                write_jpeg(self.frame_path(i), rgb, self.jpeg_quality)
                last = rgb
                i += 1
                self._publish(i)
            if i < n and not self._stop.is_set():
                if last is None:
                    raise VideoUnreadable("no frame could be decoded")
                # A damaged tail: repeat the last good frame so indices stay valid.
                self.padded = n - i
                logger.warning("%s: %d announced frames undecodable; repeating the last one",
                               self.video_path.name, self.padded)
                while i < n and not self._stop.is_set():
                    write_jpeg(self.frame_path(i), last, self.jpeg_quality)
                    i += 1
                    self._publish(i)
        except Exception as exc:  # reported to waiting readers, without server paths
            logger.exception("frame extraction failed for %s", self.video_path)
            with self._notify.cond:
                self.error = (str(exc) if isinstance(exc, VideoUnreadable)
                              else f"frame {i} could not be decoded or stored")
                self._notify.notify()


def encode_video(
    out_path: Path, frames: Iterable[np.ndarray], fps: Fraction, width: int, height: int,
    codec: str = "libx264", pix_fmt: str = "yuv420p", options: dict | None = None,
    container_options: dict | None = None, even_size: bool = True,
) -> int:
    """Encode RGB (HxWx3) or RGBA (HxWx4) frames at an exact rational fps; returns frames written.

    With ``even_size`` (needed by yuv420p H.264) an odd width or height is padded by one edge
    pixel. The file appears at ``out_path`` only once complete.
    """
    enc_w, enc_h = (width + width % 2, height + height % 2) if even_size else (width, height)
    tmp = out_path.with_name(f".{out_path.stem}.{threading.get_ident()}.tmp{out_path.suffix}")
    count = 0
    try:
        with av.open(str(tmp), "w", options=container_options or {}) as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height = enc_w, enc_h
            stream.pix_fmt = pix_fmt
            stream.options = options or {}
            for img in frames:
                if (enc_w, enc_h) != (width, height):
                    img = np.pad(img, ((0, enc_h - height), (0, enc_w - width), (0, 0)),
                                 mode="edge")
                fmt = "rgba" if img.shape[2] == 4 else "rgb24"
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format=fmt)
                frame.pts = count
                frame.time_base = 1 / fps
                for packet in stream.encode(frame):
                    container.mux(packet)
                count += 1
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def encode_mp4(out_path: Path, frames: Iterable[np.ndarray], fps: Fraction, width: int,
               height: int, crf: int = 18) -> int:
    """Browser-playable MP4: H.264, yuv420p, moov atom first (faststart)."""
    return encode_video(out_path, frames, fps, width, height, "libx264", "yuv420p",
                        {"crf": str(crf), "preset": "veryfast"}, {"movflags": "+faststart"})
