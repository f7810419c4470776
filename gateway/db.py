"""Database plumbing: the engine, and blocking work with a deadline the caller can rely on.

A database that accepts TCP and never answers (a hung server, a proxy that ACKs
bytes and forwards nothing) defeats every client-side timeout: ``connect_timeout``
only covers the handshake, ``statement_timeout`` runs on the server that never sees
the query, TCP keepalives and ``tcp_user_timeout`` only fire when the peer stops
ACKing.  So the work runs on a small set of dedicated daemon threads and the caller
waits at most its deadline:

- the caller gets :class:`~gateway.errors.StoreError` at the deadline and moves on;
- the stuck connection's socket is shut down (the job registered it with
  :meth:`Job.attach`), which wakes the worker thread with a connection error, so the
  slot comes back at once instead of when TCP gives up;
- at most ``workers`` jobs run or wait at a time: when every slot is taken the call
  fails at once, nothing queues behind a hung database;
- after a timeout the database is *suspect* for ``suspect_s``: calls fail fast, then a
  single call is let through to probe; its completion (any answer) ends the suspicion,
  its timeout starts a new window.  A hung database costs one deadline per window.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from gateway.errors import StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")


class Job:
    """What the caller may do to a job it stopped waiting for."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._finished = False
        self.abandoned = False

    def attach(self, fd: int | None) -> None:
        """Register the connection's socket (None: nothing to shut down, e.g. SQLite).

        Raises StoreError if the caller already gave up: stale work is not started."""
        with self._lock:
            if self.abandoned:
                raise StoreError("the caller stopped waiting before the work started")
            if fd is not None and self._sock is None:
                # our own descriptor: shutting it down later can never hit a reused number
                self._sock = socket.socket(fileno=os.dup(fd))

    def abandon(self) -> None:
        """The deadline passed: shut the socket down so the worker thread wakes up."""
        with self._lock:
            self.abandoned = True
            if self._sock is not None and not self._finished:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def finish(self) -> None:
        with self._lock:
            self._finished = True
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class _Call:
    """One job handed to a worker: ``done`` is released when its outcome is set (a bare
    lock is the cheapest hand-off back to the waiting thread)."""

    __slots__ = ("done", "error", "fn", "job", "result")

    def __init__(self, fn: Callable[[Job], Any]) -> None:
        self.fn = fn
        self.job = Job()
        self.done = threading.Lock()
        self.done.acquire()
        self.result: Any = None
        self.error: BaseException | None = None


class DeadlineRunner:
    def __init__(self, *, workers: int = 8, suspect_s: float = 2.0, idle_s: float = 30.0,
                 name: str = "db-deadline", clock: Callable[[], float] = time.monotonic) -> None:
        self.workers = workers
        self.suspect_s = suspect_s
        self.idle_s = idle_s
        self.name = name
        self.clock = clock
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._busy = 0  # jobs admitted and not finished (running, or about to)
        self._alive = 0  # worker threads; invariant: _alive >= _busy
        self._suspect_until: float | None = None
        self._probing = False
        self.timeouts = 0  # deadlines missed since start (for tests and logs)

    @property
    def busy(self) -> int:
        with self._lock:
            return self._busy

    @property
    def suspect(self) -> bool:
        """A deadline was missed lately: calls fail fast (or one probes)."""
        with self._lock:
            return self._suspect_until is not None

    def missed(self) -> None:
        """A deadline was missed by work done elsewhere (a read on the request thread,
        gateway.store.pg_reads): fail fast for ``suspect_s``, then probe, as after our own."""
        self._timed_out(probe=False)

    def run(self, fn: Callable[[Job], T], *, timeout_s: float) -> T:
        """``fn(job)`` on a worker thread; its result, its exception, or StoreError."""
        deadline = time.monotonic() + timeout_s
        probe = self._admit()
        call = _Call(fn)
        self._queue.put(call)
        try:
            finished = call.done.acquire(timeout=max(0.0, deadline - time.monotonic()))
        except BaseException:  # interrupted while waiting: the database did not fail
            self._answered(probe)
            raise
        if not finished:
            call.job.abandon()
            self._timed_out(probe)
            raise StoreError(f"database did not answer within {timeout_s:.2f} s") from None
        self._answered(probe)
        if call.error is not None:
            raise call.error
        result: T = call.result
        return result

    def admit_inline(self) -> bool:
        """Admission for work on the caller's own thread (gateway.watchdog): no slot,
        the same suspect window.  Raises StoreError while failing fast; True if this
        call is the probe (report its end with :meth:`ended_inline`)."""
        with self._lock:
            return self._probe_or_fail_fast()

    def ended_inline(self, probe: bool, *, timed_out: bool) -> None:
        if timed_out:
            self._timed_out(probe)
        else:
            self._answered(probe)

    # -- admission and the suspect window ----------------------------------------------

    def _probe_or_fail_fast(self) -> bool:
        """Under the lock: False while the database is trusted; raises StoreError while
        it is suspect (in its window, or another call probes); else this call becomes
        the probe (True)."""
        if self._suspect_until is None:
            return False
        if self.clock() < self._suspect_until or self._probing:
            raise StoreError("database suspect after a missed deadline: failing fast")
        self._probing = True
        return True

    def _admit(self) -> bool:
        """Take a slot (True if this call is the probe of a suspect database)."""
        spawn = False
        with self._lock:
            probe = self._probe_or_fail_fast()
            if self._busy >= self.workers:
                if probe:
                    self._probing = False
                raise StoreError(f"all {self.workers} database slots are busy: failing fast")
            self._busy += 1
            if self._alive < self._busy:
                self._alive += 1
                spawn = True
        if spawn:
            try:
                threading.Thread(target=self._worker, name=self.name, daemon=True).start()
            except RuntimeError:
                with self._lock:
                    self._alive -= 1
                    self._busy -= 1
                    self._probing = self._probing and not probe
                raise StoreError("could not start a database worker thread") from None
        return probe

    def _timed_out(self, probe: bool) -> None:
        with self._lock:
            self.timeouts += 1
            self._suspect_until = self.clock() + self.suspect_s
            if probe:
                self._probing = False
        log.error("database missed its deadline; failing fast for %.1f s", self.suspect_s)

    def _answered(self, probe: bool) -> None:
        if not probe:
            return
        with self._lock:
            self._probing = False
            self._suspect_until = None
        log.warning("database answered again")

    # -- workers -----------------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            try:
                call = self._queue.get(timeout=self.idle_s)
            except queue.Empty:
                with self._lock:
                    if self._alive > self._busy:  # a spare thread: leave
                        self._alive -= 1
                        return
                continue
            try:
                try:
                    call.result = call.fn(call.job)
                except BaseException as exc:  # noqa: BLE001 -- handed to the caller
                    call.error = exc
                finally:
                    call.done.release()
            finally:
                call.job.finish()
                with self._lock:
                    self._busy -= 1


def socket_of(conn: Connection) -> int | None:
    """The DBAPI connection's socket (psycopg has one; SQLite has none)."""
    try:
        fileno = getattr(conn.connection.dbapi_connection, "fileno", None)
        return int(fileno()) if callable(fileno) else None
    except Exception:  # noqa: BLE001 -- no socket to shut down: the deadline still holds
        return None


#: libpq settings: connect_timeout covers the handshake (2 s is libpq's minimum),
#: keepalives and tcp_user_timeout notice a peer that stopped ACKing, and
#: statement_timeout a server that is alive but slow.  A server (or proxy) that ACKs
#: and never answers is what Store.within is for.
PG_CONNECT_ARGS: dict[str, Any] = {
    "connect_timeout": 2,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 5000,
    "options": "-c statement_timeout=2000",
}
PG_SCHEMES = ("postgres://", "postgresql://", "postgresql+psycopg://")


def make_engine(url: str) -> Engine:
    """An engine with short timeouts and no pre-ping: a webhook must never hang on the
    database (a ping to a hung server blocks like any query)."""
    if url.startswith("sqlite"):
        memory = url in ("sqlite://", "sqlite:///:memory:")
        engine = sa.create_engine(
            url, connect_args={"timeout": 2.0, **({"check_same_thread": False} if memory else {})},
            # in memory: one shared connection (within() runs on other threads than the
            # caller); a file: connections kept open for the deadline threads, the step
            # writer and the serving threads at once (past pool_size a returned
            # connection is closed, and the next one opens the file and runs the
            # pragmas again: seen under load at SQLAlchemy's default of 5)
            **({"poolclass": sa.pool.StaticPool} if memory
               else {"pool_size": 16, "max_overflow": 8, "pool_timeout": 2.0}))

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA busy_timeout=2000")
            cursor.close()

        return engine
    if url.startswith(PG_SCHEMES):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
        given = sa.engine.make_url(url).query  # settings in the URL win
        return sa.create_engine(
            url,
            pool_pre_ping=False,
            pool_recycle=300,
            # kept open: the default 8 serving threads at once, and a few more; past
            # pool_size a connection is closed when it is returned, so a smaller pool
            # under load opens a new server backend every few dozen requests (84
            # connections in 5 s of event ingest at pool_size 5, 9 at 10)
            pool_size=10,
            max_overflow=5,
            pool_timeout=0.3,
            connect_args={k: v for k, v in PG_CONNECT_ARGS.items() if k not in given},
        )
    return sa.create_engine(url, pool_recycle=300)
