#!/usr/bin/env python
"""Annotation sessions completed by K concurrent annotators, single process vs Ray, side by side.

For each deployment in ``--modes`` (``single``: ``python main.py``, what users get today, torch on
every core; ``ray1`` / ``ray2``: ``python serve_ray.py --workers 1|2`` with one torch thread and one
CPU per worker) the script starts a fresh server on its own free port and temp folders, on a
random-weight checkpoint (``--model`` at ``--image-size``, CPU). ``--clients`` annotator threads
then loop for ``--seconds``: ``GET /health``, upload a synthetic video, a positive click on frame
0 (``/annotate-frame``), a negative refine click, a blocking propagation of the whole video, a
refine click on the middle frame, a blocking re-propagation from there, ``DELETE /session``.
Meanwhile a reader thread reads ``/frame``, ``/mask`` and ``/overlay`` of the sessions that are
propagating, and of an idle session of its own that has masks, and keeps the latencies of reads
made while any propagation runs. 409/429/503 answers are retried after their ``Retry-After``
(1 s when absent) and counted. How to read it: **sessions/min** is the sessions whose DELETE was
answered before the deadline, per minute of ``--seconds`` (sessions still running at the deadline
are abandoned and not counted), so it is the deployment's throughput for this workload; **click
ms** is from the first send of a click to its 2xx answer, Retry-After waits included; **reads
during propagation** shows whether viewing stays responsive while the model is busy. The ratio
table divides each mode's figure by ``ray1``'s and by ``single``'s: for sessions/min > 1 is
better, for latencies < 1 is better; on 2 cores ``ray2 / ray1`` sessions/min near 2 means the two
single-thread workers scale, and ``ray2 / single`` says whether Ray beats one multi-threaded
process. Nothing is asserted; the machine's load average is printed because it skews every figure.

  .venv/bin/python bench/sessions.py                              # single, ray1, ray2; 4 x 90 s
  .venv/bin/python bench/sessions.py --modes single --seconds 30 --clients 2 --json /tmp/s.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
RETRY_STATUSES = (409, 429, 503)
DEFAULT_RETRY_S = 1.0      # wait when a 409/429/503 carries no Retry-After
MAX_RETRY_S = 30.0
STOP_GRACE_S = 60.0        # SIGTERM, then SIGKILL of the process group after this long
MODES = {
    "single": {"script": "main.py", "workers": None,
               "label": "python main.py (what users get today; torch threads: all cores)"},
    "ray1": {"script": "serve_ray.py", "workers": 1,
             "label": "python serve_ray.py --workers 1 (1 torch thread, each worker pinned to 1 core)"},
    "ray2": {"script": "serve_ray.py", "workers": 2,
             "label": "python serve_ray.py --workers 2 (1 torch thread, each worker pinned to 1 core)"},
}
BASELINES = ("ray1", "single")


def _import_bench_module(name: str):
    """A sibling script of bench/ as a module (``bench`` is not a package)."""
    key = f"sam2_bench_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


# bench/load.py: percentile, free_port, wait_healthy, Server (log_tail, log_errors), environment,
# fmt, statuses_text, the first click's position; it puts the repo root on sys.path.
load = _import_bench_module("load")
percentile, fmt, statuses_text = load.percentile, load.fmt, load.statuses_text


class Stop(Exception):
    """The mode's deadline passed (or Ctrl-C): abandon the current session."""


# ----------------------------------------------------------------------------- recording
def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


def summary(values: list[float], nd: int = 1) -> dict:
    return {"count": len(values), "p50": _r(percentile(values, 50), nd),
            "p99": _r(percentile(values, 99), nd), "max": _r(max(values) if values else None, nd)}


@dataclass
class Figures:
    """Everything one mode measured (appended to from several threads, under ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: Counter = field(default_factory=Counter)        # every answer, retried ones too
    retries: Counter = field(default_factory=Counter)         # retried answers, by status
    clicks: dict[str, list[float]] = field(default_factory=dict)      # kind -> ms
    propagations: dict[str, list[float]] = field(default_factory=dict)  # kind -> s
    reads: dict[str, list[float]] = field(default_factory=dict)       # "busy GET /mask" -> ms
    sessions: list[dict] = field(default_factory=list)

    def answer(self, status: str) -> None:
        with self.lock:
            self.statuses[status] += 1

    def add(self, table: dict[str, list[float]], key: str, value: float) -> None:
        with self.lock:
            table.setdefault(key, []).append(value)


# ----------------------------------------------------------------------------- propagations
class Propagating:
    """Sessions whose propagation is running, shared by the clients and the reader.

    A client registers its session before ``POST /propagate`` and unregisters it after the answer;
    unregistering waits until the reader has finished the reads it started on that session, so
    that the session is never deleted under the reader's feet."""

    def __init__(self, stop: threading.Event):
        self.cond = threading.Condition()
        self.running: dict[str, dict] = {}
        self.reading: set[str] = set()
        self.stop = stop
        self._turn = 0

    def register(self, sid: str, info: dict) -> None:
        with self.cond:
            self.running[sid] = info
            self.cond.notify_all()

    def unregister(self, sid: str) -> None:
        with self.cond:
            self.running.pop(sid, None)
            while sid in self.reading:
                self.cond.wait()

    def any(self) -> bool:
        with self.cond:
            return bool(self.running)

    def lease(self) -> tuple[str, dict] | None:
        """Wait until a propagation runs (or stop); take one of them in turn for reading."""
        with self.cond:
            while not self.running and not self.stop.is_set():
                self.cond.wait()
            if self.stop.is_set():
                return None
            sids = sorted(self.running)
            sid = sids[self._turn % len(sids)]
            self._turn += 1
            self.reading.add(sid)
            return sid, self.running[sid]

    def release(self, sid: str) -> None:
        with self.cond:
            self.reading.discard(sid)
            self.cond.notify_all()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()


# ----------------------------------------------------------------------------- HTTP
class Api:
    """An ``httpx.Client`` that counts every answer by status and retries 409/429/503."""

    def __init__(self, url: str, timeout: float, figures: Figures, stop: threading.Event,
                 deadline: float | None = None):
        self.client = httpx.Client(base_url=url, timeout=timeout)
        self.figures = figures
        self.stop = stop
        self.deadline = deadline

    def close(self) -> None:
        self.client.close()

    def once(self, method: str, path: str, **kw) -> tuple[httpx.Response | None, float]:
        """One request: (answer or None on a transport error, ms)."""
        t = time.perf_counter()
        try:
            r = self.client.request(method, path, **kw)
        except httpx.HTTPError as exc:
            self.figures.answer(type(exc).__name__)
            return None, (time.perf_counter() - t) * 1000
        self.figures.answer(str(r.status_code))
        return r, (time.perf_counter() - t) * 1000

    def call(self, method: str, path: str, **kw) -> tuple[httpx.Response | None, float]:
        """Until an answer that is not 409/429/503: (answer, ms from the first send, Retry-After
        waits included). Raises Stop when the deadline would pass while waiting."""
        t = time.perf_counter()
        while True:
            r, _ = self.once(method, path, **kw)
            if r is None or r.status_code not in RETRY_STATUSES:
                return r, (time.perf_counter() - t) * 1000
            with self.figures.lock:
                self.figures.retries[str(r.status_code)] += 1
            delay = DEFAULT_RETRY_S
            with contextlib.suppress(ValueError):
                delay = min(max(float(r.headers.get("retry-after", delay)), 0.0), MAX_RETRY_S)
            if self.deadline is not None and time.perf_counter() + delay > self.deadline:
                raise Stop
            if self.stop.wait(delay):
                raise Stop


def ok(r: httpx.Response | None) -> bool:
    return r is not None and 200 <= r.status_code < 300


def _point(w: int, h: int, fx: float, fy: float, label: int) -> dict:
    return {"x": round(w * fx, 1), "y": round(h * fy, 1), "label": label}


def box_centre(i: int) -> tuple[float, float]:
    """Centre of synthetic_video's yellow box on frame i, as fractions of width and height."""
    x0 = min(0.1 + 0.02 * i, 2 / 3)
    return x0 + 1 / 6, 0.5


# ----------------------------------------------------------------------------- annotators
@dataclass
class Run:
    url: str
    video: bytes
    timeout: float
    deadline: float
    stop: threading.Event
    figures: Figures
    propagating: Propagating
    log: object


def session(api: Api, run: Run, name: str) -> dict:
    """One annotator's session, health check to DELETE."""
    t0 = time.perf_counter()
    fig = run.figures

    def need(r: httpx.Response | None, what: str) -> httpx.Response:
        if not ok(r):
            status = "no answer" if r is None else r.status_code
            raise RuntimeError(f"{what}: {status} {'' if r is None else r.text[:200]}")
        return r

    def click(kind: str, path: str, body: dict) -> None:
        if time.perf_counter() > run.deadline:
            raise Stop
        r, ms = api.call("POST", path, json=body)
        need(r, kind)
        fig.add(fig.clicks, kind, ms)

    def propagate(kind: str, sid: str, start: int, info: dict) -> None:
        if time.perf_counter() > run.deadline:
            raise Stop
        run.propagating.register(sid, info)
        try:
            r, ms = api.call("POST", f"/propagate/{sid}", json={"start_frame": start})
        finally:
            run.propagating.unregister(sid)
        need(r, kind)
        fig.add(fig.propagations, kind, ms / 1000)

    if time.perf_counter() > run.deadline:
        raise Stop
    need(api.call("GET", "/health")[0], "GET /health")
    r, _ = api.call("POST", "/upload-video", files={"file": ("sessions.mp4", run.video, "video/mp4")})
    up = need(r, "upload").json()
    sid, n, w, h = up["session_id"], up["num_frames"], up["width"], up["height"]
    result = "completed"
    error = None
    try:
        cx, cy = box_centre(0)
        click("annotate", f"/annotate-frame/{sid}",
              {"frame_idx": 0, "obj_id": 1, "points": [_point(w, h, cx, cy, 1)]})
        click("refine frame 0", f"/refine-mask/{sid}",
              {"frame_idx": 0, "obj_id": 1, "points": [_point(w, h, 0.8, 0.85, 0)]})
        propagate("propagate all", sid, 0, {"frames": n, "masked": [0]})
        mid = n // 2
        cx, cy = box_centre(mid)
        click("refine middle frame", f"/refine-mask/{sid}",
              {"frame_idx": mid, "obj_id": 1, "points": [_point(w, h, cx, cy, 1)]})
        propagate("propagate from middle", sid, mid, {"frames": n, "masked": list(range(n))})
    except Stop:
        result = "abandoned at the deadline"
    except Exception as exc:
        result, error = "failed", str(exc)[:300]
    finally:
        r, _ = api.once("DELETE", f"/session/{sid}")
        if result == "completed" and not ok(r):
            result, error = "failed", f"DELETE: {'no answer' if r is None else r.status_code}"
    end = time.perf_counter()
    if result == "completed" and end > run.deadline:
        result = "finished after the deadline"
    out = {"client": name, "result": result, "seconds": round(end - t0, 3), "frames": n}
    if error:
        out["error"] = error
    return out


def client_loop(idx: int, run: Run) -> None:
    name = f"client-{idx}"
    api = Api(run.url, run.timeout, run.figures, run.stop, run.deadline)
    try:
        while not run.stop.is_set() and time.perf_counter() < run.deadline:
            try:
                rec = session(api, run, name)
            except Stop:
                break
            except Exception as exc:  # no session was opened (health or upload failed)
                rec = {"client": name, "result": "failed", "error": str(exc)[:300]}
            with run.figures.lock:
                run.figures.sessions.append(rec)
            run.log(f"    {name}: {rec['result']} in {rec.get('seconds', '-')} s"
                    + (f" ({rec['error']})" if rec.get("error") else ""))
            if rec["result"] == "failed":
                run.stop.wait(DEFAULT_RETRY_S)  # a refused upload: do not spin on it
    finally:
        api.close()


# ----------------------------------------------------------------------------- reader
def open_reader_session(api: Api, video: bytes) -> dict | None:
    """The reader's own session: uploaded, clicked and propagated before the clients start."""
    r, _ = api.call("POST", "/upload-video", files={"file": ("reader.mp4", video, "video/mp4")})
    if not ok(r):
        return None
    info = r.json()
    cx, cy = box_centre(0)
    body = {"frame_idx": 0, "obj_id": 1,
            "points": [_point(info["width"], info["height"], cx, cy, 1)]}
    if not ok(api.call("POST", f"/annotate-frame/{info['session_id']}", json=body)[0]):
        return info | {"masked": False}
    r, _ = api.call("POST", f"/propagate/{info['session_id']}", json={"start_frame": 0})
    return info | {"masked": ok(r)}


def reader_loop(run: Run, api: Api, own: dict | None, interval: float) -> None:
    """While any propagation runs: read frame, mask and overlay of a propagating session, then of
    the reader's own idle session; one such round every ``interval`` s."""
    fig = run.figures
    i = 0

    def read(target: str, sid: str, f: int, mask_f: int) -> None:
        for route, path in (("GET /frame", f"/frame/{sid}/{f}"), ("GET /mask", f"/mask/{sid}/{mask_f}"),
                            ("GET /overlay", f"/overlay/{sid}/{f}")):
            r, ms = api.call("GET", path)
            if ok(r):
                fig.add(fig.reads, f"{target} {route}", ms)

    try:
        while not run.stop.is_set():
            leased = run.propagating.lease()
            if leased is None:
                break
            sid, info = leased
            try:
                f = i % info["frames"]
                read("propagating", sid, f, f if f in info["masked"] else info["masked"][0])
            finally:
                run.propagating.release(sid)
            if own is not None and own.get("masked") and run.propagating.any():
                f = i % own["num_frames"]
                read("idle", own["session_id"], f, f)
            i += 1
            run.stop.wait(interval)
    except Stop:
        pass


# ----------------------------------------------------------------------------- servers
class ModeServer(load.Server):
    """``main.py`` or ``serve_ray.py`` in its own process group, logging to a file in ``tmp``;
    ``log_tail`` and ``log_errors`` come from bench/load.py."""

    def __init__(self, mode: str, a: argparse.Namespace, tmp: Path, checkpoint: Path):
        spec = MODES[mode]
        self.port = load.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "server.log"
        python = ROOT / ".venv" / "bin" / "python"
        # A fresh local Ray cluster per mode: never join one named by the environment.
        inherited = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SAM2_RAY_ADDRESS")}
        env = inherited | {
            "SAM2_HOST": "127.0.0.1", "SAM2_PORT": str(self.port),
            "SAM2_CHECKPOINT": str(checkpoint), "SAM2_MODEL": a.model,
            "SAM2_IMAGE_SIZE": str(a.image_size), "SAM2_DEVICE": "cpu",
            "SAM2_UPLOAD_DIR": str(tmp / "uploads"), "SAM2_OUTPUT_DIR": str(tmp / "outputs"),
            "SAM2_MAX_SESSIONS": str(a.clients + 4), "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        cmd = [str(python if python.exists() else sys.executable), str(ROOT / spec["script"])]
        if spec["workers"] is None:
            env["SAM2_TORCH_THREADS"] = "0"   # torch's default: one thread per core
        else:
            cmd += ["--workers", str(spec["workers"])]
            env |= {"SAM2_TORCH_THREADS": "1", "SAM2_RAY_WORKERS": str(spec["workers"]),
                    "SAM2_RAY_CPUS_PER_WORKER": "1", "SAM2_RAY_GPUS_PER_WORKER": "0",
                    "SAM2_RAY_PIN_CPUS": "true"}
        self.cmd = cmd
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        # cwd is the mode's temp dir: no .env of the checkout applies, nothing is written there.
        self.proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def stop(self) -> dict:
        """SIGTERM to the server; SIGKILL to its process group if it has not exited in 60 s.
        Processes of the group still alive after the server exited are killed too."""
        out: dict = {"killed": False, "leftovers_killed": False}
        t = time.perf_counter()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                out["killed"] = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        if self._group_alive():  # e.g. Ray processes the server left behind
            end = time.monotonic() + 10
            while self._group_alive() and time.monotonic() < end:
                time.sleep(0.2)
            if self._group_alive():
                out["leftovers_killed"] = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
        return out | {"exit_code": self.proc.returncode, "stop_s": round(time.perf_counter() - t, 2)}


# ----------------------------------------------------------------------------- one mode
def run_mode(mode: str, a: argparse.Namespace, tmp: Path, ckpt: Path, video: bytes, log) -> dict:
    mtmp = tmp / mode
    mtmp.mkdir()
    res: dict = {"mode": mode, "deployment": MODES[mode]["label"]}
    server = ModeServer(mode, a, mtmp, ckpt)
    res["command"] = " ".join(Path(c).name if i < 2 else c for i, c in enumerate(server.cmd))
    log(f"[{mode}] started `{res['command']}` (pid {server.proc.pid}) on {server.url}")
    stop = threading.Event()
    propagating = Propagating(stop)
    threads: list[threading.Thread] = []
    reader_api = None
    try:
        t = time.perf_counter()
        try:
            res["health"] = load.wait_healthy(server.url, a.startup_timeout, None, server)
        except SystemExit as exc:  # wait_healthy's way of saying the server did not come up
            res["error"] = str(exc)[-3000:]
            return res
        res["startup_s"] = round(time.perf_counter() - t, 1)
        log(f"[{mode}] healthy after {res['startup_s']} s")
        fig = Figures()
        run = Run(url=server.url, video=video, timeout=a.timeout, deadline=float("inf"),
                  stop=stop, figures=fig, propagating=propagating, log=log)
        reader_api = Api(server.url, a.timeout, Figures(), stop)   # set-up answers not counted
        own = open_reader_session(reader_api, video)
        if own is None or not own.get("masked"):
            log(f"[{mode}] the reader's own session could not be prepared; it reads propagating "
                f"sessions only")
        reader_api.figures = fig
        t0 = time.perf_counter()
        run.deadline = t0 + a.seconds
        reader_api.deadline = run.deadline
        threads = [threading.Thread(target=client_loop, args=(i, run), name=f"{mode}-client-{i}",
                                    daemon=True) for i in range(a.clients)]
        threads.append(threading.Thread(target=reader_loop, args=(run, reader_api, own,
                                                                  a.read_interval),
                                        name=f"{mode}-reader", daemon=True))
        log(f"[{mode}] {a.clients} annotators for {a.seconds:.0f} s")
        for th in threads:
            th.start()
        for th in threads[:-1]:
            th.join()
        stop.set()
        propagating.wake()
        threads[-1].join()
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        if own is not None:
            reader_api.once("DELETE", f"/session/{own['session_id']}")
        res |= summarise(fig, a.seconds)
    finally:
        # On Ctrl-C or an error mid-run: the server goes first, so that requests in flight end.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.signal(signal.SIGTERM,
                                                                                 signal.SIG_IGN)
        stop.set()
        propagating.wake()
        res["stop"] = server.stop()
        for th in threads:
            th.join(timeout=10)
        if reader_api is not None:
            reader_api.close()
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
        log(f"[{mode}] server stopped: {res['stop']}")
        with contextlib.suppress(Exception):
            res["server_log_errors"] = server.log_errors()["count"]
        if res.get("server_log_errors") or res.get("error"):
            res["server_log_tail"] = server.log_tail(30)
        if a.logs:
            a.logs.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copyfile(server.log_path, a.logs / f"{mode}.log")
    return res


def summarise(fig: Figures, seconds: float) -> dict:
    with fig.lock:
        sessions = list(fig.sessions)
        clicks = {k: list(v) for k, v in fig.clicks.items()}
        props = {k: list(v) for k, v in fig.propagations.items()}
        reads = {k: list(v) for k, v in fig.reads.items()}
        statuses, retries = Counter(fig.statuses), Counter(fig.retries)
    done = [s["seconds"] for s in sessions if s["result"] == "completed"]
    all_clicks = [x for v in clicks.values() for x in v]
    all_reads = [x for v in reads.values() for x in v]

    def reads_of(target: str) -> list[float]:
        return [x for k, v in reads.items() if k.startswith(target) for x in v]

    non_2xx = {k: v for k, v in sorted(statuses.items()) if not (k.isdigit() and k.startswith("2"))}
    return {
        "sessions_completed": len(done),
        "sessions_per_min": round(len(done) / seconds * 60, 2),
        "session_outcomes": dict(Counter(s["result"] for s in sessions)),
        "session_s": summary(done, 2),
        "click_ms": summary(all_clicks),
        "click_ms_by_kind": {k: summary(v) for k, v in clicks.items()},
        "propagate_s_by_kind": {k: summary(v, 2) for k, v in props.items()},
        "reads_during_propagation_ms": summary(all_reads),
        "reads_of_propagating_session_ms": summary(reads_of("propagating")),
        "reads_of_idle_session_ms": summary(reads_of("idle")),
        "reads_by_route_ms": {k: summary(v) for k, v in sorted(reads.items())},
        "answers_by_status": dict(sorted(statuses.items())),
        "non_2xx_by_status": non_2xx,
        "retries_by_status": dict(sorted(retries.items())),
        "session_errors": [s["error"] for s in sessions if s.get("error")][:10],
        "raw": {"sessions": sessions, "clicks_ms": clicks, "propagations_s": props,
                "reads_ms": reads},
    }


# ----------------------------------------------------------------------------- report
KEY_FIGURES = [  # (label, how to get it from a mode's result, better when higher)
    ("sessions/min", lambda m: m.get("sessions_per_min"), True),
    ("click p50 ms", lambda m: m.get("click_ms", {}).get("p50"), False),
    ("click p99 ms", lambda m: m.get("click_ms", {}).get("p99"), False),
    ("read p50 ms", lambda m: m.get("reads_during_propagation_ms", {}).get("p50"), False),
    ("read p99 ms", lambda m: m.get("reads_during_propagation_ms", {}).get("p99"), False),
]


def ratios(results: dict[str, dict]) -> list[dict]:
    rows = []
    for base in BASELINES:
        b = results.get(base)
        if not b or b.get("error"):
            continue
        for mode, m in results.items():
            if mode == base or m.get("error"):
                continue
            row = {"ratio": f"{mode} / {base}"}
            for label, get, _ in KEY_FIGURES:
                x, y = get(m), get(b)
                row[label] = round(x / y, 2) if x is not None and y else None
            rows.append(row)
    return rows


def markdown(rep: dict) -> str:
    s, env = rep["settings"], rep["env"]
    out = [f"## SAM 2 sessions bench | {env['date']} | {env['cpus']} CPUs ({env['cpu_model']}) | "
           f"{s['model']} random weights @ {s['image_size']}, CPU | {s['clients']} annotators x "
           f"{s['seconds']:g} s per mode | video {s['width']}x{s['height']} x {s['frames']} frames | "
           f"load avg at start {env.get('load_avg_at_start')}, at end "
           f"{env.get('load_avg_1_5_15_at_end')}" + (" | INTERRUPTED: partial" if rep["interrupted"]
                                                      else ""), ""]
    out += ["| mode | deployment | sessions done | sessions/min | session p50 s | click p50 ms | "
            "click p99 ms | reads during propagation: n | p50 ms | p99 ms | max ms | non-2xx | "
            "retries | startup s |", "| --- " * 14 + "|"]
    failed = []
    for mode, m in rep["modes"].items():
        if m.get("error") and "sessions_completed" not in m:
            out.append(f"| {mode} | {m['deployment']} | failed: see below |" + " - |" * 11)
            failed.append(m)
            continue
        c, rd = m["click_ms"], m["reads_during_propagation_ms"]
        out.append(f"| {mode} | {m['deployment']} | {m['sessions_completed']} | "
                   f"{fmt(m['sessions_per_min'], 2)} | {fmt(m['session_s']['p50'], 2)} | "
                   f"{fmt(c['p50'])} | {fmt(c['p99'])} | {rd['count']} | {fmt(rd['p50'])} | "
                   f"{fmt(rd['p99'])} | {fmt(rd['max'])} | {statuses_text(m['non_2xx_by_status'])} | "
                   f"{statuses_text(m['retries_by_status'])} | {fmt(m.get('startup_s'))} |")
    measured = {mode: m for mode, m in rep["modes"].items() if "sessions_completed" in m}
    if measured:
        out += ["", "| mode | session outcomes | click p50 ms: annotate / refine 0 / refine middle "
                "| propagate all p50 s | propagate from middle p50 s | reads p99 ms: propagating / "
                "idle session | server log errors |", "| --- " * 7 + "|"]
    for mode, m in measured.items():
        k = m["click_ms_by_kind"]
        p = m["propagate_s_by_kind"]
        kinds = " / ".join(fmt(k.get(x, {}).get("p50"))
                           for x in ("annotate", "refine frame 0", "refine middle frame"))
        out.append(f"| {mode} | {statuses_text(m['session_outcomes'])} | {kinds} | "
                   f"{fmt(p.get('propagate all', {}).get('p50'), 2)} | "
                   f"{fmt(p.get('propagate from middle', {}).get('p50'), 2)} | "
                   f"{fmt(m['reads_of_propagating_session_ms']['p99'])} / "
                   f"{fmt(m['reads_of_idle_session_ms']['p99'])} | "
                   f"{fmt(m.get('server_log_errors'))} |")
    if rep["ratios"]:
        out += ["", "Ratios (sessions/min: > 1 is better; latencies: < 1 is better):", "",
                "| ratio | " + " | ".join(label for label, _, _ in KEY_FIGURES) + " |",
                "| --- " * (len(KEY_FIGURES) + 1) + "|"]
        for row in rep["ratios"]:
            out.append(f"| {row['ratio']} | "
                       + " | ".join(fmt(row[label], 2) for label, _, _ in KEY_FIGURES) + " |")
    for m in rep["modes"].values():
        errs = m.get("session_errors")
        if errs:
            out += ["", f"{m['mode']}: session errors (first): " + "; ".join(errs[:3])]
    for m in failed:
        out += ["", f"### {m['mode']} failed", "", "```", m["error"][-2000:], "```"]
    return "\n".join(out)


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--clients", type=int, default=4, help="concurrent annotators (threads), K")
    p.add_argument("--seconds", type=float, default=90.0,
                   help="time budget per mode: no session step starts after it, and only sessions "
                        "finished within it count")
    p.add_argument("--frames", type=int, default=24, help="frames of each uploaded video")
    p.add_argument("--width", type=int, default=320, help="video width")
    p.add_argument("--height", type=int, default=240, help="video height")
    p.add_argument("--modes", default="single,ray1,ray2",
                   help=f"comma-separated deployments to run, in order: {', '.join(MODES)}")
    p.add_argument("--image-size", type=int, default=256, help="SAM2_IMAGE_SIZE")
    p.add_argument("--model", default="tiny",
                   help="architecture of the random-weight checkpoint (SAM2_MODEL)")
    p.add_argument("--seed", type=int, default=4, help="seed of the random weights")
    p.add_argument("--read-interval", type=float, default=0.1,
                   help="pause between the reader's rounds (one round: frame, mask and overlay "
                        "of a propagating session, then of its idle session), s")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="timeout of every request (blocking propagations included), s")
    p.add_argument("--startup-timeout", type=float, default=300.0,
                   help="how long a server may take to answer GET /health 200, s")
    p.add_argument("--logs", type=Path, default=None,
                   help="copy each mode's server log to this folder as MODE.log")
    p.add_argument("--json", type=Path, default=None,
                   help="write the raw figures (every latency, every session) here as JSON")
    a = p.parse_args(argv)
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    unknown = [m for m in a.modes if m not in MODES]
    if unknown or not a.modes:
        p.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    if a.clients < 1 or a.frames < 2 or a.seconds <= 0:
        p.error("--clients and --seconds must be positive, --frames at least 2")
    return a


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_sigterm)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="sam2-sessions-"))
    results: dict[str, dict] = {}
    interrupted = False
    try:
        from synthetic_video import make_video

        video = make_video(tmp / "v.mp4", a.frames, a.width, a.height).read_bytes()
        log(f"writing a random-weight {a.model} checkpoint (seed {a.seed})")
        ckpt = load.load_write_checkpoint()(a.model, a.seed, tmp / "random.pt")
        for mode in a.modes:
            try:
                results[mode] = run_mode(mode, a, tmp, ckpt, video, log)
            except Exception as exc:  # a bug or a broken server: report it, run the next mode
                results[mode] = {"mode": mode, "deployment": MODES[mode]["label"],
                                 "error": f"{type(exc).__name__}: {exc}"}
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: reporting what was measured")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        shutil.rmtree(tmp, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    env = load.environment() | {"load_avg_at_start": load_at_start}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    rep = {"env": env, "settings": settings, "interrupted": interrupted, "modes": results,
           "ratios": ratios(results)}
    print(markdown(rep), flush=True)
    if a.json:
        a.json.write_text(json.dumps(rep, indent=1))
        log(f"wrote {a.json}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
