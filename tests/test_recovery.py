"""Crash recovery on a real server process: kill -9 during a propagation, an export and an upload,
restart on the same folders, and find manifest, files and jobs in agreement; SIGTERM stops
running work cleanly."""

from __future__ import annotations

import json
import signal
import socket
import threading
from pathlib import Path

import pytest
from media import make_video
from servers import Server
from test_api import CLICK


@pytest.fixture
def env(tmp_path, checkpoint) -> dict[str, str]:
    return {"SAM2_CHECKPOINT": str(checkpoint), "SAM2_IMAGE_SIZE": "256", "SAM2_DEVICE": "cpu",
            "SAM2_UPLOAD_DIR": str(tmp_path / "uploads"),
            "SAM2_OUTPUT_DIR": str(tmp_path / "outputs")}


@pytest.fixture
def servers(tmp_path, env):
    started: list[Server] = []

    def start() -> Server:
        srv = Server(env, tmp_path / f"server{len(started)}.log").start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


def upload(client, path: Path) -> str:
    with open(path, "rb") as f:
        r = client.post("/upload-video", files={"file": (path.name, f, "video/mp4")})
    assert r.status_code == 200, r.text
    return r.json()["session_id"]


def click(client, sid: str) -> None:
    r = client.post(f"/annotate-frame/{sid}",
                    json={"frame_idx": 0, "points": [{"x": CLICK[0], "y": CLICK[1]}]})
    assert r.status_code == 200, r.text


def until_progress(client, job_id: str, done: int) -> dict:
    """Follow the job's event stream until it has done ``done`` frames; return that event."""
    with client.stream("GET", f"/jobs/{job_id}/events") as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                assert event["status"] == "running", event
                if event["done"] >= done:
                    return event
    raise AssertionError("the job ended before the progress wanted")


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and (
        (p.name.startswith(".") and ".tmp" in p.name) or p.name.endswith(".partial"))]


def assert_files_agree(client, outputs: Path, sid: str) -> dict:
    """Manifest, GET /session and the mask files on disk agree; every listed file is served."""
    info = client.get(f"/session/{sid}").json()
    on_disk = {int(p.stem) for p in (outputs / sid / "masks").glob("[0-9]*.png")}
    assert set(info["mask_frames"]) == on_disk
    for f in info["mask_frames"]:
        assert client.get(f"/mask/{sid}/{f}").status_code == 200, f
        assert client.get(f"/overlay/{sid}/{f}").status_code == 200, f
    return info


def test_kill_during_propagation_then_restart(servers, tmp_path):
    outputs = tmp_path / "outputs"
    video = make_video(tmp_path / "v" / "long.mp4", num_frames=40)
    srv = servers()
    with srv.client() as c:
        sid = upload(c, video)
        click(c, sid)
        job = c.post(f"/propagate/{sid}", json={"start_frame": 0, "background": True}).json()
        until_progress(c, job["job_id"], 4)
        srv.kill()
    assert (outputs / sid / ".open").exists()  # it died with the session open

    srv = servers()
    assert temporaries(tmp_path / "outputs") == [] and temporaries(tmp_path / "uploads") == []
    with srv.client() as c:
        record = c.get(f"/jobs/{job['job_id']}")
        assert record.status_code == 200, record.text
        record = record.json()
        assert record["status"] == "interrupted"
        info = assert_files_agree(c, outputs, sid)
        run = info["propagations"][-1]
        assert run["status"] == "interrupted" and run["job_id"] == job["job_id"]
        tracked = [f for f in info["mask_frames"] if f > 0]
        assert tracked, "masks written before the kill were kept"
        assert run["last_frame"] == max(tracked) == record["result"]["last_frame"]
        assert run["frames"] == len(tracked) + 1 == record["result"]["frames_written"]
        # The session carries on: its prompts were replayed, and a new run completes.
        r = c.post(f"/propagate/{sid}", json={"start_frame": 0})
        assert r.status_code == 200, r.text
        assert r.json()["frames_processed"] == 40
        assert_files_agree(c, outputs, sid)


def test_kill_during_export_then_restart(servers, tmp_path):
    outputs = tmp_path / "outputs"
    video = make_video(tmp_path / "v" / "wide.mp4", num_frames=96, width=640, height=360)
    srv = servers()
    with srv.client() as c:
        sid = upload(c, video)
        click(c, sid)
        job = c.post(f"/export/{sid}", json={"format": "overlay_mp4"}).json()
        until_progress(c, job["job_id"], 2)
        srv.kill()

    srv = servers()
    assert temporaries(tmp_path) == []
    assert not (outputs / sid / "output_video.mp4").exists()
    with srv.client() as c:
        record = c.get(f"/jobs/{job['job_id']}").json()
        assert record["status"] == "interrupted", record
        assert_files_agree(c, outputs, sid)
        again = c.post(f"/export/{sid}", json={"format": "overlay_mp4"}).json()
        with c.stream("GET", f"/jobs/{again['job_id']}/events") as r:
            last = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: ")][-1]
        assert last["status"] == "succeeded", last
        assert c.get(last["result"]["download_url"]).status_code == 200


def test_kill_during_upload_then_restart(servers, tmp_path):
    srv = servers()
    uploads = tmp_path / "uploads"
    head = (b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="big.mp4"\r\n'
            b"Content-Type: video/mp4\r\n\r\n")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as sock:
        sock.sendall(b"POST /upload-video HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data;"
                     b" boundary=b0undary\r\nContent-Length: 50000000\r\n\r\n" + head)
        sock.sendall(b"\0" * (4 * 1024 * 1024))
        # The server is writing the upload: wait for its partial file (a condition, bounded).
        seen = threading.Event()
        for _ in range(1200):
            if list(uploads.rglob("*.partial")):
                seen.set()
                break
            seen.wait(0.05)
        assert seen.is_set(), "the upload never reached the disk"
        srv.kill()
    assert list(uploads.rglob("*.partial"))
    srv = servers()
    assert list(uploads.iterdir()) == [] and list((tmp_path / "outputs").iterdir()) == []
    with srv.client() as c:
        assert c.get("/sessions").json() == []


def test_sigterm_stops_a_propagation_cleanly(servers, tmp_path):
    outputs = tmp_path / "outputs"
    video = make_video(tmp_path / "v" / "long.mp4", num_frames=40)
    srv = servers()
    with srv.client() as c:
        sid = upload(c, video)
        click(c, sid)
        job = c.post(f"/propagate/{sid}", json={"start_frame": 0, "background": True}).json()
        until_progress(c, job["job_id"], 3)
        # uvicorn shuts down gracefully, then re-raises the signal for whoever supervises it.
        assert srv.terminate(timeout=120) in (0, -15)
    srv.wait_for_log("Application shutdown complete", 10)
    # Before any restart: the process itself recorded the stop and closed the session.
    assert not (outputs / sid / ".open").exists()
    manifest = json.loads((outputs / sid / "session.json").read_text())
    run = manifest["propagations"][-1]
    assert run["status"] == "interrupted" and 0 < run["frames"] < 40
    on_disk = {int(p.stem) for p in (outputs / sid / "masks").glob("[0-9]*.png")}
    assert set(manifest["mask_frames"]) == on_disk
    assert run["frames"] == len(on_disk)
    record = json.loads((outputs / sid / "jobs" / f"{job['job_id']}.json").read_text())
    assert record["status"] == "interrupted"
    assert temporaries(tmp_path) == []

    srv = servers()
    with srv.client() as c:
        assert c.get(f"/jobs/{job['job_id']}").json()["status"] == "interrupted"
        assert_files_agree(c, outputs, sid)


def test_sigterm_answers_a_blocking_propagation_with_503(servers, tmp_path):
    """A propagation run as one request, cut short by a stop: 503 with Retry-After and what was
    done, not a 500; the frames written are kept."""
    video = make_video(tmp_path / "v" / "long.mp4", num_frames=40)
    masks = tmp_path / "outputs"
    srv = servers()
    answer: dict = {}
    with srv.client() as c:
        sid = upload(c, video)
        click(c, sid)
        masks = masks / sid / "masks"
        before = len(list(masks.glob("*.png")))

        def propagate() -> None:
            answer["r"] = c.post(f"/propagate/{sid}", json={"start_frame": 0})

        worker = threading.Thread(target=propagate)
        worker.start()
        seen = threading.Event()
        while worker.is_alive() and not seen.wait(0.05):  # until the run has written some
            if len(list(masks.glob("*.png"))) >= before + 3:
                seen.set()
        assert seen.is_set(), "the propagation wrote nothing"
        srv.proc.send_signal(signal.SIGTERM)
        worker.join(120)
    r = answer["r"]
    assert r.status_code == 503 and r.headers["Retry-After"], r.text
    body = r.json()
    assert body["error"] == "interrupted" and 0 < body["result"]["frames_processed"] < 40, body
    assert srv.proc.wait(timeout=120) in (0, -15)
