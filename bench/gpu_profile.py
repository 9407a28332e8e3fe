"""GPU checks that need a CUDA device: how close our masks are to Meta's predictor on CUDA
(``fidelity``), and where GPU time goes per propagated frame (``profile``).

    python3 bench/gpu_profile.py fidelity --frames 40 --out bench-out
    python3 bench/gpu_profile.py profile --model tiny --width 1920 --height 1080 --frames 90

``fidelity`` drives Meta's predictor as its notebook does (bf16 autocast, tf32) and the server's
engine on the same video, checkpoint and prompts, for each of our CUDA settings, and counts the
mask pixels that differ. ``profile`` times each model stage with CUDA events (no added syncs),
the host stages with thread CPU time, and lists the heaviest kernels and the host-device syncs
from torch.profiler. Both run on a CPU too (``--device cpu``), for a dry run of the script.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench import (  # noqa: E402
    build_manager,
    build_meta_predictor,
    decode_to_jpegs,
    prompt_points,
    write_checkpoint,
)
from config import MODELS  # noqa: E402

# The model stages timed in ``profile``: predictor method -> label. They never nest in one
# another during tracking, so their times add up.
STAGES = {"forward_image": "image encoder",
          "_prepare_memory_conditioned_features": "memory attention",
          "_forward_sam_heads": "prompt encoder + mask decoder",
          "_encode_new_memory": "memory encoder"}


def open_session(manager, video: Path):
    sid = manager.new_session_id()
    upload = manager.store.upload_path_for(sid, video.name)
    shutil.copyfile(video, upload)
    session = manager.create_session(sid, upload, video.name)
    session.extractor.wait_for(session.info.num_frames - 1, 3600)
    return sid, session


def read_labels(manager, session, frames) -> dict[int, np.ndarray]:
    import cv2

    session.drain_writes()
    return {f: cv2.imread(str(manager.store.mask_path(session, f)), cv2.IMREAD_UNCHANGED)
            for f in frames}


# ----------------------------------------------------------------------------- fidelity
def meta_labels(a, ckpt: Path, frames_dir: Path, pts) -> dict[int, np.ndarray]:
    import torch

    from masks import label_map

    cuda = a.device == "cuda"
    predictor = build_meta_predictor(a.model, ckpt, a.device, a.image_size)
    if not cuda:
        from predictor import widen_cpu_memories

        widen_cpu_memories(predictor)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    out = {}
    with torch.inference_mode(), amp:
        state = predictor.init_state(str(frames_dir))
        for k, p in enumerate(pts):
            _, ids, masks = predictor.add_new_points_or_box(state, 0, k + 1, points=[p],
                                                            labels=[1])
        out["click"] = label_map(masks, list(ids))
        for f, ids, masks in predictor.propagate_in_video(state):
            out[f] = label_map(masks, list(ids))
    del predictor, state
    if cuda:
        torch.cuda.empty_cache()
    return out


def ours_labels(a, ckpt: Path, video: Path, work: Path, pts, **overrides) -> dict:
    import torch

    manager = build_manager(a, ckpt, work, **overrides)
    sid, session = open_session(manager, video)
    for k, p in enumerate(pts):
        manager.add_prompt(sid, 0, k + 1, points=[p], labels=[1])
    click = read_labels(manager, session, [0])[0]
    n = manager.propagate(sid, 0, session.info.num_frames - 1)["frames_processed"]
    out = read_labels(manager, session, range(n))
    out["click"] = click
    out["batching"] = getattr(manager.predictor, "object_batching", None)  # as resolved
    out["padding"] = getattr(manager.predictor, "window_padding", None)
    manager.close_session(sid, delete_files=True)
    manager.shutdown()
    del manager
    if a.device == "cuda":
        torch.cuda.empty_cache()
    return out


def compare(ref: dict, ours: dict) -> dict:
    frames = sorted(k for k in ref if k != "click")
    diffs = [int((ours[f] != ref[f]).sum()) for f in frames]
    size = ref[frames[0]].size
    ious = []
    for f in frames:
        for obj in np.unique(np.concatenate([np.unique(ref[f]), np.unique(ours[f])])):
            if obj == 0:
                continue
            r, o = ref[f] == obj, ours[f] == obj
            ious.append((r & o).sum() / max(1, (r | o).sum()))
    return {"frames": len(frames), "click_diff_px": int((ours["click"] != ref["click"]).sum()),
            "diff_px_total": sum(diffs), "diff_fraction": sum(diffs) / (size * len(frames)),
            "frames_differing": sum(d > 0 for d in diffs),
            "max_frame_fraction": max(diffs) / size,
            "mean_iou": float(np.mean(ious)) if ious else None,
            "min_iou": float(np.min(ious)) if ious else None,
            "fg_fraction_ref": float(np.mean([(ref[f] > 0).mean() for f in frames]))}


def fidelity(a, ckpt: Path, tmp: Path) -> dict:
    from synthetic_video import make_video

    video = make_video(tmp / "fid.mp4", a.frames, a.width, a.height)
    decode_to_jpegs(video, tmp / "fid-frames")
    pts = prompt_points(a.objects, a.width, a.height)
    ref = meta_labels(a, ckpt, tmp / "fid-frames", pts)
    variants = {"defaults": {},
                "SAM2_FRAME_RESIZE=exact-device": {"frame_resize": "exact-device"},
                "SAM2_FRAME_RESIZE=device": {"frame_resize": "device"},
                "SAM2_BATCH_OBJECTS=exact": {"batch_objects": "exact"},
                "SAM2_BATCH_OBJECTS=on": {"batch_objects": "on"},
                "SAM2_WINDOW_PADDING=skip": {"window_padding": "skip"}}
    results = {}
    for i, (name, overrides) in enumerate(variants.items()):
        ours = ours_labels(a, ckpt, video, tmp / f"v{i}", pts, **overrides)
        # What is in effect: "exact" batching falls back to "off", and "skip" padding to
        # "compute", where their start-up checks fail.
        results[f"{name} ({ours['batching']}, {ours['padding']})"] = compare(ref, ours)
    lines = [f"# fidelity vs Meta's predictor | {a.device} | {a.model} | {a.width}x{a.height} x "
             f"{a.frames} frames | {a.objects} objects | Meta's foreground "
             f"{100 * next(iter(results.values()))['fg_fraction_ref']:.1f}% of pixels",
             f"{'our settings':50} {'click px':>8} {'differing px':>13} {'frames':>7} "
             f"{'worst frame':>11} {'mean IoU':>8} {'min IoU':>8}"]
    for name, r in results.items():
        lines.append(f"{name:50} {r['click_diff_px']:>8} {100 * r['diff_fraction']:>12.4f}% "
                     f"{r['frames_differing']:>3}/{r['frames']:<3} "
                     f"{100 * r['max_frame_fraction']:>10.3f}% "
                     f"{r['mean_iou'] if r['mean_iou'] is not None else float('nan'):>8.4f} "
                     f"{r['min_iou'] if r['min_iou'] is not None else float('nan'):>8.4f}")
    print("\n".join(lines), flush=True)
    return {"table": "\n".join(lines), "results": results}


# ----------------------------------------------------------------------------- profile
class StageTimer:
    """CUDA events around each model stage, recorded on the stream without a sync; summed once
    the run is over. On the CPU, wall time of each call."""

    def __init__(self, predictor, cuda: bool):
        import torch

        self.cuda, self.spans = cuda, defaultdict(list)
        for method, label in STAGES.items():
            original = getattr(predictor, method)

            def timed(*args, _original=original, _label=label, **kwargs):
                if self.cuda:
                    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                    start.record()
                    out = _original(*args, **kwargs)
                    end.record()
                    self.spans[_label].append((start, end))
                else:
                    t0 = time.perf_counter()
                    out = _original(*args, **kwargs)
                    self.spans[_label].append(time.perf_counter() - t0)
                return out

            setattr(predictor, method, timed)

    def reset(self) -> None:
        self.spans.clear()

    def ms(self) -> dict[str, float]:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return {k: sum(s.elapsed_time(e) for s, e in v) for k, v in self.spans.items()}
        return {k: 1000 * sum(v) for k, v in self.spans.items()}

    def calls(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.spans.items()}


def profile(a, ckpt: Path, tmp: Path) -> dict:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from synthetic_video import make_video
    from timing import STAGES as HOST

    cuda = a.device == "cuda"
    video = make_video(tmp / "prof.mp4", a.frames, a.width, a.height)
    manager = build_manager(a, ckpt, tmp / "prof")
    sid, session = open_session(manager, video)
    pts = prompt_points(a.objects, a.width, a.height)
    for k, p in enumerate(pts):
        manager.add_prompt(sid, 0, k + 1, points=[p], labels=[1])
    n = session.info.num_frames
    timer = StageTimer(manager.predictor, cuda)
    manager.propagate(sid, 0, n - 1)  # warm: every kernel and allocation met once
    session.drain_writes()

    runs = []
    for _ in range(a.repeats):
        manager.add_prompt(sid, 0, 1, points=[pts[0]], labels=[1])  # invalidates the tracking
        session.drain_writes()
        timer.reset()
        HOST.reset()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        done = manager.propagate(sid, 0, n - 1)["frames_processed"]
        wall = time.perf_counter() - t0
        session.drain_writes()
        runs.append({"wall_ms": 1000 * wall / done, "fps": done / wall,
                     "stage_ms": {k: v / done for k, v in timer.ms().items()},
                     "calls": timer.calls(), "frames": done,
                     "host_ms": {k: 1000 * s / done for k, (s, _) in HOST.snapshot().items()}})
    best = sorted(runs, key=lambda r: r["wall_ms"])[len(runs) // 2]  # the median run

    # One more run under torch.profiler: kernels by GPU time, and the host-device syncs.
    manager.add_prompt(sid, 0, 1, points=[pts[0]], labels=[1])
    session.drain_writes()
    prof_frames = min(n, a.profile_frames)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        done = manager.propagate(sid, 0, prof_frames - 1)["frames_processed"]
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    dev_attr = "device_time_total" if hasattr(events[0], "device_time_total") else "cuda_time_total"
    kernels, syncs, busy = [], {}, 0.0
    for ev in events:
        dev_us = getattr(ev, dev_attr, 0) or 0
        if cuda and getattr(ev, "device_type", None) is not None and "CUDA" in str(ev.device_type):
            kernels.append((ev.key, dev_us / 1000 / done, ev.count / done))
            busy += dev_us
        name = ev.key
        if any(s in name for s in ("Synchronize", "cudaMemcpy ", "cudaMemcpyAsync", "aten::item",
                                   "aten::_local_scalar_dense", "aten::nonzero")):
            syncs[name] = (ev.count / done, ev.cpu_time_total / 1000 / done)
    kernels.sort(key=lambda k: -k[1])
    image_size = manager.predictor.image_size
    manager.close_session(sid, delete_files=True)
    manager.shutdown()

    stage_total = sum(best["stage_ms"].values())
    lines = [f"# GPU time per propagated frame | {device_label(cuda)} | {a.model} @ "
             f"{image_size} | {a.width}x{a.height} x {n} frames | "
             f"{a.objects} object(s) | median of {a.repeats} runs",
             f"wall per frame {best['wall_ms']:.2f} ms ({best['fps']:.1f} FPS); runs: "
             + ", ".join(f"{r['fps']:.1f}" for r in runs) + " FPS",
             f"{'model stage (CUDA events)':34} {'ms/frame':>9} {'calls/frame':>11} {'share':>6}"]
    for label in STAGES.values():
        ms = best["stage_ms"].get(label, 0.0)
        lines.append(f"{label:34} {ms:9.2f} {best['calls'].get(label, 0) / best['frames']:11.2f} "
                     f"{100 * ms / best['wall_ms']:5.1f}%")
    lines.append(f"{'model stages together':34} {stage_total:9.2f} {'':11} "
                 f"{100 * stage_total / best['wall_ms']:5.1f}%")
    lines.append(f"{'rest of the wall time':34} {best['wall_ms'] - stage_total:9.2f} {'':11} "
                 f"{100 * (1 - stage_total / best['wall_ms']):5.1f}%")
    if cuda:
        lines.append(f"{'GPU kernels busy (profiler)':34} {busy / 1000 / done:9.2f}   "
                     f"(over {done} frames)")
    lines.append(f"{'host CPU stage (thread time)':34} {'ms/frame':>9}")
    for k, v in sorted(best["host_ms"].items(), key=lambda kv: -kv[1]):
        lines.append(f"{k:34} {v:9.2f}")
    if cuda:
        lines.append(f"{'top kernels':80} {'ms/frame':>9} {'n/frame':>8}")
        for name, ms, count in kernels[:12]:
            lines.append(f"{name[:80]:80} {ms:9.3f} {count:8.1f}")
    lines.append(f"{'host-device syncs and copies':50} {'n/frame':>8} {'CPU ms/frame':>12}")
    for name, (count, ms) in sorted(syncs.items(), key=lambda kv: -kv[1][1])[:8]:
        lines.append(f"{name[:50]:50} {count:8.1f} {ms:12.3f}")
    print("\n".join(lines), flush=True)
    return {"table": "\n".join(lines), "runs": runs, "median": best,
            "kernels": kernels[:40], "syncs": syncs}


def device_label(cuda: bool) -> str:
    import torch

    return torch.cuda.get_device_name(0) if cuda else "cpu"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["fidelity", "profile"])
    p.add_argument("--model", default="tiny", choices=list(MODELS))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--image-size", type=int, default=None, help="default: the model's (1024)")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--objects", type=int, default=None,
                   help="objects prompted on frame 0 (default 2 for fidelity, 1 for profile)")
    p.add_argument("--repeats", type=int, default=3, help="profile: timed propagations")
    p.add_argument("--profile-frames", type=int, default=30,
                   help="profile: frames propagated under torch.profiler")
    p.add_argument("--seed", type=int, default=4)
    p.add_argument("--out", type=Path, default=None, help="write NAME.json and NAME.txt here")
    p.add_argument("--name", default=None)
    a = p.parse_args()
    if a.objects is None:
        a.objects = 2 if a.what == "fidelity" else 1
    tmp = Path(tempfile.mkdtemp(prefix="sam2-gpu-"))
    try:
        ckpt = write_checkpoint(a.model, a.seed, tmp / f"{a.model}.pt")
        result = (fidelity if a.what == "fidelity" else profile)(a, ckpt, tmp)
        result["args"] = {k: str(v) for k, v in vars(a).items()}
        if a.out:
            a.out.mkdir(parents=True, exist_ok=True)
            name = a.name or f"{a.what}-{a.model}-{a.width}x{a.height}"
            (a.out / f"{name}.txt").write_text(result["table"] + "\n")
            (a.out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
