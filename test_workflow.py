#!/usr/bin/env python
"""Drive the whole workflow against a running server and say what each step returned.

  python test_workflow.py [--url http://localhost:8000] [--video path] [--out result.mp4]
                          [--api-key KEY] [--keep]

Upload, frame, annotate, propagate, overlay, refine, re-propagate, export, then delete the
session (unless --keep). Without --video a small test video is made. Exits non-zero at the
first step that fails. A server with access keys needs --api-key (or SAM2_API_KEY).
(Not a pytest module: tests/test_e2e.py runs it against a real uvicorn process.)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

__test__ = False  # keep pytest from collecting this script


class StepFailed(Exception):
    pass


def step(name: str, response: httpx.Response, expect: int = 200) -> httpx.Response:
    ctype = response.headers.get("content-type", "")
    if response.status_code != expect:
        raise StepFailed(f"{name}: HTTP {response.status_code} (expected {expect}): "
                         f"{response.text[:500]}")
    if ctype.startswith("application/json"):
        body = response.json()
        shown = {k: v for k, v in body.items() if k not in ("prompts", "scores", "mask_frames")} \
            if isinstance(body, dict) else body
        print(f"[ok] {name}: {shown}")
    else:
        print(f"[ok] {name}: {ctype}, {len(response.content)} bytes")
    return response


def wait_healthy(client: httpx.Client, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = client.get("/health")
            last = r.json()
            if r.status_code == 200:
                return last
            if last.get("model_status") == "error":
                raise StepFailed(f"health: the model failed to load: {last.get('detail')}")
        except httpx.TransportError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise StepFailed(f"health: server not ready after {timeout:.0f}s ({last})")


def run(url: str, video: Path, out: Path | None, timeout: float, api_key: str | None = None,
        keep: bool = False) -> Path:
    import av

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, timeout=timeout, headers=headers) as client:
        print(f"[ok] health: {wait_healthy(client, timeout)}")
        with open(video, "rb") as f:
            r = step("upload-video", client.post(
                "/upload-video", files={"file": (video.name, f, "application/octet-stream")}))
        info = r.json()
        sid, n, w, h = info["session_id"], info["num_frames"], info["width"], info["height"]
        last = n - 1
        mid = n // 2

        step("frame 0", client.get(f"/frame/{sid}/0"))
        points = [{"x": w * 0.35, "y": h * 0.5, "label": 1}, {"x": w * 0.4, "y": h * 0.55,
                                                              "label": 1}]
        ann = step("annotate frame 0", client.post(
            f"/annotate-frame/{sid}", json={"frame_idx": 0, "points": points})).json()
        step("mask frame 0", client.get(ann["mask_url"]))
        prop = step("propagate", client.post(
            f"/propagate/{sid}", json={"session_id": sid, "start_frame": 0, "end_frame": last}))
        if prop.json()["frames_processed"] != n:
            raise StepFailed(f"propagate: {prop.json()['frames_processed']} frames, expected {n}")
        step(f"overlay frame {mid}", client.get(f"/overlay/{sid}/{mid}"))
        step(f"refine frame {mid}", client.post(
            f"/refine-mask/{sid}",
            json={"frame_idx": mid, "points": [{"x": w * 0.9, "y": h * 0.1, "label": 0}]}))
        again = step("re-propagate", client.post(
            f"/propagate/{sid}", json={"start_frame": mid, "end_frame": last})).json()
        if again["first_frame"] != mid or again["last_frame"] != last:
            raise StepFailed(f"re-propagate covered {again['first_frame']}..{again['last_frame']}")
        session = step("session", client.get(f"/session/{sid}")).json()
        actions = [p["action"] for p in session["prompts"]]
        if actions != ["annotate", "refine"]:
            raise StepFailed(f"session: prompts recorded as {actions}")
        export = step("export", client.get(f"/export/{sid}"))
        if export.headers.get("content-type") != "video/mp4":
            raise StepFailed("export: not video/mp4")
        target = out or Path(tempfile.gettempdir()) / f"{sid}.mp4"
        target.write_bytes(export.content)
        with av.open(str(target)) as container:
            stream = container.streams.video[0]
            frames = sum(1 for _ in container.decode(stream))
            print(f"[ok] exported video: {target} ({stream.codec_context.name}, "
                  f"{stream.codec_context.pix_fmt}, {frames} frames, {stream.average_rate} fps)")
            if frames != n:
                raise StepFailed(f"export has {frames} frames, the video {n}")
        if keep:
            print(f"[ok] session kept: {sid}")
        else:
            step("delete session", client.delete(f"/session/{sid}"))
        return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://localhost:8000", help="server base URL")
    parser.add_argument("--video", type=Path, default=None,
                        help="video to upload (default: a generated 24-frame clip)")
    parser.add_argument("--out", type=Path, default=None, help="where to save the export")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait for the server and for each request")
    parser.add_argument("--api-key", default=os.environ.get("SAM2_API_KEY"),
                        help="access key for a server with keys (default: $SAM2_API_KEY)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the session on the server instead of deleting it at the end")
    args = parser.parse_args(argv)
    video = args.video
    if video is None:
        from synthetic_video import make_video

        video = make_video(Path(tempfile.mkdtemp()) / "workflow.mp4", num_frames=24,
                           width=320, height=240)
        print(f"[..] made test video {video}")
    try:
        run(args.url.rstrip("/"), video, args.out, args.timeout, args.api_key, args.keep)
    except StepFailed as exc:
        print(f"[FAILED] {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"[FAILED] cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    print("[ok] workflow complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
