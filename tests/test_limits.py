"""Every input is bounded before it is decoded: hostile files and bodies get a clear 4xx, and the
server's memory (measured on a real uvicorn process) stays far below what they announce."""

from __future__ import annotations

import base64
import io
import select
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
from media import make_video
from PIL import Image
from servers import Server, reset_peak_rss, rss_kib
from test_api import CLICK, assert_error, leftovers, mask_png_b64, upload, upload_bytes

MIB = 1024 * 1024
BOMB_LIMIT_MIB = 200  # far above an honest request, far below what the bombs announce


# ----------------------------------------------------------------------------- helpers
def png_bomb(side: int = 30000) -> bytes:
    """A one-bit PNG of side x side: ~100 KB on disk, side**2 bytes once decoded to grey."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, "PNG")
    return buf.getvalue()


def write_h264(path, width: int, height: int, frames: int = 2) -> None:
    """An H.264 file of a big black picture, written in a child process (it needs memory)."""
    code = f"""
import av
with av.open({str(path)!r}, "w") as c:
    s = c.add_stream("libx264", rate=24)
    s.width, s.height, s.pix_fmt = {width}, {height}, "yuv420p"
    s.options = {{"preset": "ultrafast", "crf": "51"}}
    f = av.VideoFrame({width}, {height}, "yuv420p")
    for p in f.planes:
        p.update(bytes(p.buffer_size))
    for i in range({frames}):
        f.pts = i
        for pk in s.encode(f):
            c.mux(pk)
    for pk in s.encode():
        c.mux(pk)
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def still(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((120, 160, 3), 128, np.uint8)).save(buf, fmt)
    return buf.getvalue()


class PeakRise:
    """How far the server's resident memory rose above where it was, in MiB."""

    def __init__(self, pid: int):
        self.pid = pid

    def __enter__(self):
        self.base = rss_kib(self.pid, "VmRSS")
        assert reset_peak_rss(self.pid), "this kernel does not let us reset VmHWM"
        return self

    def __exit__(self, *exc):
        self.mib = (rss_kib(self.pid, "VmHWM") - self.base) / 1024


def stream_raw(port: int, path: str, headers: dict[str, str], total: int,
               chunked: bool = True, prefix: bytes = b"") -> int:
    """POST ``total`` bytes in 1 MiB pieces until the server answers or hangs up; returns the
    bytes that went out. The server's verdict is read from its access log (a response sent
    before the body ends may be lost to a reset on our side)."""
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1"] + [f"{k}: {v}" for k, v in headers.items()]
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}")
    piece = b"x" * MIB
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        if prefix:
            sock.sendall(f"{len(prefix):x}\r\n".encode() + prefix + b"\r\n")
        try:
            while sent < total:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    break
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
    return sent


def status_logged(server: Server, request_id: str) -> int:
    line = server.wait_for_log(f"sam2_server.access: {request_id} ", 120)
    return int(line.split(f"{request_id} ")[1].split()[2])


# ----------------------------------------------------------------------------- real server
@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    srv = Server({"SAM2_CHECKPOINT": str(checkpoint), "SAM2_IMAGE_SIZE": "256",
                  "SAM2_DEVICE": "cpu", "SAM2_UPLOAD_DIR": str(root / "uploads"),
                  "SAM2_OUTPUT_DIR": str(root / "outputs"), "SAM2_MAX_JSON_MB": "8",
                  "SAM2_MAX_UPLOAD_MB": "64"}, root / "server.log").start()
    srv.root = root
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def live(server, tmp_path_factory):
    """A session on the real server, with a click on frame 0."""
    video = make_video(tmp_path_factory.mktemp("v") / "clip.mp4")
    with server.client() as c, open(video, "rb") as f:
        sid = c.post("/upload-video", files={"file": ("clip.mp4", f, "video/mp4")}).json()[
            "session_id"]
        r = c.post(f"/annotate-frame/{sid}",
                   json={"frame_idx": 0, "points": [{"x": CLICK[0], "y": CLICK[1]}]})
        assert r.status_code == 200, r.text
    return sid


def test_png_bomb_as_base64_mask_is_refused_from_its_header(server, live):
    body = {"frame_idx": 0, "mask_png_base64": base64.b64encode(png_bomb()).decode()}
    with server.client() as c, PeakRise(server.pid) as rise:
        r = c.post(f"/annotate-frame/{live}", json=body)
    assert_error(r, 422, "invalid_prompt")
    assert "160x120" in r.json()["detail"]
    assert rise.mib < BOMB_LIMIT_MIB, rise.mib
    # Three at once.
    with server.client() as c, PeakRise(server.pid) as rise, ThreadPoolExecutor(3) as pool:
        codes = list(pool.map(lambda _: c.post(f"/annotate-frame/{live}", json=body).status_code,
                              range(3)))
    assert codes == [422] * 3 and rise.mib < BOMB_LIMIT_MIB, (codes, rise.mib)


def test_png_bomb_on_mask_prompt_is_refused_from_its_header(server, live):
    with server.client() as c, PeakRise(server.pid) as rise:
        r = c.post(f"/mask-prompt/{live}", data={"frame_idx": "0"},
                   files={"file": ("bomb.png", png_bomb(), "image/png")})
    assert_error(r, 422, "invalid_prompt")
    assert rise.mib < BOMB_LIMIT_MIB, rise.mib


def test_huge_video_is_refused_from_its_stream_header(server, tmp_path):
    bomb = tmp_path / "8k.mp4"
    write_h264(bomb, 8192, 8192)
    assert bomb.stat().st_size < 1024 * 1024
    with server.client() as c, PeakRise(server.pid) as rise, open(bomb, "rb") as f:
        r = c.post("/upload-video", files={"file": ("8k.mp4", f, "video/mp4")})
    body = assert_error(r, 422, "video_size_refused")
    assert "8192x8192" in body["detail"] and "SAM2_MAX_VIDEO_PIXELS" in body["detail"]
    # Opening the file must not decode its picture either (FFmpeg probes by decoding frames;
    # one 8192x8192 frame alone is ~100 MiB).
    assert rise.mib < 60, rise.mib
    with server.client() as c:
        sessions = c.get("/sessions").json()
    assert all(s["filename"] != "8k.mp4" for s in sessions)
    assert not any(p.name.endswith(".mp4") for p in (server.root / "uploads").rglob("*")
                   if p.parent.name not in {s["session_id"] for s in sessions})


@pytest.mark.parametrize("chunked", [True, False], ids=["streamed", "declared-length"])
def test_huge_json_body_is_413_while_it_arrives(server, live, chunked):
    rid = f"json-bomb-{int(chunked)}"
    with PeakRise(server.pid) as rise:
        sent = stream_raw(server.port, f"/annotate-frame/{live}",
                          {"Content-Type": "application/json", "X-Request-ID": rid},
                          200 * MIB, chunked=chunked)
    assert status_logged(server, rid) == 413
    assert sent < 100 * MIB, sent  # refused long before the end
    assert rise.mib < 100, rise.mib


def test_huge_mask_prompt_body_is_413_while_it_arrives(server, live):
    with PeakRise(server.pid) as rise:
        sent = stream_raw(server.port, f"/mask-prompt/{live}",
                          {"Content-Type": "multipart/form-data; boundary=xyz",
                           "X-Request-ID": "mask-bomb"}, 300 * MIB,
                          prefix=b'--xyz\r\nContent-Disposition: form-data; name="file"; '
                                 b'filename="m.png"\r\nContent-Type: image/png\r\n\r\n')
    assert status_logged(server, "mask-bomb") == 413
    assert sent < 100 * MIB, sent
    assert rise.mib < 100, rise.mib


# ----------------------------------------------------------------------------- in process
def test_json_body_over_the_limit_is_a_json_413(client, session_id, settings):
    big = {"frame_idx": 0, "mask_png_base64": "A" * (settings.max_json_bytes + 10)}
    body = assert_error(client.post(f"/annotate-frame/{session_id}", json=big), 413,
                        "request_too_large")
    assert str(settings.max_json_bytes) in body["detail"]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_still_images_are_not_videos(client, settings, fmt):
    body = assert_error(upload_bytes(client, still(fmt), f"picture.{fmt.lower()}"), 415,
                        "not_a_video")
    assert "mp4" in body["detail"]
    assert leftovers(settings) == []


def test_tiny_videos_are_refused(client, settings, tmp_path):
    path = make_video(tmp_path / "tiny.mp4", num_frames=3, width=8, height=8)
    body = assert_error(upload(client, path), 422, "video_size_refused")
    assert "at least" in body["detail"]
    assert leftovers(settings) == []


def test_empty_mask_prompt_file_is_422(client, session_id):
    r = client.post(f"/mask-prompt/{session_id}", data={"frame_idx": "0"},
                    files={"file": ("m.png", b"", "image/png")})
    assert_error(r, 422, "invalid_prompt")
    mask = np.zeros((120, 160), np.uint8)
    wrong = cv2.imencode(".png", np.zeros((60, 80), np.uint8))[1].tobytes()
    r = client.post(f"/mask-prompt/{session_id}", data={"frame_idx": "0"},
                    files={"file": ("m.png", wrong, "image/png")})
    assert "80x60" in assert_error(r, 422, "invalid_prompt")["detail"]
    assert mask_png_b64(mask)  # the right size is accepted elsewhere (test_api)


def test_parts_after_the_file_are_ignored(client, video):
    with open(video, "rb") as f:
        r = client.post("/upload-video", files=[("file", ("clip.mp4", f.read(), "video/mp4")),
                                                ("note", (None, "hello")),
                                                ("file", ("again.mp4", b"junk", "video/mp4"))])
    assert r.status_code == 200, r.text
    assert r.json()["filename"] == "clip.mp4"


def test_the_session_limit_is_exact_under_concurrent_uploads(settings, predictor, video):
    from fastapi.testclient import TestClient

    from main import create_app
    from sam2_manager import SAM2Manager

    s = settings.model_copy(update={"max_sessions": 3})
    mgr = SAM2Manager(s, predictor=predictor)
    most = []
    original = mgr.create_session

    def counting(*args, **kwargs):
        session = original(*args, **kwargs)
        with mgr._sessions_lock:
            most.append(len(mgr.sessions) + len(mgr._reserved))
        return session

    mgr.create_session = counting
    data = video.read_bytes()
    with TestClient(create_app(s, mgr)) as c:
        upload_bytes(c, data)
        barrier = threading.Barrier(8)

        def one(_):
            barrier.wait()
            return upload_bytes(c, data).status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(one, range(8)))
        assert set(codes) <= {200, 429}, codes
        assert codes.count(200) >= 3
        assert len(mgr.sessions) <= 3 and max(most) <= 3, (len(mgr.sessions), most)
        # Every upload that was answered 200 is a session on disk, open or not.
        assert len(c.get("/sessions").json()) == 1 + codes.count(200)
