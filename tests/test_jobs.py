"""Jobs: progress, server-sent events, and cancellation that leaves a consistent session."""

from __future__ import annotations

import json
import shutil

import pytest
from media import make_video

from jobs import JobCancelled, Progress


class CancelAfter:
    """A progress sink that asks for cancellation once ``n`` frames are done."""

    def __init__(self, n: int, event):
        self.n, self.event, self.seen = n, event, []

    def report(self, frame_idx, done, total):
        self.seen.append((frame_idx, done, total))
        if done >= self.n:
            self.event.set()


def test_cancelled_propagation_leaves_exactly_the_frames_written(manager, tmp_path):
    video = make_video(tmp_path / "v.mp4", num_frames=12)
    sid = manager.new_session_id()
    path = manager.store.upload_path_for(sid, "v.mp4")
    shutil.copy(video, path)
    session = manager.create_session(sid, path, "v.mp4")
    manager.add_prompt(sid, 4, 1, points=[[45, 55]], labels=[1])
    progress = Progress()
    sink = CancelAfter(3, progress.cancel_event)
    progress.job = sink
    with pytest.raises(JobCancelled) as info:
        manager.propagate(sid, 4, 11, progress=progress)
    result = info.value.result
    assert result["cancelled"] and result["frames_processed"] == 3
    assert [s[0] for s in sink.seen] == [4, 5, 6]
    manifest = json.loads(session.manifest_path.read_text())
    assert manifest["mask_frames"] == [4, 5, 6]
    assert manifest["propagations"][-1]["cancelled"] is True
    assert manifest["propagations"][-1]["frames"] == 3
    assert sorted(p.name for p in session.masks_dir.glob("*.png")) == \
        ["00004.png", "00005.png", "00006.png"]
    assert list(session.overlays_dir.glob("*.jpg")) == []  # overlays are made when read
    # The session is still usable: the rest of the range can be tracked afterwards.
    again = manager.propagate(sid, 4, 11)
    assert again["frames_processed"] == 8
    assert json.loads(session.manifest_path.read_text())["mask_frames"] == list(range(4, 12))


def test_background_propagation_streams_progress_and_can_be_cancelled(client, tmp_path):
    video = make_video(tmp_path / "long.mp4", num_frames=40)
    with open(video, "rb") as f:
        sid = client.post("/upload-video", files={"file": ("long.mp4", f)}).json()["session_id"]
    assert client.post(f"/annotate-frame/{sid}", json={
        "frame_idx": 0, "points": [{"x": 45, "y": 55, "label": 1}]}).status_code == 200
    r = client.post(f"/propagate/{sid}", json={"start_frame": 0, "background": True})
    assert r.status_code == 202
    job = r.json()
    events, cancelled = [], False
    with client.stream("GET", job["events_url"]) as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                events.append(line.split(":", 1)[1].strip())
            elif line.startswith("data:"):
                data = json.loads(line[5:])
                if events[-1] == "progress" and data["done"] >= 1 and not cancelled:
                    assert data["total"] == 40 and data["frame_idx"] == data["done"] - 1
                    assert client.post(job["cancel_url"]).status_code == 200
                    cancelled = True
    assert events[-1] == "end" and events.count("end") == 1
    final = client.get(f"/jobs/{job['job_id']}").json()
    assert final["status"] == "cancelled"
    written = final["result"]["frames_processed"]
    assert 1 <= written < 40
    session = client.get(f"/session/{sid}").json()
    assert session["mask_frames"] == list(range(written))
    for i in range(written):
        assert client.get(f"/mask/{sid}/{i}").status_code == 200
    assert client.get(f"/mask/{sid}/{written}").status_code == 404


def test_busy_session_answers_409_while_a_job_runs(client, settings, tmp_path):
    client.manager.settings = settings.model_copy(update={"session_lock_timeout_s": 0})
    video = make_video(tmp_path / "v.mp4", num_frames=30)
    with open(video, "rb") as f:
        sid = client.post("/upload-video", files={"file": ("v.mp4", f)}).json()["session_id"]
    body = {"frame_idx": 0, "points": [{"x": 45, "y": 55, "label": 1}]}
    assert client.post(f"/annotate-frame/{sid}", json=body).status_code == 200
    job = client.post(f"/propagate/{sid}", json={"start_frame": 0, "background": True}).json()
    with client.stream("GET", job["events_url"]) as stream:
        for line in stream.iter_lines():
            # done >= 1: the job reports progress only while it holds the session.
            if line.startswith("data:") and json.loads(line[5:])["done"] >= 1 \
                    and json.loads(line[5:])["status"] == "running":
                r = client.post(f"/annotate-frame/{sid}", json=body)
                assert r.status_code == 409 and r.json()["error"] == "session_busy"
                # Files stay readable while the session works.
                assert client.get(f"/frame/{sid}/3").status_code == 200
                client.post(job["cancel_url"])
                break
    running = client.manager.jobs.get(job["job_id"])
    version = -1
    while not running.finished:
        version = running.wait_change(version, 60)
    assert client.get(f"/jobs/{job['job_id']}").json()["status"] == "cancelled"
    # Once the job has ended, the session takes prompts again.
    assert client.post(f"/annotate-frame/{sid}", json=body).status_code == 200


def test_unknown_job(client):
    r = client.get("/jobs/doesnotexist")
    assert r.status_code == 404 and r.json()["error"] == "job_not_found"
    assert client.post("/jobs/doesnotexist/cancel").status_code == 404
