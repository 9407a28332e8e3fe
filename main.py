"""The FastAPI app: its lifespan, middleware and routers, and ``python main.py`` (uvicorn)."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from auth import KeyRing
from backend import Backend
from config import Settings, get_settings
from http_errors import install_error_handlers, path_scrubber
from http_limits import BodyLimit
from observability import Metrics, RequestContext
from routes import ROUTERS
from sam2_manager import SAM2Manager

logger = logging.getLogger("sam2_server")

LOOPBACK = ("127.0.0.1", "localhost", "::1")
WEB_DIR = Path(__file__).resolve().parent / "web"
# Without keys the server is one person's tool: pages on their own machine may call it.
LOCAL_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"


def create_app(settings: Settings | None = None, manager: Backend | None = None) -> FastAPI:
    """The app on ``manager`` (by default the in-process back end, made at start-up)."""
    settings = settings or get_settings()
    settings.check_deployment()
    keyring = KeyRing(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        mgr = manager or SAM2Manager(settings)
        app.state.manager = mgr
        await run_in_threadpool(mgr.store.recover)
        mgr.start_model_loader()
        # Model work (clicks, blocking propagations and exports, deletes) runs on its own
        # threads, sized so that requests queued on busy sessions can never take them all:
        # reads, /health and every other session keep the default pool to themselves.
        app.state.model_pool = ThreadPoolExecutor(
            getattr(mgr, "model_threads", None)
            or settings.max_sessions * (settings.session_queue + 1) + 4,
            thread_name_prefix="model-work")
        cleaner = asyncio.create_task(_cleanup_loop(mgr, settings.cleanup_interval_s))
        try:
            yield
        finally:
            cleaner.cancel()
            await run_in_threadpool(mgr.shutdown)
            app.state.model_pool.shutdown(wait=False, cancel_futures=True)

    # /docs with Swagger UI served from the package, not a CDN: it works offline.
    app = FastAPIOffline(
        title="SAM 2 interactive video segmentation",
        version="1.0.0",
        description="Upload a video, click points on any frame, propagate, refine, export. With "
                    "access keys configured, send `Authorization: Bearer <key>` (or "
                    "`X-API-Key`) on every request but `GET /health`.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.keyring = keyring
    app.state.scrub = path_scrubber(settings)
    metrics = Metrics(lambda: getattr(app.state, "manager", None))
    app.state.metrics = metrics
    cors: dict[str, Any] = {"allow_origins": settings.allowed_origins}
    if not keyring.enabled and not settings.allowed_origins:
        cors = {"allow_origin_regex": LOCAL_ORIGINS}
    app.add_middleware(CORSMiddleware, **cors, allow_methods=["GET", "POST", "DELETE"],
                       allow_headers=["Authorization", "X-API-Key", "Content-Type",
                                      "X-Request-ID"],
                       expose_headers=["X-Request-ID", "Retry-After", "Content-Disposition"])
    upload_limit = settings.max_upload_bytes + 1024 * 1024  # the file plus multipart framing
    # Every body but a video upload: JSON prompts (a base64 mask included) and mask images.
    app.add_middleware(BodyLimit, limit_for=lambda scope: upload_limit if scope["path"] ==
                       "/upload-video" else settings.max_json_bytes)
    app.add_middleware(RequestContext, metrics=metrics)
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    # The web page: plain files, no build step; it uses only the public API (and asks for a
    # key when the server has keys).
    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
    return app


async def _cleanup_loop(manager: Backend, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            expired = await run_in_threadpool(manager.cleanup_expired)
            if expired:
                logger.info("closed idle sessions: %s", ", ".join(expired))
        except Exception:
            logger.exception("session cleanup failed")


class _Server(uvicorn.Server):
    """uvicorn, telling the manager at the first SIGTERM/SIGINT so running work stops at once."""

    def __init__(self, config: uvicorn.Config, on_exit):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)


def main() -> None:
    """``python main.py``; with the uvicorn CLI: ``uvicorn --factory main:create_app``."""
    settings = get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    host = settings.listen_host
    if not settings.auth_enabled and host not in LOOPBACK:
        logger.warning("listening on %s without access keys: anyone who can reach this address "
                       "can read, change and delete every session. Set SAM2_API_KEYS (see the "
                       "README, 'Running it for a team')", host)
    config = uvicorn.Config(app, host=host, port=settings.port, access_log=False,
                            timeout_graceful_shutdown=int(settings.shutdown_timeout_s))

    def stop_work() -> None:
        manager = getattr(app.state, "manager", None)
        if manager is not None:
            manager.begin_shutdown()

    _Server(config, stop_work).run()


if __name__ == "__main__":
    main()
