#!/usr/bin/env python
"""CLI: inspect a video, or segment it (points/box on a frame, propagate, export) without HTTP.

Examples:
  python run_sam2.py --video test.mp4
  python run_sam2.py --video test.mp4 --frame 0 --points "[[920,470],[909,138]]" \\
      --labels "[1,1]" --propagate-end 100 --export
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from config import Settings, get_settings


def _json_list(text: str) -> list:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r} ({exc.msg})") from exc
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"expected a JSON list, got {text!r}")
    return value


def build_parser(defaults: Settings) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="SAM 2 video segmentation from the command line (same engine as the server).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--video", required=True, type=Path,
                   help="video file to read, or a ZIP of JPEG/PNG frames sorted by name")
    p.add_argument("--fps", default=None,
                   help="frame rate of a ZIP of frames, e.g. 25 or 30000/1001 (default 30)")
    p.add_argument("--frame", type=int, default=None,
                   help="frame to prompt on; without it the CLI only prints the video's info")
    p.add_argument("--points", type=_json_list, default=[],
                   help='points as JSON, e.g. "[[920,470],[909,138]]" (video pixels)')
    p.add_argument("--labels", type=_json_list, default=None,
                   help='labels as JSON, 1 = include, 0 = exclude; default: all 1')
    p.add_argument("--box", type=_json_list, default=None, help='box as JSON "[x0,y0,x1,y1]"')
    p.add_argument("--obj-id", type=int, default=1, help="object id (1..255)")
    p.add_argument("--propagate-start", type=int, default=None,
                   help="frame to propagate from (default: --frame)")
    p.add_argument("--propagate-end", type=int, default=None,
                   help="last frame to propagate to (inclusive; clamped to the video)")
    p.add_argument("--direction", choices=["forward", "backward", "both"], default=None,
                   help="propagation direction when --propagate-end is not given")
    p.add_argument("--propagate", action="store_true",
                   help="propagate over the whole video (forward, or --direction)")
    p.add_argument("--export", action="store_true", help="export the overlay MP4")
    p.add_argument("--export-format", default="overlay_mp4",
                   help="export format (see README: overlay_mp4, mask_mp4, ...)")
    p.add_argument("--model", default=defaults.model, help="tiny | small | base_plus | large")
    p.add_argument("--checkpoint", type=Path, default=defaults.checkpoint,
                   help="checkpoint in Meta's format (default: download on first use)")
    p.add_argument("--device", default=defaults.device, choices=["auto", "cuda", "mps", "cpu"],
                   help="where the model runs")
    p.add_argument("--image-size", type=int, default=defaults.image_size,
                   help="model input size override (default: the model's 1024)")
    p.add_argument("--output-dir", type=Path, default=defaults.output_dir,
                   help="where session folders are written")
    p.add_argument("--upload-dir", type=Path, default=defaults.upload_dir,
                   help="where the input video is copied")
    p.add_argument("--json", action="store_true", help="print results as JSON lines")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    return p


class _BarReporter:
    """Adapts the manager's job progress reports to a tqdm bar."""

    def __init__(self, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(desc=desc, unit="frame", file=sys.stderr)

    def report(self, frame_idx, done, total):
        self.bar.total = total
        self.bar.n = done
        self.bar.set_postfix(frame=frame_idx, refresh=False)
        self.bar.refresh()

    def close(self):
        self.bar.close()


def _print(args, title: str, data: dict) -> None:
    if args.json:
        print(json.dumps({"step": title, **data}))
    else:
        print(f"== {title}")
        for k, v in data.items():
            print(f"   {k}: {v}")


def main(argv: list[str] | None = None) -> int:
    defaults = get_settings()
    parser = build_parser(defaults)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from errors import ManagerError
    from jobs import Progress
    from sam2_manager import SAM2Manager
    from video_io import VideoUnreadable, probe_upload

    if not args.video.is_file():
        parser.error(f"no such file: {args.video}")
    try:
        info = probe_upload(args.video, args.fps)
    except VideoUnreadable as exc:
        print(f"error: {args.video}: {exc}", file=sys.stderr)
        return 2
    _print(args, "video", {"path": str(args.video)} | info.as_dict())
    if args.frame is None:
        if args.points or args.box or args.export or args.propagate_end is not None:
            parser.error("--frame is needed to prompt, propagate or export")
        return 0

    labels = args.labels if args.labels is not None else [1] * len(args.points)
    settings = defaults.model_copy(update={
        "model": Settings(model=args.model, _env_file=None).model, "checkpoint": args.checkpoint,
        "device": args.device, "image_size": args.image_size, "output_dir": args.output_dir,
        "upload_dir": args.upload_dir})
    manager = SAM2Manager(settings)
    print(f"loading SAM 2 {settings.model} ...", file=sys.stderr)
    manager.load_model()
    if not manager.ready:
        print(f"error: {manager.model_detail}", file=sys.stderr)
        return 3
    try:
        sid = manager.new_session_id()
        upload = manager.store.upload_path_for(sid, args.video.name)
        shutil.copyfile(args.video, upload)
        session = manager.create_session(sid, upload, args.video.name, fps=args.fps)
        _print(args, "session", {"session_id": sid, "folder": str(session.dir)})
        if args.points or args.box:
            result = manager.add_prompt(sid, args.frame, args.obj_id, points=args.points,
                                        labels=labels, box=args.box)
            _print(args, "mask", {"frame_idx": args.frame, "mask_area": result["mask_area"],
                                  "scores": result["scores"],
                                  "mask": str(manager.store.mask_path(session, args.frame)),
                                  "overlay": str(manager.store.overlay_path(session, args.frame))})
        if args.propagate_end is not None or args.propagate or args.direction:
            start = args.propagate_start if args.propagate_start is not None else args.frame
            bar = _BarReporter("propagate")
            try:
                result = manager.propagate(sid, start, args.propagate_end, args.direction,
                                           progress=Progress(job=bar))
            finally:
                bar.close()
            _print(args, "propagation", result)
        if args.export:
            bar = _BarReporter("export")
            try:
                path = manager.export(sid, args.export_format, progress=Progress(job=bar))
            finally:
                bar.close()
            _print(args, "export", {"path": str(path), "bytes": path.stat().st_size})
    except ManagerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        manager.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
