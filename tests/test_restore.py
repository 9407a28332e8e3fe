"""Work survives a restart and idle expiry: sessions come back from their folder and manifest."""

from __future__ import annotations

import time

import numpy as np
from conftest import label_png
from fastapi.testclient import TestClient

from main import create_app
from sam2_manager import SAM2Manager


def _upload(client, video) -> str:
    with open(video, "rb") as f:
        r = client.post("/upload-video", files={"file": ("clip.mp4", f, "video/mp4")})
    assert r.status_code == 200, r.text
    return r.json()["session_id"]


def test_session_survives_restart(settings, predictor, video):
    points = {"frame_idx": 0, "points": [{"x": 45, "y": 55, "label": 1}]}
    with TestClient(create_app(settings, SAM2Manager(settings, predictor=predictor))) as c:
        sid = _upload(c, video)
        assert c.post(f"/annotate-frame/{sid}", json=points).status_code == 200
        assert c.post(f"/propagate/{sid}", json={"start_frame": 0, "end_frame": 7}).status_code \
            == 200
        before = c.get(f"/session/{sid}").json()
        masks_before = [label_png(c.get(f"/mask/{sid}/{i}").content) for i in range(8)]

    # A new process: nothing in memory, the same folders.
    with TestClient(create_app(settings, SAM2Manager(settings, predictor=predictor))) as c:
        after = c.get(f"/session/{sid}")
        assert after.status_code == 200
        after = after.json()
        for key in ("prompts", "current_prompts", "mask_frames", "objects", "video"):
            assert after[key] == before[key], key
        assert np.array_equal(label_png(c.get(f"/mask/{sid}/5").content), masks_before[5])
        assert c.get(f"/frame/{sid}/7").status_code == 200
        # The replayed prompt tracks exactly as before the restart.
        r = c.post(f"/propagate/{sid}", json={"start_frame": 0, "end_frame": 7})
        assert r.status_code == 200, r.text
        for i in range(8):
            assert np.array_equal(label_png(c.get(f"/mask/{sid}/{i}").content), masks_before[i])
        # And it can be refined and deleted like any session.
        refine = {"frame_idx": 4, "points": [{"x": 10, "y": 10, "label": 0}]}
        assert c.post(f"/refine-mask/{sid}", json=refine).status_code == 200
        assert c.delete(f"/session/{sid}").status_code == 200
        assert c.get(f"/session/{sid}").status_code == 404


def test_idle_session_expires_then_comes_back(client, session_id):
    mgr = client.manager
    r = client.post(f"/annotate-frame/{session_id}",
                    json={"frame_idx": 0, "points": [{"x": 45, "y": 55, "label": 1}]})
    assert r.status_code == 200
    assert mgr.cleanup_expired(now=time.time() + mgr.settings.session_ttl_s + 1) == [session_id]
    assert session_id not in mgr.sessions  # model state freed
    body = client.get(f"/session/{session_id}").json()
    assert body["current_prompts"]["1"]["0"]["points"] == [[45.0, 55.0]]
    assert client.post(f"/propagate/{session_id}", json={"start_frame": 0}).status_code == 200


def test_fresh_session_is_not_expired(client, session_id):
    assert client.manager.cleanup_expired() == []
    assert session_id in client.manager.sessions


def test_mask_prompt_survives_restart(settings, predictor, video):
    import base64

    import cv2

    mask = np.zeros((120, 160), np.uint8)
    mask[30:80, 20:70] = 255
    b64 = base64.b64encode(cv2.imencode(".png", mask)[1].tobytes()).decode()
    with TestClient(create_app(settings, SAM2Manager(settings, predictor=predictor))) as c:
        sid = _upload(c, video)
        r = c.post(f"/annotate-frame/{sid}", json={"frame_idx": 2, "mask_png_base64": b64})
        assert r.status_code == 200, r.text
    with TestClient(create_app(settings, SAM2Manager(settings, predictor=predictor))) as c:
        r = c.post(f"/propagate/{sid}", json={"start_frame": 2, "end_frame": 4})
        assert r.status_code == 200, r.text
        assert r.json()["frames_processed"] == 3
