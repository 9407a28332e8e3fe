"""Side by side: Meta's SAM 2 video predictor driven as its README shows ("meta") and this
server's SAM2Manager ("ours"), on the same synthetic video, checkpoint, model and image size.

Each path runs in its own subprocess (this script with ``--only meta|ours``) so that memory
peaks do not mix; the parent makes the video and the checkpoint, collects each child's JSON and
prints one table per video length. See bench/README.md for what each row means.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import MODELS  # noqa: E402

CLICKS = 9          # clicks timed on frame 0 (median reported)
WARMUP_FRAMES = 3   # each child first runs the whole sequence on a video this long, untimed
JPEG_QUALITY = 95   # the server's default; Meta's frames are written with the same encoder


# ----------------------------------------------------------------------------- measuring
def host_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. Not getrusage's ru_maxrss: a child inherits
    its parent's peak there, and /proc/self/clear_refs does not reset that part."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peaks(cuda: bool) -> dict:
    """Forget the peaks reached so far (model load, warm-up); return the baseline to subtract."""
    import torch

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc: give freed heap back to the OS,
        ctypes.CDLL("libc.so.6").malloc_trim(0)         # or later growth reuses it unseen
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:  # resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        exact = True
    except OSError:
        exact = False
    return {"host": host_mib("VmRSS"), "gpu": torch.cuda.memory_allocated() / 2**20 if cuda else None,
            "exact": exact}


def peaks(base: dict, cuda: bool) -> dict:
    import torch

    out = {"peak_host_mib": host_mib("VmHWM") - base["host"], "peak_gpu_mib": None}
    if cuda:
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20 - base["gpu"]
    return out


def state_mib(inference_state: dict) -> dict:
    """MiB of tensors an inference state holds in memory: the frames (``images``) and the rest
    (tracking state, cached features, prompts). This is what sits on the model's device, so on
    the CPU it stands in for GPU memory. Entries spilled to disk are not read back."""
    import torch

    from predictor import LazyFrames
    from state_store import SpillingFrameOutputs

    seen: set[int] = set()

    def walk(obj) -> int:
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() in seen:
                return 0
            seen.add(storage.data_ptr())
            return storage.nbytes()
        if isinstance(obj, SpillingFrameOutputs):
            return sum(walk(v) for v in obj._mem.values())
        if isinstance(obj, LazyFrames):
            return 0  # a frame exists only while the model reads it (plus prefetch, depth 3)
        if isinstance(obj, dict):
            return sum(walk(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(walk(v) for v in obj)
        return 0

    frames = walk(inference_state["images"])
    rest = walk({k: v for k, v in inference_state.items() if k != "images"})
    return {"frames_mib": frames / 2**20, "state_mib": rest / 2**20}


def median_ms(fn, times: int = CLICKS) -> float:
    samples = []
    for _ in range(times):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return 1000 * statistics.median(samples)


def prompt_points(n: int, width: int, height: int) -> list[list[float]]:
    """n distinct points; the first lies on the synthetic video's moving box in frame 0."""
    return [[round(width * (0.05 + 0.9 * ((0.27 + 0.618 * k) % 1)), 1),
             round(height * (0.05 + 0.9 * ((0.5 + 0.382 * k) % 1)), 1)] for k in range(n)]


# ----------------------------------------------------------------------------- meta's path
def decode_to_jpegs(video: Path, out_dir: Path) -> float:
    """What Meta's README asks for before init_state: the video as 00000.jpg, 00001.jpg, ..."""
    from video_io import iter_rgb_frames, write_jpeg

    t0 = time.perf_counter()
    out_dir.mkdir(parents=True)
    for i, rgb in enumerate(iter_rgb_frames(video, 0)):
        write_jpeg(out_dir / f"{i:05d}.jpg", rgb, JPEG_QUALITY)
    return time.perf_counter() - t0


def meta_sequence(predictor, frames_dir: Path, objects: int, cuda: bool) -> dict:
    import torch
    from PIL import Image

    width, height = Image.open(frames_dir / "00000.jpg").size
    pts = prompt_points(objects, width, height)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def propagate(state) -> float:
        t0, n = time.perf_counter(), 0
        for _, _, masks in predictor.propagate_in_video(state):
            (masks > 0).cpu().numpy()
            n += 1
        return n / (time.perf_counter() - t0)

    r = {}
    with torch.inference_mode(), amp:
        t0 = time.perf_counter()
        state = predictor.init_state(str(frames_dir))
        _, _, masks = predictor.add_new_points_or_box(state, 0, 1, points=[pts[0]], labels=[1])
        r["mask_px"] = int((masks > 0).cpu().numpy().sum())
        r["first_mask_s"] = time.perf_counter() - t0

        def click():
            _, _, masks = predictor.add_new_points_or_box(state, 0, 1, points=[pts[0]],
                                                          labels=[1])
            (masks > 0).cpu().numpy()

        r["click_ms"] = median_ms(click)
        r["propagate_fps"] = propagate(state)
        r |= state_mib(state)
        r["click_after_first_ms"] = median_ms(click, 1)
        r["click_after_ms"] = median_ms(click)
        if objects > 1:
            predictor.reset_state(state)
            for k, p in enumerate(pts):
                predictor.add_new_points_or_box(state, 0, k + 1, points=[p], labels=[1])
            r["propagate_fps_multi"] = propagate(state)
            r["state_mib_multi"] = state_mib(state)["state_mib"]
    return r


def build_meta_predictor(model: str, checkpoint: Path, device: str, image_size: int | None):
    """Meta's stock predictor, configured as the server's (same overrides, no hole filling)."""
    import torch
    from sam2.build_sam import build_sam2_video_predictor

    if device == "cuda":  # as Meta's video notebook does on Ampere and later
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    overrides = ["++model.add_all_frames_to_correct_as_cond=true"]
    if image_size:
        overrides.insert(0, f"++model.image_size={image_size}")
    predictor = build_sam2_video_predictor(MODELS[model][0], str(checkpoint), device=device,
                                           hydra_overrides_extra=overrides)
    predictor.fill_hole_area = 0  # Meta's hole filling needs sam2._C, which is not built
    return predictor


def run_meta(a: argparse.Namespace, cuda: bool, work: Path) -> dict:
    predictor = build_meta_predictor(a.model, a.checkpoint, a.device, a.image_size)
    notes = []
    decode_to_jpegs(a.warm_video, work / "warm")
    try:  # the warm-up runs the very sequence that is timed, so it meets any dtype error first
        meta_sequence(predictor, work / "warm", a.objects, cuda)
    except RuntimeError as exc:
        if cuda or "dtype" not in str(exc):
            raise
        from predictor import widen_cpu_memories

        widen_cpu_memories(predictor)
        notes.append(f"meta: stock sam2 raised {str(exc)[:80]!r}; its bf16 memories are widened "
                     "to float32 (predictor.widen_cpu_memories), as the server does")
        meta_sequence(predictor, work / "warm", a.objects, cuda)
    decode_s = decode_to_jpegs(a.video, work / "frames")
    os.sync()  # as ours: no write-back of the frames inside the timed part
    base = reset_peaks(cuda)
    r = meta_sequence(predictor, work / "frames", a.objects, cuda)
    r |= peaks(base, cuda)
    r |= {"decode_s": decode_s, "video_to_mask_s": decode_s + r["first_mask_s"],
          "image_size": predictor.image_size, "exact_host_peak": base["exact"], "notes": notes}
    return r


# ----------------------------------------------------------------------------- our path
def ours_sequence(manager, video: Path, objects: int) -> dict:
    sid = manager.new_session_id()
    upload = manager.store.upload_path_for(sid, video.name)
    shutil.copyfile(video, upload)  # the upload itself is network time: not timed
    r = {}
    t_upload = time.perf_counter()
    session = manager.create_session(sid, upload, video.name)
    n = session.info.num_frames
    decoded_at = []  # the moment the background decoder has written the last frame

    def wait_decoded():
        session.extractor.wait_for(n - 1, 24 * 3600)
        decoded_at.append(time.perf_counter())

    decoded = threading.Thread(target=wait_decoded)
    decoded.start()
    pts = prompt_points(objects, session.info.width, session.info.height)
    res = manager.add_prompt(sid, 0, 1, points=[pts[0]], labels=[1])
    r["first_mask_s"] = r["video_to_mask_s"] = time.perf_counter() - t_upload
    r["mask_px"] = res["mask_area"].get(1, 0)
    # Frames keep decoding in the background while the user clicks; wait for the last one so
    # clicks and propagation are timed without that (Meta's are, having decoded beforehand).
    decoded.join()
    r["decode_s"] = decoded_at[0] - t_upload
    os.sync()  # the kernel's write-back of the frames must not run inside the timed clicks
    def click():
        manager.add_prompt(sid, 0, 1, points=[pts[0]], labels=[1])

    r["click_ms"] = median_ms(click)
    from timing import STAGES

    session.drain_writes()
    STAGES.reset()
    t0 = time.perf_counter()
    done = manager.propagate(sid, 0, n - 1)["frames_processed"]
    r["propagate_fps"] = done / (time.perf_counter() - t0)
    session.drain_writes()
    # Host CPU per propagated frame, by stage; then what an overlay costs on its first read.
    for f in range(n):
        manager.store.overlay_path(session, f)
    r["host_ms_per_frame"] = {stage: 1000 * seconds / done
                              for stage, (seconds, _) in STAGES.snapshot().items()}
    r |= state_mib(session.state)
    r["click_after_first_ms"] = median_ms(click, 1)
    r["click_after_ms"] = median_ms(click)
    if objects > 1:
        manager.reset(sid)
        for k, p in enumerate(pts):
            manager.add_prompt(sid, 0, k + 1, points=[p], labels=[1])
        t0 = time.perf_counter()
        done = manager.propagate(sid, 0, n - 1)["frames_processed"]
        r["propagate_fps_multi"] = done / (time.perf_counter() - t0)
        r["state_mib_multi"] = state_mib(session.state)["state_mib"]
    manager.close_session(sid, delete_files=True)
    return r


def build_manager(a: argparse.Namespace, checkpoint: Path, work: Path, **overrides):
    """The server's engine with its model loaded, its files under ``work``."""
    from config import Settings
    from sam2_manager import SAM2Manager

    settings = Settings(model=a.model, checkpoint=checkpoint, image_size=a.image_size,
                        device=a.device, fill_hole_area=0, upload_dir=work / "uploads",
                        output_dir=work / "outputs", _env_file=None, **overrides)
    manager = SAM2Manager(settings, predictor=None)
    manager.load_model()
    if not manager.ready:
        raise SystemExit(f"model not loaded: {manager.model_detail}")
    return manager


def run_ours(a: argparse.Namespace, cuda: bool, work: Path) -> dict:
    manager = build_manager(a, a.checkpoint, work)
    ours_sequence(manager, a.warm_video, a.objects)
    base = reset_peaks(cuda)
    r = ours_sequence(manager, a.video, a.objects)
    r |= peaks(base, cuda)
    r |= {"image_size": manager.predictor.image_size, "exact_host_peak": base["exact"],
          "notes": []}
    manager.shutdown()
    return r


# ----------------------------------------------------------------------------- parent
def write_checkpoint(model: str, seed: int, path: Path) -> Path:
    """Random weights of the real architecture in Meta's format (speed ignores weight values)."""
    import torch
    from sam2.build_sam import build_sam2_video_predictor

    torch.manual_seed(seed)
    net = build_sam2_video_predictor(MODELS[model][0], None, device="cpu")
    torch.save({"model": net.state_dict()}, path)
    return path


def run_child(which: str, a: argparse.Namespace, video: Path, warm: Path, ckpt: Path,
              tmp: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"{which}-", dir=tmp))
    result = work / "result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", which, "--video", str(video),
           "--warm-video", str(warm), "--checkpoint", str(ckpt), "--model", a.model,
           "--device", a.device, "--objects", str(a.objects), "--result", str(result)]
    if a.image_size:
        cmd += ["--image-size", str(a.image_size)]
    print(f"  {which}: {video.name} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"the {which} run failed (exit {proc.returncode})")
    out = json.loads(result.read_text())
    shutil.rmtree(work, ignore_errors=True)
    return out


def merge_rounds(results: list[dict]) -> dict:
    """One result from several rounds of the same path: the median of each figure."""
    first = results[0]
    if len(results) == 1:
        return first
    out = {}
    for key, value in first.items():
        values = [r[key] for r in results if r.get(key) is not None]
        if isinstance(value, bool):
            out[key] = all(values)
        elif isinstance(value, int):
            out[key] = statistics.median_low(values)
        elif isinstance(value, float):
            out[key] = statistics.median(values)
        elif isinstance(value, dict):
            out[key] = merge_rounds(values)
        else:
            out[key] = value
    return out


SPREAD_ROWS = [("click_ms", "click latency", False), ("propagate_fps", "propagate FPS", True),
               ("propagate_fps_multi", "propagate FPS N obj", True),
               ("click_after_first_ms", "1st click after prop.", False)]


def spread(rounds: list[dict]) -> str:
    """The ratio of each round (meta and ours run back to back), for the rows that move most."""
    lines = []
    for key, label, higher_better in SPREAD_ROWS:
        ratios = []
        for r in rounds:
            m, o = (r.get("meta") or {}).get(key), r["ours"].get(key)
            if m and o:
                ratios.append(o / m if higher_better else m / o)
        if ratios:
            lines.append(f"{label:24} " + " ".join(f"{x:.2f}x" for x in ratios)
                         + f"   (median {statistics.median(ratios):.2f}x)")
    return ("ratio in each round\n" + "\n".join(lines)) if lines else ""


def device_name(cuda: bool) -> str:
    import torch

    if cuda:
        return torch.cuda.get_device_name(0)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return (f"{name}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
            f"load {os.getloadavg()[0]:.1f}")


def fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def table(run: dict, objects: int) -> str:
    rows = [("decode_s", "decode to JPEG s", False), ("first_mask_s", "first mask s", False),
            ("video_to_mask_s", "video -> first mask s", False),
            ("click_ms", "click latency ms", False), ("propagate_fps", "propagate FPS", True),
            ("click_after_first_ms", "1st click after prop. ms", False),
            ("click_after_ms", "click after propagate ms", False)]
    if objects > 1:
        rows.append(("propagate_fps_multi", f"propagate FPS {objects} obj", True))
    rows += [("frames_mib", "frames held MiB", False), ("state_mib", "tracking state MiB", False)]
    if objects > 1:
        rows.append(("state_mib_multi", f"tracking state {objects} obj", False))
    rows += [("peak_host_mib", "peak host MiB", False), ("peak_gpu_mib", "peak GPU MiB", False)]
    meta, ours = run.get("meta") or {}, run["ours"]
    lines = [f"{'metric':24} {'meta':>9} {'ours':>9} {'ratio':>7}"]
    for key, label, higher_better in rows:
        m, o = meta.get(key), ours.get(key)
        ratio = "-"
        if m is not None and o is not None and min(m, o) > 0:
            ratio = f"{(o / m if higher_better else m / o):.2f}x"
        lines.append(f"{label:24} {fmt(m):>9} {fmt(o):>9} {ratio:>7}")
    if meta:
        same = "same" if meta["mask_px"] == ours["mask_px"] else "DIFFERENT"
        lines.append(f"frame-0 mask: meta {meta['mask_px']} px, ours {ours['mask_px']} px ({same})")
    for note in meta.get("notes", []) + ours["notes"]:
        lines.append(f"note: {note}")
    if not ours["exact_host_peak"]:
        lines.append("note: /proc/self/clear_refs unavailable: host peaks include model loading")
    return "\n".join(lines)


STAGE_LABELS = {"frame_load": "frame load + resize", "frame_normalise": "to float + normalise",
                "label_map": "label map",
                "scores": "scores (device -> host)", "mask_png": "mask PNG",
                "manifest": "manifest", "state_spill": "state spill", "state_load": "state load",
                "overlay": "overlay (made on first read)"}


def stages(run: dict) -> str:
    """Host CPU ms per propagated frame outside the model, by stage (ours)."""
    per = run["ours"].get("host_ms_per_frame") or {}
    lines = [f"{'host CPU per frame':30} {'ms':>7}"]
    for stage, label in STAGE_LABELS.items():
        if stage in per:
            lines.append(f"{label:30} {per[stage]:7.2f}")
    during = sum(v for k, v in per.items() if k != "overlay")
    lines.append(f"{'total during propagation':30} {during:7.2f}")
    return "\n".join(lines)


def scaling(runs: list[dict]) -> str:
    keys = [("first_mask_s", "first mask s"), ("state_mib", "state MiB"),
            ("peak_host_mib", "host MiB"), ("peak_gpu_mib", "GPU MiB")]
    head = f"{'frames':>7} " + " ".join(f"{label + ' ' + p:>17}" for _, label in keys
                                         for p in ("meta", "ours"))
    lines = [head]
    for run in runs:
        cells = [fmt((run.get(p) or {}).get(k)) for k, _ in keys for p in ("meta", "ours")]
        lines.append(f"{run['frames']:>7} " + " ".join(f"{c:>17}" for c in cells))
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", default="30",
                   help="video length in frames (default 30); a comma list (e.g. 30,300) runs "
                        "each length and adds a scaling table")
    p.add_argument("--width", type=int, default=320, help="video width in pixels (default 320)")
    p.add_argument("--height", type=int, default=240, help="video height in pixels (default 240)")
    p.add_argument("--model", default="tiny", choices=list(MODELS),
                   help="SAM 2.1 architecture (default tiny)")
    p.add_argument("--image-size", type=int, default=None,
                   help="model input size (++model.image_size); default 256 on the CPU, the "
                        "model's own 1024 on CUDA")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto (default): cuda when torch sees a GPU, else cpu")
    p.add_argument("--objects", type=int, default=1,
                   help="with N > 1, also time propagation of N objects prompted on frame 0 "
                        "(default 1)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint in Meta's format for --model; default: random weights of "
                        "that architecture written to a temp dir (speed ignores weight values)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run both paths this many times, alternating, and report the median of "
                        "each figure and each round's ratio (default 1)")
    p.add_argument("--seed", type=int, default=4, help="torch seed of the random checkpoint (default 4)")
    p.add_argument("--json", type=Path, default=None, help="also write the results JSON here")
    p.add_argument("--skip-meta", action="store_true", help="run only our path")
    p.add_argument("--only", choices=["meta", "ours"], help="(internal) run one path in this "
                   "process and write its JSON to --result")
    p.add_argument("--video", type=Path, help="(internal) video for --only")
    p.add_argument("--warm-video", type=Path, help="(internal) warm-up video for --only")
    p.add_argument("--result", type=Path, help="(internal) where --only writes its JSON")
    a = p.parse_args()
    if a.objects < 1:
        p.error("--objects must be at least 1")
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    return a


def main() -> None:
    a = parse_args()
    if a.only:
        cuda = a.device == "cuda"
        work = a.result.parent
        result = (run_meta if a.only == "meta" else run_ours)(a, cuda, work)
        a.result.write_text(json.dumps(result))
        return

    import torch

    from synthetic_video import make_video

    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = a.device == "cuda"
    if a.image_size is None and not cuda:
        a.image_size = 256
    lengths = [int(x) for x in str(a.frames).split(",") if x.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="sam2-bench-"))
    try:
        ckpt = a.checkpoint or write_checkpoint(a.model, a.seed, tmp / f"{a.model}-random.pt")
        warm = make_video(tmp / "warm.mp4", WARMUP_FRAMES, a.width, a.height)
        header = {"device": device_name(cuda), "torch": torch.__version__, "model": a.model,
                  "checkpoint": str(a.checkpoint) if a.checkpoint else f"random (seed {a.seed})",
                  "image_size": a.image_size or "model default", "video": f"{a.width}x{a.height}",
                  "objects": a.objects, "rounds": a.rounds,
                  "date": datetime.datetime.now().isoformat(" ", "seconds")}
        runs = []
        for n in lengths:
            print(f"{n} frames: making the video ...", file=sys.stderr, flush=True)
            video = make_video(tmp / f"video-{n}.mp4", n, a.width, a.height)
            # Rounds alternate the two paths, so a slow spell of a shared machine falls on both.
            rounds = []
            for _ in range(a.rounds):
                meta = None if a.skip_meta else run_child("meta", a, video, warm, ckpt, tmp)
                rounds.append({"meta": meta, "ours": run_child("ours", a, video, warm, ckpt, tmp)})
            run = {"frames": n, "rounds": rounds, "ours": merge_rounds([r["ours"] for r in rounds]),
                   "meta": None if a.skip_meta else merge_rounds([r["meta"] for r in rounds])}
            header["image_size"] = run["ours"]["image_size"]
            runs.append(run)
            print(f"\n# SAM 2 bench | {header['device']} | torch {header['torch']} | "
                  f"{a.model} @ {header['image_size']} | {header['video']} x {n} frames | "
                  f"{header['checkpoint']} | {header['date']}")
            print(table(run, a.objects), flush=True)
            if a.rounds > 1:
                print(f"(medians of {a.rounds} rounds)")
                print(spread(rounds), flush=True)
            print(stages(run), flush=True)
            video.unlink()
        if len(runs) > 1:
            print("\n# scaling with video length (meta / ours)")
            print(scaling(runs))
        if a.json:
            a.json.write_text(json.dumps({"header": header, "runs": runs}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
