"""A ZIP of image frames works like a video: same frames, same masks (equal to Meta's predictor
on the server's frames, and to a lossless video of the same pictures), bounded like any input."""

from __future__ import annotations

import io
import shutil
import zipfile
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
from media import frame_rgb
from PIL import Image
from test_api import assert_error, leftovers, prompt, propagate_ok
from test_fidelity import POS_LABELS, POS_POINTS, assert_one_click_run_matches, server_mask

N, W, H = 8, 160, 120


def frames_zip(names: list[str] | None = None, fmt: str = ".png", extra: dict | None = None
               ) -> bytes:
    """The synthetic frames as a ZIP of images named ``names`` (00000.png... by default)."""
    names = [f"{i:05d}{fmt}" for i in range(N)] if names is None else names
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i, name in enumerate(names):
            zf.writestr(name, cv2.imencode(fmt, frame_rgb(i, W, H)[..., ::-1])[1].tobytes())
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


def upload_zip(client, data: bytes, fps: str | None = "12"):
    fields = {"fps": fps} if fps is not None else {}
    return client.post("/upload-video", data=fields,
                       files={"file": ("frames.zip", data, "application/zip")})


def lossless_video(path, fps: int = 12):
    """The same pictures as an FFV1 video: decoded, its frames equal the PNGs exactly."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "bgr0"
        for i in range(N):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame_rgb(i, W, H),
                                                                   format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_a_zip_of_frames_is_a_session(client):
    r = upload_zip(client, frames_zip(), fps="30000/1001")
    assert r.status_code == 200, r.text
    info = r.json()
    assert (info["num_frames"], info["width"], info["height"]) == (N, W, H)
    assert info["fps_rational"] == "30000/1001" and info["codec"] == "images"
    sid = info["session_id"]
    for i in range(N):
        jpeg = cv2.imdecode(np.frombuffer(client.get(f"/frame/{sid}/{i}").content, np.uint8),
                            cv2.IMREAD_COLOR)[..., ::-1]
        assert np.abs(jpeg.astype(int) - frame_rgb(i, W, H)).mean() < 2, i
    assert prompt(client, sid).status_code == 200
    assert propagate_ok(client, sid)["frames_processed"] == N
    r = client.get(f"/export/{sid}?format=mask_mp4")
    with av.open(io.BytesIO(r.content)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == Fraction(30000, 1001)
        assert sum(1 for _ in container.decode(stream)) == N


def test_zip_masks_equal_meta_and_a_lossless_video_of_the_same_frames(manager, tmp_path,
                                                                     reference_predictor):
    sessions = {}
    for kind, name, fps in (("zip", "frames.zip", "12"), ("video", "frames.mkv", None)):
        sid = manager.new_session_id()
        path = manager.store.upload_path_for(sid, name)
        if kind == "zip":
            path.write_bytes(frames_zip())
        else:
            shutil.copy(lossless_video(tmp_path / name), path)
        session = manager.create_session(sid, path, name, fps=fps)
        manager.add_prompt(sid, 0, 1, points=POS_POINTS, labels=POS_LABELS)
        annotated = server_mask(session, 0)
        assert manager.propagate(sid, 0, N - 1)["frames_processed"] == N
        sessions[kind] = session
        if kind == "zip":
            assert_one_click_run_matches(reference_predictor, session, 0, N - 1, annotated)
    for i in range(N):
        a, b = sessions["zip"], sessions["video"]
        assert a.frame_file(i).read_bytes() == b.frame_file(i).read_bytes(), i
        assert np.array_equal(server_mask(a, i), server_mask(b, i)), i


def test_frames_are_taken_in_natural_name_order(client):
    # frame0, frame2 ... frame14: by plain string order frame10 would come second.
    data = frames_zip([f"shot/frame{2 * i}.jpg" for i in range(N)], fmt=".jpg",
                      extra={"__MACOSX/shot/._frame1.jpg": b"junk", "shot/notes.txt": b"hi",
                             ".hidden.png": b"junk"})
    r = upload_zip(client, data, fps=None)
    assert r.status_code == 200, r.text
    assert r.json()["num_frames"] == N and r.json()["fps"] == 30
    sid = r.json()["session_id"]
    for i in range(N):
        got = cv2.imdecode(np.frombuffer(client.get(f"/frame/{sid}/{i}").content, np.uint8),
                           cv2.IMREAD_COLOR)[..., ::-1]
        assert np.abs(got.astype(int) - frame_rgb(i, W, H)).mean() < 3, i


@pytest.mark.parametrize("case", ["no-images", "not-a-zip-entry", "bomb", "bad-fps",
                                  "fps-on-video"])
def test_bad_sequences_are_422(client, settings, video, case):
    if case == "no-images":
        r = upload_zip(client, frames_zip(names=[], extra={"readme.txt": b"nothing"}))
    elif case == "not-a-zip-entry":
        r = upload_zip(client, frames_zip(names=[], extra={"00000.png": b"not a png"}))
    elif case == "bomb":
        big = io.BytesIO()
        Image.new("1", (30000, 30000)).save(big, "PNG")
        r = upload_zip(client, frames_zip(names=[], extra={"00000.png": big.getvalue()}))
    elif case == "bad-fps":
        r = upload_zip(client, frames_zip(), fps="fast")
    else:
        r = client.post("/upload-video", data={"fps": "25"},
                        files={"file": ("clip.mp4", video.read_bytes(), "video/mp4")})
    body = assert_error(r, 422)
    assert body["error"] in ("video_unreadable", "video_size_refused")
    assert leftovers(settings) == []


def test_a_damaged_later_frame_repeats_the_last_good_one(client):
    data = frames_zip(names=[f"{i:05d}.png" for i in range(N - 2)],
                      extra={f"{N - 2:05d}.png": b"broken", f"{N - 1:05d}.png": b"broken"})
    r = upload_zip(client, data)
    assert r.status_code == 200, r.text
    sid = r.json()["session_id"]
    assert client.get(f"/frame/{sid}/{N - 1}").status_code == 200
    assert client.get(f"/session/{sid}").json()["video"]["frames_padded"] == 2
