"""The server's work in one process: a session store and the engine over it.

What ``python main.py``, the CLI and the tests run. ``store.py`` holds the sessions on disk,
``engine.py`` the model and the live sessions; ``errors.py`` the errors both raise.
"""

from __future__ import annotations

from typing import Any

from config import Settings
from engine import Engine
from store import SessionStore


class SAM2Manager(Engine):
    """The engine, with a store of its own over the configured folders."""

    def __init__(self, settings: Settings, predictor: Any = None):
        super().__init__(settings, SessionStore(settings), predictor)
