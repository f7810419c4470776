"""The voice read on PostgreSQL on the request thread, with a hard deadline of its own.

Every other statement goes through SQLAlchemy and, on the call path, a deadline thread
(:meth:`gateway.store.Store.within`), because a server that accepts TCP and never
answers defeats libpq's timeouts.  The hand-off to that thread and back, SQLAlchemy's
execution and the 30-odd GIL releases of a read cost a fresh call about 2.5x the CPU of
a minimal signed TwiML handler under load (bench/bench_incoming.py).  This read keeps
the deadline hard without the hand-off:

- it speaks libpq's asynchronous protocol through psycopg's documented ``pq`` layer
  (``send_query_prepared``, ``flush``, ``consume_input``, ``is_busy``, ``get_result``)
  and waits on the socket with ``select`` until the deadline, never longer: a server
  that hangs costs the read its deadline, and the connection is dropped;
- each serving thread keeps one connection, and a connection is only ever *opened* off
  the request thread (by a small opener thread: libpq's connect timeout is 2 s at
  least): a thread without one answers :class:`NotReady`, and the caller reads through
  the deadline thread as before while the opener prepares one;
- the statement is prepared once per connection (the server skips parsing and planning)
  and returns one text column (the caller packs its row as JSON).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from gateway.errors import StoreError

log = logging.getLogger(__name__)


#: libpq's PGRES_COMMAND_OK and PGRES_TUPLES_OK (ExecStatusType; psycopg.pq.ExecStatus
#: has the same values, but this module does not import psycopg: an optional dependency,
#: reached through the connections SQLAlchemy opens)
_OK = (1, 2)


class NotReady(Exception):
    """This thread has no open connection yet: read another way this time."""


class ReadTimeout(StoreError):
    """The read missed its deadline (its connection was dropped)."""


class _Timeout(Exception):
    pass


class _Owned:
    """A thread's connection and the statements prepared on it, kept in that thread's
    locals: when the thread ends (its locals go) the connection is finished, by
    whichever thread collects them; no other thread can be using it then."""

    __slots__ = ("conn", "prepared")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.prepared: set[str] = set()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.pgconn.finish()


class PgReads:
    """One-text-column reads on PostgreSQL, each on the calling thread under a deadline;
    every failure is :class:`~gateway.errors.StoreError` (or :class:`NotReady`)."""

    def __init__(self, connect: Callable[[], Any], *, spare: int = 4) -> None:
        #: opens one autocommit psycopg connection (blocking: only the opener calls it)
        self.connect = connect
        self.spare = max(1, spare)
        self._local = threading.local()
        self._ready: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._wanted = threading.Event()
        self._closed = False
        self._opener: threading.Thread | None = None
        self.failures = 0  # connections the opener could not open (for tests and logs)

    # -- reading ---------------------------------------------------------------------------

    def fetch_text(self, name: str, sql: str, params: Sequence[str | None], *,
                   timeout_s: float) -> list[str | None]:
        """The first column of each row of the prepared statement ``name`` (``sql``,
        ``$n`` placeholders, text parameters), within ``timeout_s``."""
        if any(p is not None and "\x00" in p for p in params):
            # libpq reads a text parameter up to its first NUL: "CA\x00x" would be read
            # as "CA" (PostgreSQL text holds no NUL; psycopg refuses it the same way)
            raise StoreError("database error: a parameter holds a NUL character")
        deadline = time.monotonic() + timeout_s
        conn = self._connection()
        pg = conn.pgconn
        try:
            prepared = self._local.owned.prepared
            if name not in prepared:
                pg.send_prepare(name.encode(), sql.encode())
                self._results(pg, deadline)
                prepared.add(name)
            pg.send_query_prepared(name.encode(), [None if p is None else p.encode()
                                                   for p in params])
            result = self._results(pg, deadline)
        except _Timeout:
            self._drop(conn)
            raise ReadTimeout(f"database did not answer within {timeout_s:.2f} s") from None
        except StoreError:
            self._drop(conn)
            raise
        except Exception as exc:  # a broken connection, a libpq error: drop it
            self._drop(conn)
            raise StoreError(f"database error: {type(exc).__name__}") from exc
        return [None if result.get_value(row, 0) is None
                else bytes(result.get_value(row, 0)).decode() for row in range(result.ntuples)]

    def _results(self, pg: Any, deadline: float) -> Any:
        """Send what is queued, then read every result of one command; the last."""
        while pg.flush():  # 1: more to send (the socket buffer was full)
            self._wait(pg.socket, deadline, write=True)
        last = None
        while True:
            while pg.is_busy():
                self._wait(pg.socket, deadline)
                pg.consume_input()
            result = pg.get_result()
            if result is None:
                break
            if result.status not in _OK:
                message = (result.error_message or b"").decode(errors="replace").strip()
                raise StoreError(f"database error: {message[:200]}")
            last = result
        if last is None:
            raise StoreError("database error: no result")
        return last

    @staticmethod
    def _wait(fd: int, deadline: float, *, write: bool = False) -> None:
        """Until ``fd`` is readable (writable), at most until ``deadline`` (poll, not
        select: a busy server's descriptors pass select's limit of 1024)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Timeout
        poller = select.poll()
        poller.register(fd, select.POLLOUT if write else select.POLLIN)
        if not poller.poll(max(1, int(remaining * 1000 + 0.999))):
            raise _Timeout

    # -- connections -----------------------------------------------------------------------

    def _connection(self) -> Any:
        local = self._local
        owned = getattr(local, "owned", None)
        if owned is not None and not owned.conn.closed:
            if not self._closed:
                return owned.conn
            self._drop(owned.conn)  # closed since: each thread finishes its own connection
        if self._closed:
            raise NotReady
        try:
            conn = self._ready.get_nowait()
        except queue.Empty:
            self._want()
            raise NotReady from None
        local.owned = _Owned(conn)
        self._want()  # keep a spare ready for the next thread
        return conn

    def _drop(self, conn: Any) -> None:
        """Finish ``conn`` (this thread's): no round trip, the server may hang."""
        self._local.owned = None
        with contextlib.suppress(Exception):
            conn.pgconn.finish()
        self._want()

    def _want(self) -> None:
        if self._closed:
            return
        self._wanted.set()
        if self._opener is None:
            with self._lock:
                if self._opener is None and not self._closed:
                    self._opener = threading.Thread(target=self._open_spares,
                                                    name="db-voice-opener", daemon=True)
                    self._opener.start()

    def _open_spares(self) -> None:
        while not self._closed:
            self._wanted.wait()
            self._wanted.clear()
            while not self._closed and self._ready.qsize() < self.spare:
                try:
                    conn = self.connect()
                except Exception as exc:  # noqa: BLE001 -- reads go the other way meanwhile
                    self.failures += 1
                    log.warning("voice-read connection not opened: %s", type(exc).__name__)
                    time.sleep(1.0)  # the database is down: do not spin
                    break
                self._ready.put(conn)
        self._finish_spares()

    def _finish_spares(self) -> None:
        while True:
            try:
                conn = self._ready.get_nowait()
            except queue.Empty:
                return
            with contextlib.suppress(Exception):
                conn.pgconn.finish()

    def close(self) -> None:
        """Stop opening connections and finish the idle ones and this thread's; every
        other thread finishes its own at its next read (never one thread finishing a
        connection another may be using: libpq frees it)."""
        self._closed = True
        self._wanted.set()
        self._finish_spares()
        owned = getattr(self._local, "owned", None)
        if owned is not None:
            self._drop(owned.conn)
