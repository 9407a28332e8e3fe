"""``python serve_ray.py``: the same HTTP API on a Ray cluster, one model per worker actor.

Starts a local Ray cluster (or joins one: ``--address`` / ``SAM2_RAY_ADDRESS``), starts
``SAM2_RAY_WORKERS`` engines as actors ``sam2-worker-{i}`` in the namespace ``sam2`` (Ray
restarts one that dies), and serves the app of ``main.py`` through Ray Serve on
``SAM2_HOST:SAM2_PORT``, its model work sent to the workers by ``ray_backend.py``. Every node
must see the same ``SAM2_OUTPUT_DIR`` and ``SAM2_UPLOAD_DIR`` (and this code at the same path).
SIGTERM or Ctrl+C stops the workers as a SIGTERM stops ``main.py``: running jobs end as
``interrupted``, every manifest is written.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path

import ray
from ray import serve

from checkpoints import ensure_checkpoint
from config import Settings, get_settings
from ray_worker import NAMESPACE, EngineWorker, worker_name
from store import SessionStore

logger = logging.getLogger("sam2_server")
ROOT = Path(__file__).resolve().parent
APP_NAME = "sam2"


def app_builder(settings: Settings):
    """What each ingress replica calls to make its app: ``main.py``'s, on the Ray back end."""
    def build():
        from main import create_app
        from ray_backend import RayBackend

        return create_app(settings, manager=RayBackend(settings))

    return build


class Ingress:
    """The Ray Serve deployment that serves the app (its routes come from ``build_app``)."""


def parse_args(settings: Settings) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", default=settings.ray_address,
                   help="Ray cluster to join (host:port or 'auto'; default: SAM2_RAY_ADDRESS, "
                        "else start a local cluster)")
    p.add_argument("--workers", type=int, default=settings.ray_workers,
                   help="engines to start, one model each (default: SAM2_RAY_WORKERS)")
    p.add_argument("--replicas", type=int, default=settings.ray_ingress_replicas,
                   help="HTTP ingress replicas (default: SAM2_RAY_INGRESS_REPLICAS)")
    p.add_argument("--host", default=settings.listen_host,
                   help="address to listen on (default: SAM2_HOST)")
    p.add_argument("--port", type=int, default=settings.port,
                   help="port to listen on (default: SAM2_PORT)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs of a local cluster started here (default: all)")
    return p.parse_args()


def start_workers(settings: Settings) -> list:
    gpus = settings.ray_gpus_per_worker
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    threads = settings.max_sessions * (settings.session_queue + 1) + 16
    worker_cls = ray.remote(EngineWorker)
    workers = [
        worker_cls.options(name=worker_name(i), namespace=NAMESPACE, max_restarts=-1,
                           max_task_retries=0, num_cpus=settings.ray_cpus_per_worker,
                           num_gpus=gpus, max_concurrency=threads).remote(settings, i)
        for i in range(settings.ray_workers)
    ]
    healths = ray.get([w.health.remote() for w in workers])  # each has loaded its model
    for h in healths:
        logger.info("%s: %s on %s (%s)", h["worker"], h["model_status"], h["device"],
                    h["node_id"][:12])
    return workers


def stop_workers(workers: list, timeout: float) -> None:
    refs = [w.shutdown.remote() for w in workers]
    try:
        ray.get(refs, timeout=timeout)
    except Exception as exc:  # a worker that cannot stop cleanly is reconciled on next start
        logger.warning("workers did not all stop cleanly: %s", exc)
    for w in workers:
        ray.kill(w, no_restart=True)


def main() -> None:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    args = parse_args(settings)
    settings = settings.model_copy(update={
        "ray_address": args.address, "ray_workers": args.workers,
        "ray_ingress_replicas": args.replicas, "host": args.host, "port": args.port})
    settings.check_deployment()
    # Ray's processes import this code by module name, wherever they start.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    cluster = ray.init(address=settings.ray_address, namespace=NAMESPACE, num_cpus=args.num_cpus,
                       runtime_env={"env_vars": {"PYTHONPATH": path}})
    logger.info("Ray cluster at %s (dashboard: %s)", cluster.address_info["gcs_address"],
                cluster.dashboard_url or "not running")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        ensure_checkpoint(settings)  # once here, not once per worker
    except Exception as exc:  # each worker retries, and /health says why
        logger.error("checkpoint not available: %s", exc)
    SessionStore(settings).recover()  # before any worker holds a session
    workers = start_workers(settings)
    try:
        serve.start(http_options={"host": settings.listen_host, "port": settings.port})
        deployment = serve.deployment(
            name="sam2-ingress", num_replicas=settings.ray_ingress_replicas,
            max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0},
        )(serve.ingress(app_builder(settings))(Ingress))
        serve.run(deployment.bind(), name=APP_NAME, route_prefix="/", blocking=False)
        logger.info("serving on http://%s:%d with %d workers", settings.listen_host,
                    settings.port, len(workers))
        stop.wait()
    finally:
        logger.info("stopping")
        serve.delete(APP_NAME)
        stop_workers(workers, settings.shutdown_timeout_s + 10)
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
