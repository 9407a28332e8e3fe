"""Meta's predictor and this server's engine in one process, their calls alternated one by one.

``bench.py`` runs each path in its own process, which keeps memory peaks apart but lets a slow
spell of a shared machine fall on one side only: on a 2-core VM, single runs of the same code
moved by 10-15%. Here both run in one process on the same frames, checkpoint and clicks, and
each timed call of one side is followed by the same call of the other, so a slow spell falls
on both. The ratio of each pair is kept; the median of those ratios is reported, with their
spread. Memory is not measured here (both sides share the process): see ``bench.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (bench.py puts the repository root on sys.path)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Meta:
    """Meta's loop as in its README: init_state on the JPEG folder, clicks, propagate_in_video."""

    def __init__(self, a, ckpt: Path, frames: Path, cuda: bool):
        import torch

        self.torch = torch
        self.predictor = bench.build_meta_predictor(a.model, ckpt, a.device, a.image_size)
        if not cuda:  # stock sam2 stores bf16 memories that its float32 CPU path cannot read
            from predictor import widen_cpu_memories

            widen_cpu_memories(self.predictor)
        self.amp = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda
                    else contextlib.nullcontext())
        with self.ctx():
            self.state = self.predictor.init_state(str(frames))

    @contextlib.contextmanager
    def ctx(self):
        with self.torch.inference_mode(), self.amp:
            yield

    def click(self, obj_id: int, point) -> None:
        with self.ctx():
            _, _, masks = self.predictor.add_new_points_or_box(self.state, 0, obj_id,
                                                               points=[point], labels=[1])
            (masks > 0).cpu().numpy()

    def propagate(self) -> int:
        n = 0
        with self.ctx():
            for _, _, masks in self.predictor.propagate_in_video(self.state):
                (masks > 0).cpu().numpy()
                n += 1
        return n

    def reset(self) -> None:
        with self.ctx():
            self.predictor.reset_state(self.state)


class Ours:
    """The server's engine: add_prompt is /annotate-frame, propagate is /propagate (every mask
    PNG written and listed)."""

    def __init__(self, a, ckpt: Path, video: Path, work: Path):
        self.manager = bench.build_manager(a, ckpt, work)
        self.sid = self.manager.new_session_id()
        upload = self.manager.store.upload_path_for(self.sid, video.name)
        shutil.copyfile(video, upload)
        self.session = self.manager.create_session(self.sid, upload, video.name)
        self.session.extractor.wait_for(self.session.info.num_frames - 1, 24 * 3600)

    def click(self, obj_id: int, point) -> None:
        self.manager.add_prompt(self.sid, 0, obj_id, points=[point], labels=[1])

    def propagate(self) -> int:
        self.session.drain_writes()
        done = self.manager.propagate(self.sid, 0, self.session.info.num_frames - 1)
        self.session.drain_writes()  # every file written, as the timed part promises
        return done["frames_processed"]

    def reset(self) -> None:
        self.manager.reset(self.sid)


def pairs(meta_fn, ours_fn, times: int, higher_better: bool) -> dict:
    """Alternate the two calls ``times`` times (Meta first in even pairs, ours first in odd
    ones); each pair's ratio, oriented so that above 1 means ours is better."""
    meta_s, ours_s, ratios = [], [], []
    for k in range(times):
        if k % 2 == 0:
            m, o = meta_fn(), ours_fn()
        else:
            o, m = ours_fn(), meta_fn()
        meta_s.append(m)
        ours_s.append(o)
        ratios.append(o / m if higher_better else m / o)
    return {"meta": statistics.median(meta_s), "ours": statistics.median(ours_s),
            "ratio": statistics.median(ratios), "ratios": ratios}


def run(a, cuda: bool, ckpt: Path, video: Path, work: Path) -> dict:
    bench.decode_to_jpegs(video, work / "frames")
    ours = Ours(a, ckpt, video, work)
    meta = Meta(a, ckpt, work / "frames", cuda)
    info = ours.session.info
    pts = bench.prompt_points(a.objects, info.width, info.height)
    for side in (meta, ours):  # frame 0's features, and each first call's set-up, untimed
        side.click(1, pts[0])
    r = {"click_ms": pairs(lambda: 1000 * timed(lambda: meta.click(1, pts[0])),
                           lambda: 1000 * timed(lambda: ours.click(1, pts[0])),
                           a.clicks, False)}

    def fps(side) -> float:
        t0 = time.perf_counter()
        n = side.propagate()
        return n / (time.perf_counter() - t0)

    def first_click_after(side) -> float:
        side.propagate()  # untimed: the click that follows is the one timed
        return 1000 * timed(lambda: side.click(1, pts[0]))

    r["propagate_fps"] = pairs(lambda: fps(meta), lambda: fps(ours), a.propagations, True)
    r["click_after_first_ms"] = pairs(lambda: first_click_after(meta),
                                      lambda: first_click_after(ours), a.propagations, False)
    if a.objects > 1:
        for side in (meta, ours):
            side.reset()
            for k, p in enumerate(pts):
                side.click(k + 1, p)
        r["propagate_fps_multi"] = pairs(lambda: fps(meta), lambda: fps(ours), a.propagations,
                                         True)
    ours.manager.shutdown()
    return r


ROWS = [("click_ms", "click latency ms"), ("propagate_fps", "propagate FPS"),
        ("click_after_first_ms", "1st click after prop. ms"),
        ("propagate_fps_multi", "propagate FPS N obj")]


def table(r: dict) -> str:
    lines = [f"{'metric':26} {'meta':>8} {'ours':>8} {'ratio':>7}   each pair"]
    for key, label in ROWS:
        if key in r:
            row = r[key]
            lines.append(f"{label:26} {bench.fmt(row['meta']):>8} {bench.fmt(row['ours']):>8} "
                         f"{row['ratio']:6.2f}x   "
                         + " ".join(f"{x:.2f}" for x in row["ratios"]))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=60, help="video length (default 60)")
    p.add_argument("--width", type=int, default=640, help="video width (default 640)")
    p.add_argument("--height", type=int, default=360, help="video height (default 360)")
    p.add_argument("--model", default="tiny", choices=list(bench.MODELS),
                   help="SAM 2.1 architecture (default tiny)")
    p.add_argument("--image-size", type=int, default=None,
                   help="model input size; default 256 on the CPU, the model's own on CUDA")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto (default): cuda when torch sees a GPU, else cpu")
    p.add_argument("--objects", type=int, default=3,
                   help="objects for the multi-object propagation (default 3; 1 skips it)")
    p.add_argument("--clicks", type=int, default=20, help="click pairs (default 20)")
    p.add_argument("--propagations", type=int, default=3,
                   help="propagation pairs, each way of timing (default 3)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint in Meta's format; default random weights (seed 4)")
    p.add_argument("--json", type=Path, default=None, help="also write the results JSON here")
    a = p.parse_args()

    import torch

    from synthetic_video import make_video

    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = a.device == "cuda"
    if a.image_size is None and not cuda:
        a.image_size = 256
    tmp = Path(tempfile.mkdtemp(prefix="sam2-paired-"))
    try:
        ckpt = a.checkpoint or bench.write_checkpoint(a.model, 4, tmp / "random.pt")
        video = make_video(tmp / "video.mp4", a.frames, a.width, a.height)
        r = run(a, cuda, ckpt, video, tmp)
        print(f"\n# SAM 2 paired bench | {bench.device_name(cuda)} | torch {torch.__version__} | "
              f"{a.model} @ {a.image_size or 'model default'} | {a.width}x{a.height} x "
              f"{a.frames} frames | {a.objects} objects | one process, calls alternated")
        print(table(r))
        if a.json:
            a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()},
                                          "results": r}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
