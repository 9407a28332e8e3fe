"""Access keys over HTTP: who may call what, whose sessions each key sees, CORS, and no key leaks."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient
from test_api import CLICK, assert_error

from main import create_app
from sam2_manager import SAM2Manager

ALICE, BOB, ROOT = "alice-key-6f1d2c", "bob-key-90ab77", "root-key-c0ffee"


@pytest.fixture
def keyed(settings):
    return settings.model_copy(update={"api_keys": ALICE + "," + BOB, "admin_keys": ROOT,
                                       "allowed_origins": ["https://app.example.com"]})


@pytest.fixture
def kc(keyed, predictor):
    mgr = SAM2Manager(keyed, predictor=predictor)
    with TestClient(create_app(keyed, mgr)) as c:
        c.manager = mgr
        yield c


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def upload_as(client, key, video) -> str:
    with open(video, "rb") as f:
        r = client.post("/upload-video", files={"file": ("clip.mp4", f, "video/mp4")},
                        headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()["session_id"]


def test_health_needs_no_key_and_everything_else_does(kc, video):
    assert kc.get("/health").status_code == 200
    for method, url in [("GET", "/sessions"), ("GET", "/metrics"), ("POST", "/upload-video"),
                        ("GET", "/frame/00000000-0000-4000-8000-000000000000/0"),
                        ("GET", "/jobs/" + "0" * 32)]:
        r = kc.request(method, url)
        body = assert_error(r, 401, "unauthorized")
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert "Bearer" in body["detail"]
        wrong = kc.request(method, url, headers=auth("not-a-key"))
        assert_error(wrong, 401, "unauthorized")
    # The upload is refused before its body is read: nothing reaches the disk.
    with open(video, "rb") as f:
        r = kc.post("/upload-video", files={"file": ("clip.mp4", f, "video/mp4")})
    assert_error(r, 401)
    assert kc.manager.sessions == {}
    assert list(kc.manager.settings.upload_dir.iterdir()) == []


def test_bearer_and_x_api_key_both_work(kc, video):
    sid = upload_as(kc, ALICE, video)
    assert kc.get(f"/session/{sid}", headers={"X-API-Key": ALICE}).status_code == 200
    assert kc.get(f"/session/{sid}", headers=auth(ALICE)).status_code == 200


def test_a_session_is_invisible_to_other_keys(kc, video):
    sid = upload_as(kc, ALICE, video)
    r = kc.post(f"/annotate-frame/{sid}", headers=auth(ALICE),
                json={"frame_idx": 0, "points": [{"x": CLICK[0], "y": CLICK[1], "label": 1}]})
    assert r.status_code == 200, r.text
    job = kc.post(f"/propagate/{sid}", headers=auth(ALICE),
                  json={"start_frame": 0, "background": True}).json()
    assert kc.get(f"/jobs/{job['job_id']}/events", headers=auth(ALICE)).status_code == 200
    before = kc.get(f"/session/{sid}", headers=auth(ALICE)).json()
    mask_before = kc.get(f"/mask/{sid}/0", headers=auth(ALICE)).content

    click = {"frame_idx": 0, "points": [{"x": 5, "y": 5, "label": 0}]}
    attempts = [("GET", f"/session/{sid}", None), ("GET", f"/frame/{sid}/0", None),
                ("GET", f"/mask/{sid}/0", None), ("GET", f"/overlay/{sid}/0", None),
                ("POST", f"/annotate-frame/{sid}", click), ("POST", f"/refine-mask/{sid}", click),
                ("POST", f"/propagate/{sid}", {"start_frame": 0}),
                ("POST", f"/clear-prompts/{sid}", {"frame_idx": 0, "obj_id": 1}),
                ("DELETE", f"/object/{sid}/1", None), ("POST", f"/reset/{sid}", None),
                ("GET", f"/export/{sid}", None), ("POST", f"/export/{sid}", {}),
                ("GET", f"/exports/{sid}/output_video.mp4", None),
                ("DELETE", f"/session/{sid}", None),
                ("GET", f"/jobs/{job['job_id']}", None),
                ("GET", f"/jobs/{job['job_id']}/events", None),
                ("POST", f"/jobs/{job['job_id']}/cancel", None)]
    unknown = "00000000-0000-4000-8000-000000000000"
    for method, url, body in attempts:
        r = kc.request(method, url, json=body, headers=auth(BOB))
        code = "job_not_found" if url.startswith("/jobs") else "session_not_found"
        got = assert_error(r, 404, code)
        # Word for word what a session that does not exist gets, bar the id.
        if "/jobs/" not in url:
            ghost = kc.request(method, url.replace(sid, unknown), json=body, headers=auth(BOB))
            assert got["detail"].replace(sid, unknown) == ghost.json()["detail"]
    after = kc.get(f"/session/{sid}", headers=auth(ALICE)).json()
    for key in ("prompts", "current_prompts", "mask_frames", "objects", "propagations"):
        assert after[key] == before[key], key
    assert kc.get(f"/mask/{sid}/0", headers=auth(ALICE)).content == mask_before
    assert kc.get(f"/jobs/{job['job_id']}", headers=auth(ALICE)).json()["status"] != "cancelled"


def test_sessions_lists_only_the_callers_own_and_admins_see_all(kc, video):
    a = upload_as(kc, ALICE, video)
    b = upload_as(kc, BOB, video)
    mine = kc.get("/sessions", headers=auth(ALICE)).json()
    assert [s["session_id"] for s in mine] == [a]
    assert "owner" in mine[0] and ALICE not in json.dumps(mine)
    assert [s["session_id"] for s in kc.get("/sessions", headers=auth(BOB)).json()] == [b]
    every = {s["session_id"] for s in kc.get("/sessions", headers=auth(ROOT)).json()}
    assert every == {a, b}
    # An admin manages any session.
    assert kc.get(f"/session/{a}", headers=auth(ROOT)).status_code == 200
    assert kc.delete(f"/session/{b}", headers=auth(ROOT)).status_code == 200
    assert kc.get(f"/session/{b}", headers=auth(BOB)).status_code == 404


def test_ownership_survives_a_restart_without_reopening_for_strangers(keyed, predictor, video):
    with TestClient(create_app(keyed, SAM2Manager(keyed, predictor=predictor))) as c:
        sid = upload_as(c, ALICE, video)
    mgr = SAM2Manager(keyed, predictor=predictor)
    with TestClient(create_app(keyed, mgr)) as c:
        assert_error(c.get(f"/session/{sid}", headers=auth(BOB)), 404, "session_not_found")
        # A stranger's request is answered from the session's small info file: it neither
        # reopens the session nor pushes anyone else's out.
        assert sid not in mgr.sessions
        assert [s["session_id"] for s in c.get("/sessions", headers=auth(ALICE)).json()] == [sid]
        assert c.get(f"/session/{sid}", headers=auth(ALICE)).status_code == 200
        assert sid in mgr.sessions


def test_keys_never_reach_logs_files_or_responses(kc, video, caplog, settings):
    caplog.set_level(logging.DEBUG)
    sid = upload_as(kc, ALICE, video)
    r = kc.post(f"/annotate-frame/{sid}", headers=auth(ALICE),
        json={"frame_idx": 0, "points": [{"x": CLICK[0], "y": CLICK[1], "label": 1}]})
    assert r.status_code == 200
    kc.get("/sessions", headers={"X-API-Key": BOB})
    kc.get("/sessions", headers=auth("wrong-key-123"))
    kc.get(f"/session/{sid}", headers=auth(ALICE))
    for key in (ALICE, BOB, "wrong-key-123"):
        assert key not in caplog.text
        for path in settings.output_dir.rglob("*.json"):
            assert key not in path.read_text()
    # One access-log line per request, naming the key only by its id.
    access = [r for r in caplog.records if r.name == "sam2_server.access"]
    assert len(access) >= 5 and any("key=" in r.getMessage() for r in access)


def test_cors_allows_only_the_configured_origins_when_keys_are_set(kc):
    ok = kc.options("/sessions", headers={"Origin": "https://app.example.com",
                                          "Access-Control-Request-Method": "GET",
                                          "Access-Control-Request-Headers": "authorization"})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == "https://app.example.com"
    bad = kc.options("/sessions", headers={"Origin": "https://evil.example.net",
                                           "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in bad.headers


def test_without_keys_only_local_pages_may_call_it(client):
    local = client.get("/health", headers={"Origin": "http://localhost:5173"})
    assert local.headers["access-control-allow-origin"] == "http://localhost:5173"
    remote = client.get("/health", headers={"Origin": "https://evil.example.net"})
    assert "access-control-allow-origin" not in remote.headers
    assert client.manager.settings.listen_host == "127.0.0.1"


def test_keyed_settings_refuse_a_wildcard_origin_and_listen_on_every_address(keyed, predictor):
    assert keyed.listen_host == "0.0.0.0"
    wildcard = keyed.model_copy(update={"allowed_origins": ["*"]})
    with pytest.raises(ValueError, match="refused when access keys are set") as info:
        create_app(wildcard, SAM2Manager(wildcard, predictor=predictor))
    assert ALICE not in str(info.value)


def test_keys_file(settings, predictor, tmp_path, video):
    keys = tmp_path / "keys.txt"
    keys.write_text("# the team\n carol-key-1234 \n\ndave-key-5678\n")
    s = settings.model_copy(update={"api_keys_file": keys})
    with TestClient(create_app(s, SAM2Manager(s, predictor=predictor))) as c:
        sid = upload_as(c, "carol-key-1234", video)
        assert c.get(f"/session/{sid}", headers=auth("dave-key-5678")).status_code == 404
        assert_error(c.get("/sessions", headers=auth("# the team")), 401)
