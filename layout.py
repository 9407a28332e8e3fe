"""Where a session's files live: the seed's ``outputs/{session_id}/`` layout, and its markers."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

MANIFEST_NAME = "session.json"  # everything about the session: prompts, masks, scores, runs
INFO_NAME = "info.json"         # small and written once: owner, file name, video size
OPEN_MARKER = ".open"           # present while a process has the session open
PARTIAL_SUFFIX = ".partial"     # an upload still arriving


def is_session_id(name: str) -> bool:
    """Folder names the server made itself (a UUID); nothing else under its folders is touched."""
    try:
        return str(uuid.UUID(name)) == name
    except ValueError:
        return False


def is_job_id(name: str) -> bool:
    return len(name) == 32 and all(c in "0123456789abcdef" for c in name)


@dataclass
class SessionFiles:
    """Paths of one session's folder (frames, masks, overlays, manifest, exports, jobs...)."""

    dir: Path

    @property
    def frames_dir(self) -> Path:
        return self.dir / "frames"

    @property
    def masks_dir(self) -> Path:
        return self.dir / "masks"

    @property
    def overlays_dir(self) -> Path:
        return self.dir / "overlays"

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST_NAME

    @property
    def info_path(self) -> Path:
        return self.dir / INFO_NAME

    @property
    def open_marker(self) -> Path:
        return self.dir / OPEN_MARKER

    @property
    def worker_path(self) -> Path:
        """Ray mode: which worker holds the session (written once, read by every ingress)."""
        return self.dir / "worker.json"

    @property
    def prompts_dir(self) -> Path:
        return self.dir / "prompts"

    def prompt_mask_path(self, obj_id: int, frame_idx: int) -> Path:
        return self.prompts_dir / f"obj{obj_id:03d}_{frame_idx:05d}.png"

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    @property
    def exports_dir(self) -> Path:
        return self.dir / "exports"

    @property
    def jobs_dir(self) -> Path:
        return self.dir / "jobs"

    def job_path(self, job_id: str) -> Path:
        return self.jobs_dir / f"{job_id}.json"

    @property
    def export_path(self) -> Path:
        return self.dir / "output_video.mp4"

    def frame_file(self, frame_idx: int) -> Path:
        return self.frames_dir / f"{frame_idx:05d}.jpg"

    def mask_path(self, frame_idx: int) -> Path:
        return self.masks_dir / f"{frame_idx:05d}.png"

    def overlay_path(self, frame_idx: int) -> Path:
        return self.overlays_dir / f"{frame_idx:05d}.jpg"
