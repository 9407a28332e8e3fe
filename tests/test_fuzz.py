"""Property-based fuzzing of the whole HTTP API from its own OpenAPI document (schemathesis).

Every operation of ``app.openapi()`` gets generated requests, valid and invalid, sent to the
in-process app; each response must not be a 5xx, and must match the status code's declared
schema and content type. Most requests are aimed at a real session (uploaded, clicked and
propagated, so it has prompts and masks) and at real frames, jobs and export files, so the
fuzzer reaches the model and the file writers rather than 404s; the rest keep the generated ids.

The app's lifespan is run by a Starlette ``TestClient`` (also used to prepare the session);
schemathesis sends its requests straight to the same app object in-process. Generation is
derandomized: every run sends the same requests. ``SAM2_FUZZ_LOG=file`` appends each exchange
(request, status, error body, seconds) to ``file`` as JSON lines.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest
import schemathesis
from conftest import IMAGE_SIZE
from fastapi.testclient import TestClient
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from media import make_video
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from config import Settings
from main import create_app
from sam2_manager import SAM2Manager

NUM_FRAMES, WIDTH, HEIGHT = 8, 160, 120  # the `video` fixture
CLICK = {"x": 45, "y": 55, "label": 1}  # inside the yellow box on frame 0
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance,
          content_type_conformance]
ROOT = Path(__file__).resolve().parents[1]
FUZZ_SETTINGS = hypothesis_settings(
    max_examples=20, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                           HealthCheck.data_too_large],
)
# Operations that delete what the others need: fuzzed last, in their own test.
DESTRUCTIVE = r"^(DELETE /object/|POST /reset/|DELETE /session/)"
RESEED_FRAMES = 1  # frames tracked after frame 0 when the session is brought back
FUZZ_LOG = os.environ.get("SAM2_FUZZ_LOG")  # a file to append every exchange to (debugging)


def _asgi_http_only(app):
    """The app for schemathesis's in-process transport, minus the lifespan the TestClient runs."""

    async def asgi(scope, receive, send):
        if scope["type"] != "lifespan":
            return await app(scope, receive, send)
        while True:  # acknowledge startup and shutdown without passing them on
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    return asgi


def _mask_png() -> bytes:
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[40:80, 30:70] = 255
    ok, buf = cv2.imencode(".png", mask)
    assert ok
    return buf.tobytes()


def _no_server_paths(*folders: Path) -> Callable:
    """A check: error bodies name none of the server's folders and carry no traceback."""
    markers = [str(f) for f in folders] + ["Traceback (most recent call last)", 'File "/']

    def no_server_paths_in_errors(ctx, response, case) -> None:
        if response.status_code < 400:
            return
        text = response.text
        for marker in markers:
            assert marker not in text, f"the error body leaks {marker!r}: {text[:500]}"

    return no_server_paths_in_errors


@dataclass
class LiveSession:
    """A session with prompts and masks, brought back whenever a fuzzed request destroyed it."""

    client: TestClient
    video: Path
    asgi: Callable
    checks: list[Callable]
    session_id: str = ""
    info: dict = field(default_factory=dict)  # GET /session/{id}, read before each case
    job_id: str = ""
    export_names: list[str] = field(default_factory=list)
    restored: int = 0
    dirty: bool = True  # a request may have changed the session since `info` was read
    ensure_s: float = 0.0

    def upload(self) -> None:
        r = self._upload()
        if r.status_code == 429:  # sessions opened by fuzzed requests: make room
            for s in self.client.get("/sessions").json():
                self.client.delete(f"/session/{s['session_id']}")
            r = self._upload()
        assert r.status_code == 200, r.text
        self.session_id = r.json()["session_id"]

    def _upload(self):
        with open(self.video, "rb") as f:
            return self.client.post("/upload-video", files={"file": ("clip.mp4", f, "video/mp4")})

    def seed(self, max_frames: int | None = None) -> None:
        """Click frame 0 and track the object forward (over the whole video by default)."""
        sid = self.session_id
        r = self.client.post(f"/annotate-frame/{sid}",
                             json={"frame_idx": 0, "obj_id": 1, "points": [CLICK]})
        assert r.status_code == 200, r.text
        r = self.client.post(f"/propagate/{sid}",
                             json={"start_frame": 0, "max_frames": max_frames})
        assert r.status_code == 200, r.text

    def ensure(self) -> None:
        """Bring the session back if a fuzzed request deleted or emptied it (a short tracking
        only: a full one costs ~2 s, and the destructive operations undo it at every call)."""
        if not self.dirty:
            return
        r = self.client.get(f"/session/{self.session_id}")
        if r.status_code == 404:
            self.restored += 1
            self.upload()
            self.seed(max_frames=RESEED_FRAMES)
        elif not (r.json()["current_prompts"] and r.json()["mask_frames"]):
            self.restored += 1
            self.seed(max_frames=RESEED_FRAMES)
        else:
            self.info, self.dirty = r.json(), False
            return
        r = self.client.get(f"/session/{self.session_id}")
        assert r.status_code == 200, r.text
        self.info, self.dirty = r.json(), False

    def prepare(self) -> None:
        """The session, a finished export job and two export files to download."""
        self.upload()
        self.seed()
        r = self.client.post(f"/export/{self.session_id}", json={"format": "masks_zip"})
        assert r.status_code == 202, r.text
        self.job_id = r.json()["job_id"]
        job = self.wait_job(self.job_id)
        assert job["status"] == "succeeded", job
        r = self.client.get(f"/export/{self.session_id}")  # writes output_video.mp4
        assert r.status_code == 200, r.text
        self.export_names = [job["result"]["file"], "output_video.mp4"]

    def wait_job(self, job_id: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            r = self.client.get(f"/jobs/{job_id}")
            assert r.status_code == 200, r.text
            job = r.json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            assert time.monotonic() < deadline, job
            time.sleep(0.02)

    @property
    def objects(self) -> list[int]:
        return [o["obj_id"] for o in self.info.get("objects", [])] or [1]

    @property
    def prompted(self) -> list[tuple[int, int]]:
        """(obj_id, frame_idx) of every current prompt."""
        return sorted((int(o), int(f)) for o, per in self.info.get("current_prompts", {}).items()
                      for f in per) or [(1, 0)]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _aim(case, live: LiveSession) -> None:
    """Point most cases at the live session, its frames, objects, prompts, job and exports.

    The choices are drawn from a generator seeded with the generated values (not from a
    counter), so a Hypothesis replay of an example sends the same request. One case in five
    keeps every generated value; values of the wrong type always stay (they test validation).
    """
    generated = repr((case.operation.label, case.path_parameters, case.query, case.body))
    # Without object addresses (the repr of schemathesis's NotSet has one): same seed each run.
    rnd = random.Random(zlib.crc32(re.sub(r" at 0x[0-9a-fA-F]+", "", generated).encode()))
    if rnd.random() < 0.2:
        return
    # Schemathesis may share these containers between cases: edit copies.
    case.path_parameters = copy.deepcopy(case.path_parameters)
    case.query = copy.deepcopy(case.query)
    case.body = copy.deepcopy(case.body)
    path = case.operation.path
    params = case.path_parameters
    if params:
        if "session_id" in params:
            params["session_id"] = live.session_id
        if _is_int(params.get("frame_idx")) and rnd.random() < 0.9:
            params["frame_idx"] %= NUM_FRAMES
        if "job_id" in params:
            params["job_id"] = live.job_id
        if "name" in params and rnd.random() < 0.8:
            params["name"] = rnd.choice(live.export_names)
        if _is_int(params.get("obj_id")) and rnd.random() < 0.8:
            params["obj_id"] = rnd.choice(live.objects)
    body = case.body
    if isinstance(body, dict) and rnd.random() < 0.8:
        for name in ("frame_idx", "start_frame", "end_frame"):
            if _is_int(body.get(name)):
                body[name] %= NUM_FRAMES
        if path.startswith("/clear-prompts/") and _is_int(body.get("frame_idx")):
            body["obj_id"], body["frame_idx"] = rnd.choice(live.prompted)
        points = body.get("points")
        if isinstance(points, list):
            for p in points:
                if isinstance(p, dict) and _is_real(p.get("x")) and _is_real(p.get("y")):
                    p["x"], p["y"] = p["x"] % WIDTH, p["y"] % HEIGHT
        if "session_id" in body and rnd.random() < 0.5:
            body["session_id"] = live.session_id
        if path.startswith("/mask-prompt/") and "file" in body and rnd.random() < 0.6:
            body["file"] = _mask_png()
    if (isinstance(body, dict) and path.startswith("/propagate/") and rnd.random() < 0.8
            and body.get("end_frame") is None and body.get("max_frames") is None):
        # Tracking costs ~0.2 s a frame: most propagations cover a few frames only.
        body["max_frames"] = rnd.randint(0, 2)
    query = case.query
    if isinstance(query, dict) and rnd.random() < 0.8:
        for name in ("start_frame", "end_frame"):
            if _is_int(query.get(name)):
                query[name] %= NUM_FRAMES


def _fuzz(case, live: LiveSession) -> None:
    t0 = time.perf_counter()
    live.ensure()
    live.ensure_s = time.perf_counter() - t0
    _aim(case, live)
    t0 = time.perf_counter()
    response = None
    try:
        response = case.call(app=live.asgi)
    finally:
        if response is None or (case.method.upper() != "GET" and response.status_code < 300):
            live.dirty = True
        if FUZZ_LOG:
            _log(case, response, time.perf_counter() - t0, live)
    try:
        case.validate_response(response, checks=live.checks)
    finally:
        _settle(case, response, live)


def _settle(case, response, live: LiveSession) -> None:
    """Let a background job end, and close sessions a fuzzed upload opened (max_sessions=4)."""
    content_type = ",".join(response.headers.get("content-type", []))  # lists of values
    if response.status_code not in (200, 202) or "json" not in content_type:
        return
    try:
        body = response.json()
    except ValueError:
        return
    if not isinstance(body, dict):
        return
    if response.status_code == 202 and body.get("job_id"):
        live.wait_job(body["job_id"])
    if case.operation.path == "/upload-video" and body.get("session_id"):
        live.client.delete(f"/session/{body['session_id']}")


def _log(case, response, seconds: float, live: LiveSession) -> None:
    with open(FUZZ_LOG, "a") as log:
        log.write(json.dumps({
            "op": case.operation.label, "phase": case.meta.phase.name.value if case.meta else None,
            "path": case.formatted_path, "query": repr(case.query), "body": repr(case.body)[:300],
            "status": response.status_code if response is not None else "raised",
            "ctype": response.headers.get("content-type") if response is not None else None,
            "text": response.text[:600] if response is not None and response.status_code >= 400
            else "", "seconds": seconds, "restored": live.restored, "ensure_s": live.ensure_s,
        }, default=str) + "\n")


# ----------------------------------------------------------------------------- fixtures
def _openapi() -> dict:
    """The app's OpenAPI document, read at collection (creating the app loads nothing; the
    `live` fixture checks that its app, on the test settings, documents the same API)."""
    scratch = Path(tempfile.gettempdir()) / "sam2-fuzz-openapi"
    return create_app(Settings(
        device="cpu", upload_dir=scratch / "uploads", output_dir=scratch / "outputs",
        checkpoint_dir=scratch / "checkpoints", _env_file=None)).openapi()


# Loaded at import, so that each operation is a test item of its own. (`from_fixture` would
# build the schema from a fixture, but schemathesis 4.32 fails with pytest 9.2 there: it sets
# the removed `Node._nodeid`.) Requests go to the fixture's app: `case.call(app=...)`.
schema = schemathesis.openapi.from_dict(_openapi())


@pytest.fixture(scope="module")
def live(tmp_path_factory, checkpoint, predictor):
    """The app (settings as conftest's `settings`, on a module-wide folder) and its session."""
    root = tmp_path_factory.mktemp("fuzz")
    settings = Settings(
        checkpoint=checkpoint, image_size=IMAGE_SIZE, device="cpu", fill_hole_area=0,
        upload_dir=root / "uploads", output_dir=root / "outputs",
        checkpoint_dir=root / "checkpoints", max_sessions=4, max_upload_mb=5,
        session_lock_timeout_s=5, _env_file=None,
    )
    app = create_app(settings, SAM2Manager(settings, predictor=predictor))
    assert app.openapi() == schema.raw_schema, "the fuzzed app's OpenAPI differs from the schema"
    with TestClient(app) as client:
        session = LiveSession(client=client, video=make_video(root / "in" / "clip.mp4"),
                              asgi=_asgi_http_only(app),
                              checks=[*CHECKS, _no_server_paths(root, ROOT)])
        session.prepare()
        yield session


# ----------------------------------------------------------------------------- tests
@schema.exclude(name_regex=DESTRUCTIVE).parametrize()
@FUZZ_SETTINGS
def test_api_fuzz(case, live):
    _fuzz(case, live)


@schema.include(name_regex=DESTRUCTIVE).parametrize()
@hypothesis_settings(FUZZ_SETTINGS, max_examples=10)
def test_api_fuzz_destructive(case, live):
    _fuzz(case, live)

