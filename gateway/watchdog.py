"""A hard deadline for database work on the caller's own thread.

:meth:`gateway.store.Store.within` hands work to a deadline thread; most transactions
(an event's INSERT, the IVR's PIN check, the agent API's reads, the background
workers) run on the thread that asked, through :meth:`Store.begin`.  A PostgreSQL
server, or a proxy, that accepts TCP and never answers held those threads for ever:
libpq's timeouts do not cover it (gateway.db says why), and once every serving thread
waited, an emergency call was not answered either.  Found by trying, and now a test.

So such work is *watched*: one daemon thread per store holds the deadlines of the work
in progress and, at a deadline, shuts down that connection's socket
(:meth:`gateway.db.Job.abandon`).  The waiting call then fails with a connection error
at once; it is reported as :class:`DeadlineMissed` and the connection is invalidated,
never handed out again.  The same suspect window as the deadline threads applies: after
a miss, work fails fast for ``suspect_s``, then one call probes.

What it costs the caller: a lock, a dict entry and a duplicated descriptor per
transaction; the watchdog thread wakes only at the earliest deadline of the work in
progress.  SQLite has no socket to cut: its lock waits end at the busy timeout (2 s).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from gateway.db import DeadlineRunner, Job, socket_of
from gateway.errors import StoreError

#: a transaction on the caller's thread: the server's own statement_timeout (2 s)
TRANSACTION_TIMEOUT_S = 2.0

_thread_kind = threading.local()


def background_thread(target: Callable[[], None]) -> Callable[[], None]:
    """``target`` as the body of a background thread (the outbox worker, the notifier,
    the command queue): a deadline its transactions miss makes the store's background
    slots suspect, never the request threads' (a slow pass of a worker must not make
    calls fail fast; a database that really hangs, a request finds out for itself)."""

    def run() -> None:
        _mark_background()
        target()

    return run


def _mark_background() -> None:
    _thread_kind.background = True


def on_background_thread() -> bool:
    return bool(getattr(_thread_kind, "background", False))


def pool_like_this_thread(max_workers: int, *, thread_name_prefix: str) -> ThreadPoolExecutor:
    """A thread pool whose threads are background threads if this one is (a worker's
    pass sends in parallel: those sends are the worker's background work too)."""
    return ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=thread_name_prefix,
                              initializer=_mark_background if on_background_thread() else None)


class DeadlineMissed(StoreError):
    """The work did not finish by its deadline; its connection was cut."""


class Watchdog:
    """Cuts the connections of work still running past its deadline."""

    def __init__(self, *, name: str = "db-watchdog") -> None:
        self.name = name
        self._next_key = 0
        self._closed = False
        self._reset()
        _alive.add(self)

    def _reset(self) -> None:
        """A new lock, no work, no thread: at creation, and in a forked child (where
        the parent's thread is gone and its lock may have been held at the fork)."""
        self._cond = threading.Condition(threading.Lock())
        self._jobs: dict[int, tuple[float, Job]] = {}
        self._wake_at: float | None = None  # when the thread will look next (None: idle)
        self._thread: threading.Thread | None = None

    def watch(self, job: Job, timeout_s: float) -> int:
        """Watch ``job`` until :meth:`done`; its key."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            key = self._next_key
            self._next_key += 1
            self._jobs[key] = (deadline, job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name,
                                                daemon=True)
                self._thread.start()
            elif self._wake_at is None or deadline < self._wake_at:
                self._cond.notify()
        return key

    def done(self, key: int) -> None:
        with self._cond:
            self._jobs.pop(key, None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                late = [key for key, (deadline, _) in self._jobs.items() if deadline <= now]
                jobs = [self._jobs.pop(key)[1] for key in late]
                self._wake_at = min((d for d, _ in self._jobs.values()), default=None)
                if not jobs:
                    self._cond.wait(None if self._wake_at is None else self._wake_at - now)
                    continue
            for job in jobs:  # outside the lock: a shutdown() may take a moment
                job.abandon()


#: every watchdog of this process, reset in a forked child (gunicorn forks its workers)
_alive: weakref.WeakSet[Watchdog] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for watchdog in list(_alive):
        watchdog._reset()


os.register_at_fork(after_in_child=_reset_after_fork)


@contextmanager
def connection_within(engine: Engine, *, timeout_s: float, runner: DeadlineRunner,
                      watchdog: Watchdog) -> Iterator[Connection]:
    """A connection from ``engine`` for work on this thread that must end by
    ``timeout_s``.  Raises :class:`DeadlineMissed` if it did not, StoreError at once
    while the database is suspect; any other error as it came."""
    probe = runner.admit_inline()
    job = Job()
    key = watchdog.watch(job, timeout_s)
    timed_out = False
    try:
        with engine.connect() as conn:
            try:
                job.attach(socket_of(conn))
                yield conn
            finally:
                job.finish()  # before the connection goes back to the pool
                if job.abandoned:
                    conn.invalidate()  # its socket is shut down: never reuse it
    except (SQLAlchemyError, StoreError) as exc:
        if job.abandoned and not isinstance(exc, DeadlineMissed):
            timed_out = True
            raise DeadlineMissed(f"database did not answer within {timeout_s:.2f} s") from exc
        raise
    finally:
        watchdog.done(key)
        runner.ended_inline(probe, timed_out=timed_out)
