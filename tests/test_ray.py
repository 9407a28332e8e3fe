"""Ray mode: ``python serve_ray.py`` with 2 workers of 1 CPU on a local cluster, over HTTP.

One server for the module (a Ray cluster takes seconds to start), with access keys on, so
every request here also checks that auth holds through the Ray ingress.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from servers import ROOT, RayServer
from test_fidelity import (
    POS_LABELS,
    POS_POINTS,
    assert_informative,
    assert_same_labels,
    ref_add,
    ref_propagate,
)

from synthetic_video import make_video

pytest.importorskip("ray")

KEY_A, KEY_B = "ray-key-a-0123456789", "ray-key-b-0123456789"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory, checkpoint):
    root = tmp_path_factory.mktemp("ray")
    env = {"SAM2_CHECKPOINT": str(checkpoint), "SAM2_IMAGE_SIZE": "256", "SAM2_DEVICE": "cpu",
           "SAM2_FILL_HOLE_AREA": "0", "SAM2_UPLOAD_DIR": str(root / "uploads"),
           "SAM2_OUTPUT_DIR": str(root / "outputs"), "SAM2_API_KEYS": f"{KEY_A},{KEY_B}",
           "SAM2_MAX_SESSIONS": "1", "SAM2_MAX_JSON_MB": "1",
           # Two ingress replicas: requests of one test land on either, so job ids, views and
           # assignments must agree across them.
           "SAM2_RAY_INGRESS_REPLICAS": "2"}
    server = RayServer(env, root / "server.log").start(ready_timeout=600)
    server.output_dir = root / "outputs"
    yield server
    server.stop()


@pytest.fixture
def http(ray_server):
    with ray_server.client(headers=A) as c:
        yield c


def upload(http, path: Path, headers=None) -> str:
    with open(path, "rb") as f:
        r = http.post("/upload-video", files={"file": (path.name, f, "video/mp4")},
                      headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["session_id"]


def click(http, sid: str, frame_idx: int = 0, points=POS_POINTS, labels=POS_LABELS,
          path: str = "annotate-frame"):
    body = {"frame_idx": frame_idx, "obj_id": 1,
            "points": [{"x": x, "y": y, "label": lab} for (x, y), lab in
                       zip(points, labels, strict=True)]}
    return http.post(f"/{path}/{sid}", json=body)


def mask_of(http, sid: str, frame_idx: int) -> np.ndarray:
    r = http.get(f"/mask/{sid}/{frame_idx}")
    assert r.status_code == 200, r.text
    return cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_UNCHANGED)


def workers(http) -> dict[str, dict]:
    return {w["worker"]: w for w in http.get("/health").json()["workers"]}


def test_two_sessions_land_on_two_workers(ray_server, http, tmp_path):
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["mode"] == "ray"
    assert sorted(workers(http)) == ["sam2-worker-0", "sam2-worker-1"]
    video = make_video(tmp_path / "clip.mp4")
    first, second = upload(http, video), upload(http, video)
    held = {http.get(f"/session/{sid}").json()["worker"] for sid in (first, second)}
    assert held == {"sam2-worker-0", "sam2-worker-1"}
    for sid in (first, second):
        assert click(http, sid).status_code == 200
        assert http.delete(f"/session/{sid}").status_code == 200


def test_seed_workflow_through_the_ray_ingress(ray_server):
    done = subprocess.run([sys.executable, "test_workflow.py", "--url", ray_server.url,
                           "--api-key", KEY_A, "--timeout", "300"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "workflow complete" in done.stdout


def test_masks_equal_metas_predictor_through_ray(ray_server, http, tmp_path,
                                                 reference_predictor):
    video = make_video(tmp_path / "clip.mp4")
    sid = upload(http, video)
    r = click(http, sid)
    assert r.status_code == 200, r.text
    r = http.post(f"/propagate/{sid}", json={"start_frame": 0})
    assert r.status_code == 200, r.text
    n = r.json()["frames_processed"]
    server = {f: mask_of(http, sid, f) for f in range(n)}
    # Meta's predictor on the very JPEG frames the worker decoded to the shared folder.
    state = reference_predictor.init_state(str(ray_server.output_dir / sid / "frames"))
    clicked = ref_add(reference_predictor, state, 0, 1, points=POS_POINTS, labels=POS_LABELS)
    reference = ref_propagate(reference_predictor, state, 0, n - 1)
    assert_same_labels({0: server[0]}, {0: clicked})
    assert_informative(reference)
    assert_same_labels(server, reference)
    assert http.delete(f"/session/{sid}").status_code == 200


def test_auth_and_limits_hold_in_ray_mode(ray_server, http, tmp_path):
    video = make_video(tmp_path / "clip.mp4")
    sid = upload(http, video)
    with ray_server.client() as anonymous:
        assert anonymous.get("/health").status_code == 200
        assert anonymous.get(f"/frame/{sid}/0").status_code == 401
    with ray_server.client(headers=B) as other:
        for path in (f"/session/{sid}", f"/frame/{sid}/0", f"/mask/{sid}/0"):
            r = other.get(path)
            assert r.status_code == 404 and r.json()["error"] == "session_not_found", path
        assert click(other, sid).status_code == 404
        assert sid not in {s["session_id"] for s in other.get("/sessions").json()}
    assert http.get(f"/frame/{sid}/8").status_code == 404
    r = click(http, sid, frame_idx=99)
    assert r.status_code == 422 and str(ray_server.output_dir) not in r.text
    r = http.post(f"/annotate-frame/{sid}", content=b"{" + b" " * (2 * 1024 * 1024) + b"}",
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    r = http.post("/upload-video", files={"file": ("x.mp4", b"not a video", "video/mp4")})
    assert r.status_code in (415, 422) and r.json()["error"] in ("not_a_video",
                                                                 "video_unreadable")
    assert http.delete(f"/session/{sid}").status_code == 200


def test_full_workers_answer_429(ray_server, http, tmp_path):
    """One session per worker (SAM2_MAX_SESSIONS=1): with both propagating, a third is 429."""
    video = make_video(tmp_path / "long.mp4", num_frames=120)
    sids = [upload(http, video) for _ in range(2)]
    jobs = []
    for sid in sids:
        assert click(http, sid).status_code == 200
        r = http.post(f"/propagate/{sid}", json={"start_frame": 0, "background": True})
        assert r.status_code == 202, r.text
        jobs.append(r.json()["job_id"])
    for job in jobs:  # both running (each answers once its first frame is done)
        with http.stream("GET", f"/jobs/{job}/events") as events:
            for line in events.iter_lines():
                if line.startswith("data:") and json.loads(line[5:])["done"] > 0:
                    break
    with open(video, "rb") as f:
        r = http.post("/upload-video", files={"file": ("third.mp4", f, "video/mp4")})
    assert r.status_code == 429 and "Retry-After" in r.headers, r.text
    for job in jobs:
        assert http.post(f"/jobs/{job}/cancel").status_code == 200
    for sid in sids:
        assert http.delete(f"/session/{sid}").status_code in (200, 409)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_killed_worker_loses_no_work(ray_server, http, tmp_path):
    video = make_video(tmp_path / "long.mp4", num_frames=90)
    sid = upload(http, video)
    assert click(http, sid).status_code == 200
    r = http.post(f"/propagate/{sid}", json={"start_frame": 0, "end_frame": 9})
    assert r.status_code == 200, r.text
    assert click(http, sid, frame_idx=5, points=[[70, 40]], labels=[0],
                 path="refine-mask").status_code == 200
    before = http.get(f"/session/{sid}").json()
    holder = before["worker"]
    pid = workers(http)[holder]["pid"]
    masks = ray_server.output_dir / sid / "masks"
    kept = {p.name: _digest(p) for p in masks.glob("*.png")}
    assert len(kept) == 10

    # A propagation from frame 10 on, as a job; the worker is killed once it has written some.
    r = http.post(f"/propagate/{sid}", json={"start_frame": 10, "background": True})
    assert r.status_code == 202, r.text
    job = r.json()["job_id"]
    with http.stream("GET", f"/jobs/{job}/events") as events:
        for line in events.iter_lines():
            if line.startswith("data:") and json.loads(line[5:])["done"] >= 3:
                break
    ray_server.ray_run(f"ray.kill(ray.get_actor({holder!r}), no_restart=False)")

    # The job reads interrupted, with the last frame it wrote (at most one 503 on the way).
    statuses = []
    for _ in range(2):
        r = http.get(f"/jobs/{job}")
        statuses.append(r.status_code)
        if r.status_code == 200:
            break
        assert r.status_code == 503 and "Retry-After" in r.headers, r.text
    assert statuses[-1] == 200, statuses
    record = r.json()
    assert record["status"] == "interrupted", record
    # Every mask written before the job is unchanged; the job's frames are whole PNGs.
    for name, digest in kept.items():
        assert _digest(masks / name) == digest, name
    for path in masks.glob("*.png"):
        assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED) is not None, path.name

    # The session works again, on its worker restarted (hard affinity: the same name).
    after = http.get(f"/session/{sid}").json()
    assert after["worker"] == holder
    assert after["current_prompts"] == before["current_prompts"]
    interrupted = [p for p in after["propagations"] if p.get("job_id") == job]
    assert interrupted and interrupted[0]["status"] == "interrupted", after["propagations"]
    r = click(http, sid, frame_idx=20, points=[[50, 50]], labels=[1], path="refine-mask")
    assert r.status_code == 200, r.text
    r = http.post(f"/propagate/{sid}", json={"start_frame": 20, "end_frame": 30})
    assert r.status_code == 200 and r.json()["frames_processed"] == 11, r.text
    health = workers(http)[holder]
    assert health["status"] == "ok" and health["pid"] != pid  # a new process
    assert http.delete(f"/session/{sid}").status_code == 200


def test_a_worker_gone_for_good_hands_its_sessions_over(ray_server, http, tmp_path):
    """Last in the module: it leaves one worker. A worker killed without restart: its session
    moves to the other worker, which reopens it from disk with every mask and prompt."""
    video = make_video(tmp_path / "clip.mp4", num_frames=12)
    sid = upload(http, video)
    assert click(http, sid).status_code == 200
    assert http.post(f"/propagate/{sid}", json={"start_frame": 0, "end_frame": 5}).status_code \
        == 200
    before = http.get(f"/session/{sid}").json()
    holder = before["worker"]
    masks = ray_server.output_dir / sid / "masks"
    kept = {p.name: _digest(p) for p in masks.glob("*.png")}
    assert len(kept) == 6
    ray_server.ray_run(f"ray.kill(ray.get_actor({holder!r}), no_restart=True)")

    answers = []
    for _ in range(3):
        r = click(http, sid, frame_idx=8, points=[[50, 50]], labels=[1], path="refine-mask")
        answers.append(r.status_code)
        if r.status_code == 200:
            break
        assert r.status_code == 503 and "Retry-After" in r.headers, r.text
    assert answers[-1] == 200 and len(answers) <= 2, answers
    after = http.get(f"/session/{sid}").json()
    assert after["worker"] != holder
    assert after["current_prompts"]["1"]["0"] == before["current_prompts"]["1"]["0"]
    for name, digest in kept.items():
        assert _digest(masks / name) == digest, name
    r = http.post(f"/propagate/{sid}", json={"start_frame": 8, "end_frame": 11})
    assert r.status_code == 200 and r.json()["frames_processed"] == 4, r.text
    assert workers(http)[holder]["status"] == "gone"
    assert http.delete(f"/session/{sid}").status_code == 200
