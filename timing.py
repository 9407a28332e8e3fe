"""CPU time per stage of the host work around the model (frame loading, label maps, mask files,
overlays, manifest, tracking-state spills): what decides throughput once the model is fast."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class StageClock:
    """Thread CPU seconds and call counts per stage, summed over every thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds: dict[str, float] = {}
        self._calls: dict[str, int] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.thread_time()  # this thread's CPU time: waiting and other threads not counted
        try:
            yield
        finally:
            spent = time.thread_time() - t0
            with self._lock:
                self._seconds[stage] = self._seconds.get(stage, 0.0) + spent
                self._calls[stage] = self._calls.get(stage, 0) + 1

    def snapshot(self) -> dict[str, tuple[float, int]]:
        """stage -> (CPU seconds, calls) so far."""
        with self._lock:
            return {k: (self._seconds[k], self._calls[k]) for k in sorted(self._seconds)}

    def reset(self) -> None:
        with self._lock:
            self._seconds.clear()
            self._calls.clear()


#: One clock for the process (exported as ``sam2_host_cpu_seconds_total{stage}``).
STAGES = StageClock()
