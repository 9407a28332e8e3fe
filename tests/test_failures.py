"""Failures become clear answers and lose nothing: out of memory, a full disk or quota, files
missing under a session, and the metrics, request ids and log lines that show what happened."""

from __future__ import annotations

import errno
import logging
import os
import re

import pytest
import torch
from test_api import assert_error, prompt, propagate_ok, read_sse, upload

import video_io


@pytest.fixture
def tracked(client, session_id) -> str:
    assert prompt(client, session_id).status_code == 200
    propagate_ok(client, session_id)
    return session_id


def masks_of(client, sid: str, n: int = 8) -> list[bytes]:
    return [client.get(f"/mask/{sid}/{f}").content for f in range(n)]


def no_temporaries(settings) -> bool:
    return not [p for p in settings.output_dir.rglob(".*") if ".tmp" in p.name]


# ----------------------------------------------------------------------------- out of memory
def test_out_of_memory_on_a_click_is_503_and_the_session_stays_usable(client, tracked,
                                                                      monkeypatch):
    before = masks_of(client, tracked)
    predictor = client.manager.predictor
    real = predictor.add_new_points_or_box

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(predictor, "add_new_points_or_box", exhausted)
    r = prompt(client, tracked, frame_idx=3, points=((10, 10, 0),), refine=True)
    body = assert_error(r, 503, "out_of_memory")
    assert "SAM2_IMAGE_SIZE" in body["detail"] and "Retry-After" in r.headers
    assert "Tried to allocate" not in body["detail"]
    assert client.manager.sessions[tracked].state is None  # dropped, rebuilt on the next call
    monkeypatch.setattr(predictor, "add_new_points_or_box", real)

    info = client.get(f"/session/{tracked}").json()
    assert [p["action"] for p in info["prompts"]] == ["annotate"]  # the failed click left none
    assert masks_of(client, tracked) == before
    # The next call rebuilds the model state from the prompts and tracks exactly as before.
    again = propagate_ok(client, tracked)
    assert again["frames_processed"] == 8
    assert masks_of(client, tracked) == before
    assert prompt(client, tracked, frame_idx=3, points=((10, 10, 0),), refine=True
                  ).status_code == 200
    assert "sam2_out_of_memory_total 1.0" in client.get("/metrics").text


def test_out_of_memory_during_a_propagation_keeps_the_frames_written(client, session_id,
                                                                    monkeypatch):
    assert prompt(client, session_id).status_code == 200
    predictor = client.manager.predictor
    real = predictor.propagate_in_video

    def runs_out(*args, **kwargs):
        for i, out in enumerate(real(*args, **kwargs)):
            if i == 3:
                raise torch.OutOfMemoryError("CUDA out of memory")
            yield out

    monkeypatch.setattr(predictor, "propagate_in_video", runs_out)
    assert_error(client.post(f"/propagate/{session_id}", json={"start_frame": 0}), 503,
                 "out_of_memory")
    monkeypatch.setattr(predictor, "propagate_in_video", real)
    info = client.get(f"/session/{session_id}").json()
    run = info["propagations"][-1]
    assert run["status"] == "failed" and info["mask_frames"] == [0, 1, 2]
    assert propagate_ok(client, session_id)["frames_processed"] == 8


# ----------------------------------------------------------------------------- disk
def test_disk_quota_refuses_uploads_with_what_to_delete(client, video, settings):
    sid = upload(client, video).json()["session_id"]
    used = client.manager.store.disk.usage(fresh=True).total
    client.manager.store.disk.limit = used + video.stat().st_size // 2
    r = upload(client, video)
    body = assert_error(r, 507, "insufficient_storage")
    assert "SAM2_MAX_DISK_GB" in body["detail"] and sid in body["detail"]
    assert {p.name for p in settings.upload_dir.iterdir()} == {sid}
    # Deleting a session makes room again.
    assert client.delete(f"/session/{sid}").status_code == 200
    client.manager.store.disk.usage(fresh=True)
    assert upload(client, video).status_code == 200


def test_disk_quota_stops_a_propagation_and_keeps_what_it_wrote(client, session_id, settings):
    assert prompt(client, session_id).status_code == 200
    disk = client.manager.store.disk
    disk.max_age_s = 0  # count every file as it lands
    one_frame = sum(p.stat().st_size for p in settings.output_dir.rglob("00000.*")
                    if "frames" not in p.parts)
    disk.limit = disk.usage(fresh=True).total + 2 * one_frame
    r = client.post(f"/propagate/{session_id}", json={"start_frame": 0})
    assert_error(r, 507, "insufficient_storage")
    info = client.get(f"/session/{session_id}").json()
    assert info["propagations"][-1]["status"] == "failed"
    on_disk = {int(p.stem) for p in (settings.output_dir / session_id / "masks").glob("*.png")}
    assert set(info["mask_frames"]) == on_disk and 0 in on_disk and len(on_disk) < 8
    assert_error(client.post(f"/export/{session_id}", json={}), 507, "insufficient_storage")
    assert no_temporaries(settings)


def test_a_full_disk_never_leaves_a_truncated_file(client, tracked, settings, monkeypatch):
    before = client.get(f"/mask/{tracked}/3").content
    real_replace = os.replace

    def disk_full(src, dst):
        if str(dst).endswith(".png"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(video_io.os, "replace", disk_full)
    r = prompt(client, tracked, frame_idx=3, points=((10, 10, 0),), refine=True)
    assert r.status_code == 200  # the mask is computed; its file is written off the request
    assert_error(client.get(f"/mask/{tracked}/3"), 507, "insufficient_storage")
    monkeypatch.setattr(video_io.os, "replace", real_replace)
    # The earlier file is intact and still served; no partial file is left behind.
    assert client.get(f"/mask/{tracked}/3").content == before
    assert no_temporaries(settings)


# ----------------------------------------------------------------------------- missing files
def test_a_missing_overlay_is_rebuilt_identically(client, tracked, settings):
    path = settings.output_dir / tracked / "overlays" / "00004.jpg"
    original = client.get(f"/overlay/{tracked}/4").content
    path.unlink()
    assert client.get(f"/overlay/{tracked}/4").content == original
    assert path.read_bytes() == original
    path.write_bytes(b"damaged")
    r = client.get(f"/export/{tracked}")
    assert r.status_code == 200 and path.read_bytes() == original


def test_a_missing_mask_is_409_then_unlisted(client, tracked, settings):
    (settings.output_dir / tracked / "masks" / "00005.png").unlink()
    body = assert_error(client.get(f"/mask/{tracked}/5"), 409, "file_missing")
    assert "propagate" in body["detail"]
    assert 5 not in client.get(f"/session/{tracked}").json()["mask_frames"]
    assert_error(client.get(f"/mask/{tracked}/5"), 404, "mask_not_found")
    assert client.get(f"/export/{tracked}?format=masks_zip").status_code == 200


def test_a_damaged_mask_is_409_in_an_export_and_the_job_error_names_no_path(client, tracked,
                                                                          settings, tmp_path):
    (settings.output_dir / tracked / "masks" / "00006.png").write_bytes(b"not a png")
    assert_error(client.get(f"/export/{tracked}?format=coco_json"), 409, "file_missing")
    job = client.post(f"/export/{tracked}", json={"format": "mask_mp4"}).json()
    end = read_sse(client, f"/jobs/{job['job_id']}/events")[-1][1]
    assert end["status"] == "failed" and "frame 6" in end["error"]
    assert str(tmp_path) not in end["error"] and "/" not in end["error"].replace("/session", "")


# ----------------------------------------------------------------------------- observability
def test_metrics_count_requests_sessions_jobs_and_frames(client, tracked):
    client.get(f"/frame/{tracked}/2")
    text = client.get("/metrics").text
    assert re.search(r'sam2_http_requests_total\{method="GET",route="/frame/\{session_id\}/'
                     r'\{frame_idx\}",status="200"\} [1-9]', text)
    assert re.search(r'sam2_http_requests_total\{method="POST",route="/annotate-frame/'
                     r'\{session_id\}",status="200"\} 1.0', text)
    assert 'sam2_http_request_duration_seconds_bucket{le="0.005",method="GET"' in text
    assert "sam2_sessions_open 1.0" in text and "sam2_model_ready 1.0" in text
    assert "sam2_frames_propagated_total 8.0" in text
    assert 'sam2_model_status{status="ready"} 1.0' in text
    assert "sam2_session_queue_waiting 0.0" in text
    assert 'sam2_jobs_running{kind="propagate"} 0.0' in text
    # Unknown paths share one label value, whatever was asked.
    client.get("/no/such/thing/1")
    client.get("/no/such/thing/2")
    text = client.get("/metrics").text
    assert 'route="unmatched",status="404"} 2.0' in text


def test_request_ids_and_one_log_line_per_request(client, session_id, caplog):
    caplog.set_level(logging.INFO, logger="sam2_server.access")
    r = client.get(f"/frame/{session_id}/1", headers={"X-Request-ID": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42"
    odd = client.get("/health", headers={"X-Request-ID": "bad id\twith spaces"})
    assert re.fullmatch(r"[0-9a-f]{16}", odd.headers["x-request-id"])
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "sam2_server.access"]
    assert len(lines) == 2
    assert lines[0].startswith(f"trace-42 GET /frame/{session_id}/1 200 ")
    error = client.get("/frame/not-a-uuid/0")
    assert error.headers["x-request-id"]


def test_every_error_body_is_free_of_server_paths(client, tracked, settings, tmp_path):
    probes = [client.get(f"/mask/{tracked}/99"), client.get(f"/frame/{tracked}/-1"),
              client.post(f"/annotate-frame/{tracked}", json={"frame_idx": 0}),
              client.post(f"/annotate-frame/{tracked}",
                          json={"frame_idx": 0, "mask_png_base64": "!!"}),
              client.post("/upload-video", files={"file": ("x.mp4", b"not a video", "video/mp4")}),
              client.get(f"/exports/{tracked}/../../etc/passwd"),
              client.get(f"/exports/{tracked}/nothing.mp4"),
              client.get("/jobs/" + "f" * 32)]
    for r in probes:
        assert 400 <= r.status_code < 500, r.text
        assert str(tmp_path) not in r.text and "Traceback" not in r.text, r.text
