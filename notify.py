"""A condition that worker threads signal and that both threads and asyncio tasks can wait on.

Waiting in a thread holds that thread; an HTTP request that waits for a frame being decoded or
a job's next progress event awaits instead, so waiting clients hold no thread of the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class Notifier:
    """``notify()`` from any thread wakes ``wait()`` (threads) and ``wait_async()`` (tasks)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self._async: set[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = set()

    def notify(self) -> None:
        """Call with ``self.cond`` held, after changing the state the waiters look at."""
        self.cond.notify_all()
        for loop, future in list(self._async):
            with contextlib.suppress(RuntimeError):  # that loop has closed
                loop.call_soon_threadsafe(_resolve, future)

    def wait(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    async def wait_async(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Like ``wait``, without holding a thread; returns the predicate's last value."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            with self.cond:
                if predicate():
                    return True
                future = loop.create_future()
                entry = (loop, future)
                self._async.add(entry)
            try:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return False
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(future, remaining)
            finally:
                with self.cond:
                    self._async.discard(entry)
