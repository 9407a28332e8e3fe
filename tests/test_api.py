"""HTTP contract of every endpoint: one test per status path, against the real predictor on CPU."""

from __future__ import annotations

import base64
import json
import shutil
import threading
import uuid
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from conftest import label_png
from fastapi.testclient import TestClient
from media import frame_rgb, make_video

import manifest
import masks as mask_ops
import store
from layout import SessionFiles
from main import create_app
from sam2_manager import SAM2Manager

NUM_FRAMES, WIDTH, HEIGHT = 8, 160, 120  # the `video` fixture
CLICK = (45, 55)  # inside the yellow box on frame 0


# ----------------------------------------------------------------------------- helpers
def assert_error(r, status: int, code: str | None = None) -> dict:
    """The response is the single JSON error shape with the expected status (and code)."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    assert isinstance(body.get("detail"), str) and body["detail"], body
    if code is not None:
        assert body["error"] == code, body
    return body


def upload(client, path: Path, name: str | None = None):
    with open(path, "rb") as f:
        return client.post("/upload-video",
                           files={"file": (name or path.name, f, "application/octet-stream")})


def upload_bytes(client, data: bytes, name: str = "clip.mp4"):
    return client.post("/upload-video", files={"file": (name, data, "video/mp4")})


def prompt(client, sid: str, frame_idx: int = 0, points=(CLICK + (1,),), obj_id: int = 1,
           refine: bool = False, **extra):
    body = {"frame_idx": frame_idx, "obj_id": obj_id,
            "points": [{"x": x, "y": y, "label": lab} for x, y, lab in points], **extra}
    route = "refine-mask" if refine else "annotate-frame"
    return client.post(f"/{route}/{sid}", json=body)


def annotate_ok(client, sid: str, **kwargs) -> dict:
    r = prompt(client, sid, **kwargs)
    assert r.status_code == 200, r.text
    return r.json()


def propagate_ok(client, sid: str, **body) -> dict:
    r = client.post(f"/propagate/{sid}", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def mask_png_b64(mask: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", mask)
    assert ok
    return base64.b64encode(buf.tobytes()).decode()


def decode_jpeg(content: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(content, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None, "not a decodable image"
    return img[..., ::-1]


def session_files(settings, sid: str) -> tuple[set[int], set[int]]:
    """Frame indices that have a mask PNG / an overlay JPEG on disk (temporary files excluded)."""
    out = settings.output_dir / sid
    masks = {int(p.stem) for p in (out / "masks").glob("[0-9]*.png")}
    overlays = {int(p.stem) for p in (out / "overlays").glob("[0-9]*.jpg")}
    return masks, overlays


def leftovers(settings, keep: set[str] = frozenset()) -> list[Path]:
    """Anything under upload_dir / output_dir that does not belong to a session in ``keep``."""
    found = []
    for root in (settings.upload_dir, settings.output_dir):
        if root.exists():
            found += [p for p in root.iterdir() if p.name not in keep]
    return found


def read_sse(client, url: str) -> list[tuple[str, dict]]:
    """Read a server-sent event stream to its `end` event; returns (event, data) pairs."""
    events = []
    with client.stream("GET", url) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[len("data: "):])))
                if event == "end":
                    break
    assert events and events[-1][0] == "end", events
    return events


def fetch_all_frames(client, sid: str, n: int = NUM_FRAMES) -> None:
    # The decoder writes frames in the background; fetching each waits for it deterministically.
    for i in range(n):
        assert client.get(f"/frame/{sid}/{i}").status_code == 200


MANIFEST_KEYS = ("session_id", "filename", "video", "objects", "prompts", "current_prompts",
                 "mask_frames", "scores", "propagations")


def assert_consistent(client, settings, sid: str) -> dict:
    """Manifest file, GET /session and the mask/overlay files on disk all agree."""
    info = client.get(f"/session/{sid}").json()
    on_disk = manifest.read(SessionFiles(settings.output_dir / sid))
    for key in MANIFEST_KEYS:
        assert on_disk[key] == info[key], key
    masks, overlays = session_files(settings, sid)
    assert masks == set(info["mask_frames"])
    assert overlays <= set(info["mask_frames"])  # overlays are made when first read
    objects = {o["obj_id"] for o in info["objects"]}
    for f in info["mask_frames"]:
        labels = label_png(client.get(f"/mask/{sid}/{f}").content)
        assert labels.shape == (HEIGHT, WIDTH)
        assert set(np.unique(labels).tolist()) <= {0} | objects, f
    return info


@pytest.fixture
def prompted(client, session_id) -> str:
    """A session with object 1 clicked on frame 0."""
    annotate_ok(client, session_id)
    return session_id


@pytest.fixture
def propagated(client, prompted) -> str:
    """A session with object 1 clicked on frame 0 and tracked over every frame."""
    propagate_ok(client, prompted)
    return prompted


def own_client(settings, predictor, **kwargs) -> TestClient:
    return TestClient(create_app(settings, SAM2Manager(settings, predictor=predictor)), **kwargs)


# ----------------------------------------------------------------------------- /health
def test_health_ready(client):
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "tiny"
    assert body["device"] == "cpu"
    assert body["model_status"] == "ready"
    assert body["status"] == "ok"


def test_failed_model_load_is_retried_once_the_checkpoint_is_in_place(settings, predictor,
                                                                     checkpoint, tmp_path, video):
    with TestClient(create_app(settings, SAM2Manager(settings, predictor=predictor))) as c:
        sid = upload(c, video).json()["session_id"]
    missing = tmp_path / "nowhere" / "sam2.1_hiera_tiny.pt"
    broken = settings.model_copy(update={"checkpoint": missing, "model_retry_s": 3600})
    mgr = SAM2Manager(broken)
    mgr.load_model()  # fails now, in this thread, so nothing below races the loader
    assert mgr.model_status == "error"
    with TestClient(create_app(broken, mgr)) as c:
        r = c.get("/health")
        assert r.status_code == 503
        body = r.json()
        assert body["model_status"] == "error" and body["status"] != "ok"
        assert "sam2.1_hiera_tiny.pt" in body["detail"]
        assert str(tmp_path) not in r.text  # no server path, even on /health
        assert body["next_retry_in_s"] > 3000 and body["load_failures"] == 1
        assert int(r.headers["Retry-After"]) > 3000

        # An existing session's files are still served; model work and new uploads answer 503.
        assert c.get(f"/frame/{sid}/0").status_code == 200
        assert_error(prompt(c, sid), 503, "model_not_ready")
        assert_error(upload(c, video), 503, "model_not_ready")

        # The checkpoint is put in place: the next request that needs the model retries at
        # once instead of waiting out the back-off.
        missing.parent.mkdir()
        shutil.copy(checkpoint, missing)
        assert_error(prompt(c, sid), 503, "model_not_ready")
        assert mgr.wait_ready(timeout=300)
        assert c.get("/health").status_code == 200
        assert prompt(c, sid).status_code == 200
        assert upload(c, video).status_code == 200


# ----------------------------------------------------------------------------- /upload-video
def test_upload_ok(client, video, settings):
    r = upload(client, video)
    assert r.status_code == 200, r.text
    body = r.json()
    uuid.UUID(body["session_id"])
    assert body["num_frames"] == NUM_FRAMES
    assert (body["width"], body["height"]) == (WIDTH, HEIGHT)
    assert body["fps"] == 24
    assert body["fps_rational"] == "24/1"
    assert body["filename"] == "clip.mp4"
    assert client.get(body["frame_url"]).status_code == 200
    assert (settings.output_dir / body["session_id"] / "session.json").is_file()


def test_upload_random_bytes_is_422(client, settings):
    data = np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    assert_error(upload_bytes(client, data), 422, "video_unreadable")
    assert leftovers(settings) == []
    assert client.get("/sessions").json() == []


def test_upload_empty_file_is_422(client, settings):
    assert_error(upload_bytes(client, b""), 422)
    assert leftovers(settings) == []


def test_upload_without_file_field_is_422(client, settings, video):
    r = client.post("/upload-video", files={"video": ("clip.mp4", video.read_bytes())})
    assert_error(r, 422)
    assert leftovers(settings) == []


def test_upload_not_multipart_is_415(client, settings, video):
    assert_error(client.post("/upload-video", json={"file": "clip.mp4"}), 415)
    r = client.post("/upload-video", content=video.read_bytes(),
                    headers={"content-type": "video/mp4"})
    assert_error(r, 415)
    assert leftovers(settings) == []


@pytest.mark.parametrize("size", [20_000, 200_000], ids=["while-streaming", "by-content-length"])
def test_upload_over_the_limit_is_413(settings, predictor, size):
    small = settings.model_copy(update={"max_upload_mb": 0.01})  # 10 KiB
    data = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes()
    with own_client(small, predictor) as c:
        assert_error(upload_bytes(c, data), 413)
        assert leftovers(small) == []
        assert c.get("/sessions").json() == []


def _faststart_copy(src: Path, dst: Path) -> Path:
    """Remux with the moov atom first, so that a cut tail keeps the index of every frame."""
    with av.open(str(src)) as inp, av.open(str(dst), "w",
                                            options={"movflags": "+faststart"}) as out:
        s_in = inp.streams.video[0]
        s_out = out.add_stream_from_template(s_in)
        for packet in inp.demux(s_in):
            if packet.dts is None:
                continue
            packet.stream = s_out
            out.mux(packet)
    return dst


def _cut_inside_packet(path: Path, packet_idx: int) -> bytes:
    """The file's bytes up to the middle of its ``packet_idx``-th video packet."""
    with av.open(str(path)) as c:
        packets = [(p.pos, p.size) for p in c.demux(video=0) if p.size]
    pos, size = packets[packet_idx]
    return path.read_bytes()[: pos + size // 2]


@pytest.mark.parametrize("kind", ["mp4-first-half", "mp4-faststart-cut-in-frame-5",
                                  "mkv-cut-in-frame-5", "mkv-first-half", "avi-tail-cut"])
def test_truncated_upload_is_422_or_fully_servable(client, settings, tmp_path, kind):
    src = tmp_path / "src"
    if kind == "mp4-first-half":
        data = make_video(src / "a.mp4").read_bytes()
        data = data[: len(data) // 2]
    elif kind == "mp4-faststart-cut-in-frame-5":
        data = _cut_inside_packet(_faststart_copy(make_video(src / "a.mp4"), src / "fs.mp4"), 5)
    elif kind == "mkv-cut-in-frame-5":
        data = _cut_inside_packet(make_video(src / "a.mkv"), 5)
    elif kind == "mkv-first-half":
        data = make_video(src / "a.mkv").read_bytes()
        data = data[: len(data) // 2]
    else:
        data = make_video(src / "a.avi", codec="mjpeg", pix_fmt="yuvj420p").read_bytes()
        data = data[: int(len(data) * 0.6)]
    r = upload_bytes(client, data, name=f"cut.{kind.split('-')[0]}")
    assert r.status_code in (200, 422), r.text
    if r.status_code == 422:
        assert_error(r, 422, "video_unreadable")
        assert leftovers(settings) == []
        return
    body = r.json()
    sid, n = body["session_id"], body["num_frames"]
    assert n >= 1
    for i in range(n):
        f = client.get(f"/frame/{sid}/{i}")
        assert f.status_code == 200, (i, f.text)
        assert decode_jpeg(f.content).shape == (body["height"], body["width"], 3)
    assert_error(client.get(f"/frame/{sid}/{n}"), 404, "frame_out_of_range")


def test_full_server_closes_the_least_recently_used_idle_session(client, settings, video):
    mgr = client.manager
    ids = [upload(client, video).json()["session_id"] for _ in range(settings.max_sessions)]
    assert client.get(f"/frame/{ids[0]}/0").status_code == 200  # ids[1] is now the oldest use
    r = upload(client, video)
    assert r.status_code == 200, r.text
    assert len(mgr.sessions) == settings.max_sessions
    assert ids[1] not in mgr.sessions
    # Its work is on disk: it reopens on its next use (closing the next least recently used).
    assert client.get(f"/session/{ids[1]}").status_code == 200
    assert ids[1] in mgr.sessions and len(mgr.sessions) == settings.max_sessions


def test_too_many_sessions_is_429_only_when_every_open_one_is_busy(client, settings, video):
    mgr = client.manager
    ids = {upload(client, video).json()["session_id"] for _ in range(settings.max_sessions)}
    busy = list(mgr.sessions.values())
    for session in busy:
        session.work_lock.acquire()
    try:
        r = upload(client, video)
        assert_error(r, 429, "too_many_sessions")
        assert int(r.headers["Retry-After"]) >= 1
        assert leftovers(settings, keep=ids) == []
    finally:
        for session in busy:
            session.work_lock.release()
    assert upload(client, video).status_code == 200


# ----------------------------------------------------------------------------- /frame
def test_frames_are_jpegs_of_the_video(client, session_id):
    for i in range(NUM_FRAMES):
        r = client.get(f"/frame/{session_id}/{i}")
        assert r.status_code == 200
        assert r.headers["content-type"] == "image/jpeg"
        img = decode_jpeg(r.content)
        assert img.shape == (HEIGHT, WIDTH, 3)
        diff = np.abs(img.astype(int) - frame_rgb(i, WIDTH, HEIGHT).astype(int)).mean()
        assert diff < 8, (i, diff)


@pytest.mark.parametrize("frame_idx", [NUM_FRAMES, 1000, -1])
def test_frame_out_of_range_is_404(client, session_id, frame_idx):
    assert_error(client.get(f"/frame/{session_id}/{frame_idx}"), 404, "frame_out_of_range")


@pytest.mark.parametrize("route", ["frame", "overlay", "mask"])
def test_malformed_session_id_is_422(client, route):
    assert_error(client.get(f"/{route}/not-a-uuid/0"), 422)
    assert_error(client.get(f"/{route}/{uuid.uuid4().hex[:12]}/0"), 422)


@pytest.mark.parametrize("route", ["frame", "overlay", "mask"])
def test_unknown_session_is_404(client, route):
    assert_error(client.get(f"/{route}/{uuid.uuid4()}/0"), 404, "session_not_found")


def test_malformed_session_id_on_every_route_is_422(client):
    bad = "not-a-uuid"
    assert_error(client.post(f"/annotate-frame/{bad}", json={"points": [{"x": 1, "y": 1}],
                                                             "frame_idx": 0}), 422)
    assert_error(client.post(f"/propagate/{bad}", json={}), 422)
    assert_error(client.get(f"/export/{bad}"), 422)
    assert_error(client.get(f"/session/{bad}"), 422)
    assert_error(client.delete(f"/session/{bad}"), 422)


# ----------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("refine", [False, True], ids=["annotate", "refine"])
def test_prompt_returns_mask(client, session_id, refine):
    r = prompt(client, session_id, refine=refine)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["obj_ids"] == [1]
    assert body["frame_idx"] == 0 and body["obj_id"] == 1
    assert set(body["scores"]) == {"1"}
    assert {"object_score", "iou", "visible"} <= set(body["scores"]["1"])
    m = client.get(body["mask_url"])
    assert m.status_code == 200 and m.headers["content-type"] == "image/png"
    labels = label_png(m.content)
    assert labels.shape == (HEIGHT, WIDTH)
    assert set(np.unique(labels).tolist()) <= {0, 1}
    # mask_area counts exactly the pixels of the served PNG.
    assert body["mask_area"] == ({"1": int((labels == 1).sum())} if (labels == 1).any() else {})
    o = client.get(body["overlay_url"])
    assert o.status_code == 200 and decode_jpeg(o.content).shape == (HEIGHT, WIDTH, 3)


BAD_PROMPTS = {
    "label-2": {"frame_idx": 0, "points": [{"x": 45, "y": 55, "label": 2}]},
    "label-minus-1": {"frame_idx": 0, "points": [{"x": 45, "y": 55, "label": -1}]},
    "point-right-of-frame": {"frame_idx": 0, "points": [{"x": WIDTH + 10, "y": 55}]},
    "point-above-frame": {"frame_idx": 0, "points": [{"x": 45, "y": -3}]},
    "no-points": {"frame_idx": 0, "points": []},
    "obj-id-0": {"frame_idx": 0, "obj_id": 0, "points": [{"x": 45, "y": 55}]},
    "obj-id-256": {"frame_idx": 0, "obj_id": 256, "points": [{"x": 45, "y": 55}]},
    "negative-frame": {"frame_idx": -1, "points": [{"x": 45, "y": 55}]},
    "box-inverted": {"frame_idx": 0, "box": [100, 80, 20, 10]},
    "not-json-object": [1, 2, 3],
}


@pytest.mark.parametrize("refine", [False, True], ids=["annotate", "refine"])
@pytest.mark.parametrize("case", list(BAD_PROMPTS))
def test_invalid_prompt_is_422(client, session_id, case, refine):
    route = "refine-mask" if refine else "annotate-frame"
    assert_error(client.post(f"/{route}/{session_id}", json=BAD_PROMPTS[case]), 422)
    info = client.get(f"/session/{session_id}").json()
    assert info["objects"] == [] and info["prompts"] == [] and info["mask_frames"] == []


@pytest.mark.parametrize("refine", [False, True], ids=["annotate", "refine"])
def test_prompt_frame_out_of_range_is_422(client, session_id, refine):
    # A frame index in a request body is a bad field (422); in a URL it is a missing page (404).
    r = prompt(client, session_id, frame_idx=NUM_FRAMES, refine=refine)
    assert "frame_idx" in assert_error(r, 422, "invalid_request")["detail"]


def test_prompt_unknown_session_is_404(client):
    assert_error(prompt(client, str(uuid.uuid4())), 404, "session_not_found")


def _bad_mask_requests() -> dict:
    full = np.zeros((HEIGHT, WIDTH), np.uint8)
    full[20:60, 20:60] = 1
    return {
        "point-outside": {"points": [{"x": WIDTH * 3, "y": 5}]},
        "mask-wrong-size": {"mask_png_base64": mask_png_b64(np.ones((10, 10), np.uint8))},
        "mask-not-base64": {"mask_png_base64": "@@@not base64@@@"},
        "mask-not-an-image": {"mask_png_base64": base64.b64encode(b"hello").decode()},
        "mask-and-points": {"mask_png_base64": mask_png_b64(full),
                            "points": [{"x": 45, "y": 55}]},
    }


@pytest.mark.parametrize("refine", [False, True], ids=["annotate", "refine"])
def test_failed_prompt_with_new_obj_id_does_not_register_it(client, prompted, refine):
    route = "refine-mask" if refine else "annotate-frame"
    for case, extra in _bad_mask_requests().items():
        body = {"frame_idx": 2, "obj_id": 7, **extra}
        r = client.post(f"/{route}/{prompted}", json=body)
        assert_error(r, 422)
        info = client.get(f"/session/{prompted}").json()
        assert [o["obj_id"] for o in info["objects"]] == [1], case
        assert "7" not in info["current_prompts"], case
    # An object registered without prompts would make sam2's propagation raise.
    result = propagate_ok(client, prompted, end_frame=2)
    assert result["objects"] == [1]
    assert result["frames_processed"] == 3


def test_predictor_failure_on_new_obj_id_is_rolled_back(settings, predictor, video,
                                                        monkeypatch):
    """A crash inside the model after it registered the object leaves no trace of it."""
    with own_client(settings, predictor, raise_server_exceptions=False) as c:
        sid = upload(c, video).json()["session_id"]
        annotate_ok(c, sid)
        real = predictor.add_new_points_or_box

        def crash(inference_state, frame_idx, obj_id, *args, **kwargs):
            predictor._obj_id_to_idx(inference_state, obj_id)  # registered, then it fails
            raise RuntimeError("simulated model failure")

        monkeypatch.setattr(predictor, "add_new_points_or_box", crash)
        r = prompt(c, sid, frame_idx=3, obj_id=9)
        assert_error(r, 500, "internal_error")
        monkeypatch.setattr(predictor, "add_new_points_or_box", real)

        info = c.get(f"/session/{sid}").json()
        assert [o["obj_id"] for o in info["objects"]] == [1]
        assert info["mask_frames"] == [0]
        r = c.post(f"/propagate/{sid}", json={"end_frame": 2})
        assert r.status_code == 200, r.text
        assert r.json()["objects"] == [1]


def test_refine_appends_and_annotate_replaces(client, session_id):
    annotate_ok(client, session_id, points=[(45, 55, 1)])
    r = prompt(client, session_id, points=[(60, 50, 0)], refine=True)
    assert r.status_code == 200, r.text

    info = client.get(f"/session/{session_id}").json()
    current = info["current_prompts"]["1"]["0"]
    assert current["points"] == [[45, 55], [60, 50]]
    assert current["labels"] == [1, 0]
    assert [p["action"] for p in info["prompts"]] == ["annotate", "refine"]
    assert [p["points"] for p in info["prompts"]] == [[[45, 55]], [[60, 50]]]

    annotate_ok(client, session_id, points=[(30, 50, 1)])
    info = client.get(f"/session/{session_id}").json()
    assert info["current_prompts"]["1"]["0"]["points"] == [[30, 50]]
    assert info["current_prompts"]["1"]["0"]["labels"] == [1]
    assert [p["action"] for p in info["prompts"]] == ["annotate", "refine", "annotate"]


def test_refine_on_another_frame_keeps_the_first(client, prompted):
    r = prompt(client, prompted, frame_idx=4, points=[(60, 55, 1)], refine=True)
    assert r.status_code == 200, r.text
    current = client.get(f"/session/{prompted}").json()["current_prompts"]["1"]
    assert current["0"]["points"] == [list(CLICK)]
    assert current["4"]["points"] == [[60, 55]]


def test_box_and_mask_prompts(client, session_id):
    r = client.post(f"/annotate-frame/{session_id}",
                    json={"frame_idx": 1, "obj_id": 3, "box": [15, 35, 75, 85]})
    assert r.status_code == 200, r.text
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[80:110, 100:150] = 255
    r = client.post(f"/annotate-frame/{session_id}",
                    json={"frame_idx": 2, "obj_id": 4, "mask_png_base64": mask_png_b64(mask)})
    assert r.status_code == 200, r.text
    labels = label_png(client.get(f"/mask/{session_id}/2").content)
    assert (labels == 4).any()
    assert r.json()["obj_ids"] == [3, 4]


# ----------------------------------------------------------------------------- /propagate
def test_propagate_without_prompts_is_409(client, session_id):
    assert_error(client.post(f"/propagate/{session_id}", json={}), 409, "no_prompts")
    assert_error(client.post(f"/propagate/{session_id}", json={"background": True}), 409,
                 "no_prompts")


def test_propagate_forward_clamps_end_frame(client, prompted, settings):
    result = propagate_ok(client, prompted, start_frame=0, end_frame=100)
    assert result["end_frame"] == NUM_FRAMES - 1
    assert result["last_frame"] == NUM_FRAMES - 1
    assert result["first_frame"] == 0
    assert result["frames_processed"] == NUM_FRAMES
    assert result["direction"] == "forward"
    assert result["cancelled"] is False
    info = assert_consistent(client, settings, prompted)
    assert info["mask_frames"] == list(range(NUM_FRAMES))
    assert len(info["propagations"]) == 1


def test_propagate_start_out_of_range_is_422(client, prompted):
    r = client.post(f"/propagate/{prompted}", json={"start_frame": NUM_FRAMES})
    assert "start_frame" in assert_error(r, 422, "invalid_request")["detail"]
    r = client.post(f"/propagate/{prompted}", json={"start_frame": -1})
    assert_error(r, 422)


def test_propagate_session_id_mismatch_is_422(client, prompted):
    r = client.post(f"/propagate/{prompted}", json={"session_id": str(uuid.uuid4())})
    assert_error(r, 422)
    r = client.post(f"/propagate/{prompted}", json={"session_id": prompted, "end_frame": 1})
    assert r.status_code == 200, r.text


def test_propagate_end_frame_with_max_frames_is_422(client, prompted):
    r = client.post(f"/propagate/{prompted}", json={"end_frame": 3, "max_frames": 2})
    assert_error(r, 422)
    r = client.post(f"/propagate/{prompted}",
                    json={"start_frame": 4, "end_frame": 2, "direction": "forward"})
    assert_error(r, 422)


def test_propagate_backward_when_end_before_start(client, session_id, settings):
    annotate_ok(client, session_id, frame_idx=6, points=[(60, 55, 1)])
    result = propagate_ok(client, session_id, start_frame=6, end_frame=2)
    assert result["direction"] == "backward"
    assert (result["first_frame"], result["last_frame"]) == (2, 6)
    assert result["frames_processed"] == 5
    info = assert_consistent(client, settings, session_id)
    assert info["mask_frames"] == [2, 3, 4, 5, 6]


def test_propagate_both_directions_with_max_frames(client, session_id, settings):
    annotate_ok(client, session_id, frame_idx=4, points=[(55, 55, 1)])
    result = propagate_ok(client, session_id, start_frame=4, direction="both", max_frames=2)
    assert result["direction"] == "both"
    assert [p["direction"] for p in result["passes"]] == ["forward", "backward"]
    assert (result["first_frame"], result["last_frame"]) == (2, 6)
    assert result["frames_processed"] == 5
    assert assert_consistent(client, settings, session_id)["mask_frames"] == [2, 3, 4, 5, 6]


def test_propagate_forward_with_max_frames(client, prompted, settings):
    result = propagate_ok(client, prompted, max_frames=3)
    assert (result["first_frame"], result["last_frame"]) == (0, 3)
    assert assert_consistent(client, settings, prompted)["mask_frames"] == [0, 1, 2, 3]


def test_propagate_in_background(client, prompted, settings):
    r = client.post(f"/propagate/{prompted}", json={"background": True})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "propagate" and job["session_id"] == prompted
    events = read_sse(client, job["events_url"])
    end = events[-1][1]
    assert end["status"] == "succeeded", end
    assert all(e == "progress" for e, _ in events[:-1])
    assert end["done"] == end["total"] == NUM_FRAMES

    r = client.get(f"/jobs/{job['job_id']}")
    assert r.status_code == 200
    final = r.json()
    assert final["status"] == "succeeded"
    assert final["result"]["frames_processed"] == NUM_FRAMES
    assert final["result"]["last_frame"] == NUM_FRAMES - 1
    assert assert_consistent(client, settings, prompted)["mask_frames"] == list(range(NUM_FRAMES))


def test_background_propagation_validates_before_answering_202(client, prompted):
    r = client.post(f"/propagate/{prompted}", json={"background": True, "start_frame": 99})
    assert "start_frame" in assert_error(r, 422, "invalid_request")["detail"]


def test_unknown_job_is_404(client):
    assert_error(client.get(f"/jobs/{uuid.uuid4().hex}"), 404)
    assert_error(client.get(f"/jobs/{uuid.uuid4().hex}/events"), 404)
    assert_error(client.post(f"/jobs/{uuid.uuid4().hex}/cancel"), 404)


# ----------------------------------------------------------------------------- overlay / mask
def test_overlay_is_the_frame_until_masked(client, session_id):
    frame = client.get(f"/frame/{session_id}/0")
    overlay = client.get(f"/overlay/{session_id}/0")
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/jpeg"
    assert overlay.content == frame.content

    body = annotate_ok(client, session_id)
    labels = label_png(client.get(f"/mask/{session_id}/0").content)
    assert (labels == 1).any(), "the seeded checkpoint gives a non-empty mask for this click"
    after = client.get(body["overlay_url"])
    assert after.status_code == 200
    assert after.content != frame.content
    assert decode_jpeg(after.content).shape == (HEIGHT, WIDTH, 3)
    # Frames without a mask still overlay as the plain frame.
    assert client.get(f"/overlay/{session_id}/5").content == \
        client.get(f"/frame/{session_id}/5").content


def test_overlays_made_on_first_read_equal_the_eager_ones(client, propagated, settings):
    """Propagation writes masks only; an overlay asked for afterwards is, byte for byte, the
    JPEG of the frame with its mask drawn, as it was when every overlay was written eagerly."""
    sid = propagated
    overlays = settings.output_dir / sid / "overlays"
    assert list(overlays.glob("*.jpg")) == []
    export_before = client.get(f"/export/{sid}?format=overlay_mp4&end_frame=3").content
    for f in range(NUM_FRAMES):
        path = overlays / f"{f:05d}.jpg"
        served = client.get(f"/overlay/{sid}/{f}").content
        frame = decode_jpeg(client.get(f"/frame/{sid}/{f}").content)
        eager = cv2.imencode(".jpg", mask_ops.overlay(np.ascontiguousarray(frame), label_png(
            client.get(f"/mask/{sid}/{f}").content))[..., ::-1],
            [cv2.IMWRITE_JPEG_QUALITY, settings.jpeg_quality])[1].tobytes()
        assert served == eager == path.read_bytes(), f
    # Exports are the same whether the overlays were made before or during the export.
    assert client.get(f"/export/{sid}?format=overlay_mp4&end_frame=3").content == export_before
    # A new mask makes the frame's overlay stale: it goes, and is drawn again when read.
    annotate_ok(client, sid, frame_idx=2, points=((10, 10, 1),))
    client.get(f"/mask/{sid}/2")
    assert not (overlays / "00002.jpg").exists()
    assert client.get(f"/overlay/{sid}/2").status_code == 200 and (overlays / "00002.jpg").exists()


def test_mask_before_any_mask_is_404(client, session_id):
    assert_error(client.get(f"/mask/{session_id}/0"), 404, "mask_not_found")


def test_mask_and_overlay_out_of_range_is_404(client, prompted):
    assert_error(client.get(f"/mask/{prompted}/{NUM_FRAMES}"), 404, "frame_out_of_range")
    assert_error(client.get(f"/overlay/{prompted}/{NUM_FRAMES}"), 404, "frame_out_of_range")
    assert_error(client.get(f"/mask/{prompted}/1"), 404, "mask_not_found")


# ----------------------------------------------------------------------------- /export
def video_facts(path_or_bytes) -> dict:
    with av.open(path_or_bytes) as container:
        stream = container.streams.video[0]
        frames = []
        pts = []
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            pts.append(frame.pts)
        return {"codec": stream.codec_context.name, "pix_fmt": stream.codec_context.pix_fmt,
                "width": stream.codec_context.width, "height": stream.codec_context.height,
                "average_rate": stream.average_rate, "time_base": stream.time_base,
                "frames": frames, "pts": pts}


def luma_diff(a: np.ndarray, b: np.ndarray) -> float:
    gray = [cv2.cvtColor(np.ascontiguousarray(x), cv2.COLOR_RGB2GRAY).astype(int) for x in (a, b)]
    return float(np.abs(gray[0] - gray[1]).mean())


def test_export_without_masks_is_409(client, session_id):
    assert_error(client.get(f"/export/{session_id}"), 409, "no_masks")


def test_export_after_propagation(client, propagated, tmp_path):
    r = client.get(f"/export/{propagated}")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/mp4"
    disposition = r.headers["content-disposition"]
    assert "attachment" in disposition and ".mp4" in disposition
    out = tmp_path / "export.mp4"
    out.write_bytes(r.content)
    facts = video_facts(str(out))
    assert facts["codec"] == "h264"
    assert facts["pix_fmt"] == "yuv420p"
    assert (facts["width"], facts["height"]) == (WIDTH, HEIGHT)
    assert len(facts["frames"]) == NUM_FRAMES
    assert facts["average_rate"] == 24
    # Every exported frame is that frame's overlay, not the plain frame (compared on luma:
    # 4:2:0 chroma blurs the overlay's coloured edges).
    for i, img in enumerate(facts["frames"]):
        overlay = decode_jpeg(client.get(f"/overlay/{propagated}/{i}").content)
        plain = decode_jpeg(client.get(f"/frame/{propagated}/{i}").content)
        to_overlay, to_plain = luma_diff(img, overlay), luma_diff(img, plain)
        assert to_overlay < 6, (i, to_overlay)
        if luma_diff(overlay, plain) > 10:
            assert to_overlay < to_plain, (i, to_overlay, to_plain)


def test_export_a_range(client, prompted, tmp_path):
    r = client.get(f"/export/{prompted}", params={"start_frame": 2, "end_frame": 5})
    assert r.status_code == 200, r.text
    out = tmp_path / "range.mp4"
    out.write_bytes(r.content)
    facts = video_facts(str(out))
    assert len(facts["frames"]) == 4
    assert (facts["width"], facts["height"]) == (WIDTH, HEIGHT)
    # An end_frame past the last frame is clamped to it.
    r = client.get(f"/export/{prompted}", params={"start_frame": 6, "end_frame": 500})
    assert r.status_code == 200, r.text
    out.write_bytes(r.content)
    assert len(video_facts(str(out))["frames"]) == 2


def test_export_bad_range_is_422(client, prompted):
    r = client.get(f"/export/{prompted}", params={"start_frame": NUM_FRAMES})
    assert "start_frame" in assert_error(r, 422, "invalid_request")["detail"]
    assert_error(client.get(f"/export/{prompted}", params={"start_frame": 5, "end_frame": 2}),
                 422)
    assert_error(client.get(f"/export/{prompted}", params={"start_frame": -1}), 422)


def test_export_unknown_session_is_404(client):
    assert_error(client.get(f"/export/{uuid.uuid4()}"), 404, "session_not_found")


# ----------------------------------------------------------------------------- /session
def test_session_describes_and_matches_manifest(client, session_id, settings):
    fetch_all_frames(client, session_id)
    annotate_ok(client, session_id)
    propagate_ok(client, session_id, end_frame=3)
    info = client.get(f"/session/{session_id}").json()
    assert info["session_id"] == session_id
    video = info["video"]
    assert video["num_frames"] == NUM_FRAMES
    assert (video["width"], video["height"]) == (WIDTH, HEIGHT)
    assert video["fps_rational"] == "24/1"
    assert video["codec"] == "h264"
    assert [o["obj_id"] for o in info["objects"]] == [1]
    assert info["objects"][0]["prompted_frames"] == [0]
    assert [p["action"] for p in info["prompts"]] == ["annotate"]
    assert info["mask_frames"] == [0, 1, 2, 3]
    assert (settings.output_dir / session_id / "session.json").is_file()
    on_disk = manifest.read(SessionFiles(settings.output_dir / session_id))
    for key in MANIFEST_KEYS:
        assert on_disk[key] == info[key], key
    listed = client.get("/sessions").json()
    assert [s["session_id"] for s in listed] == [session_id]


def test_delete_session(client, prompted, settings):
    assert client.get(f"/export/{prompted}").status_code == 200
    assert (settings.output_dir / prompted).is_dir()
    assert (settings.upload_dir / prompted).is_dir()
    r = client.delete(f"/session/{prompted}")
    assert r.status_code == 200
    assert r.json()["deleted"] is True
    assert_error(client.get(f"/session/{prompted}"), 404, "session_not_found")
    assert_error(client.get(f"/frame/{prompted}/0"), 404, "session_not_found")
    assert_error(client.delete(f"/session/{prompted}"), 404, "session_not_found")
    assert not (settings.output_dir / prompted).exists()
    assert not (settings.upload_dir / prompted).exists()
    assert leftovers(settings) == []


# ----------------------------------------------------------------------------- objects
def _second_object_mask() -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[85:115, 110:155] = 1  # bottom right, away from the click on object 1
    return mask


def _two_objects(client, sid: str) -> dict:
    annotate_ok(client, sid)
    r = client.post(f"/annotate-frame/{sid}", json={
        "frame_idx": 0, "obj_id": 2, "mask_png_base64": mask_png_b64(_second_object_mask())})
    assert r.status_code == 200, r.text
    return r.json()


def test_two_objects_on_one_frame(client, session_id):
    body = _two_objects(client, session_id)
    assert body["obj_ids"] == [1, 2]
    labels = label_png(client.get(f"/mask/{session_id}/0").content)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2}
    assert (labels == 2).any()
    assert body["mask_area"].get("2") == int((labels == 2).sum())
    info = client.get(f"/session/{session_id}").json()
    assert [o["obj_id"] for o in info["objects"]] == [1, 2]
    assert info["objects"][0]["color"] != info["objects"][1]["color"]


def test_remove_object_erases_it_everywhere(client, session_id, settings):
    _two_objects(client, session_id)
    propagate_ok(client, session_id, end_frame=3)
    assert (label_png(client.get(f"/mask/{session_id}/0").content) == 2).any()

    r = client.delete(f"/object/{session_id}/2")
    assert r.status_code == 200, r.text
    assert r.json()["objects"] == [1]
    info = assert_consistent(client, settings, session_id)
    assert [o["obj_id"] for o in info["objects"]] == [1]
    assert "2" not in info["current_prompts"]
    assert all("2" not in per for per in info["scores"].values())
    assert info["mask_frames"] == [0, 1, 2, 3]
    for f in info["mask_frames"]:
        labels = label_png(client.get(f"/mask/{session_id}/{f}").content)
        assert not (labels == 2).any(), f
        assert labels.max() <= 1
    # The remaining object still tracks.
    assert propagate_ok(client, session_id, end_frame=1)["objects"] == [1]


def test_remove_unknown_object_is_404(client, prompted):
    assert_error(client.delete(f"/object/{prompted}/5"), 404, "object_not_found")
    assert_error(client.delete(f"/object/{uuid.uuid4()}/1"), 404, "session_not_found")


def test_clear_prompts(client, session_id, settings):
    annotate_ok(client, session_id, frame_idx=0)
    annotate_ok(client, session_id, frame_idx=3, points=[(55, 55, 1)])
    r = client.post(f"/clear-prompts/{session_id}", json={"frame_idx": 3, "obj_id": 1})
    assert r.status_code == 200, r.text
    assert r.json()["object_removed"] is False
    info = client.get(f"/session/{session_id}").json()
    assert list(info["current_prompts"]["1"]) == ["0"]
    assert info["objects"][0]["prompted_frames"] == [0]

    # Clearing the last prompted frame removes the object.
    r = client.post(f"/clear-prompts/{session_id}", json={"frame_idx": 0, "obj_id": 1})
    assert r.status_code == 200, r.text
    assert r.json()["object_removed"] is True
    info = assert_consistent(client, settings, session_id)
    assert info["objects"] == [] and info["current_prompts"] == {}
    assert_error(client.post(f"/propagate/{session_id}", json={}), 409, "no_prompts")


def test_clear_prompts_errors(client, prompted):
    assert_error(client.post(f"/clear-prompts/{prompted}", json={"frame_idx": 4, "obj_id": 1}),
                 422)
    r = client.post(f"/clear-prompts/{prompted}", json={"frame_idx": 99, "obj_id": 1})
    assert "frame_idx" in assert_error(r, 422, "invalid_request")["detail"]
    assert_error(client.post(f"/clear-prompts/{prompted}", json={"frame_idx": 0, "obj_id": 0}),
                 422)


def test_reset(client, session_id, settings):
    _two_objects(client, session_id)
    propagate_ok(client, session_id, end_frame=NUM_FRAMES - 1, start_frame=NUM_FRAMES - 3)
    propagate_ok(client, session_id, end_frame=1)
    assert len(client.get(f"/session/{session_id}").json()["mask_frames"]) == 5
    r = client.post(f"/reset/{session_id}")
    assert r.status_code == 200, r.text
    info = assert_consistent(client, settings, session_id)
    assert info["mask_frames"] == [] and info["objects"] == []
    assert info["current_prompts"] == {} and info["scores"] == {}
    assert session_files(settings, session_id) == (set(), set())
    for f in (0, NUM_FRAMES - 1):
        assert_error(client.get(f"/mask/{session_id}/{f}"), 404, "mask_not_found")
        assert client.get(f"/overlay/{session_id}/{f}").content == \
            client.get(f"/frame/{session_id}/{f}").content
    assert_error(client.get(f"/export/{session_id}"), 409, "no_masks")
    assert_error(client.post(f"/propagate/{session_id}", json={}), 409, "no_prompts")
    # The session is usable again.
    annotate_ok(client, session_id)
    assert propagate_ok(client, session_id, end_frame=2)["frames_processed"] == 3


def test_reset_unknown_session_is_404(client):
    assert_error(client.post(f"/reset/{uuid.uuid4()}"), 404, "session_not_found")


# ----------------------------------------------------------------------------- other errors
def test_unknown_route_and_method_are_json(client, session_id):
    assert_error(client.get("/no-such-route"), 404)
    assert_error(client.put(f"/session/{session_id}"), 405)
    assert_error(client.post(f"/annotate-frame/{session_id}", content=b"{not json",
                             headers={"content-type": "application/json"}), 422)


# ----------------------------------------------------------------------------- concurrency
def test_prompts_during_background_propagation_keep_the_session_consistent(client, prompted,
                                                                          settings):
    fetch_all_frames(client, prompted)
    r = client.post(f"/propagate/{prompted}", json={"background": True})
    assert r.status_code == 202, r.text
    job = r.json()

    answers: dict[str, int] = {}

    def annotate_concurrently(name: str, **kwargs):
        answers[name] = prompt(client, prompted, **kwargs).status_code

    threads = [
        threading.Thread(target=annotate_concurrently, args=("refine-5",),
                         kwargs={"frame_idx": 5, "points": [(60, 55, 1)], "refine": True}),
        threading.Thread(target=annotate_concurrently, args=("new-obj",),
                         kwargs={"frame_idx": 3, "obj_id": 2, "points": [(130, 100, 1)]}),
    ]
    for t in threads:
        t.start()
    end = read_sse(client, job["events_url"])[-1][1]
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive()
    assert end["status"] == "succeeded", end
    # Each prompt either waited for the propagation or was told the session is busy.
    assert set(answers.values()) <= {200, 409}, answers

    info = assert_consistent(client, settings, prompted)
    assert set(range(NUM_FRAMES)) <= set(info["mask_frames"])
    objects = {o["obj_id"] for o in info["objects"]}
    assert objects == {1} | ({2} if answers["new-obj"] == 200 else set())
    # And the session still works afterwards.
    assert propagate_ok(client, prompted, end_frame=2)["frames_processed"] == 3
    assert_consistent(client, settings, prompted)


def test_masks_reported_during_propagation_are_servable(client, prompted, monkeypatch):
    """A frame the job reports as tracked serves its mask, even while its file is still being
    written: the read waits for the write instead of answering 404."""
    mgr = client.manager
    gate = threading.Event()
    real_write = mgr.store._write_frame

    def slow_write(session, frame_idx, labels_map, seq=None):
        if frame_idx == 3:
            gate.wait(timeout=120)  # held until the reader below has asked
        return real_write(session, frame_idx, labels_map, seq)

    monkeypatch.setattr(mgr.store, "_write_frame", slow_write)
    r = client.post(f"/propagate/{prompted}", json={"background": True})
    assert r.status_code == 202, r.text
    job = mgr.jobs.get(r.json()["job_id"])
    got = []
    try:
        version = -1
        while not job.finished and not (job.frame_idx is not None and job.done >= 4):
            version = job.wait_change(version, 30)
        assert job.done >= 4 and not job.finished, job.snapshot()
        reader = threading.Thread(target=lambda: got.append(client.get(f"/mask/{prompted}/3")))
        reader.start()
    finally:
        gate.set()
    reader.join(timeout=120)
    assert got and got[0].status_code == 200, got and got[0].text
    assert label_png(got[0].content).shape == (HEIGHT, WIDTH)
    end = read_sse(client, f"/jobs/{job.id}/events")[-1][1]
    assert end["status"] == "succeeded"
    assert end["result"]["passes"][0]["last"] == NUM_FRAMES - 1


def test_prompt_answers_name_each_objects_colour(client, session_id):
    body = annotate_ok(client, session_id, obj_id=7)
    assert body["colors"] == {"7": mask_ops.color_of(7)}


def test_a_frame_request_waiting_for_decoding_ends_when_the_session_is_deleted(client, video):
    sid = upload(client, video).json()["session_id"]
    assert client.get(f"/frame/{sid}/7").status_code == 200
    extractor = client.manager.sessions[sid].extractor
    with extractor._notify.cond:
        extractor.written = 1  # as if the decoder were still at frame 1
    got = []
    reader = threading.Thread(target=lambda: got.append(client.get(f"/frame/{sid}/7")))
    reader.start()
    assert client.delete(f"/session/{sid}").status_code == 200
    reader.join(timeout=60)  # a bound for a failure: it would otherwise wait 120 s for frames
    assert got, "the waiting request did not end"
    assert_error(got[0], 404, "session_not_found")


def test_concurrent_requests_on_two_sessions(client, video, settings):
    ids = [upload(client, video).json()["session_id"] for _ in range(2)]
    for sid in ids:
        annotate_ok(client, sid)
    results: dict[str, int] = {}

    def run(sid):
        results[sid] = client.post(f"/propagate/{sid}", json={"end_frame": 3}).status_code

    threads = [threading.Thread(target=run, args=(sid,)) for sid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == {sid: 200 for sid in ids}
    for sid in ids:
        assert assert_consistent(client, settings, sid)["mask_frames"] == [0, 1, 2, 3]



def test_mask_prompt_as_multipart(client, session_id):
    import cv2

    mask = np.zeros((120, 160), np.uint8)
    mask[30:80, 20:70] = 255
    png = cv2.imencode(".png", mask)[1].tobytes()
    r = client.post(f"/mask-prompt/{session_id}", data={"frame_idx": "2", "obj_id": "3"},
                    files={"file": ("m.png", png, "image/png")})
    assert r.status_code == 200, r.text
    assert r.json()["obj_ids"] == [3]
    session = client.get(f"/session/{session_id}").json()
    assert session["current_prompts"]["3"]["2"]["mask"] is True
    assert session["prompts"][-1]["action"] == "mask"
    # Wrong size, not an image, and a missing field are 422s that register nothing.
    small = cv2.imencode(".png", mask[:60, :80])[1].tobytes()
    for files, data in ((("m.png", small, "image/png"), {"frame_idx": "2"}),
                        (("m.png", b"not an image", "image/png"), {"frame_idx": "2"}),
                        (("m.png", png, "image/png"), {})):
        r = client.post(f"/mask-prompt/{session_id}", data=data | {"obj_id": "4"},
                        files={"file": files})
        assert r.status_code == 422, r.text
    assert [o["obj_id"] for o in client.get(f"/session/{session_id}").json()["objects"]] == [3]


def test_clicks_append_journal_lines_instead_of_rewriting_the_manifest(client, session_id,
                                                                      settings, monkeypatch):
    """A click's cost on disk does not grow with the video: it appends one journal line; the
    snapshot plus the journal hold every click, and a rewrite folds the journal in."""
    mgr = client.manager
    annotate_ok(client, session_id)
    session = mgr.get(session_id)
    session.drain_writes()
    mgr.store.save_manifest(session)  # start from a snapshot with no journal
    files = SessionFiles(settings.output_dir / session_id)
    rewrites = []
    real = mgr.store._write_manifest
    monkeypatch.setattr(mgr.store, "_write_manifest", lambda s: (rewrites.append(1), real(s)))
    clicks = [[10 + 5 * k, 20] for k in range(6)]
    for point in clicks:
        r = client.post(f"/refine-mask/{session_id}",
                        json={"frame_idx": 0, "points": [{"x": point[0], "y": point[1], "label": 0}]})
        assert r.status_code == 200, r.text
    session.drain_writes()
    assert rewrites == []
    assert len(manifest.journal_path(files).read_text().splitlines()) == 6
    snapshot = json.loads(files.manifest_path.read_text())
    assert [p["action"] for p in snapshot["prompts"]] == ["annotate"]
    on_disk = manifest.read(files)
    refines = [p for p in on_disk["prompts"] if p["action"] == "refine"]
    assert [p["points"][-1] for p in refines] == [[float(x), float(y)] for x, y in clicks]
    in_memory = json.loads(json.dumps(mgr.store.manifest_of(session)))
    for key in set(in_memory) - {"last_access", "busy_with"}:  # live values, not records
        assert on_disk[key] == in_memory[key], key
    # A rewrite folds the journal in; closing the session leaves a snapshot only.
    mgr.close_session(session_id, delete_files=False)
    assert not manifest.journal_path(files).exists()
    assert json.loads(files.manifest_path.read_text())["prompts"] == on_disk["prompts"]


def test_a_torn_journal_line_is_skipped_and_older_lines_are_not_replayed(tmp_path):
    files = SessionFiles(tmp_path)
    files.manifest_path.write_text(json.dumps({"mask_frames": [1], "journal_seq": 2,
                                               "current_prompts": {}, "objects": []}))
    manifest.append(files, 2, [["add", "mask_frames", 7]])  # already in the snapshot
    manifest.append(files, 3, [["add", "mask_frames", 4]])
    with open(manifest.journal_path(files), "a") as f:
        f.write('{"seq": 4, "ops": [["add", "mask_')  # a crash in the middle of a write
    data = manifest.read(files)
    assert data["mask_frames"] == [1, 4] and data["journal_seq"] == 3


def test_clicks_queue_file_writes_without_waiting_and_the_last_one_wins(client, session_id,
                                                                        monkeypatch):
    """A click does not wait for its mask file, which is written later (or when a reader asks);
    a write overtaken by a later click on the same frame is skipped, and the file ends as the
    last click left it."""
    mgr = client.manager
    session = mgr.get(session_id)
    annotate_ok(client, session_id)
    session.drain_writes()
    written = []
    real_png = store.write_png
    monkeypatch.setattr(store, "write_png",
                        lambda path, labels: (written.append(path.name), real_png(path, labels)))
    monkeypatch.setattr(mgr.store._click_writes, "delay", 3600)  # nothing is written unless asked
    results = [annotate_ok(client, session_id, obj_id=obj_id, points=[point])
               for obj_id, point in ((2, (110, 90, 1)), (3, (40, 95, 1)))]
    assert written == []  # both clicks answered; neither file written yet
    session.drain_writes()  # a reader asks: the queued writes run now, in order
    assert written == ["00000.png"]  # the overtaken write was skipped
    last = results[-1]
    assert sorted(last["obj_ids"]) == [1, 2, 3]
    assert results[0]["mask_area"] != last["mask_area"]  # else the check below shows nothing
    r = client.get(f"/mask/{session_id}/0")
    assert r.status_code == 200
    labels = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert {int(k): v for k, v in last["mask_area"].items()} == mask_ops.areas(labels)
    assert client.get(f"/overlay/{session_id}/0").status_code == 200
