"""Voice steps are written after the answer: the web thread never waits on a write.

A voice view decides, answers Twilio, and hands a :class:`StepRecord` to the app's
:class:`StepWriter` (``submit`` never blocks and never raises).  One writer thread
writes the records in order, those queued together (up to ``batch_max``) in one
transaction, and for each record:

- the ``call_steps`` row (unique ``call_sid`` + ``step``); if it already exists (a
  Twilio retry, or our own retry of a write whose commit we did not see) nothing else
  is written and nothing is fed: exactly once, by the unique key;
- if it is new: the ``routing_decisions`` row, the line's outcome for the centre
  breaker (:meth:`CentreHealth.record` in the same transaction) and a vehicle command
  (:func:`gateway.commands.enqueue_command`).

Each write has a deadline (:meth:`Store.within`), so a hung database cannot hold the
thread.  A database error is retried (exponential back-off with jitter, capped at
``retry_max_s``) for as long as the writer runs, without reordering; meanwhile
submissions keep queueing up to ``max_queue`` records, then new ones are dropped,
counted and logged.  A record that can never be written (a constraint or data error,
a bug) is logged and dropped so it cannot wedge the queue: a batch that fails so is
written again one record per transaction, which finds it.

Batching is what lets the writer keep up under load: one transaction (one commit, one
deadline hand-off, two INSERT statements) per batch instead of per record.  The thread
lets a batch gather for up to ``linger_s`` (50 ms) after the first record arrives, or
until ``batch_max`` records are queued, unless :meth:`StepWriter.flush` is waiting: a
record is in the database within about that long after its answer, and under load
the writer costs a fraction of what writing each record on its own did.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.exc import DataError, IntegrityError
from tenacity import RetryCallState, Retrying, retry_if_exception, wait_exponential_jitter

from gateway.errors import StoreError
from gateway.store import Store, callbacks, insert_ignore, utcnow, write_steps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepRecord:
    call_sid: str
    step: str
    incident_id: str | None
    twiml: str
    detail: Mapping[str, Any]
    #: the routing_decisions row (target, number, centre_id, reason)
    decision: Mapping[str, Any] | None = None
    #: (line key, ok, reason) for the centre breaker: fed once, only if the step is new
    health: tuple[str, bool, str] | None = None
    #: a vehicle command queued once, only if the step is new:
    #: ``enqueue_command(conn, **command)`` (``now`` is added when missing)
    command: Mapping[str, Any] | None = None
    #: a callback the centre owes the caller (the ``callbacks`` table), once per call
    callback: Mapping[str, Any] | None = None


def transient(exc: BaseException) -> bool:
    """Worth retrying: the database was down, hung or busy (not a rejected row)."""
    return isinstance(exc, StoreError) and not isinstance(exc.__cause__,
                                                          (IntegrityError, DataError))


class StepWriter:
    def __init__(self, store: Store, *, health: Any = None, metrics: Any = None,
                 max_queue: int = 10000, retry_max_s: float = 5.0,
                 write_timeout_s: float = 3.0, autostart: bool = True,
                 batch_max: int = 100, linger_s: float = 0.05) -> None:
        self.store = store
        self.health = health
        self.metrics = metrics
        self.max_queue = max_queue
        self.batch_max = max(1, batch_max)
        #: how long the thread waits for a batch to fill before writing what it has
        self.linger_s = max(0.0, linger_s)
        self._hurry = 0  # flush() calls waiting: write at once
        #: after a batch failed for good, write one record per transaction until this
        #: many records are finished (the bad record is found and dropped on its own)
        self._single_until = 0
        self.retry_max_s = retry_max_s
        self.write_timeout_s = write_timeout_s
        self._wait = wait_exponential_jitter(multiplier=0.05, max=retry_max_s,
                                             jitter=min(0.5, retry_max_s))
        #: start the thread on the first submit (create_app relies on it)
        self.autostart = autostart
        self._cond = threading.Condition()
        self._queue: deque[StepRecord] = deque()
        self._accepted = 0  # records queued since start
        self._finished = 0  # of those, written, found stored, or dropped as unwritable
        self._consumer = threading.Lock()  # one writer at a time keeps the order
        self._stopping = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()

    # -- the producer side ---------------------------------------------------------------

    def submit(self, record: StepRecord) -> None:
        """Queue a record; never blocks, never raises (a full queue drops it)."""
        try:
            with self._cond:
                full = len(self._queue) >= self.max_queue
                if not full:
                    self._queue.append(record)
                    self._accepted += 1
                    if len(self._queue) in (1, self.batch_max):  # wake the writer
                        self._cond.notify_all()
                depth = len(self._queue)
            self._gauge(depth)
            if full:
                self._count("steps_dropped", "queue_full")
                log.error("step queue full (%d records): dropped step %s", depth, record.step)
                return
            if self.autostart and not self._stopped and self._thread is None:
                self.start_thread()
        except Exception:
            log.exception("could not queue step %s", getattr(record, "step", "?"))

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    # -- the thread ----------------------------------------------------------------------

    def start_thread(self) -> None:
        with self._thread_lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping.clear()
            self._stopped = False
            self._thread = threading.Thread(target=self._run, name="step-writer", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (records still queued stay queued: ``flush`` first)."""
        with self._thread_lock:
            self._stopped = True
            self._stopping.set()
            with self._cond:
                self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.error("step writer did not stop within %.1f s", timeout)
        left = self.depth
        if left:
            log.error("step writer stopped with %d records not written", left)

    def _running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._stopping.is_set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            with self._cond:
                while not self._queue and not self._stopping.is_set():
                    self._cond.wait()
                # let a batch gather: one transaction for many records, not one each
                until = time.monotonic() + self.linger_s
                while (len(self._queue) < self.batch_max and not self._hurry
                       and not self._stopping.is_set()):
                    remaining = until - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            if self._stopping.is_set():
                return
            try:
                self._write_head(deadline=None)
            except Exception:  # never let the thread die (nor spin)
                log.exception("step writer failed; going on")
                self._stopping.wait(1.0)

    # -- writing -----------------------------------------------------------------------

    def flush(self, timeout: float = 5.0) -> bool:
        """True once everything submitted so far is processed (written, found already
        stored, or dropped as unwritable).  Without a running thread the records are
        written here, retrying until ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._accepted
        if self._running():
            with self._cond:
                self._hurry += 1
                self._cond.notify_all()
                try:
                    while self._finished < target:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            return False
                        self._cond.wait(remaining)
                finally:
                    self._hurry -= 1
            return True
        while self._finished < target and time.monotonic() < deadline:
            if not self._write_head(deadline=deadline):
                break
        return self._finished >= target

    def _write_head(self, *, deadline: float | None) -> bool:
        """Write the oldest records (up to ``batch_max``, in one transaction), retrying
        database errors until ``deadline`` (None: until the writer stops).  False if
        nothing was done: the records stay first."""
        with self._consumer:
            with self._cond:
                if not self._queue:
                    return False
                size = 1 if self._finished < self._single_until else self.batch_max
                batch = list(itertools.islice(self._queue, size))

            def give_up(state: RetryCallState) -> bool:
                return self._stopping.is_set() or (
                    deadline is not None and time.monotonic() >= deadline)

            def sleep(seconds: float) -> None:
                if deadline is not None:
                    seconds = min(seconds, max(0.0, deadline - time.monotonic()))
                self._stopping.wait(seconds)

            retrying = Retrying(
                retry=retry_if_exception(transient),
                wait=self._wait,
                stop=give_up, sleep=sleep, before_sleep=self._retrying, reraise=True)
            try:
                retrying(self.write_batch, batch)
            except Exception as exc:
                if transient(exc):
                    return False  # stopped or out of time: keep them for later
                if len(batch) > 1:  # one of them can never be written: find it alone
                    with self._cond:
                        self._single_until = self._finished + len(batch)
                    return True
                record = batch[0]
                log.exception("step %s of %s can never be written: dropped",
                              record.step, record.call_sid)
                self._count("steps_dropped", "unwritable")
            with self._cond:
                for _ in batch:
                    self._queue.popleft()
                self._finished += len(batch)
                depth = len(self._queue)
                self._cond.notify_all()
            self._gauge(depth)
            return True

    def write_now(self, record: StepRecord) -> bool:
        """Write one record now (one transaction, with a deadline); True if the step
        is new.  Raises StoreError (and whatever a command or health feed raises)."""
        return self.write_batch([record])[0]

    def write_batch(self, records: Sequence[StepRecord]) -> list[bool]:
        """Write records now, in order, in one transaction with a deadline; for each,
        True if its step is new.  All or nothing: raises StoreError (and whatever a
        command or health feed raises)."""
        now = utcnow()
        enqueue: Callable[..., bool] | None = None
        if any(record.command is not None for record in records):
            from gateway.commands import enqueue_command

            enqueue = enqueue_command
        news: list[bool] = self.store.within(
            lambda conn: self._write(conn, records, now, enqueue),
            timeout_s=self.write_timeout_s, background=True)
        for record, new in zip(records, news, strict=True):
            self._count("steps_written" if new else "steps_replayed")
            if new and record.twiml:  # committed: a replay of it needs no database read
                self.store.remember_step(call_sid=record.call_sid, step=record.step,
                                         incident_id=record.incident_id, twiml=record.twiml,
                                         detail=record.detail, created_at=now)
        return news

    def _write(self, conn: Connection, records: Sequence[StepRecord], now: dt.datetime,
               enqueue: Callable[..., bool] | None) -> list[bool]:
        """The steps and their decisions in two statements; then, for each new step,
        its breaker feed, vehicle command and callback."""
        news = write_steps(conn, [{"call_sid": r.call_sid, "step": r.step,
                                   "incident_id": r.incident_id, "twiml": r.twiml,
                                   "detail": r.detail, "decision": r.decision}
                                  for r in records], now=now)
        for record, new in zip(records, news, strict=True):
            if not new:
                continue
            if record.health is not None and self.health is not None and record.health[0]:
                key, ok, reason = record.health
                self.health.record(key, ok=ok, reason=reason, conn=conn)
            if record.command is not None and enqueue is not None:
                enqueue(conn, **{"now": now, **record.command})
            if record.callback is not None:
                insert_ignore(conn, callbacks, {"created_at": now, **record.callback})
        return news

    # -- metrics -------------------------------------------------------------------------

    def _retrying(self, state: RetryCallState) -> None:
        self._count("step_write_retries")
        exc = state.outcome.exception() if state.outcome else None
        if state.attempt_number in (1, 10) or state.attempt_number % 100 == 0:
            log.warning("step write failed (%s); retry %d", exc, state.attempt_number)

    def _count(self, name: str, reason: str | None = None) -> None:
        counter = getattr(self.metrics, name, None)
        if counter is not None:
            (counter.labels(reason) if reason else counter).inc()

    def _gauge(self, depth: int) -> None:
        gauge = getattr(self.metrics, "step_queue_depth", None)
        if gauge is not None:
            gauge.set(depth)
