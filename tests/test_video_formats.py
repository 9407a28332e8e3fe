"""Uploading real encoded videos: codecs, containers, odd sizes, NTSC rates, rotation metadata."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from conftest import label_png
from media import frame_rgb, make_video

NUM_FRAMES = 6


def require_encoder(codec: str) -> None:
    try:
        av.codec.Codec(codec, "w")
    except Exception:  # PyAV raises UnknownCodecError (or ValueError in old versions)
        pytest.skip(f"PyAV has no {codec} encoder")


def upload(client, path: Path) -> dict:
    with open(path, "rb") as f:
        r = client.post("/upload-video",
                        files={"file": (path.name, f, "application/octet-stream")})
    assert r.status_code == 200, r.text
    return r.json()


def get_frame(client, sid: str, i: int) -> np.ndarray:
    r = client.get(f"/frame/{sid}/{i}")
    assert r.status_code == 200, (i, r.text)
    assert r.headers["content-type"] == "image/jpeg"
    bgr = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
    assert bgr is not None, i
    return bgr[..., ::-1]


def mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


def export_facts(client, sid: str, tmp_path: Path) -> dict:
    """Annotate frame 0 (export needs a mask), export, and decode what came back."""
    r = client.post(f"/annotate-frame/{sid}",
                    json={"frame_idx": 0, "points": [{"x": 10, "y": 10, "label": 1}]})
    assert r.status_code == 200, r.text
    r = client.get(f"/export/{sid}")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/mp4"
    out = tmp_path / f"export-{sid}.mp4"
    out.write_bytes(r.content)
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        frames, pts, rotations = [], [], []
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            pts.append(frame.pts)
            rotations.append(int(getattr(frame, "rotation", 0) or 0))
        return {"codec": stream.codec_context.name, "pix_fmt": stream.codec_context.pix_fmt,
                "width": stream.codec_context.width, "height": stream.codec_context.height,
                "average_rate": stream.average_rate, "time_base": stream.time_base,
                "frames": frames, "pts": pts, "rotations": rotations}


# (file name, encoder, pix_fmt, width, height, codec name the upload reports)
FORMATS = {
    "mp4-h264": ("clip.mp4", "libx264", "yuv420p", 160, 120, "h264"),
    "mp4-hevc": ("clip.mp4", "libx265", "yuv420p", 160, 120, "hevc"),
    "mkv-hevc": ("clip.mkv", "libx265", "yuv420p", 160, 120, "hevc"),
    "webm-vp9": ("clip.webm", "libvpx-vp9", "yuv420p", 160, 120, "vp9"),
    "mov-h264": ("clip.mov", "libx264", "yuv420p", 160, 120, "h264"),
    "avi-mpeg4": ("clip.avi", "mpeg4", "yuv420p", 160, 120, "mpeg4"),
    "avi-mjpeg": ("clip.avi", "mjpeg", "yuvj420p", 160, 120, "mjpeg"),
    "mkv-h264": ("clip.mkv", "libx264", "yuv420p", 160, 120, "h264"),
    "odd-avi-mpeg4": ("clip.avi", "mpeg4", "yuv420p", 161, 97, "mpeg4"),
    "odd-avi-mjpeg": ("clip.avi", "mjpeg", "yuvj444p", 161, 97, "mjpeg"),
    "odd-mp4-h264-444": ("clip.mp4", "libx264", "yuv444p", 161, 97, "h264"),
    "odd-mkv-h264-444": ("clip.mkv", "libx264", "yuv444p", 161, 97, "h264"),
}


@pytest.mark.parametrize("case", list(FORMATS))
def test_upload_serves_every_frame(client, tmp_path, case):
    name, codec, pix_fmt, width, height, codec_name = FORMATS[case]
    require_encoder(codec)
    path = make_video(tmp_path / "in" / name, num_frames=NUM_FRAMES, width=width, height=height,
                      codec=codec, pix_fmt=pix_fmt)
    body = upload(client, path)
    assert body["num_frames"] == NUM_FRAMES
    assert (body["width"], body["height"]) == (width, height)
    assert body["codec"] == codec_name
    assert body["fps_rational"] == "24/1"
    assert body["rotation"] == 0
    sid = body["session_id"]
    for i in range(NUM_FRAMES):
        img = get_frame(client, sid, i)
        assert img.shape == (height, width, 3), i
        # The frame shown is frame i of the source (the box moves, so a shifted index differs).
        assert mean_diff(img, frame_rgb(i, width, height)) < 10, i
    r = client.get(f"/frame/{sid}/{NUM_FRAMES}")
    assert r.status_code == 404 and r.json()["error"] == "frame_out_of_range"
    info = client.get(f"/session/{sid}").json()["video"]
    assert info["frames_padded"] == 0


@pytest.mark.parametrize("case", ["odd-avi-mpeg4", "odd-mp4-h264-444"])
def test_odd_size_masks_and_export(client, tmp_path, case):
    name, codec, pix_fmt, width, height, _ = FORMATS[case]
    require_encoder(codec)
    path = make_video(tmp_path / "in" / name, num_frames=NUM_FRAMES, width=width, height=height,
                      codec=codec, pix_fmt=pix_fmt)
    sid = upload(client, path)["session_id"]
    facts = export_facts(client, sid, tmp_path)
    mask = label_png(client.get(f"/mask/{sid}/0").content)
    assert mask.shape == (height, width)
    assert facts["codec"] == "h264" and facts["pix_fmt"] == "yuv420p"
    assert len(facts["frames"]) == NUM_FRAMES
    # yuv420p H.264 needs even sizes: at most one padded row/column, the picture itself intact.
    assert facts["width"] in (width, width + 1) and facts["height"] in (height, height + 1)
    for i in range(1, NUM_FRAMES):  # frame 0 carries the overlay
        picture = facts["frames"][i][:height, :width]
        assert mean_diff(picture, get_frame(client, sid, i)) < 6, i


NTSC = {
    "mp4-30000/1001": ("clip.mp4", "libx264", Fraction(30000, 1001)),
    "mov-30000/1001": ("clip.mov", "libx264", Fraction(30000, 1001)),
    "mkv-30000/1001": ("clip.mkv", "libx264", Fraction(30000, 1001)),
    "webm-30000/1001": ("clip.webm", "libvpx-vp9", Fraction(30000, 1001)),
    "mp4-24000/1001": ("clip.mp4", "libx264", Fraction(24000, 1001)),
    "mp4-60000/1001": ("clip.mp4", "libx264", Fraction(60000, 1001)),
}


@pytest.mark.parametrize("case", list(NTSC))
def test_ntsc_rate_is_reported_and_exported_exactly(client, tmp_path, case):
    name, codec, fps = NTSC[case]
    require_encoder(codec)
    path = make_video(tmp_path / "in" / name, num_frames=NUM_FRAMES, codec=codec, fps=fps)
    body = upload(client, path)
    assert body["fps_rational"] == f"{fps.numerator}/{fps.denominator}"
    assert body["fps"] == pytest.approx(float(fps), abs=1e-6)
    assert body["num_frames"] == NUM_FRAMES
    assert body["duration_s"] == pytest.approx(NUM_FRAMES / float(fps), abs=1e-5)

    facts = export_facts(client, body["session_id"], tmp_path)
    assert len(facts["frames"]) == NUM_FRAMES
    assert facts["average_rate"] == fps
    # Each frame lasts exactly 1/fps: no drift from a rounded rate.
    pts = facts["pts"]
    steps = {Fraction(b - a) * facts["time_base"] for a, b in zip(pts, pts[1:], strict=False)}
    assert steps == {1 / fps}


@pytest.mark.parametrize("rotation", [90, 180, 270])
@pytest.mark.parametrize("ext", ["mp4", "mov"])
def test_rotation_metadata_is_applied(client, tmp_path, rotation, ext):
    src_w, src_h = 160, 120
    path = make_video(tmp_path / "in" / f"rot.{ext}", num_frames=NUM_FRAMES, width=src_w,
                      height=src_h, rotation=rotation)
    body = upload(client, path)
    assert body["rotation"] == rotation
    w, h = (src_h, src_w) if rotation in (90, 270) else (src_w, src_h)
    assert (body["width"], body["height"]) == (w, h)
    assert body["num_frames"] == NUM_FRAMES
    sid = body["session_id"]

    k = rotation // 90  # PyAV: rotation is counter-clockwise, as np.rot90
    for i in range(NUM_FRAMES):
        img = get_frame(client, sid, i)
        assert img.shape == (h, w, 3), i
        expected = np.rot90(frame_rgb(i, src_w, src_h), k=k)
        assert mean_diff(img, expected) < 10, i

    # The blue top-left mark of the source, wherever the rotation put it.
    corner = {90: "bottom-left", 180: "bottom-right", 270: "top-right"}[rotation]
    img = get_frame(client, sid, 0).astype(int)
    cells = {"top-left": img[2, 2], "top-right": img[2, w - 3],
             "bottom-left": img[h - 3, 2], "bottom-right": img[h - 3, w - 3]}
    blue = {name for name, px in cells.items() if px[2] > 180 and px[0] < 80}
    assert blue == {corner}, cells

    # Prompts, masks and the export live in the displayed (rotated) geometry.
    r = client.post(f"/annotate-frame/{sid}",
                    json={"frame_idx": 0, "points": [{"x": w - 1, "y": h - 1, "label": 1}]})
    assert r.status_code == 200, r.text
    assert label_png(client.get(f"/mask/{sid}/0").content).shape == (h, w)
    facts = export_facts(client, sid, tmp_path)
    assert (facts["width"], facts["height"]) == (w, h)
    assert len(facts["frames"]) == NUM_FRAMES
    # The pixels are already upright: the export must not ask players to rotate them again.
    assert set(facts["rotations"]) == {0}
    assert mean_diff(facts["frames"][3], get_frame(client, sid, 3)) < 6


@pytest.mark.parametrize("num_frames", [1, 4, 10])
def test_frame_count_matches_what_was_encoded(client, tmp_path, num_frames):
    path = make_video(tmp_path / "in" / "n.mp4", num_frames=num_frames)
    body = upload(client, path)
    assert body["num_frames"] == num_frames
    sid = body["session_id"]
    for i in range(num_frames):
        assert get_frame(client, sid, i).shape == (120, 160, 3)
    assert client.get(f"/frame/{sid}/{num_frames}").status_code == 404
