"""Reads of the embedded SQLite file on the request thread, with a deadline of their own.

Every other statement goes through SQLAlchemy and, on the call path, a deadline thread
(:meth:`gateway.store.Store.within`).  The voice webhook's one read is different
because of how CPython 3.11's ``sqlite3`` module meets a loaded server: it releases the
GIL around every call into SQLite, including one per column of every row fetched
(``sqlite3_column_type``).  Under load each release hands the interpreter to another
thread (a serving thread, the I/O loop) and back, and on this 2-core VM a context
switch costs as much as several microseconds of Python.  Measured with
``bench/bench_incoming.py`` (fresh calls, 8 serving threads): the voice read, a 9 µs
statement on one thread, cost about 400 µs of CPU per request under load as a
30-column row handed to a deadline thread, and a few dozen GIL releases per request.

So this read:

- runs on the request thread (no hand-off to a deadline thread and back);
- asks for few columns (the caller packs a row into one JSON text with SQLite's
  ``json_object``);
- uses connections of its own, one per thread, ``query_only``;
- has a deadline: the connection's busy timeout is the read's deadline (a write lock
  held by someone else, or a WAL recovery, is waited for at most that long), and a
  progress handler aborts a statement still running past it (checked every
  ``progress_ops`` SQLite VM instructions: the voice read takes a few hundred, so the
  handler, which needs the GIL, is not called at all on a normal read).

What the deadline does not cover: a file system that stops answering inside a
``read()`` (a local disk that hangs).  The webhook then waits; Twilio calls the
Fallback URL after its 15 s, and that URL never touches the database
(:func:`gateway.views.voice.fallback`).  PostgreSQL, whose common outage is a server
that accepts TCP and never answers, keeps the deadline threads.
"""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gateway.errors import StoreError


class SqliteReads:
    """Read-only statements on a SQLite file, each on the calling thread, each under a
    deadline; every failure is :class:`~gateway.errors.StoreError`."""

    def __init__(self, path: str, *, progress_ops: int = 20000) -> None:
        self.path = path
        self.progress_ops = max(1, progress_ops)
        #: called with each statement a connection opened from now on runs (tests)
        self.trace: Callable[[str], None] | None = None
        self._local = threading.local()
        self._lock = threading.Lock()
        #: bumped by close(): a thread's connection of an older generation is reopened
        self._generation = itertools.count(1)
        self._current = next(self._generation)

    def fetch(self, sql: str, params: Sequence[Any] | Mapping[str, Any], *,
              timeout_s: float) -> list[Any]:
        """All rows of ``sql`` within ``timeout_s``.  Positional parameters are cheaper
        under load: for named ones the sqlite3 module looks each name up with the GIL
        released."""
        local = self._local
        local.deadline = time.monotonic() + timeout_s
        try:
            conn = self._connection(timeout_s)
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if str(exc) == "interrupted":
                raise StoreError(f"database did not answer within {timeout_s:.2f} s") from exc
            raise StoreError(f"database error: OperationalError ({exc})") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"database error: {type(exc).__name__}") from exc

    def _connection(self, timeout_s: float) -> sqlite3.Connection:
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is not None and local.generation != self._current:
            with contextlib.suppress(sqlite3.Error):
                conn.close()  # closed since: each thread closes its own
            conn = local.conn = None
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None,
                                   check_same_thread=False)
            try:
                conn.execute("PRAGMA query_only = 1")
                conn.set_progress_handler(self._past_deadline, self.progress_ops)
                if self.trace is not None:
                    conn.set_trace_callback(self.trace)
            except sqlite3.Error:
                conn.close()
                raise
            local.conn, local.generation, local.busy_ms = conn, self._current, None
        busy_ms = max(1, int(timeout_s * 1000))
        if local.busy_ms != busy_ms:  # the lock wait is the read's deadline
            conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
            local.busy_ms = busy_ms
        return conn

    def _past_deadline(self) -> int:
        """SQLite's progress handler: non-zero aborts the statement ("interrupted")."""
        return int(time.monotonic() > self._local.deadline)

    def close(self) -> None:
        """Close this thread's connection now; every other thread closes its own at its
        next read, which opens a new one (never one thread closing a connection another
        may be using)."""
        with self._lock:
            self._current = next(self._generation)
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
