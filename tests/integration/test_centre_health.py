"""The centre breaker's edges: exactly when a line opens, is probed and is claimed again;
what a caller gets when the database does not answer (on a real SQLite file, and on
PostgreSQL behind a proxy that stops answering)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa

from gateway.centre_health import API, CentreHealth, centre_health
from gateway.errors import StoreError
from gateway.store import Store, as_utc
from tests.conftest import Clock, postgres_url
from tests.support.proxy import TcpProxy, proxied_url

LINE, OTHER = "eu-primary", "eu-backup"


@pytest.fixture
def store(tmp_path: Any) -> Iterator[Store]:
    store = Store.from_url(f"sqlite:///{tmp_path}/health.sqlite3")
    store.create_schema()
    yield store
    store.dispose()


@pytest.fixture
def health(store: Store, clock: Clock) -> CentreHealth:
    return CentreHealth(store, centre_ids=[LINE, OTHER], failure_threshold=3, open_for_s=30,
                        probe_window_s=60, clock=clock)


def state(store: Store, key: str) -> str | None:
    with store.engine.connect() as conn:
        return conn.execute(sa.select(centre_health.c.state)
                            .where(centre_health.c.key == key)).scalar()


def open_line(health: CentreHealth, key: str = LINE) -> None:
    for _ in range(3):
        health.record(key, ok=False, reason="dial failed")


def row_of(store: Store, key: str) -> dict[str, Any]:
    with store.engine.connect() as conn:
        return dict(conn.execute(sa.select(centre_health)
                                 .where(centre_health.c.key == key)).one()._mapping)


def test_what_record_logs_and_keeps(health: CentreHealth, store: Store,
                                    caplog: pytest.LogCaptureFixture) -> None:
    """Warnings only when a line changes for the worse (open, and every failure while
    open) or comes back; the reason is kept (200 characters), and a closed line keeps no
    open time or probe."""

    def logged() -> list[str]:
        found = [r.getMessage() for r in caplog.records if r.name == "gateway.centre_health"]
        caplog.clear()
        return found

    with caplog.at_level(logging.WARNING, logger="gateway.centre_health"):
        health.record(LINE, ok=True, reason="first answer")  # new and fine: nothing to say
        assert logged() == []
        health.record(LINE, ok=False, reason="dial busy")
        health.record(LINE, ok=False, reason="dial busy")
        assert logged() == []
        health.record(LINE, ok=False, reason="dial failed")
        assert logged() == [f"centre {LINE} known unreachable (dial failed)"]
        row = row_of(store, LINE)
        assert (row["state"], row["failures"], row["last_reason"]) == ("open", 3, "dial failed")
        assert row["opened_at"] is not None
        health.record(LINE, ok=False, reason="x" * 201)
        assert logged() == [f"centre {LINE} known unreachable ({'x' * 201})"]
        assert row_of(store, LINE)["last_reason"] == "x" * 200
        health.record(LINE, ok=True, reason="y" * 199 + "zz")
        assert logged() == [f"centre {LINE} reachable again ({'y' * 199 + 'zz'})"]
        row = row_of(store, LINE)
        assert (row["state"], row["failures"], row["last_reason"]) == (
            "closed", 0, "y" * 199 + "z")
        assert row["opened_at"] is None and row["probe_until"] is None
        health.record(LINE, ok=True, reason="dial answered")  # closed already: quiet
        assert logged() == []


def test_record_in_the_callers_transaction(health: CentreHealth, store: Store) -> None:
    """The step writer feeds a line's outcome in the transaction of the step."""
    open_line(health)
    with store.begin() as conn:
        health.record(LINE, ok=True, reason="dial answered", conn=conn)
        assert state(store, LINE) == "open"  # not committed yet (another connection)
    assert state(store, LINE) == "closed"
    with store.begin() as conn:
        for _ in range(3):
            health.record(LINE, ok=False, reason="dial failed", conn=conn)
    assert state(store, LINE) == "open"


def test_the_defaults_three_failures_open_for_30_s_probe_for_60_s(store: Store,
                                                                 clock: Clock) -> None:
    health = CentreHealth(store, centre_ids=[LINE], clock=clock)
    health.record(LINE, ok=False, reason="dial failed")
    health.record(LINE, ok=False, reason="dial failed")
    assert health.unreachable() == set()
    health.record(LINE, ok=False, reason="dial failed")
    assert health.unreachable() == {LINE}
    clock.advance(30)
    assert health.unreachable() == set()  # this caller probes; its dial never reports
    clock.advance(60)
    assert health.unreachable() == set()  # claimed again


def test_the_metrics_list_every_line_given(store: Store, clock: Clock) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from gateway.metrics import Metrics

    health = CentreHealth(store, centre_ids=[LINE, OTHER], clock=clock)
    metrics = Metrics()
    metrics.watch_database(store, health=health, clock=clock)
    listed = {s.labels["centre"] for f in text_string_to_metric_families(
        metrics.render().decode()) for s in f.samples if s.name == "gateway_centre_open"}
    assert listed == {LINE, OTHER, API}


def test_a_failure_while_open_does_not_push_the_probe_back(
    health: CentreHealth, store: Store, clock: Clock
) -> None:
    open_line(health)
    opened = row_of(store, LINE)["opened_at"]
    clock.advance(20)
    health.record(LINE, ok=False, reason="a late dial outcome")
    assert row_of(store, LINE)["opened_at"] == opened
    clock.advance(10)
    assert health.unreachable() == set()  # probed 30 s after it opened, not after the last


def test_one_lines_failure_leaves_another_lines_probe_alone(
    health: CentreHealth, store: Store, clock: Clock
) -> None:
    open_line(health, LINE)
    clock.advance(30)
    assert health.unreachable() == set()  # LINE's probe is out
    health.record(OTHER, ok=False, reason="dial busy")  # below the threshold
    assert state(store, LINE) == "half_open" and state(store, OTHER) == "closed"


def test_a_failed_probe_opens_the_line_again_from_now(
    health: CentreHealth, store: Store, clock: Clock
) -> None:
    open_line(health)
    clock.advance(30)
    assert health.unreachable() == set()
    clock.advance(5)
    health.record(LINE, ok=False, reason="probe: dial failed")
    row = row_of(store, LINE)
    assert row["state"] == "open" and row["probe_until"] is None
    assert as_utc(row["opened_at"]) == as_utc(row["updated_at"])
    assert as_utc(row["opened_at"]).timestamp() == clock.now  # type: ignore[union-attr]
    clock.advance(29)
    assert health.unreachable() == {LINE}
    clock.advance(1)
    assert health.unreachable() == set()


def test_a_probe_answered_closes_the_line_and_clears_the_probe(
    health: CentreHealth, store: Store, clock: Clock
) -> None:
    open_line(health)
    clock.advance(30)
    assert health.unreachable() == set()
    assert row_of(store, LINE)["probe_until"] is not None
    health.record(LINE, ok=True, reason="probe: dial answered")
    row = row_of(store, LINE)
    assert (row["state"], row["failures"], row["opened_at"], row["probe_until"]) == (
        "closed", 0, None, None)


def test_every_outcome_stamps_the_row(health: CentreHealth, store: Store,
                                      clock: Clock) -> None:
    for ok in (False, True, False):
        clock.advance(7)
        health.record(LINE, ok=ok, reason="dial")
        stamped = as_utc(row_of(store, LINE)["updated_at"])
        assert stamped is not None and stamped.timestamp() == clock.now


def test_a_closed_line_is_never_probed(health: CentreHealth, store: Store,
                                       clock: Clock) -> None:
    health.record(LINE, ok=False, reason="dial failed")
    health.record(LINE, ok=True, reason="dial answered")
    for _ in range(3):
        clock.advance(100)
        assert health.unreachable() == set()
        assert state(store, LINE) == "closed"


def test_an_open_line_is_probed_exactly_open_for_after_it_opened(
    health: CentreHealth, store: Store, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    open_line(health)
    clock.advance(29)
    assert health.unreachable() == {LINE}
    clock.advance(1)  # exactly open_for_s: this caller probes
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gateway.centre_health"):
        assert health.unreachable() == set()
    assert [r.getMessage() for r in caplog.records if r.name == "gateway.centre_health"] == [
        f"probing centre {LINE}"]
    assert state(store, LINE) == "half_open"
    assert health.unreachable() == {LINE}  # the others skip it while it is probed


def test_a_probe_that_never_reported_is_claimed_again_when_its_window_ends(
    health: CentreHealth, store: Store, clock: Clock
) -> None:
    open_line(health)
    clock.advance(30)
    assert health.unreachable() == set()  # probing: its dial never reports
    clock.advance(59)
    assert health.unreachable() == {LINE}
    clock.advance(1)  # exactly probe_window_s: the probe is claimed again
    assert health.unreachable() == set()
    assert health.unreachable() == {LINE}


def test_each_line_has_its_own_probe(health: CentreHealth, store: Store,
                                     clock: Clock) -> None:
    """Two lines opened at the same instant: claiming one line's probe never takes the
    other's."""
    open_line(health, LINE)
    open_line(health, OTHER)
    clock.advance(30)
    assert health.unreachable() == set()  # this caller probes both
    assert (state(store, LINE), state(store, OTHER)) == ("half_open", "half_open")
    assert health.unreachable() == {LINE, OTHER}


def test_the_api_key_never_takes_a_line_down(health: CentreHealth, store: Store,
                                             clock: Clock) -> None:
    open_line(health, API)
    assert health.states() == {API: "open"}
    clock.advance(30)
    assert health.unreachable() == set()
    assert state(store, API) == "open"  # never probed by a call


def test_a_database_error_means_every_line_is_tried_and_is_logged(
    health: CentreHealth, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    open_line(health)
    with store.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE centre_health RENAME TO centre_health_away"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gateway.centre_health"):
        assert health.unreachable() == set()
    [record] = [r for r in caplog.records if r.name == "gateway.centre_health"]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == ("centre health unavailable (database error: "
                                   "OperationalError); trying every line")
    with pytest.raises(StoreError):
        health.states()


def test_record_safely_never_raises_and_says_which_line(
    health: CentreHealth, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    with store.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE centre_health RENAME TO centre_health_away"))
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="gateway.centre_health"):
        health.record_safely(LINE, ok=False, reason="dial failed")
        health.record_safely("", ok=False, reason="no line: nothing recorded")
    [record] = [r for r in caplog.records if r.name == "gateway.centre_health"]
    assert record.getMessage() == f"could not record centre health for {LINE}"
    assert record.exc_info is not None


@pytest.fixture
def pg_proxy() -> Iterator[tuple[str, TcpProxy]]:
    url = postgres_url()
    if not url:
        pytest.skip("PostgreSQL not configured: set GATEWAY_TEST_POSTGRES_URL to run this test")
    parts = urlsplit(url)
    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        yield proxied_url(url, proxy), proxy


@pytest.mark.postgres
def test_a_database_that_stops_answering_costs_each_read_at_most_its_deadline(
    pg_store: Store, pg_proxy: tuple[str, TcpProxy], clock: Clock
) -> None:
    """Behind a proxy that stops forwarding: unreachable() (the background refresh
    the call path reads from memory) answers "nothing known down" within its 2 s
    default; states() and record() fail within their 2 s."""
    url, proxy = pg_proxy
    # one store each: a timed-out connection is shut down, and a new one through the
    # proxy would fail on libpq's 2 s connect_timeout instead of the deadline
    stores = [Store.from_url(url, suspect_s=0.0) for _ in range(3)]
    try:
        calls, reads, writes = (CentreHealth(s, centre_ids=[LINE], clock=clock)
                                for s in stores)
        writes.record(LINE, ok=False, reason="dial failed")  # each with a pooled connection
        assert calls.unreachable() == set() and reads.states() == {LINE: "closed"}
        proxy.mode = "blackhole"
        started = time.monotonic()
        assert calls.unreachable() == set()
        assert 1.9 < time.monotonic() - started < 2.9
        started = time.monotonic()
        with pytest.raises(StoreError):
            reads.states()
        assert 1.9 < time.monotonic() - started < 2.9
        started = time.monotonic()
        with pytest.raises(StoreError):
            writes.record(LINE, ok=False, reason="dial failed")
        assert 1.9 < time.monotonic() - started < 2.9
    finally:
        for s in stores:
            s.dispose()


def test_a_slow_line_health_read_leaves_the_request_path_alone(
    store: Store, health: CentreHealth
) -> None:
    """Seen in CI: on a loaded machine the background refresh of line health missed a
    0.3 s deadline, the request path's database then failed fast for 2 s, and a call
    dialled a line known down.  The refresh is background work: it waits up to 2 s, on
    the background slots, and a slow read changes nothing for the request threads."""
    from gateway.line_health import LineHealthCache

    for _ in range(3):
        health.record(LINE, ok=False, reason="dial failed")
    slow_reads = []

    @sa.event.listens_for(store.engine, "before_cursor_execute")
    def _slow_disk(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "centre_health" in statement:
            slow_reads.append(statement)
            time.sleep(0.6)

    cache = LineHealthCache(health)
    started = time.monotonic()
    assert cache.refresh() == {LINE}
    assert 0.6 <= time.monotonic() - started < 2.0
    assert slow_reads  # the read did take the slow path
    assert not store.deadline.suspect  # the request threads' database is not suspect
    assert store.deadline.busy == 0
