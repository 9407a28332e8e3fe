#!/usr/bin/env python
"""Upload-to-first-mask over HTTP, and peak host memory, for videos of several lengths.

  python bench/first_mask.py --frames 10,1000 [--width 640 --height 360] [--image-size 1024]

Each length runs in a fresh process: the app (with its lifespan) is served in-process by
Starlette's TestClient, the video is POSTed to /upload-video, then frame 0 is annotated. The time
is from the start of the upload to the annotate answer; memory is the peak resident set (VmHWM)
above what the process held once the model was loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _vm(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def measure(frames: int, width: int, height: int, image_size: int | None, workdir: Path) -> dict:
    import torch
    from fastapi.testclient import TestClient
    from sam2.build_sam import build_sam2_video_predictor

    from config import Settings
    from main import create_app
    from synthetic_video import make_video

    ckpt = workdir / "ckpt.pt"
    torch.manual_seed(4)
    model = build_sam2_video_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu")
    torch.save({"model": model.state_dict()}, ckpt)
    del model
    video = make_video(workdir / "v.mp4", num_frames=frames, width=width, height=height)
    settings = Settings(checkpoint=ckpt, image_size=image_size, device="auto",
                        upload_dir=workdir / "up", output_dir=workdir / "out", _env_file=None)
    with TestClient(create_app(settings)) as client:
        while client.get("/health").status_code != 200:
            time.sleep(0.05)
        _reset_peak()
        base = _vm("VmHWM")
        t0 = time.perf_counter()
        with open(video, "rb") as f:
            r = client.post("/upload-video", files={"file": ("v.mp4", f, "video/mp4")})
        t_upload = time.perf_counter() - t0
        sid = r.json()["session_id"]
        body = {"frame_idx": 0, "points": [{"x": width * 0.3, "y": height * 0.5, "label": 1}]}
        r = client.post(f"/annotate-frame/{sid}", json=body)
        t_mask = time.perf_counter() - t0
        assert r.status_code == 200, r.text
        peak = _vm("VmHWM") - base
        device = client.get("/health").json()["device"]
    return {"frames": frames, "size": f"{width}x{height}", "device": device,
            "image_size": image_size, "upload_s": round(t_upload, 3),
            "upload_to_first_mask_s": round(t_mask, 3), "peak_host_mib_above_model": round(peak, 1),
            "video_mib": round(video.stat().st_size / 2**20, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", default="10,1000", help="comma-separated video lengths")
    p.add_argument("--width", type=int, default=640, help="video width")
    p.add_argument("--height", type=int, default=360, help="video height")
    p.add_argument("--image-size", type=int, default=None,
                   help="model input size (default: the model's 1024)")
    p.add_argument("--one", type=int, default=None, help="(internal) measure one length")
    args = p.parse_args()
    if args.one is not None:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(measure(args.one, args.width, args.height, args.image_size,
                                     Path(tmp))))
        return 0
    rows = []
    for n in [int(x) for x in args.frames.split(",")]:
        cmd = [sys.executable, __file__, "--one", str(n), "--width", str(args.width),
               "--height", str(args.height)]
        if args.image_size:
            cmd += ["--image-size", str(args.image_size)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row[k]) for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
