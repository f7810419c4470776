"""The watchdog on its own: a real socket pair stands for a database connection whose
server stopped answering (a blocked ``recv`` is what a hung PostgreSQL looks like to
psycopg).  Shutting the socket down must wake the reader at the deadline, not before,
and never touch work that finished."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from gateway.db import DeadlineRunner, Job
from gateway.errors import StoreError
from gateway.watchdog import Watchdog


@pytest.fixture
def watchdog() -> Iterator[Watchdog]:
    dog = Watchdog()
    yield dog
    dog.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, server = socket.socketpair()
    yield ours, server
    ours.close()
    server.close()


def blocked_recv(sock: socket.socket) -> tuple[threading.Thread, dict[str, float]]:
    """A thread waiting on ``sock`` the way a query waits on a hung server."""
    woke: dict[str, float] = {}
    started = time.monotonic()

    def read() -> None:
        sock.recv(1)  # b"" once the socket is shut down
        woke["after"] = time.monotonic() - started

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, woke


def test_a_job_past_its_deadline_has_its_socket_shut_down(
        watchdog: Watchdog, pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = pair
    job = Job()
    job.attach(ours.fileno())
    thread, woke = blocked_recv(ours)
    watchdog.watch(job, 0.2)
    thread.join(3)
    assert not thread.is_alive()
    assert 0.18 <= woke["after"] < 0.6
    assert job.abandoned
    job.finish()


def test_work_done_in_time_is_never_cut(
        watchdog: Watchdog, pair: tuple[socket.socket, socket.socket]) -> None:
    ours, server = pair
    job = Job()
    job.attach(ours.fileno())
    key = watchdog.watch(job, 0.1)
    job.finish()
    watchdog.done(key)
    time.sleep(0.3)
    assert not job.abandoned
    server.sendall(b"x")  # the connection still works
    assert ours.recv(1) == b"x"


def test_a_finished_job_the_watchdog_reaches_late_is_left_alone(
        watchdog: Watchdog, pair: tuple[socket.socket, socket.socket]) -> None:
    """finish() before done(): the deadline passes in between, and the socket (back in
    the pool by then) must not be shut down."""
    ours, server = pair
    job = Job()
    job.attach(ours.fileno())
    key = watchdog.watch(job, 0.05)
    job.finish()
    time.sleep(0.3)  # the watchdog abandons it: too late to matter
    watchdog.done(key)
    server.sendall(b"y")
    assert ours.recv(1) == b"y"


def test_a_shorter_deadline_watched_later_is_kept(watchdog: Watchdog) -> None:
    """The thread sleeps until the earliest deadline it knows; a new, earlier one must
    wake it."""
    long_job, short_job = Job(), Job()
    watchdog.watch(long_job, 5.0)
    time.sleep(0.05)  # the thread now waits for the 5 s deadline
    started = time.monotonic()
    watchdog.watch(short_job, 0.1)
    while not short_job.abandoned:
        assert time.monotonic() - started < 1.0, "the shorter deadline was missed"
        time.sleep(0.01)
    assert not long_job.abandoned


def test_an_idle_watchdog_wakes_for_new_work(watchdog: Watchdog) -> None:
    first = Job()
    key = watchdog.watch(first, 0.05)
    time.sleep(0.2)
    assert first.abandoned
    watchdog.done(key)
    time.sleep(0.1)  # nothing watched: the thread waits without a timeout
    second = Job()
    started = time.monotonic()
    watchdog.watch(second, 0.1)
    while not second.abandoned:
        assert time.monotonic() - started < 1.0, "the idle watchdog did not wake"
        time.sleep(0.01)


def test_one_thread_for_all_the_work() -> None:
    dog = Watchdog(name="watchdog-of-test-one-thread")
    try:
        keys = [dog.watch(Job(), 10.0) for _ in range(50)]
        for key in keys:
            dog.done(key)
        named = [t for t in threading.enumerate() if t.name == dog.name]
        assert len(named) == 1
    finally:
        dog.close()


def test_every_job_in_progress_is_watched_and_done_forgets_only_its_own(
        watchdog: Watchdog) -> None:
    """Keys are unique: a job watched later never replaces one in progress, and done()
    of one job leaves the others watched."""
    first, second, third = Job(), Job(), Job()
    keys = [watchdog.watch(job, 0.1) for job in (first, second, third)]
    assert len(set(keys)) == 3
    watchdog.done(keys[0])
    time.sleep(0.4)
    assert not first.abandoned
    assert second.abandoned and third.abandoned


def test_close_ends_the_thread() -> None:
    dog = Watchdog()
    dog.watch(Job(), 10.0)
    thread = dog._thread
    assert thread is not None and thread.is_alive()
    assert thread.daemon  # a watchdog never closed must not keep the process alive
    dog.close()
    thread.join(2)
    assert not thread.is_alive()


# -- the suspect window for work on the caller's thread -------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_inline_work_fails_fast_while_suspect_then_one_probes() -> None:
    clock = Clock()
    runner = DeadlineRunner(suspect_s=2.0, clock=clock)
    assert runner.admit_inline() is False  # healthy: no probe
    runner.ended_inline(False, timed_out=True)
    assert runner.suspect and runner.timeouts == 1
    with pytest.raises(StoreError, match="suspect"):
        runner.admit_inline()
    clock.now += 2.0
    assert runner.admit_inline() is True  # the probe
    with pytest.raises(StoreError, match="suspect"):
        runner.admit_inline()  # only one at a time
    runner.ended_inline(True, timed_out=False)
    assert not runner.suspect
    assert runner.admit_inline() is False


def test_a_probe_that_times_out_opens_a_new_window() -> None:
    clock = Clock()
    runner = DeadlineRunner(suspect_s=2.0, clock=clock)
    runner.ended_inline(False, timed_out=True)
    clock.now += 2.0
    assert runner.admit_inline() is True
    runner.ended_inline(True, timed_out=True)
    clock.now += 1.9
    with pytest.raises(StoreError, match="suspect"):
        runner.admit_inline()
    clock.now += 0.1
    assert runner.admit_inline() is True


def test_work_that_answers_ends_no_one_elses_suspicion() -> None:
    """Only the probe's answer ends a suspect window; other work (admitted before the
    miss) answering late says nothing about the database now."""
    clock = Clock()
    runner = DeadlineRunner(suspect_s=2.0, clock=clock)
    runner.ended_inline(False, timed_out=True)
    runner.ended_inline(False, timed_out=False)
    assert runner.suspect


def test_a_forked_process_gets_a_watchdog_thread_of_its_own(watchdog: Watchdog) -> None:
    """gunicorn forks its workers; a thread started in the parent does not exist in
    the child, so the first watch in the child starts one.  Found by this test: the
    parent's thread may hold the watchdog's lock at the fork, and the child then
    waited on it for ever; the watchdog is reset in the child (os.register_at_fork)."""
    import os
    import warnings

    watchdog.watch(Job(), 10.0)  # the parent's thread is running
    with warnings.catch_warnings():  # 3.12+ warns of fork() with threads running: the
        warnings.simplefilter("ignore", DeprecationWarning)  # child runs only this test
        pid = os.fork()
    if pid == 0:  # the child: exit 0 only if its deadline was kept
        code = 1
        try:
            import signal

            signal.alarm(5)  # a deadlock in the child ends it (and fails the test)
            job = Job()
            watchdog.watch(job, 0.05)
            deadline = time.monotonic() + 2.0
            while not job.abandoned and time.monotonic() < deadline:
                time.sleep(0.01)
            code = 0 if job.abandoned else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
