"""Finding or downloading Meta's SAM 2.1 checkpoints (progress, atomic write, clear offline error)."""

from __future__ import annotations

import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from config import Settings

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int | None], None]


class CheckpointUnavailable(RuntimeError):
    """The checkpoint is neither on disk nor downloadable."""


def ensure_checkpoint(settings: Settings, progress: ProgressFn | None = None) -> Path:
    """Return the checkpoint path, downloading Meta's file on first use when it is missing."""
    path = settings.checkpoint_path
    if path.is_file():
        return path
    if settings.checkpoint is not None:
        raise CheckpointUnavailable(
            f"SAM2_CHECKPOINT={path} does not exist. Point it at a SAM 2 checkpoint in Meta's "
            f"format, or unset it to download {settings.checkpoint_filename} automatically."
        )
    url = settings.checkpoint_download_url
    download(url, path, progress)
    return path


def download(url: str, dest: Path, progress: ProgressFn | None = None) -> None:
    """Download ``url`` to ``dest`` through a temporary file renamed into place when complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s -> %s", url, dest)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=30)  # noqa: S310 (URL is a setting)
            except (urllib.error.URLError, OSError) as exc:
                raise CheckpointUnavailable(
                    f"cannot download the SAM 2 checkpoint from {url} ({exc}). Without network "
                    f"access, download it elsewhere and put it at {dest.resolve()}, or set "
                    f"SAM2_CHECKPOINT to its path."
                ) from exc
            with response:
                total = response.headers.get("Content-Length")
                total_bytes = int(total) if total and total.isdigit() else None
                done = 0
                last_logged = -1
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total_bytes)
                    pct = int(100 * done / total_bytes) if total_bytes else done >> 26
                    if pct // 10 != last_logged:
                        last_logged = pct // 10
                        logger.info("checkpoint download: %s", _fmt_progress(done, total_bytes))
            if total_bytes is not None and done != total_bytes:
                raise CheckpointUnavailable(
                    f"download of {url} stopped after {done} of {total_bytes} bytes; try again"
                )
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    logger.info("checkpoint saved to %s", dest)


def _fmt_progress(done: int, total: int | None) -> str:
    mib = done / (1 << 20)
    if total:
        return f"{mib:.1f}/{total / (1 << 20):.1f} MiB ({100 * done / total:.0f}%)"
    return f"{mib:.1f} MiB"
