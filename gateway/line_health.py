"""The centre lines known down, as last read: the call path never waits for it.

:class:`~gateway.centre_health.CentreHealth` keeps each line's breaker in the
database (shared by every instance).  A call must not wait on that read, so the
voice views ask this cache, which answers from memory and refreshes itself in a
background thread when its copy is older than ``max_age_s``.  If the database
does not answer, the last known set stays (an empty set at start: every line is
tried, and the call plan's deadline still bounds the time that costs).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

log = logging.getLogger(__name__)


class LineHealth(Protocol):
    def unreachable(self) -> Iterable[str]: ...


class LineHealthCache:
    def __init__(self, health: LineHealth | None, *, max_age_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._health = health
        self._max_age_s = max_age_s
        self._clock = clock
        self._down: frozenset[str] = frozenset()
        self._read_at: float | None = None
        self._lock = threading.Lock()
        self._refreshing = False
        self._thread: threading.Thread | None = None

    def down(self) -> frozenset[str]:
        """The lines known down, from memory; starts a refresh if the copy is old."""
        now = self._clock()
        with self._lock:
            stale = self._read_at is None or now - self._read_at >= self._max_age_s
            start = stale and not self._refreshing and self._health is not None
            if start:
                self._refreshing = True
        if start:
            self._thread = threading.Thread(target=self._refresh_in_background,
                                            name="line-health", daemon=True)
            self._thread.start()
        return self._down

    def stop(self, timeout: float = 2.0) -> None:
        """Wait for a refresh still reading the database (shutdown: nothing may read
        after the store is closed)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def refresh(self) -> frozenset[str]:
        """Read the lines' state now (start-up, tests); keeps the old set on failure."""
        if self._health is None:
            return self._down
        try:
            down = frozenset(self._health.unreachable())
        except Exception:
            log.exception("centre line health unavailable; keeping the last known state")
            return self._down
        with self._lock:
            self._down, self._read_at = down, self._clock()
        return down

    def _refresh_in_background(self) -> None:
        try:
            self.refresh()
        finally:
            with self._lock:
                self._refreshing = False
                if self._read_at is None:
                    self._read_at = self._clock()  # failed: wait max_age_s before the next try
