"""The centre lines known down, from memory: LineHealthCache never makes a call wait.

The health behind it is a fake of its port (``unreachable()``): it counts reads, can
fail, and can hold a read until the test lets it go."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest

from gateway.line_health import LineHealthCache
from tests.conftest import Clock


class FakeLineHealth:
    def __init__(self, down: set[str] | None = None) -> None:
        self.down = set(down or ())
        self.error: Exception | None = None
        self.reads = 0
        self.threads: list[threading.Thread] = []
        self.hold: threading.Event | None = None  # set: reads wait until it is set
        self.started = threading.Event()

    def unreachable(self) -> set[str]:
        self.reads += 1
        self.threads.append(threading.current_thread())
        self.started.set()
        if self.hold is not None:
            assert self.hold.wait(10)
        if self.error is not None:
            raise self.error
        return set(self.down)

    def finish(self) -> None:
        """Wait for every background read so far to end."""
        for thread in self.threads:
            if thread is not threading.current_thread():
                thread.join(10)
                assert not thread.is_alive()


@pytest.fixture
def clock() -> Clock:
    return Clock(1000.0)


@pytest.fixture
def health() -> Iterator[FakeLineHealth]:
    fake = FakeLineHealth({"eu-primary"})
    yield fake
    if fake.hold is not None:
        fake.hold.set()
    fake.finish()


def test_the_first_ask_answers_nothing_known_down_and_reads_in_the_background(
    health: FakeLineHealth, clock: Clock
) -> None:
    cache = LineHealthCache(health, max_age_s=2.0, clock=clock)
    health.hold = threading.Event()
    assert cache.down() == frozenset()  # at once, from memory: the read is still held
    assert health.started.wait(5)
    [reader] = health.threads
    assert reader is not threading.current_thread()
    assert reader.name == "line-health" and reader.daemon  # a hung read never holds exit
    health.hold.set()
    health.finish()
    assert cache.down() == frozenset({"eu-primary"})
    assert isinstance(cache.down(), frozenset)


def test_one_read_at_a_time(health: FakeLineHealth, clock: Clock) -> None:
    cache = LineHealthCache(health, max_age_s=2.0, clock=clock)
    health.hold = threading.Event()
    cache.down()
    assert health.started.wait(5)
    for _ in range(5):
        clock.advance(3)
        assert cache.down() == frozenset()
    health.hold.set()
    health.finish()
    assert health.reads == 1


def test_a_fresh_copy_is_not_read_again_until_max_age(health: FakeLineHealth,
                                                      clock: Clock) -> None:
    cache = LineHealthCache(health, max_age_s=2.0, clock=clock)
    assert cache.refresh() == frozenset({"eu-primary"})
    assert health.reads == 1
    health.down = {"eu-backup"}
    clock.advance(1.75)
    assert cache.down() == frozenset({"eu-primary"})
    health.finish()
    assert health.reads == 1  # still fresh: no read
    clock.advance(0.25)  # exactly max_age old: stale
    health.hold = threading.Event()
    assert cache.down() == frozenset({"eu-primary"})  # the old copy, while it reads
    health.hold.set()
    health.finish()
    assert health.reads == 2
    assert cache.down() == frozenset({"eu-backup"})
    health.finish()
    assert health.reads == 2


def test_the_age_counts_from_the_last_read(health: FakeLineHealth, clock: Clock) -> None:
    cache = LineHealthCache(health, max_age_s=2.0, clock=clock)
    clock.advance(5)
    cache.refresh()
    clock.advance(1.5)  # 1.5 s after the read, 6.5 s after the start
    cache.down()
    health.finish()
    assert health.reads == 1


def test_a_failed_read_keeps_the_last_known_set_and_says_so(
    health: FakeLineHealth, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    cache = LineHealthCache(health, max_age_s=2.0, clock=clock)
    assert cache.refresh() == frozenset({"eu-primary"})
    health.error = RuntimeError("database gone")
    health.down = set()
    with caplog.at_level(logging.ERROR, logger="gateway.line_health"):
        assert cache.refresh() == frozenset({"eu-primary"})
    [record] = caplog.records
    assert record.getMessage() == (
        "centre line health unavailable; keeping the last known state")
    assert record.exc_info is not None
    clock.advance(2)
    assert cache.down() == frozenset({"eu-primary"})
    health.finish()
    assert cache.down() == frozenset({"eu-primary"})


def test_a_failed_first_read_waits_max_age_before_the_next(health: FakeLineHealth,
                                                          clock: Clock) -> None:
    health.error = RuntimeError("database gone")
    cache = LineHealthCache(health, max_age_s=2.0, clock=clock)
    assert cache.down() == frozenset()
    health.finish()
    assert health.reads == 1
    clock.advance(1.75)
    assert cache.down() == frozenset()
    health.finish()
    assert health.reads == 1  # no read after each failure: one per max_age
    clock.advance(0.25)
    health.error = None
    cache.down()
    health.finish()
    assert health.reads == 2
    assert cache.down() == frozenset({"eu-primary"})


def test_without_health_nothing_is_read_and_nothing_is_down(clock: Clock) -> None:
    cache = LineHealthCache(None, max_age_s=2.0, clock=clock)
    before = threading.active_count()
    assert cache.down() == frozenset()
    assert cache.refresh() == frozenset()
    assert threading.active_count() == before


def test_the_default_max_age_is_two_seconds(health: FakeLineHealth, clock: Clock) -> None:
    cache = LineHealthCache(health, clock=clock)
    cache.refresh()
    clock.advance(1.75)
    cache.down()
    health.finish()
    assert health.reads == 1
    clock.advance(0.25)
    cache.down()
    health.finish()
    assert health.reads == 2


def test_stop_waits_for_a_refresh_still_reading() -> None:
    """Shutdown: no refresh may read the database after the store is closed."""
    import threading
    import time

    from gateway.line_health import LineHealthCache

    reading = threading.Event()

    class SlowHealth:
        def unreachable(self) -> list[str]:
            reading.set()
            time.sleep(0.3)
            return ["eu-primary"]

    cache = LineHealthCache(SlowHealth())
    cache.down()  # starts the refresh in the background
    assert reading.wait(timeout=2)
    cache.stop(timeout=2)
    assert cache._thread is not None and not cache._thread.is_alive()
    assert cache.down() == frozenset({"eu-primary"})  # it finished, not abandoned
