"""Work run a moment later on one thread, or at once when someone needs its result.

A click's mask file is written this way: the click answers with the mask at once, the file is
written when the page asks for it (which expedites it) or shortly after, so a burst of clicks
does not share its CPU with file encoding on a small machine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

logger = logging.getLogger(__name__)


class DeferredFuture(Future):
    """A Future whose work has not started yet: ``expedite()`` runs it as soon as possible."""

    def __init__(self, runner: DeferredRunner, fn: Callable[[], object]):
        super().__init__()
        self._runner = runner
        self._fn = fn

    def expedite(self) -> None:
        self._runner._expedite(self)


class DeferredRunner:
    """One thread running submitted work ``delay`` seconds after submission, in order."""

    def __init__(self, delay: float, name: str = "deferred"):
        self.delay = delay
        self._cond = threading.Condition()
        self._queue: list[tuple[float, DeferredFuture]] = []  # due in submission order
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], object]) -> DeferredFuture:
        future = DeferredFuture(self, fn)
        with self._cond:
            if self._closed:
                raise RuntimeError("the runner is shut down")
            self._queue.append((time.monotonic() + self.delay, future))
            self._cond.notify_all()
        return future

    def _expedite(self, future: DeferredFuture) -> None:
        with self._cond:
            # Everything submitted before it runs first: writes of a frame stay in order.
            for i, (_, queued) in enumerate(self._queue):
                self._queue[i] = (0.0, queued)
                if queued is future:
                    break
            self._cond.notify_all()

    def shutdown(self) -> None:
        """Run what is queued now, then stop."""
        with self._cond:
            self._closed = True
            self._queue = [(0.0, f) for _, f in self._queue]
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._queue and self._queue[0][0] <= time.monotonic():
                        _, future = self._queue.pop(0)
                        break
                    if self._closed and not self._queue:
                        return
                    wait = self._queue[0][0] - time.monotonic() if self._queue else None
                    self._cond.wait(wait)
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(future._fn())
            except BaseException as exc:  # the reader of the result gets it
                future.set_exception(exc)
