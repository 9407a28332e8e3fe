#!/usr/bin/env python
"""Load test over HTTP: K concurrent annotators against a real server on loopback.

  .venv/bin/python bench/load.py                                 # 4 clients, 60 s, own server
  .venv/bin/python bench/load.py --clients 2 --seconds 20 --json /tmp/load.json
  .venv/bin/python bench/load.py --url http://127.0.0.1:8000 --api-key KEY   # existing server

By default it starts its own server: ``.venv/bin/python main.py`` (uvicorn) on a free loopback
port, on the CPU, on a random-weight hiera-tiny checkpoint written by ``bench/bench.py``'s
``write_checkpoint`` at ``SAM2_IMAGE_SIZE=256``, with uploads and outputs in a temp dir. It waits
for ``GET /health`` to answer 200 (503 while the model loads and warms up), and at the end (or on
Ctrl-C) it stops the server and deletes the temp dir. With ``--url`` nothing is started.

Each of ``--clients`` threads has its own ``httpx.Client`` and, until ``--seconds`` have passed,
loops over an annotator's session: upload a synthetic video (``synthetic_video.make_video``), get
frame 0, click a positive point (``POST /annotate-frame``), get the mask and the overlay, a few
refine clicks (``POST /refine-mask``), propagate as a background job (followed with
``GET /jobs/{job_id}``), read frames, masks and overlays of a few frames, ``GET /session``, export
``masks_zip`` as a job and download it, then ``DELETE /session``. A non-2xx answer is counted
under its status and the client carries on: 409/429/503 are retried after the ``Retry-After``
header (or a short pause), anything else moves on to the next step. At the deadline, a running job
is cancelled and the session deleted.

The observer measurement (``--observer after``, the default, runs it once the clients are done):
one session propagates a longer video (``--observer-frames``, default 4x ``--frames``) as a
background job while another session's ``GET /frame``, ``/mask``, ``/overlay`` and ``/session``
are timed back to back, first for a few seconds before that propagation starts (the baseline),
then for as long as it runs. ``GET /health`` is polled through the whole run.

The report (stdout, Markdown; ``--json PATH`` for the same figures as JSON): total requests,
requests/s, non-2xx answers by status, per route (the route template, e.g.
``POST /annotate-frame/{id}``) count, p50, p99 and max latency in ms (``time.perf_counter``
around each request, body read included), sessions completed, job durations, the observer
figures, samples of unexpected answers with the request and the response body, and error lines
from the server's log when the server was started here. It is a benchmark: nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TERMINAL = ("succeeded", "failed", "cancelled", "interrupted")
RETRY_STATUSES = (409, 429, 503)
MAX_SAMPLES_PER_KEY = 3      # kept answers per (route, status), for the report
MAX_SAMPLES = 100
R_UPLOAD = "POST /upload-video"
R_FRAME = "GET /frame/{id}/{i}"
R_MASK = "GET /mask/{id}/{i}"
R_OVERLAY = "GET /overlay/{id}/{i}"
R_ANNOTATE = "POST /annotate-frame/{id}"
R_REFINE = "POST /refine-mask/{id}"
R_PROPAGATE = "POST /propagate/{id}"
R_JOB = "GET /jobs/{job_id}"
R_CANCEL = "POST /jobs/{job_id}/cancel"
R_SESSION = "GET /session/{id}"
R_EXPORT = "POST /export/{id}"
R_DOWNLOAD = "GET /exports/{id}/{name}"
R_DELETE = "DELETE /session/{id}"
R_HEALTH = "GET /health"
OBSERVED = (R_FRAME, R_MASK, R_OVERLAY, R_SESSION)
RECORD_START = re.compile(r"^(\d{4}-\d\d-\d\d[ T]|INFO:|WARNING:|ERROR:|CRITICAL:|DEBUG:)")
ERROR_START = re.compile(r"^(ERROR:|CRITICAL:|Traceback)|^\d{4}-\S+ \S+ (ERROR|CRITICAL) ")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d[ T][\d:,.]+ ")


class Stop(Exception):
    """The run's deadline passed (or Ctrl-C): wind the current session down."""


# ----------------------------------------------------------------------------- recording
def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


class Recorder:
    """Latencies and statuses per route, thread-safe, plus samples of unexpected answers."""

    def __init__(self, t0: float):
        self.t0 = t0
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.statuses: dict[str, Counter] = defaultdict(Counter)
        self.samples: list[dict] = []
        self._sample_keys: Counter = Counter()

    def add(self, route: str, status: str, ms: float, sample: dict | None = None) -> None:
        with self.lock:
            self.latency[route].append(ms)
            self.statuses[route][status] += 1
            if sample is not None:
                key = (route, status)
                if self._sample_keys[key] < MAX_SAMPLES_PER_KEY and len(self.samples) < MAX_SAMPLES:
                    self._sample_keys[key] += 1
                    self.samples.append(sample | {"t_s": round(time.perf_counter() - self.t0, 2)})

    def total(self) -> int:
        with self.lock:
            return sum(len(v) for v in self.latency.values())

    def by_status(self) -> Counter:
        with self.lock:
            out: Counter = Counter()
            for c in self.statuses.values():
                out.update(c)
            return out

    def route_summary(self, route: str) -> dict:
        with self.lock:
            lat = list(self.latency.get(route, []))
            st = Counter(self.statuses.get(route, Counter()))
        return {"count": len(lat), "non_2xx": sum(n for s, n in st.items() if not is_2xx(s)),
                "statuses": dict(sorted(st.items())), "p50_ms": _r(percentile(lat, 50)),
                "p99_ms": _r(percentile(lat, 99)), "max_ms": _r(max(lat) if lat else None)}

    def routes(self) -> list[str]:
        with self.lock:
            return list(self.latency)


def is_2xx(status: str) -> bool:
    return status.isdigit() and 200 <= int(status) < 300


def ok(r: httpx.Response | None) -> bool:
    return r is not None and 200 <= r.status_code < 300


def status_of(r: httpx.Response | None) -> str:
    return "no answer" if r is None else str(r.status_code)


def _body_summary(kw: dict) -> str | None:
    if "json" in kw:
        return json.dumps(kw["json"])[:300]
    if "files" in kw:
        name, data, ctype = kw["files"]["file"]
        return f"multipart file={name} ({len(data)} bytes, {ctype})"
    return None


class Api:
    """One ``httpx.Client`` whose every request is timed and recorded under its route template."""

    def __init__(self, cfg: Config, rec: Recorder, name: str, abort: threading.Event):
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        self.client = httpx.Client(base_url=cfg.url, timeout=cfg.timeout, headers=headers)
        self.rec = rec
        self.name = name
        self.abort = abort

    def close(self) -> None:
        self.client.close()

    def call(self, method: str, route: str, path: str, **kw) -> httpx.Response | None:
        t = time.perf_counter()
        try:
            r = self.client.request(method, path, **kw)
        except httpx.HTTPError as exc:  # timeouts, refused or dropped connections
            ms = (time.perf_counter() - t) * 1000
            self.rec.add(route, type(exc).__name__, ms, {
                "client": self.name, "request": f"{method} {path}", "body": _body_summary(kw),
                "status": type(exc).__name__, "response": str(exc)[:500], "ms": round(ms, 1)})
            return None
        ms = (time.perf_counter() - t) * 1000
        sample = None
        if not 200 <= r.status_code < 300:
            sample = {"client": self.name, "request": f"{method} {path}", "body": _body_summary(kw),
                      "status": str(r.status_code), "retry_after": r.headers.get("retry-after"),
                      "response": r.text[:500], "ms": round(ms, 1)}
        self.rec.add(route, str(r.status_code), ms, sample)
        return r

    def call_retry(self, method: str, route: str, path: str, attempts: int = 3,
                   **kw) -> httpx.Response | None:
        """``call``, repeated after a back-off while the answer is 409/429/503."""
        r = None
        for attempt in range(attempts):
            r = self.call(method, route, path, **kw)
            if r is None or r.status_code not in RETRY_STATUSES or attempt == attempts - 1:
                return r
            self.backoff(r)
            if self.abort.is_set():
                return r
        return r

    def backoff(self, r: httpx.Response | None) -> None:
        """Sleep for the answer's Retry-After (capped at 30 s), else briefly with jitter."""
        delay = None
        if r is not None and r.headers.get("retry-after"):
            with contextlib.suppress(ValueError):
                delay = min(max(float(r.headers["retry-after"]), 0.05), 30.0)
        if delay is None:
            delay = 0.5 + random.random() * 0.5
        self.abort.wait(delay)


# ----------------------------------------------------------------------------- the workload
@dataclass
class Config:
    url: str
    api_key: str | None
    timeout: float
    poll_s: float
    refines: int
    video: bytes
    long_video: bytes
    deadline: float = 0.0              # perf_counter time after which clients wind down
    abort: threading.Event = field(default_factory=threading.Event)   # Ctrl-C


@dataclass
class Tally:
    """What the clients did, beyond single requests (appended to from several threads)."""

    sessions: list[dict] = field(default_factory=list)
    jobs: list[dict] = field(default_factory=list)


def _point(w: int, h: int, fx: float, fy: float, label: int) -> dict:
    return {"x": round(w * fx, 1), "y": round(h * fy, 1), "label": label}


# Clicks on frame 0 of synthetic_video: the yellow box spans x 10-43 % and y 33-67 % there.
FIRST_CLICK = (0.27, 0.5, 1)
REFINE_CLICKS = [(0.2, 0.42, 1), (0.8, 0.85, 0), (0.38, 0.6, 1), (0.6, 0.2, 0), (0.15, 0.55, 1)]


def follow_job(api: Api, job_id: str, kind: str, tally: Tally, started: float, deadline: float,
               abort: threading.Event, poll_s: float) -> dict | None:
    """Poll the job until it ends. Past ``deadline`` or on abort: cancel it and raise Stop."""
    snap = None
    while True:
        r = api.call("GET", R_JOB, f"/jobs/{job_id}")
        if ok(r):
            snap = r.json()
            if snap.get("status") in TERMINAL:
                tally.jobs.append({
                    "kind": kind, "status": snap["status"],
                    "wall_s": round(time.perf_counter() - started, 3),
                    "server_elapsed_s": snap.get("elapsed_s"), "fps": snap.get("fps"),
                    "total": snap.get("total"), "error": snap.get("error")})
                return snap
        elif r is not None and r.status_code == 404:
            tally.jobs.append({"kind": kind, "status": "lost (404)",
                               "wall_s": round(time.perf_counter() - started, 3)})
            return None
        if abort.is_set() or time.perf_counter() > deadline:
            if not abort.is_set():
                api.call("POST", R_CANCEL, f"/jobs/{job_id}/cancel")
            tally.jobs.append({"kind": kind, "status": "stopped (deadline or Ctrl-C)",
                               "wall_s": round(time.perf_counter() - started, 3)})
            raise Stop
        abort.wait(poll_s)


def run_session(api: Api, cfg: Config, tally: Tally) -> dict:
    """One annotator session, start to DELETE. Returns what happened (for the tally)."""
    t_start = time.perf_counter()
    out: dict = {"client": api.name, "result": "completed", "failed_steps": 0}

    r = api.call("POST", R_UPLOAD, "/upload-video",
                 files={"file": ("load.mp4", cfg.video, "video/mp4")})
    if not ok(r):
        api.backoff(r)
        return out | {"result": f"upload refused ({status_of(r)})"}
    info = r.json()
    sid, n, w, h = info["session_id"], info["num_frames"], info["width"], info["height"]

    def step(resp: httpx.Response | None) -> bool:
        if not ok(resp):
            out["failed_steps"] += 1
        return ok(resp)

    def check() -> None:
        if cfg.abort.is_set() or time.perf_counter() > cfg.deadline:
            raise Stop

    def follow(resp: httpx.Response | None, kind: str, started: float) -> dict | None:
        if resp is None or resp.status_code != 202:
            step(resp)
            return None
        snap = follow_job(api, resp.json()["job_id"], kind, tally, started, cfg.deadline,
                          cfg.abort, cfg.poll_s)
        if snap is None or snap.get("status") != "succeeded":
            out["failed_steps"] += 1
            return None
        return snap

    try:
        check()
        step(api.call_retry("GET", R_FRAME, f"/frame/{sid}/0"))
        check()
        step(api.call_retry("POST", R_ANNOTATE, f"/annotate-frame/{sid}",
                            json={"frame_idx": 0, "points": [_point(w, h, *FIRST_CLICK)]}))
        step(api.call_retry("GET", R_MASK, f"/mask/{sid}/0"))
        step(api.call_retry("GET", R_OVERLAY, f"/overlay/{sid}/0"))
        for k in range(cfg.refines):
            check()
            click = REFINE_CLICKS[k % len(REFINE_CLICKS)]
            step(api.call_retry("POST", R_REFINE, f"/refine-mask/{sid}",
                                json={"frame_idx": 0, "points": [_point(w, h, *click)]}))
        check()
        t_job = time.perf_counter()
        follow(api.call_retry("POST", R_PROPAGATE, f"/propagate/{sid}",
                              json={"start_frame": 0, "background": True}), "propagate", t_job)
        for i in sorted({n // 4, n // 2, n - 1}):
            check()
            step(api.call_retry("GET", R_FRAME, f"/frame/{sid}/{i}"))
            step(api.call_retry("GET", R_MASK, f"/mask/{sid}/{i}"))
            step(api.call_retry("GET", R_OVERLAY, f"/overlay/{sid}/{i}"))
        check()
        step(api.call_retry("GET", R_SESSION, f"/session/{sid}"))
        check()
        t_job = time.perf_counter()
        snap = follow(api.call_retry("POST", R_EXPORT, f"/export/{sid}",
                                     json={"format": "masks_zip"}), "export masks_zip", t_job)
        url = ((snap or {}).get("result") or {}).get("download_url")
        if url:
            check()
            step(api.call_retry("GET", R_DOWNLOAD, url))
        elif snap is not None:
            out["failed_steps"] += 1
    except Stop:
        out["result"] = "stopped (deadline or Ctrl-C)"
    finally:
        # Always close the session, even at the deadline; on Ctrl-C one try only.
        r = api.call_retry("DELETE", R_DELETE, f"/session/{sid}",
                           attempts=1 if cfg.abort.is_set() else 4)
        step(r)
    if out["result"] == "completed" and out["failed_steps"]:
        out["result"] = "completed with failed steps"
    return out | {"session_id": sid, "seconds": round(time.perf_counter() - t_start, 3)}


def client_loop(idx: int, cfg: Config, rec: Recorder, tally: Tally) -> None:
    api = Api(cfg, rec, f"client-{idx}", cfg.abort)
    try:
        while not cfg.abort.is_set() and time.perf_counter() < cfg.deadline:
            try:
                tally.sessions.append(run_session(api, cfg, tally))
            except Exception as exc:  # a bad answer body etc.: note it, pause, carry on
                tally.sessions.append({"client": api.name, "result": "client exception",
                                       "error": repr(exc)[:300]})
                cfg.abort.wait(0.5)
    finally:
        api.close()


# ----------------------------------------------------------------------------- observer
def observer(cfg: Config, rec_setup: Recorder, rec_before: Recorder, rec_during: Recorder,
             before_s: float, job_timeout: float, tally: Tally) -> dict:
    """A long propagation in one session while another session's reads are timed."""
    api = Api(cfg, rec_setup, "observer", cfg.abort)
    result: dict = {}
    sids: list[str] = []
    try:
        def upload(data: bytes) -> dict | None:
            for _ in range(10):
                r = api.call("POST", R_UPLOAD, "/upload-video",
                             files={"file": ("observer.mp4", data, "video/mp4")})
                if ok(r):
                    sids.append(r.json()["session_id"])
                    return r.json()
                if cfg.abort.is_set() or r is None or r.status_code not in RETRY_STATUSES:
                    return None
                api.backoff(r)
            return None

        long_info, read_info = upload(cfg.long_video), upload(cfg.video)
        if long_info is None or read_info is None:
            return {"error": "could not open the observer's two sessions (see non-2xx samples)"}
        p, rs, n = long_info["session_id"], read_info["session_id"], read_info["num_frames"]
        for sid, info in ((p, long_info), (rs, read_info)):
            api.call_retry("POST", R_ANNOTATE, f"/annotate-frame/{sid}", json={
                "frame_idx": 0, "points": [_point(info["width"], info["height"], *FIRST_CLICK)]})
        # The read session is tracked first, so that its masks exist (blocking propagation).
        api.call_retry("POST", R_PROPAGATE, f"/propagate/{rs}", json={"start_frame": 0})

        def reads(rec: Recorder, until) -> None:
            api.rec = rec
            i = 0
            while not cfg.abort.is_set() and not until():
                f = i % n
                api.call("GET", R_FRAME, f"/frame/{rs}/{f}")
                api.call("GET", R_MASK, f"/mask/{rs}/{f}")
                api.call("GET", R_OVERLAY, f"/overlay/{rs}/{f}")
                api.call("GET", R_SESSION, f"/session/{rs}")
                i += 1
            api.rec = rec_setup

        t_end = time.perf_counter() + before_s
        reads(rec_before, lambda: time.perf_counter() > t_end)

        r = api.call_retry("POST", R_PROPAGATE, f"/propagate/{p}",
                           json={"start_frame": 0, "background": True})
        if r is None or r.status_code != 202:
            return {"error": f"the long propagation did not start ({status_of(r)})"}
        job_id = r.json()["job_id"]
        done = threading.Event()
        final: dict = {}

        def watch() -> None:
            watcher = Api(cfg, rec_setup, "observer-watch", cfg.abort)
            try:
                final["snap"] = follow_job(watcher, job_id, "propagate", tally,
                                           time.perf_counter(), time.perf_counter() + job_timeout,
                                           cfg.abort, cfg.poll_s)
            except Stop:
                final["snap"] = None
            except Exception as exc:
                final["error"] = repr(exc)[:300]
            finally:
                watcher.close()
                done.set()

        t_prop = time.perf_counter()
        th = threading.Thread(target=watch, name="observer-watch", daemon=True)
        th.start()
        reads(rec_during, done.is_set)
        th.join(timeout=job_timeout)
        snap = final.get("snap") or {}
        result = {"propagating_frames": long_info["num_frames"], "read_frames": n,
                  "job_status": snap.get("status", final.get("error", "unknown")),
                  "job_wall_s": round(time.perf_counter() - t_prop, 2),
                  "job_fps": snap.get("fps")}
        return result
    finally:
        for sid in sids:
            api.call_retry("DELETE", R_DELETE, f"/session/{sid}",
                           attempts=1 if cfg.abort.is_set() else 4)
        api.close()


def health_monitor(cfg: Config, recs: dict[str, Recorder], phase: list[str], stop: threading.Event,
                   interval: float) -> None:
    api = Api(cfg, recs[phase[0]], "health", cfg.abort)
    try:
        while not stop.is_set():
            api.rec = recs[phase[0]]
            api.call("GET", R_HEALTH, "/health")
            stop.wait(interval)
    finally:
        api.close()


# ----------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_write_checkpoint():
    """``write_checkpoint`` from bench/bench.py, imported by path (``bench`` is not a package)."""
    spec = importlib.util.spec_from_file_location("sam2_bench_bench", ROOT / "bench" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_checkpoint


def wait_healthy(url: str, timeout: float, api_key: str | None,
                 server: Server | None = None) -> dict:
    """Poll ``GET /health`` until it answers 200 (it is 503 while the model loads and warms up)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with httpx.Client(base_url=url, timeout=5.0, headers=headers) as c:
        while time.monotonic() < deadline:
            if server is not None and server.proc.poll() is not None:
                raise SystemExit(f"the server exited with {server.proc.returncode} before it was "
                                 f"healthy; its log ends:\n{server.log_tail()}")
            try:
                r = c.get("/health")
                if r.status_code == 200:
                    return r.json()
                last = f"{r.status_code} {r.text[:300]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.25)
    tail = f"; the server log ends:\n{server.log_tail()}" if server is not None else ""
    raise SystemExit(f"GET /health at {url} was not 200 within {timeout:.0f} s (last: {last}){tail}")


class Server:
    """``python main.py`` in its own process group, logging to a file in the temp dir."""

    def __init__(self, a: argparse.Namespace, tmp: Path, checkpoint: Path, max_sessions: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "server.log"
        python = ROOT / ".venv" / "bin" / "python"
        env = os.environ | {
            "SAM2_HOST": "127.0.0.1", "SAM2_PORT": str(self.port),
            "SAM2_CHECKPOINT": str(checkpoint), "SAM2_MODEL": a.model,
            "SAM2_IMAGE_SIZE": str(a.image_size), "SAM2_DEVICE": a.device,
            "SAM2_UPLOAD_DIR": str(tmp / "uploads"), "SAM2_OUTPUT_DIR": str(tmp / "outputs"),
            "SAM2_MAX_SESSIONS": str(max_sessions), "PYTHONUNBUFFERED": "1"}
        if a.api_key:
            env["SAM2_API_KEYS"] = a.api_key
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        # cwd is the temp dir, so that no .env of the checkout applies and nothing is written there.
        self.proc = subprocess.Popen(
            [str(python if python.exists() else sys.executable), str(ROOT / "main.py")],
            cwd=tmp, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def log_errors(self) -> dict:
        """ERROR/CRITICAL records and tracebacks in the log, grouped by where they came from and
        the exception they end with (uvicorn logs an unhandled exception a second time)."""
        lines = self.log_path.read_text(errors="replace").splitlines() \
            if self.log_path.exists() else []
        groups: dict[str, dict] = {}
        i = 0
        while i < len(lines):
            if not ERROR_START.match(lines[i]):
                i += 1
                continue
            j = i + 1
            while j < len(lines) and not RECORD_START.match(lines[j]):
                j += 1
            block = lines[i:j]
            header = TIMESTAMP.sub("", block[0]).strip()
            exc = next((x for x in reversed(block[1:]) if x.strip() and not x.startswith(" ")
                        and not x.lstrip().startswith("^")), "")
            where = [x.strip() for x in block if x.strip().startswith("File ")][-2:]
            g = groups.setdefault(f"{header} | {exc}", {
                "count": 0, "record": header, "exception": exc, "where": where,
                "first": "\n".join(block)[-4000:]})
            g["count"] += 1
            i = j
        ordered = sorted(groups.values(), key=lambda g: -g["count"])
        return {"count": sum(g["count"] for g in ordered), "groups": ordered}

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode


# ----------------------------------------------------------------------------- report
def fmt(x, nd: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def statuses_text(c: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(c.items())) or "none"


def build_report(a: argparse.Namespace, env: dict, health_info: dict | None, load_s: float,
                 rec: Recorder, tally: Tally, obs: dict, health_recs: dict[str, Recorder],
                 server_errors: dict | None, interrupted: bool) -> dict:
    total = rec.total()
    by_status = rec.by_status()
    sess = Counter(s["result"] for s in tally.sessions)
    done_s = [s["seconds"] for s in tally.sessions if s["result"] == "completed"]
    jobs: dict[str, dict] = {}
    for kind in sorted({j["kind"] for j in tally.jobs}):
        js = [j for j in tally.jobs if j["kind"] == kind]
        ok_ = [j for j in js if j["status"] == "succeeded"]
        walls = [j["wall_s"] for j in ok_]
        fps = [j["fps"] for j in ok_ if j.get("fps")]
        jobs[kind] = {"count": len(js), "statuses": dict(Counter(j["status"] for j in js)),
                      "succeeded_wall_p50_s": _r(percentile(walls, 50), 2),
                      "succeeded_wall_max_s": _r(max(walls) if walls else None, 2),
                      "fps_p50": _r(percentile(fps, 50), 2)}
    routes = {r: rec.route_summary(r) for r in rec.routes()}
    health = {phase: h.route_summary(R_HEALTH) for phase, h in health_recs.items()
              if h.total()}
    samples = sorted(rec.samples + obs.get("samples", []), key=lambda s: s["t_s"])
    return {
        "env": env,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
                     if k not in ("api_key",)} | {"api_key": bool(a.api_key)},
        "server_health_at_start": health_info,
        "interrupted": interrupted,
        "load": {"wall_s": round(load_s, 2), "total_requests": total,
                 "requests_per_s": round(total / load_s, 2) if load_s > 0 else None,
                 "non_2xx_by_status": {k: v for k, v in sorted(by_status.items()) if not is_2xx(k)},
                 "by_status": dict(sorted(by_status.items())),
                 "sessions": dict(sess), "sessions_completed": sess.get("completed", 0),
                 "completed_session_p50_s": _r(percentile(done_s, 50), 2),
                 "completed_session_max_s": _r(max(done_s) if done_s else None, 2),
                 "client_exceptions": [s["error"] for s in tally.sessions if "error" in s][:10]},
        "routes": routes,
        "jobs": jobs,
        "observer": obs.get("summary", {}),
        "health": health,
        "non_2xx_samples": samples,
        "server_log_errors": server_errors,
    }


def markdown(rep: dict) -> str:
    env, s, load = rep["env"], rep["settings"], rep["load"]
    hi = rep["server_health_at_start"] or {}
    weights = f"random weights (seed {s['seed']})" if not s["checkpoint"] else s["checkpoint"]
    server = (f"started here: {s['model']} {weights} @ {s['image_size']}, {s['device']}"
              if not s["url"] else f"{s['url']} ({hi.get('model', '?')} on "
              f"{hi.get('device', '?')})")
    out = [f"## SAM 2 load test | {env['date']} | {env['cpus']} CPUs ({env['cpu_model']}) | "
           f"server: {server} | {s['clients']} clients x {s['seconds']} s | video "
           f"{s['width']}x{s['height']} x {s['frames']} frames | {s['refines']} refine clicks | "
           f"load avg at start {env.get('load_avg_at_start')}, at end "
           f"{env.get('load_avg_1_5_15_at_end')}"
           + (" | INTERRUPTED (Ctrl-C or SIGTERM): partial figures" if rep["interrupted"] else ""), ""]
    sessions = load["sessions"]
    out += ["| metric | value |", "| --- | --- |",
            f"| load phase wall time | {fmt(load['wall_s'], 1)} s (deadline, then in-flight "
            f"sessions wound down) |",
            f"| total requests | {fmt(load['total_requests'])} |",
            f"| requests/s | {fmt(load['requests_per_s'], 2)} |",
            f"| non-2xx by status | {statuses_text(load['non_2xx_by_status'])} |",
            f"| sessions completed (every step 2xx) | {sessions.get('completed', 0)} |",
            f"| all session outcomes | {statuses_text(sessions)} |",
            f"| completed session time p50 / max | {fmt(load['completed_session_p50_s'], 2)} s / "
            f"{fmt(load['completed_session_max_s'], 2)} s |"]
    for kind, j in rep["jobs"].items():
        extra = f", {fmt(j['fps_p50'], 2)} FPS p50" if j["fps_p50"] and "propagate" in kind else ""
        out.append(f"| {kind} jobs | {j['count']} ({statuses_text(j['statuses'])}); succeeded: "
                   f"wall p50 {fmt(j['succeeded_wall_p50_s'], 2)} s, max "
                   f"{fmt(j['succeeded_wall_max_s'], 2)} s{extra} |")
    out += ["", "| route | count | non-2xx | statuses | p50 ms | p99 ms | max ms |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    order = [R_UPLOAD, R_FRAME, R_ANNOTATE, R_MASK, R_OVERLAY, R_REFINE, R_PROPAGATE, R_JOB,
             R_SESSION, R_EXPORT, R_DOWNLOAD, R_DELETE, R_CANCEL]
    routes = rep["routes"]
    for route in order + sorted(set(routes) - set(order)):
        if route in routes:
            r = routes[route]
            out.append(f"| `{route}` | {r['count']} | {r['non_2xx']} | "
                       f"{statuses_text(r['statuses'])} | {fmt(r['p50_ms'])} | "
                       f"{fmt(r['p99_ms'])} | {fmt(r['max_ms'])} |")
    obs = rep["observer"]
    if obs:
        out += ["", f"### Observer ({s['observer']} the clients): reads of a {s['frames']}-frame "
                f"session, back to back, while another session propagates {s['observer_frames']} "
                f"frames", ""]
        if obs.get("error"):
            out.append(f"observer failed: {obs['error']}")
        else:
            out += [f"Propagation job: {obs.get('job_status')}, {fmt(obs.get('job_wall_s'), 2)} s "
                    f"wall, {fmt(obs.get('job_fps'), 2)} FPS (server's figure).", "",
                    "| route | before: count | p50 ms | p99 ms | max ms | during: count | "
                    "p50 ms | p99 ms | max ms |", "| --- | --- | --- | --- | --- | --- | --- | "
                    "--- | --- |"]
            for route in [*OBSERVED, "all four"]:
                b = obs["before"].get(route, {})
                d = obs["during"].get(route, {})
                out.append(f"| `{route}` | {fmt(b.get('count'))} | {fmt(b.get('p50_ms'))} | "
                           f"{fmt(b.get('p99_ms'))} | {fmt(b.get('max_ms'))} | "
                           f"{fmt(d.get('count'))} | {fmt(d.get('p50_ms'))} | "
                           f"{fmt(d.get('p99_ms'))} | {fmt(d.get('max_ms'))} |")
            nb = obs.get("non_2xx", {})
            if nb:
                out.append(f"\nObserver non-2xx: {statuses_text(nb)}")
    if rep["health"]:
        out += ["", f"### `GET /health`, polled every {s['health_interval']} s", "",
                "| phase | count | non-2xx | p50 ms | p99 ms | max ms |",
                "| --- | --- | --- | --- | --- | --- |"]
        for phase, h in rep["health"].items():
            out.append(f"| {phase} | {h['count']} | {h['non_2xx']} | {fmt(h['p50_ms'])} | "
                       f"{fmt(h['p99_ms'])} | {fmt(h['max_ms'])} |")
    odd = [x for x in rep["non_2xx_samples"] if x["status"] not in ("409", "429")]
    if odd:
        out += ["", "### Unexpected answers (not 409/429): first samples", ""]
        for x in odd[:12]:
            out.append(f"- t={x['t_s']} s {x['client']}: `{x['request']}` body `{x['body']}` -> "
                       f"**{x['status']}** in {x['ms']} ms: `{x['response'][:300]}`")
    busy = [x for x in rep["non_2xx_samples"] if x["status"] in ("409", "429")]
    if busy:
        x = busy[0]
        out += ["", f"First 409/429 sample: `{x['request']}` -> {x['status']} (Retry-After: "
                f"{x.get('retry_after')}): `{x['response'][:300]}`"]
    exc = load.get("client_exceptions")
    if exc:
        out += ["", "Client-side exceptions (the session was abandoned): " + "; ".join(exc[:5])]
    errs = rep["server_log_errors"]
    if errs is not None:
        out += ["", f"Server log: {errs['count']} ERROR/CRITICAL records or tracebacks."]
        for g in errs["groups"][:8]:
            where = f" (at {g['where'][-1]})" if g["where"] else ""
            out.append(f"- {g['count']} x `{g['record'][:200]}` -> `{g['exception'][:300]}`{where}")
    return "\n".join(out)


def environment() -> dict:
    model = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load_avg = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return {"date": datetime.datetime.now().isoformat(" ", "seconds"), "cpus": cpus,
            "load_avg_1_5_15_at_end": load_avg,
            "cpu_model": model, "platform": platform.platform(),
            "python": platform.python_version(), "httpx": httpx.__version__}


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default=None,
                   help="use the server at this URL (e.g. http://127.0.0.1:8000) instead of "
                        "starting one")
    p.add_argument("--api-key", default=None,
                   help="send 'Authorization: Bearer KEY' on every request (and give the started "
                        "server SAM2_API_KEYS=KEY)")
    p.add_argument("--clients", type=int, default=4, help="concurrent annotator clients (threads)")
    p.add_argument("--seconds", type=float, default=60.0,
                   help="how long the clients start new work; in-flight sessions are then wound "
                        "down (running jobs cancelled, sessions deleted)")
    p.add_argument("--frames", type=int, default=24, help="frames in each client's video")
    p.add_argument("--width", type=int, default=320, help="video width")
    p.add_argument("--height", type=int, default=240, help="video height")
    p.add_argument("--refines", type=int, default=3, help="refine clicks per session")
    p.add_argument("--timeout", type=float, default=120.0, help="timeout of every request, s")
    p.add_argument("--poll-interval", type=float, default=0.5,
                   help="how often a client polls GET /jobs/{job_id}, s")
    p.add_argument("--observer", choices=("after", "during", "off"), default="after",
                   help="when the observer measurement runs: after the clients (isolated), during "
                        "them (one more session pair under load), or not at all")
    p.add_argument("--observer-frames", type=int, default=0,
                   help="frames of the observer's propagating video; 0: 4x --frames")
    p.add_argument("--observer-before", type=float, default=5.0,
                   help="seconds of observer reads timed before its propagation starts "
                        "(the baseline)")
    p.add_argument("--job-timeout", type=float, default=600.0,
                   help="the observer gives up on its propagation job after this many s")
    p.add_argument("--health-interval", type=float, default=0.5,
                   help="how often GET /health is polled during the run, s")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here as JSON")
    srv = p.add_argument_group("started server (ignored with --url)")
    srv.add_argument("--model", default="tiny",
                     help="architecture of the random-weight checkpoint (SAM2_MODEL)")
    srv.add_argument("--seed", type=int, default=4, help="seed of the random weights")
    srv.add_argument("--checkpoint", type=Path, default=None,
                     help="use this checkpoint instead of writing random weights")
    srv.add_argument("--image-size", type=int, default=256, help="SAM2_IMAGE_SIZE")
    srv.add_argument("--device", default="cpu", help="SAM2_DEVICE")
    srv.add_argument("--max-sessions", type=int, default=None,
                     help="SAM2_MAX_SESSIONS (default: clients + 4)")
    p.add_argument("--startup-timeout", type=float, default=300.0,
                   help="how long to wait for GET /health to answer 200 before starting, s")
    srv.add_argument("--server-log", type=Path, default=None,
                     help="copy the server's log here before the temp dir is deleted")
    a = p.parse_args(argv)
    if a.clients < 1 or a.frames < 1 or a.seconds <= 0:
        p.error("--clients, --frames and --seconds must be positive")
    a.observer_frames = a.observer_frames or 4 * a.frames
    return a


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    load_at_start = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    # Ctrl-C and SIGTERM stop the run cleanly, even where SIGINT was inherited as ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_sigterm)
    tmp = Path(tempfile.mkdtemp(prefix="sam2-load-"))
    server: Server | None = None
    interrupted = False
    rep = None
    threads: list[threading.Thread] = []
    abort = threading.Event()
    health_stop = threading.Event()
    try:
        from synthetic_video import make_video

        log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
        log(f"making videos: {a.width}x{a.height} x {a.frames} and x {a.observer_frames} frames")
        video = make_video(tmp / "v.mp4", a.frames, a.width, a.height).read_bytes()
        long_video = (make_video(tmp / "long.mp4", a.observer_frames, a.width, a.height)
                      .read_bytes() if a.observer != "off" else b"")
        url = a.url
        if url is None:
            ckpt = a.checkpoint
            if ckpt is None:
                log(f"writing a random-weight {a.model} checkpoint (seed {a.seed})")
                ckpt = load_write_checkpoint()(a.model, a.seed, tmp / "random.pt")
            server = Server(a, tmp, ckpt, a.max_sessions or a.clients + 4)
            url = server.url
            log(f"started the server (pid {server.proc.pid}) on {url}")
        log(f"waiting for GET {url.rstrip('/')}/health to answer 200")
        t = time.perf_counter()
        health_info = wait_healthy(url.rstrip("/"), a.startup_timeout, a.api_key, server)
        log(f"healthy after {time.perf_counter() - t:.1f} s: {json.dumps(health_info)[:300]}")
        cfg = Config(url=url.rstrip("/"), api_key=a.api_key, timeout=a.timeout,
                     poll_s=a.poll_interval, refines=a.refines, video=video,
                     long_video=long_video, abort=abort)

        t0 = time.perf_counter()
        rec = Recorder(t0)
        tally = Tally()
        obs_tally = Tally()  # the observer's own job, kept out of the clients' figures
        obs_recs = {k: Recorder(t0) for k in ("setup", "before", "during")}
        health_recs = {"during the clients": Recorder(t0), "during the observer": Recorder(t0)}
        phase = ["during the clients"]
        obs_out: dict = {}

        def run_observer() -> None:
            try:
                obs_out["result"] = observer(cfg, obs_recs["setup"], obs_recs["before"],
                                             obs_recs["during"], a.observer_before,
                                             a.job_timeout, obs_tally)
            except Exception as exc:
                obs_out["result"] = {"error": repr(exc)[:300]}

        hm = threading.Thread(target=health_monitor, name="health", daemon=True,
                              args=(cfg, health_recs, phase, health_stop, a.health_interval))
        hm.start()
        cfg.deadline = time.perf_counter() + a.seconds
        log(f"{a.clients} clients for {a.seconds:.0f} s against {url}")
        threads = [threading.Thread(target=client_loop, args=(i, cfg, rec, tally), daemon=True,
                                    name=f"client-{i}") for i in range(a.clients)]
        obs_thread = None
        if a.observer == "during":
            obs_thread = threading.Thread(target=run_observer, name="observer", daemon=True)
            threads.append(obs_thread)
        try:
            for th in threads:
                th.start()
            next_note = time.perf_counter() + 10
            while any(th.is_alive() for th in threads if th is not obs_thread):
                for th in threads:
                    th.join(timeout=0.5)
                if time.perf_counter() >= next_note:
                    next_note += 10
                    bad = {k: v for k, v in rec.by_status().items() if not is_2xx(k)}
                    done = sum(s["result"] == "completed" for s in tally.sessions)
                    log(f"  t={time.perf_counter() - t0:5.1f} s: {rec.total()} requests, {done} "
                        f"sessions completed, non-2xx: {statuses_text(bad)}")
            load_s = time.perf_counter() - t0
            if a.observer == "after":
                phase[0] = "during the observer"
                log(f"observer: reads of a {a.frames}-frame session while another propagates "
                    f"{a.observer_frames} frames")
                obs_thread = threading.Thread(target=run_observer, name="observer", daemon=True)
                threads.append(obs_thread)
                obs_thread.start()
            if obs_thread is not None:
                while obs_thread.is_alive():
                    obs_thread.join(timeout=0.5)
        except KeyboardInterrupt:
            interrupted = True
            log("Ctrl-C: stopping the clients (a second Ctrl-C is ignored while cleaning up)")
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            abort.set()
            end = time.monotonic() + 15
            for th in threads:
                th.join(timeout=max(0.0, end - time.monotonic()))
            load_s = time.perf_counter() - t0
        health_stop.set()
        hm.join(timeout=a.timeout)

        obs_summary: dict = {}
        res = obs_out.get("result")
        if res is not None:
            obs_summary = dict(res)
            if "error" not in res:
                for key in ("before", "during"):
                    r_ = obs_recs[key]
                    block = {route: r_.route_summary(route) for route in OBSERVED}
                    lat = [x for route in OBSERVED for x in r_.latency.get(route, [])]
                    block["all four"] = {"count": len(lat), "p50_ms": _r(percentile(lat, 50)),
                                         "p99_ms": _r(percentile(lat, 99)),
                                         "max_ms": _r(max(lat) if lat else None)}
                    obs_summary[key] = block
            nb: Counter = Counter()
            for r_ in obs_recs.values():
                nb.update({k: v for k, v in r_.by_status().items() if not is_2xx(k)})
            obs_summary["non_2xx"] = dict(nb)
        obs_samples = [x for r_ in obs_recs.values() for x in r_.samples]
        server_errors = server.log_errors() if server is not None else None
        env = environment() | {"load_avg_at_start": load_at_start}
        rep = build_report(a, env, health_info, load_s, rec, tally,
                           {"summary": obs_summary, "samples": obs_samples}, health_recs,
                           server_errors, interrupted)
        print(markdown(rep), flush=True)
        if a.json:
            a.json.write_text(json.dumps(rep, indent=1))
            log(f"wrote {a.json}")
    except KeyboardInterrupt:
        interrupted = True
        abort.set()
        print("interrupted before the clients started", file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        abort.set()
        health_stop.set()
        if server is not None:
            code = server.stop()
            print(f"server stopped (exit {code})", file=sys.stderr)
            if a.server_log:
                with contextlib.suppress(OSError):
                    shutil.copyfile(server.log_path, a.server_log)
        shutil.rmtree(tmp, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
