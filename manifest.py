"""The session manifest on disk: a JSON snapshot (``session.json``) plus a journal of the small
changes made since (``journal.jsonl``), so that a click appends one short line instead of
rewriting a file that grows with the video's length.

A journal line is ``{"seq": n, "ops": [...]}``; the snapshot says up to which line it holds
(``journal_seq``), and only later lines are replayed over it. The operations:

- ``["set", [key, ...], value]`` sets a nested value;
- ``["del", [key, ...]]`` removes one (if there);
- ``["add", key, frame_idx]`` adds a frame to a sorted list of frames;
- ``["append", key, entry]`` appends to a list of entries numbered by ``seq``, unless there;
- ``["object", {"obj_id", "color"}]`` adds an object (if new).
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path

from layout import SessionFiles
from video_io import atomic_write_bytes

JOURNAL_NAME = "journal.jsonl"


def journal_path(files: SessionFiles) -> Path:
    return files.dir / JOURNAL_NAME


def apply(data: dict, ops: list) -> None:
    for op in ops:
        kind = op[0]
        if kind == "set":
            node = data
            *parents, last = op[1]
            for key in parents:
                node = node.setdefault(key, {})
            node[last] = op[2]
        elif kind == "del":
            node = data
            *parents, last = op[1]
            for key in parents:
                node = node.get(key, {})
            node.pop(last, None)
        elif kind == "add":
            frames = data.setdefault(op[1], [])
            at = bisect.bisect_left(frames, op[2])
            if at == len(frames) or frames[at] != op[2]:
                frames.insert(at, op[2])
        elif kind == "append":
            entries = data.setdefault(op[1], [])
            if not any(e.get("seq") == op[2].get("seq") for e in entries[-64:]):
                entries.append(op[2])
        elif kind == "object":
            objects = data.setdefault("objects", [])
            if all(o["obj_id"] != op[1]["obj_id"] for o in objects):
                objects.append(dict(op[1]))
                objects.sort(key=lambda o: o["obj_id"])
        else:
            raise ValueError(f"unknown manifest operation {kind!r}")
    _derive(data)


def _derive(data: dict) -> None:
    """The fields computed from others: kept right whatever was replayed."""
    prompts = data.get("current_prompts", {})
    for obj in data.get("objects", []):
        obj["prompted_frames"] = sorted(int(f) for f in prompts.get(str(obj["obj_id"]), {}))
    data["num_mask_frames"] = len(data.get("mask_frames", []))


def read(files: SessionFiles) -> dict:
    """The snapshot with the later journal lines replayed over it (a torn last line, from a
    crash in the middle of an append, is skipped)."""
    data = json.loads(files.manifest_path.read_text())
    path = journal_path(files)
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
                seq, ops = int(entry["seq"]), entry["ops"]
            except (ValueError, KeyError, TypeError):
                continue
            if seq > data.get("journal_seq", 0):
                apply(data, ops)
                data["journal_seq"] = seq
    return data


def append(files: SessionFiles, seq: int, ops: list) -> None:
    """Add line ``seq`` to the journal (one write call: a crash leaves it whole or torn)."""
    line = json.dumps({"seq": seq, "ops": ops}, separators=(",", ":")) + "\n"
    fd = os.open(journal_path(files), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def write_snapshot(files: SessionFiles, data: dict) -> None:
    """Replace the snapshot (``data["journal_seq"]`` says which lines it holds), then drop the
    journal."""
    atomic_write_bytes(files.manifest_path, json.dumps(data, separators=(",", ":")).encode())
    journal_path(files).unlink(missing_ok=True)
