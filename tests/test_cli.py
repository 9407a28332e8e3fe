"""run_sam2.py: info only, and the full prompt -> propagate -> export path without HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import cv2
import numpy as np
from media import make_video

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path, checkpoint=None):
    env = os.environ | {"SAM2_UPLOAD_DIR": str(tmp_path / "up"),
                        "SAM2_OUTPUT_DIR": str(tmp_path / "out")}
    if checkpoint is not None:
        env |= {"SAM2_CHECKPOINT": str(checkpoint), "SAM2_IMAGE_SIZE": "256",
                "SAM2_DEVICE": "cpu", "SAM2_FILL_HOLE_AREA": "0"}
    return subprocess.run([sys.executable, "run_sam2.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_info_only(tmp_path):
    video = make_video(tmp_path / "v.mp4", num_frames=5, width=96, height=64, fps=25)
    run = _run(["--video", str(video), "--json"], tmp_path)
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout.splitlines()[0])
    assert (info["num_frames"], info["width"], info["height"], info["fps"]) == (5, 96, 64, 25.0)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_not_a_video(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 1000)
    run = _run(["--video", str(bad)], tmp_path)
    assert run.returncode == 2
    assert "not a readable video" in run.stderr


def test_malformed_points(tmp_path):
    video = make_video(tmp_path / "v.mp4", num_frames=3)
    run = _run(["--video", str(video), "--frame", "0", "--points", "[[1,2"], tmp_path)
    assert run.returncode == 2
    assert "not JSON" in run.stderr


def test_segment_propagate_export(tmp_path, checkpoint):
    video = make_video(tmp_path / "v.mp4", num_frames=6)
    run = _run(["--video", str(video), "--frame", "0", "--points", "[[45,55],[50,60]]",
                "--labels", "[1,1]", "--propagate-end", "100", "--export", "--json"],
               tmp_path, checkpoint)
    assert run.returncode == 0, run.stderr
    steps = {d["step"]: d for d in map(json.loads, run.stdout.splitlines())}
    assert steps["propagation"]["frames_processed"] == 6
    assert steps["propagation"]["end_frame"] == 5  # clamped
    assert "propagate" in run.stderr  # the progress bar
    out = Path(steps["export"]["path"])
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(c.streams.video[0])) == 6
    session_dir = out.parent
    masks = sorted((session_dir / "masks").glob("*.png"))
    assert len(masks) == 6
    labels = cv2.imread(str(masks[0]), cv2.IMREAD_UNCHANGED)
    assert set(np.unique(labels)) <= {0, 1}
    manifest = json.loads((session_dir / "session.json").read_text())
    assert manifest["prompts"][0]["points"] == [[45.0, 55.0], [50.0, 60.0]]
