"""A ZIP of image frames (JPEG/PNG, sorted by name, as DAVIS and SA-V ship them) read as a video.

Every entry is bounded before it is decoded: its compressed and stated sizes, and the picture
size from its header, so neither a zip bomb nor an image bomb gets far.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
import zipfile
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

CONTAINER, CODEC = "zip", "images"  # how a sequence is named in VideoInfo and the manifest
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MAX_ENTRY_BYTES = 256 * 1024 * 1024  # one frame file, compressed or not


class SequenceUnreadable(ValueError):
    """The ZIP holds no usable frames (the message says why)."""


def is_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)


def _natural(name: str) -> list:
    # frame2 before frame10, as a person numbering frames means it.
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def frame_names(archive: zipfile.ZipFile) -> list[str]:
    """The image entries in frame order; folders, hidden files and macOS metadata are skipped."""
    names = []
    for info in archive.infolist():
        path = PurePosixPath(info.filename)
        if info.is_dir() or any(p.startswith((".", "__MACOSX")) for p in path.parts):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            names.append(info.filename)
    return sorted(names, key=_natural)


def _read(archive: zipfile.ZipFile, name: str) -> bytes:
    info = archive.getinfo(name)
    if info.file_size > MAX_ENTRY_BYTES:
        raise SequenceUnreadable(f"{PurePosixPath(name).name} is larger than "
                                 f"{MAX_ENTRY_BYTES // 2**20} MiB")
    with archive.open(info) as entry:
        data = entry.read(MAX_ENTRY_BYTES + 1)  # the stated size can lie
    if len(data) > MAX_ENTRY_BYTES:
        raise SequenceUnreadable(f"{PurePosixPath(name).name} unpacks to more than "
                                 f"{MAX_ENTRY_BYTES // 2**20} MiB")
    return data


def picture_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding its pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return img.size
    except Image.DecompressionBombError as exc:
        raise SequenceUnreadable("a frame announces a gigantic picture") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise SequenceUnreadable("a frame is not a readable image") from exc


def probe(path: Path, max_frames: int | None = None) -> tuple[list[str], int, int]:
    """The frame names in order and the first frame's (width, height), from headers only."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = frame_names(archive)
            if not names:
                raise SequenceUnreadable(f"the ZIP holds no frames ({', '.join(IMAGE_SUFFIXES)})")
            if max_frames is not None and len(names) > max_frames:
                raise SequenceUnreadable(f"the ZIP holds more than {max_frames} frames")
            width, height = picture_size(_read(archive, names[0]))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, RuntimeError, EOFError) as exc:
        raise SequenceUnreadable("not a readable ZIP file") from exc
    return names, width, height


def parse_fps(value: str | None, default: Fraction = Fraction(30)) -> Fraction:
    """A frame rate given as '25', '29.97' or '30000/1001'."""
    if value is None or not value.strip():
        return default
    try:
        fps = Fraction(value.strip()).limit_denominator(1_000_000)
    except (ValueError, ZeroDivisionError) as exc:
        raise SequenceUnreadable(f"fps {value!r} is not a number like 25, 29.97 or "
                                 f"30000/1001") from exc
    if not 0 < fps <= 1000:
        raise SequenceUnreadable(f"fps {value!r} must be above 0 and at most 1000")
    return fps


def iter_rgb_frames(path: Path, max_pixels: int | None) -> Iterable[np.ndarray]:
    """Decode the frames in order as RGB arrays, each checked from its header first. Stops, as
    a video's decoding does at a damaged tail, at the first frame that cannot be used."""
    with zipfile.ZipFile(path) as archive:
        for name in frame_names(archive):
            try:
                data = _read(archive, name)
                width, height = picture_size(data)
                if max_pixels is not None and width * height > max_pixels:
                    raise SequenceUnreadable(f"{width}x{height} is over the pixel limit")
                bgr = cv2.imdecode(np.frombuffer(data, np.uint8),
                                   cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
                if bgr is None:
                    raise SequenceUnreadable("it cannot be decoded")
            except (SequenceUnreadable, zipfile.BadZipFile, OSError) as exc:
                logger.warning("%s: frames stop at %s (%s)", path.name, name, exc)
                return
            yield np.ascontiguousarray(bgr[..., ::-1])
