"""End to end: a real uvicorn process, driven by test_workflow.py over HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import av

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_workflow_against_real_server(tmp_path, checkpoint):
    port = _free_port()
    env = os.environ | {
        "SAM2_CHECKPOINT": str(checkpoint), "SAM2_IMAGE_SIZE": "256", "SAM2_DEVICE": "cpu",
        "SAM2_UPLOAD_DIR": str(tmp_path / "uploads"), "SAM2_OUTPUT_DIR": str(tmp_path / "out"),
        "SAM2_HOST": "127.0.0.1", "SAM2_PORT": str(port), "PYTHONUNBUFFERED": "1",
        "SAM2_API_KEYS": "e2e-key-0123456789",
    }
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 (closed in finally)
    server = subprocess.Popen([sys.executable, "main.py"], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        out = tmp_path / "result.mp4"
        workflow = [sys.executable, "test_workflow.py", "--url", f"http://127.0.0.1:{port}",
                    "--timeout", "300"]
        run = subprocess.run(workflow + ["--out", str(out), "--keep"], cwd=ROOT,
                             env=env | {"SAM2_API_KEY": "e2e-key-0123456789"},
                             capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout + run.stderr + (tmp_path / "server.log").read_text()
        assert "[ok] workflow complete" in run.stdout
        for name in ("upload-video", "annotate frame 0", "propagate", "refine frame",
                     "re-propagate", "export"):
            assert f"[ok] {name}" in run.stdout
        with av.open(str(out)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            assert stream.codec_context.pix_fmt == "yuv420p"
            assert sum(1 for _ in container.decode(stream)) == 24
        # The server wrote the seed's layout.
        (session_dir,) = (tmp_path / "out").iterdir()
        assert {p.name for p in session_dir.iterdir()} >= {
            "frames", "masks", "overlays", "output_video.mp4", "session.json"}
        assert len(list((session_dir / "masks").glob("*.png"))) == 24

        # Without --keep the script deletes its session; without the key it gets nowhere.
        again = subprocess.run(workflow + ["--api-key", "e2e-key-0123456789"], cwd=ROOT,
                               capture_output=True, text=True, timeout=900)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "[ok] delete session" in again.stdout
        assert [p.name for p in (tmp_path / "out").iterdir()] == [session_dir.name]
        refused = subprocess.run(workflow, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert refused.returncode == 1 and "HTTP 401" in refused.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    assert server.returncode is not None


def test_workflow_reports_unreachable_server(tmp_path):
    run = subprocess.run(
        [sys.executable, "test_workflow.py", "--url", f"http://127.0.0.1:{_free_port()}",
         "--timeout", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "FAILED" in run.stderr
