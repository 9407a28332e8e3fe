"""Bringing the server's folders back to a consistent state after a crash (kill -9, power loss).

At start-up: partial uploads, orphan folders and temporary files go, and every session that was
open when the process died (it still has its ``.open`` marker) is reconciled: its manifest and
its mask files are made to agree, and the propagation or job that was running is recorded as
``interrupted`` with the last frame it wrote.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import manifest
from jobs import FINISHED
from layout import MANIFEST_NAME, PARTIAL_SUFFIX, SessionFiles, is_session_id
from video_io import atomic_write_bytes

logger = logging.getLogger(__name__)

_SUBDIRS = ("", "frames", "masks", "overlays", "exports", "prompts", "jobs")


def is_temporary(name: str) -> bool:
    """Files written under a temporary name and renamed into place when complete."""
    return (name.startswith(".") and ".tmp" in name) or name.endswith(PARTIAL_SUFFIX)


def _remove_temporaries(folder: Path) -> int:
    removed = 0
    if folder.is_dir():
        for path in folder.iterdir():
            if path.is_file() and is_temporary(path.name):
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def sweep(upload_dir: Path, output_dir: Path, partial_downloads: Path | None = None) -> dict:
    """Start-up clean-up of everything a killed process can leave behind; returns counts.

    ``partial_downloads`` is a glob pattern (a path whose last part has wildcards) of
    checkpoint downloads left unfinished.
    """
    counts = {"partial_uploads": 0, "orphan_sessions": 0, "temporary_files": 0,
              "reconciled_sessions": 0}
    if upload_dir.is_dir():
        for folder in upload_dir.iterdir():
            if not (folder.is_dir() and is_session_id(folder.name)):
                continue
            if not (output_dir / folder.name / MANIFEST_NAME).is_file():
                # The upload never became a session (killed mid-upload, or refused).
                shutil.rmtree(folder, ignore_errors=True)
                counts["partial_uploads"] += 1
            else:
                counts["temporary_files"] += _remove_temporaries(folder)
    if output_dir.is_dir():
        for folder in output_dir.iterdir():
            if not (folder.is_dir() and is_session_id(folder.name)):
                continue
            files = SessionFiles(folder)
            if not files.manifest_path.is_file():
                shutil.rmtree(folder, ignore_errors=True)
                shutil.rmtree(upload_dir / folder.name, ignore_errors=True)
                counts["orphan_sessions"] += 1
                continue
            for sub in _SUBDIRS:
                counts["temporary_files"] += _remove_temporaries(folder / sub if sub else folder)
            shutil.rmtree(files.state_dir, ignore_errors=True)  # spilled tracking state
            if files.open_marker.exists():
                try:
                    reconcile(files)
                    counts["reconciled_sessions"] += 1
                except (OSError, ValueError, KeyError, TypeError):
                    logger.exception("session %s could not be reconciled", folder.name)
    if partial_downloads is not None and partial_downloads.parent.is_dir():
        # An interrupted checkpoint download (a glob pattern of ours, in our download folder).
        for part in partial_downloads.parent.glob(partial_downloads.name):
            part.unlink(missing_ok=True)
            counts["temporary_files"] += 1
    return counts


def _frame_files(folder: Path, suffix: str) -> dict[int, Path]:
    found = {}
    if folder.is_dir():
        for path in folder.iterdir():
            if path.suffix == suffix and path.stem.isdigit() and not path.name.startswith("."):
                found[int(path.stem)] = path
    return found


def reconcile(files: SessionFiles) -> dict:
    """Make the manifest, the mask/overlay files and the job records of one session agree.

    Every mask file is kept and listed (it is finished work: files are renamed into place only
    when complete); a listed mask whose file is gone is unlisted; an overlay older than its mask
    is removed (it is rebuilt from the mask on its next read). A propagation or job still
    marked as running is recorded as ``interrupted``, with the frames it wrote.
    """
    data = manifest.read(files)
    num_frames = int(data["video"]["num_frames"])
    masks = _frame_files(files.masks_dir, ".png")
    overlays = _frame_files(files.overlays_dir, ".jpg")
    for frame_idx in [f for f in masks if f >= num_frames]:
        masks.pop(frame_idx).unlink(missing_ok=True)
    listed = set(data.get("mask_frames", []))
    adopted = sorted(set(masks) - listed)
    dropped = sorted(listed - set(masks))
    scores = data.get("scores", {})
    for frame_idx in dropped:
        scores.pop(str(frame_idx), None)
    stale = 0
    for frame_idx, overlay in overlays.items():
        mask = masks.get(frame_idx)
        if mask is None or overlay.stat().st_mtime_ns < mask.stat().st_mtime_ns:
            overlay.unlink(missing_ok=True)
            stale += 1
    data["mask_frames"] = sorted(masks)
    data["num_mask_frames"] = len(masks)

    interrupted = {}
    for record in data.get("propagations", []):
        if record.get("status") != "running":
            continue
        since_ns = int(float(record.get("at", 0)) * 1e9)
        reached = None
        written = 0
        for p in record.get("passes", []):
            lo, hi = sorted((int(p["from"]), int(p["to"])))
            frames = [f for f in range(lo, hi + 1)
                      if f in masks and masks[f].stat().st_mtime_ns >= since_ns]
            written += len(frames)
            if frames:
                reached = min(frames) if p.get("direction") == "backward" else max(frames)
        record.update(status="interrupted", last_frame=reached, frames=written,
                      cancelled=True)
        if record.get("job_id"):
            interrupted[record["job_id"]] = {"last_frame": reached, "frames_written": written}

    if files.jobs_dir.is_dir():
        for path in files.jobs_dir.glob("*.json"):
            try:
                job = json.loads(path.read_text())
            except (OSError, ValueError):
                path.unlink(missing_ok=True)
                continue
            if job.get("status") in FINISHED:
                continue
            job["status"] = "interrupted"
            job["error"] = "the server stopped while this job ran; work done so far is kept"
            if job["job_id"] in interrupted:
                job["result"] = interrupted[job["job_id"]]
                job["frame_idx"] = interrupted[job["job_id"]]["last_frame"]
            atomic_write_bytes(path, json.dumps(job, separators=(",", ":")).encode())

    manifest.write_snapshot(files, data)
    files.open_marker.unlink(missing_ok=True)
    summary = {"adopted_masks": len(adopted), "unlisted_masks": len(dropped),
               "stale_overlays": stale, "interrupted": sorted(interrupted)}
    logger.info("session %s reconciled after an unclean stop: %s", files.dir.name, summary)
    return summary
