"""Request ids, one access-log line per request, and the Prometheus metrics of the server."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from timing import STAGES

access_log = logging.getLogger("sam2_server.access")

REQUEST_ID_HEADER = "x-request-id"
_SANE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
MODEL_STATUSES = ("not_loaded", "downloading", "loading", "warming_up", "ready", "error")


class _ManagerCollector:
    """Reads the manager's state at scrape time (the manager knows nothing of Prometheus)."""

    def __init__(self, manager: Callable[[], Any]):
        self._manager = manager

    def describe(self):
        return []

    def collect(self):
        manager = self._manager()
        if manager is None:
            return
        sessions = list(manager.sessions.values())
        yield GaugeMetricFamily("sam2_sessions_open", "Sessions open in memory", len(sessions))
        yield GaugeMetricFamily("sam2_sessions_max", "SAM2_MAX_SESSIONS",
                                manager.settings.max_sessions)
        yield GaugeMetricFamily("sam2_sessions_busy", "Open sessions running model work or an "
                                "export", sum(1 for s in sessions if s.work_lock.locked()))
        yield GaugeMetricFamily("sam2_session_queue_waiting", "Requests waiting for a busy "
                                "session, all sessions together", sum(s.waiting for s in sessions))
        jobs = GaugeMetricFamily("sam2_jobs_running", "Background jobs not finished", labels=["kind"])
        running: dict[str, int] = {"propagate": 0, "export": 0}
        for job in manager.jobs.running():
            running[job.kind] = running.get(job.kind, 0) + 1
        for kind, count in sorted(running.items()):
            jobs.add_metric([kind], count)
        yield jobs
        for name, help_text in (("frames_propagated", "Frames tracked by propagations"),
                                ("sessions_evicted", "Idle sessions closed to make room"),
                                ("out_of_memory", "Model calls that ran out of GPU memory")):
            yield CounterMetricFamily(f"sam2_{name}", help_text, manager.counters[name])
        yield CounterMetricFamily("sam2_model_load_failures", "Failed model loads",
                                  manager.load_failures)
        yield GaugeMetricFamily("sam2_model_ready", "1 when the model serves requests",
                                1 if manager.ready else 0)
        status = GaugeMetricFamily("sam2_model_status", "The model's state (1 = current)",
                                   labels=["status"])
        for name in MODEL_STATUSES:
            status.add_metric([name], 1 if manager.model_status == name else 0)
        yield status
        cpu = CounterMetricFamily("sam2_host_cpu_seconds", "CPU time of the host work around "
                                  "the model, by stage", labels=["stage"])
        for stage, (seconds, _) in STAGES.snapshot().items():
            cpu.add_metric([stage], seconds)
        yield cpu
        if manager.store.disk.limit is not None:
            yield GaugeMetricFamily("sam2_disk_quota_bytes", "SAM2_MAX_DISK_GB in bytes",
                                    manager.store.disk.limit)
            yield GaugeMetricFamily("sam2_disk_used_bytes", "Bytes in the upload and output "
                                    "folders", manager.store.disk.usage().total)


class Metrics:
    """One registry per app, so that several apps (tests) never share counters."""

    def __init__(self, manager: Callable[[], Any]):
        self.registry = CollectorRegistry()
        self.requests = Counter("sam2_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram(
            "sam2_http_request_duration_seconds", "HTTP request latency by route",
            ["method", "route"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.registry.register(_ManagerCollector(manager))

    def render(self) -> tuple[bytes, str]:
        return _generate_latest(self.registry), CONTENT_TYPE_LATEST


def route_of(scope: Scope) -> str:
    """The route template (``/mask/{session_id}/{frame_idx}``): bounded label values."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class RequestContext:
    """ASGI middleware: a request id (the client's ``X-Request-ID`` if sane, else a new one),
    returned as a header, one access-log line, and the request metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope.get("headers", ())
                      if k == REQUEST_ID_HEADER.encode()), "")
        request_id = given if _SANE_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500
        t0 = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - t0
            route = route_of(scope)
            method = scope.get("method", "")
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(elapsed)
            # The path, never the query string or headers (an access key never reaches a log).
            access_log.info("%s %s %s %d %.1fms key=%s", request_id, method, scope.get("path"),
                            status, elapsed * 1000, state.get("key_id") or "-")
