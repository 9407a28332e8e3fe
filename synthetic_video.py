"""Synthetic test videos made with PyAV: a bright box moving over a dark background."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def frame_rgb(i: int, width: int, height: int) -> np.ndarray:
    """Frame i: a yellow box that moves right by 2% of the width each frame, a blue corner mark."""
    img = np.zeros((height, width, 3), np.uint8)
    img[:] = (30, 60, 90)
    bw, bh = max(width // 3, 2), max(height // 3, 2)
    x0 = min(int(width * (0.1 + 0.02 * i)), width - bw)
    y0 = height // 3
    img[y0:y0 + bh, x0:x0 + bw] = (230, 210, 40)
    img[: max(height // 8, 1), : max(width // 8, 1)] = (20, 40, 230)  # marks the top-left corner
    return img


def make_video(path: Path, num_frames: int = 8, width: int = 160, height: int = 120,
               codec: str = "libx264", fps: Fraction | int = 24, pix_fmt: str = "yuv420p",
               rotation: int = 0) -> Path:
    """Write a video; ``rotation`` is stored as display-matrix metadata (counter-clockwise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = pix_fmt
        if rotation:
            stream.set_display_rotation(rotation)
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(frame_rgb(i, width, height), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def read_all_frames(path: Path) -> tuple[list[np.ndarray], av.video.stream.VideoStream]:
    """Decode every frame (RGB) plus stream facts, for checking exports."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, stream
