"""Disk usage of the server's folders against the quota, and telling a full disk apart."""

from __future__ import annotations

import errno
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in FULL_ERRNOS


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (links are not followed)."""
    total = 0
    stack = [path]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except OSError:  # removed while we looked
                        continue
        except OSError:
            continue
    return total


@dataclass
class Usage:
    total: int
    per_session: dict[str, int]  # session folder name -> bytes (outputs and upload together)


class DiskQuota:
    """What the upload and output folders hold, rescanned at most every ``max_age_s``.

    A scan walks every file, so it is cached; writes made since the last scan are counted on
    top through ``add``.
    """

    def __init__(self, roots: tuple[Path, ...], limit_bytes: int | None, max_age_s: float = 5.0):
        self.roots = roots
        self.limit = limit_bytes
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._usage: Usage | None = None
        self._at = 0.0
        self._added = 0

    def usage(self, fresh: bool = False) -> Usage:
        with self._lock:
            if fresh or self._usage is None or time.monotonic() - self._at > self.max_age_s:
                per: dict[str, int] = {}
                for root in self.roots:
                    if not root.is_dir():
                        continue
                    with os.scandir(root) as entries:
                        for entry in entries:
                            if entry.is_dir(follow_symlinks=False):
                                per[entry.name] = per.get(entry.name, 0) + tree_bytes(
                                    Path(entry.path))
                            elif entry.is_file(follow_symlinks=False):
                                per[""] = per.get("", 0) + entry.stat().st_size
                self._usage = Usage(total=sum(per.values()), per_session=per)
                self._at = time.monotonic()
                self._added = 0
            return Usage(total=self._usage.total + self._added,
                         per_session=dict(self._usage.per_session))

    def add(self, nbytes: int) -> None:
        with self._lock:
            self._added += nbytes

    def room(self, extra: int = 0) -> int | None:
        """Bytes left under the quota after ``extra`` more; None without a quota."""
        if self.limit is None:
            return None
        return self.limit - self.usage().total - extra
