"""Checkpoint download on first use, tested offline against a loopback HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import threading
from pathlib import Path

import pydantic
import pytest

from checkpoints import CheckpointUnavailable, ensure_checkpoint
from config import Settings

FILENAME = "sam2.1_hiera_tiny.pt"


class LoopbackServer:
    """ThreadingHTTPServer on 127.0.0.1:0 serving ``files[path]`` in a chosen way."""

    def __init__(self, files: dict[str, bytes | Path]):
        self.files = files
        self.mode = "ok"  # ok | truncate | long_length | missing
        self.requests: list[str] = []
        self.on_request = None  # called in the handler thread before answering
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                outer.requests.append(self.path)
                if outer.on_request is not None:
                    outer.on_request(self.path)
                body = outer.files.get(self.path)
                if body is None or outer.mode == "missing":
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    return
                if isinstance(body, Path):
                    body = body.read_bytes()
                length = len(body)
                if outer.mode == "truncate":
                    body = body[: len(body) // 2]  # announce all, send half, hang up
                elif outer.mode == "long_length":
                    length = len(body) + 1000  # the header promises more than exists
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(length))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url_template(self) -> str:
        return f"http://127.0.0.1:{self.port}/{{filename}}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def make_settings(tmp_path: Path, url: str, **kw) -> Settings:
    base = {"checkpoint_url": url, "checkpoint_dir": tmp_path / "ckpts", "checkpoint": None,
            "model": "tiny", "device": "cpu", "image_size": 256, "fill_hole_area": 0,
            "upload_dir": tmp_path / "uploads", "output_dir": tmp_path / "outputs",
            "_env_file": None}
    return Settings(**(base | kw))


@pytest.fixture(autouse=True)
def _no_sam2_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SAM2_"):
            monkeypatch.delenv(key)


@pytest.fixture
def payload() -> bytes:
    # A little over 2 MiB so the download reads it in several chunks.
    return os.urandom((2 << 20) + 12345)


def closed_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ----------------------------------------------------------------------------- downloads
def test_downloads_on_first_use_with_progress(tmp_path, payload):
    with LoopbackServer({f"/{FILENAME}": payload}) as server:
        settings = make_settings(tmp_path, server.url_template)
        dest = tmp_path / "ckpts" / FILENAME
        assert settings.checkpoint_path == dest
        assert settings.checkpoint_download_url == f"http://127.0.0.1:{server.port}/{FILENAME}"
        assert not dest.exists()
        progress: list[tuple[int, int | None]] = []
        path = ensure_checkpoint(settings, progress=lambda d, t: progress.append((d, t)))
        assert path == dest
        assert dest.read_bytes() == payload
        assert server.requests == [f"/{FILENAME}"]
        # Progress: increasing byte counts against the announced total, ending complete.
        assert len(progress) >= 2
        assert all(t == len(payload) for _, t in progress)
        done = [d for d, _ in progress]
        assert done == sorted(done) and len(set(done)) == len(done)
        assert done[-1] == len(payload)
        # Nothing but the checkpoint is left in the folder (no .part temp file).
        assert sorted(p.name for p in dest.parent.iterdir()) == [FILENAME]

        # Second use: found on disk, no new request.
        assert ensure_checkpoint(settings) == dest
        assert server.requests == [f"/{FILENAME}"]


def test_download_without_progress_callback(tmp_path, payload):
    with LoopbackServer({f"/{FILENAME}": payload}) as server:
        settings = make_settings(tmp_path, server.url_template)
        assert ensure_checkpoint(settings).read_bytes() == payload


@pytest.mark.parametrize("mode", ["truncate", "long_length"])
def test_incomplete_download_leaves_no_file(tmp_path, payload, mode):
    with LoopbackServer({f"/{FILENAME}": payload}) as server:
        server.mode = mode
        settings = make_settings(tmp_path, server.url_template)
        dest = settings.checkpoint_path
        with pytest.raises(CheckpointUnavailable) as info:
            ensure_checkpoint(settings, progress=lambda d, t: None)
        assert server.requests == [f"/{FILENAME}"]
    assert settings.checkpoint_download_url in str(info.value)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == [], "a partial or temporary file was left behind"


def test_http_error_leaves_no_file(tmp_path, payload):
    with LoopbackServer({f"/{FILENAME}": payload}) as server:
        server.mode = "missing"
        settings = make_settings(tmp_path, server.url_template)
        with pytest.raises(CheckpointUnavailable) as info:
            ensure_checkpoint(settings)
    assert settings.checkpoint_download_url in str(info.value)
    assert not settings.checkpoint_path.exists()
    assert list(settings.checkpoint_path.parent.iterdir()) == []


def test_unreachable_url_names_url_and_destination(tmp_path):
    port = closed_port()
    settings = make_settings(tmp_path, f"http://127.0.0.1:{port}/{{filename}}")
    dest = settings.checkpoint_path
    with pytest.raises(CheckpointUnavailable) as info:
        ensure_checkpoint(settings)
    msg = str(info.value)
    assert f"http://127.0.0.1:{port}/{FILENAME}" in msg
    assert str(dest.resolve()) in msg or str(dest) in msg
    assert not dest.exists()
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []


def test_existing_file_is_used_without_network(tmp_path):
    settings = make_settings(tmp_path, f"http://127.0.0.1:{closed_port()}/{{filename}}")
    settings.checkpoint_dir.mkdir(parents=True)
    settings.checkpoint_path.write_bytes(b"already here")
    assert ensure_checkpoint(settings) == settings.checkpoint_path
    assert settings.checkpoint_path.read_bytes() == b"already here"


def test_explicit_missing_checkpoint_is_a_clear_error_and_not_downloaded(tmp_path, payload):
    missing = tmp_path / "nowhere" / "my_sam2.pt"
    with LoopbackServer({f"/{FILENAME}": payload}) as server:
        settings = make_settings(tmp_path, server.url_template, checkpoint=missing)
        assert settings.checkpoint_path == missing
        with pytest.raises(CheckpointUnavailable) as info:
            ensure_checkpoint(settings)
        assert server.requests == []
    msg = str(info.value)
    assert str(missing) in msg
    assert "SAM2_CHECKPOINT" in msg
    assert not missing.exists()
    assert not (tmp_path / "ckpts" / FILENAME).exists()


def test_explicit_checkpoint_from_environment(tmp_path, monkeypatch):
    missing = tmp_path / "env.pt"
    monkeypatch.setenv("SAM2_CHECKPOINT", str(missing))
    settings = Settings(_env_file=None, checkpoint_dir=tmp_path / "ckpts")
    assert settings.checkpoint_path == missing
    with pytest.raises(CheckpointUnavailable, match="SAM2_CHECKPOINT"):
        ensure_checkpoint(settings)


# ----------------------------------------------------------------------------- model names
@pytest.mark.parametrize(("alias", "canonical", "filename"), [
    ("sam2_t.pt", "tiny", "sam2.1_hiera_tiny.pt"),
    ("sam2_s.pt", "small", "sam2.1_hiera_small.pt"),
    ("sam2_b.pt", "base_plus", "sam2.1_hiera_base_plus.pt"),
    ("sam2_l.pt", "large", "sam2.1_hiera_large.pt"),
    ("sam2.1_hiera_large", "large", "sam2.1_hiera_large.pt"),
    ("sam2.1_hiera_tiny.pt", "tiny", "sam2.1_hiera_tiny.pt"),
    ("base+", "base_plus", "sam2.1_hiera_base_plus.pt"),
    ("small", "small", "sam2.1_hiera_small.pt"),
    ("TINY", "tiny", "sam2.1_hiera_tiny.pt"),
])
def test_model_aliases(alias, canonical, filename, tmp_path):
    settings = Settings(model=alias, checkpoint_dir=tmp_path, _env_file=None)
    assert settings.model == canonical
    assert settings.checkpoint_filename == filename
    assert settings.checkpoint_path == tmp_path / filename
    assert settings.checkpoint_download_url.endswith("/" + filename)
    assert settings.model_config_file.startswith("configs/sam2.1/")


def test_model_alias_from_environment(monkeypatch):
    monkeypatch.setenv("SAM2_MODEL", "sam2_b.pt")
    assert Settings(_env_file=None).model == "base_plus"


@pytest.mark.parametrize("name", ["sam3_t.pt", "huge", "", "yolov8n.pt"])
def test_unknown_model_is_a_validation_error(name):
    with pytest.raises(pydantic.ValidationError, match="unknown model"):
        Settings(model=name, _env_file=None)


# ----------------------------------------------------------------------------- the manager
def test_manager_downloads_then_becomes_ready(tmp_path, checkpoint):
    """A fresh server without a checkpoint downloads Meta's file, builds the model, is healthy."""
    from fastapi.testclient import TestClient

    from main import create_app
    from sam2_manager import SAM2Manager

    seen_during_download = []
    with LoopbackServer({f"/{FILENAME}": checkpoint}) as server:
        settings = make_settings(tmp_path, server.url_template)
        manager = SAM2Manager(settings)
        assert manager.model_status == "not_loaded"
        assert not manager.ready
        assert manager.health()["status"] == "unavailable"
        server.on_request = lambda path: seen_during_download.append(manager.health())
        manager.load_model()
        assert server.requests == [f"/{FILENAME}"]

    assert manager.model_status == "ready", manager.model_detail
    assert manager.ready and manager.model_detail is None
    # While the request was being served, health said it was downloading, naming URL and path.
    assert len(seen_during_download) == 1
    during = seen_during_download[0]
    assert during["model_status"] == "downloading"
    assert settings.checkpoint_download_url in during["detail"]
    assert str(settings.checkpoint_path) in during["detail"]
    # The checkpoint is in place, byte for byte, with nothing else beside it.
    dest = settings.checkpoint_path
    size = checkpoint.stat().st_size
    assert dest.stat().st_size == size
    assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(
        checkpoint.read_bytes()).digest()
    assert sorted(p.name for p in dest.parent.iterdir()) == [FILENAME]
    assert manager.download == {"bytes": size, "total_bytes": size}
    assert manager.predictor.image_size == 256

    with TestClient(create_app(settings, manager)) as client:
        r = client.get("/health")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "ok" and body["model_status"] == "ready"
        assert body["model"] == "tiny"
        assert body["checkpoint"] == dest.name  # no server path on the public /health


def test_manager_reports_an_unreachable_checkpoint_on_health(tmp_path):
    from fastapi.testclient import TestClient

    from main import create_app
    from sam2_manager import SAM2Manager

    settings = make_settings(tmp_path, f"http://127.0.0.1:{closed_port()}/{{filename}}")
    manager = SAM2Manager(settings)
    manager.load_model()
    assert manager.model_status == "error"
    assert not manager.ready
    assert settings.checkpoint_download_url in manager.model_detail
    assert not settings.checkpoint_path.exists()
    with TestClient(create_app(settings, manager)) as client:
        # The lifespan retries the load in a thread; health answers 503 whatever it is at.
        r = client.get("/health")
        assert r.status_code == 503, r.text
        assert r.json()["status"] == "unavailable"
