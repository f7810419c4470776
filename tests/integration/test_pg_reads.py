"""The voice read on PostgreSQL on the request thread (gateway.store.pg_reads): the same answers
as the SQLAlchemy read, a hard deadline against a server that accepts TCP and never
answers (TcpProxy), fail-fast after a miss, a broken connection read again the other
way, and connections never opened on the request thread."""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import StoreError
from gateway.store import Store, incidents
from tests.conftest import PUBLIC_URL
from tests.support.proxy import TcpProxy
from tests.support.twilio import call_params, dialled_number, parse, signature

pytestmark = pytest.mark.postgres

SINCE = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
MSISDN = "+46701234567"


def ready(store: Store, timeout: float = 5.0) -> None:
    """Wait until the opener has a connection ready for the next thread that reads."""
    assert store.pg_reads is not None
    store.pg_reads._want()
    deadline = time.monotonic() + timeout
    while store.pg_reads._ready.qsize() == 0:
        assert time.monotonic() < deadline, "no voice-read connection opened"
        time.sleep(0.01)


def lookup(store: Store, timeout_s: float = 0.3, **overrides: Any) -> Any:
    kwargs: dict[str, Any] = {"call_sid": "CA1", "steps": ("voice",), "msisdn": MSISDN,
                              "since": SINCE, "types": ("crash", "sos", "on_call"),
                              "timeout_s": timeout_s}
    kwargs.update(overrides)
    return store.voice_lookup(**kwargs)


def conn_here(store: Store) -> Any:
    """This thread's own connection of ``store``'s reader, or None."""
    assert store.pg_reads is not None
    owned = getattr(store.pg_reads._local, "owned", None)
    return None if owned is None else owned.conn


def on_this_thread(store: Store) -> bool:
    conn = conn_here(store)
    return conn is not None and not conn.closed


def test_the_first_read_of_a_thread_goes_the_old_way_and_a_connection_is_opened_meanwhile(
        pg_store: Store) -> None:
    assert pg_store.pg_reads is not None
    assert lookup(pg_store).incident is None  # no connection yet: through the deadline thread
    assert not on_this_thread(pg_store)
    ready(pg_store)
    assert lookup(pg_store).incident is None
    assert on_this_thread(pg_store)  # this thread now keeps one


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["crash", "sos", "on_call"]), text=st.text(max_size=30),
       micros=st.integers(0, 999_999), test_call=st.one_of(st.none(), st.booleans()),
       home=st.one_of(st.none(), st.sampled_from(["SE", "DE"])),
       detail=st.dictionaries(st.text(max_size=5), st.one_of(st.text(max_size=5),
                                                             st.integers(), st.booleans()),
                              max_size=3))
def test_the_packed_read_returns_what_the_sqlalchemy_read_returns(
        pg_store: Store, kind: str, text: str, micros: int, test_call: bool | None,
        home: str | None, detail: dict[str, Any]) -> None:
    text = text.replace("\x00", "")  # PostgreSQL text holds no NUL
    detail = {k.replace("\x00", ""): v.replace("\x00", "") if isinstance(v, str) else v
              for k, v in detail.items()}
    ready(pg_store)
    msisdn = "+4670" + uuid.uuid4().hex[:7]
    call_sid = "CA" + uuid.uuid4().hex
    at = dt.datetime(2026, 11, 26, 3, 4, 5, micros, tzinfo=dt.UTC)
    with pg_store.begin() as conn:
        conn.execute(incidents.insert().values(
            id=str(uuid.uuid4()), event_id=call_sid, payload_sha256="0" * 64, type=kind,
            vin="WVWZZZ1JZXW000001", msisdn=msisdn, occurred_at=at, received_at=at,
            lat=59.3, lon=18.0, home_country=home, route_country="SE", route_reason=text,
            emergency_number="112", fallback_dial="+46000000000", status="open",
            test_call=test_call))
    assert pg_store.record_call_step(call_sid=call_sid, step="voice", incident_id=None,
                                     twiml=f"<Response>{text}</Response>", detail=detail)
    kwargs: dict[str, Any] = {"call_sid": call_sid, "steps": ("voice", "accept:1"),
                              "msisdn": msisdn, "types": ("crash", "sos", "on_call"),
                              "timeout_s": 2.0}
    packed = lookup(pg_store, **kwargs)
    assert on_this_thread(pg_store)  # it was the request-thread read
    plain = Store(pg_store.engine)  # the SQLAlchemy read of the same database
    plain.pg_reads = None
    expected = lookup(plain, **kwargs)
    assert packed.incident == expected.incident
    assert packed.steps == expected.steps
    assert packed.incident["received_at"] == at and packed.incident["type"] == kind
    assert packed.steps["voice"]["detail"] == detail


def test_a_server_that_hangs_costs_the_read_its_deadline_then_reads_fail_fast(
        proxied: Store, proxy: TcpProxy) -> None:
    proxied.create_schema()
    ready(proxied)
    lookup(proxied)
    assert on_this_thread(proxied)
    proxy.mode = "blackhole"
    started = time.monotonic()
    with pytest.raises(StoreError, match="did not answer within 0.30 s"):
        lookup(proxied)
    assert time.monotonic() - started < 0.3 + 0.1
    assert not on_this_thread(proxied)  # the stuck connection was dropped
    started = time.monotonic()
    with pytest.raises(StoreError, match="suspect"):
        lookup(proxied)  # the database is suspect now: no second wait
    assert time.monotonic() - started < 0.05


def test_twenty_threads_with_their_own_connections_on_a_server_that_hangs(
        proxied: Store, proxy: TcpProxy) -> None:
    proxied.create_schema()
    assert proxied.pg_reads is not None
    proxied.pg_reads.spare = 20
    ready(proxied)
    deadline = time.monotonic() + 5
    while proxied.pg_reads._ready.qsize() < 20:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    barrier = threading.Barrier(20)
    took: list[float] = []
    lock = threading.Lock()

    def call() -> None:
        assert lookup(proxied).incident is None  # forwarding: each thread takes a connection
        barrier.wait(timeout=5)
        if threading.current_thread().name == "caller-0":
            proxy.mode = "blackhole"
        barrier.wait(timeout=5)
        started = time.monotonic()
        try:
            lookup(proxied)
        except StoreError:
            pass
        with lock:
            took.append(time.monotonic() - started)

    threads = [threading.Thread(target=call, name=f"caller-{i}") for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(took) == 20 and max(took) < 0.3 + 0.2


def test_a_connection_the_server_closed_is_read_again_the_other_way(pg_store: Store) -> None:
    ready(pg_store)
    lookup(pg_store)
    assert on_this_thread(pg_store) and pg_store.pg_reads is not None
    pid = conn_here(pg_store).info.backend_pid
    with pg_store.begin() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    found = lookup(pg_store, timeout_s=2.0)  # answered: the deadline thread read it
    assert found.incident is None and found.steps == {}
    assert not on_this_thread(pg_store)


def test_connections_are_opened_by_the_opener_never_by_a_request_thread(
        pg_store: Store) -> None:
    assert pg_store.pg_reads is not None
    opened_on: list[str] = []
    connect = pg_store.pg_reads.connect

    def watched() -> Any:
        opened_on.append(threading.current_thread().name)
        return connect()

    pg_store.pg_reads.connect = watched
    for _ in range(3):
        lookup(pg_store)
        ready(pg_store)
    assert opened_on and set(opened_on) == {"db-voice-opener"}


def test_close_leaves_another_threads_connection_to_that_thread(pg_store: Store) -> None:
    assert pg_store.pg_reads is not None
    ready(pg_store)
    owned: list[Any] = []
    go_on = threading.Event()

    def reader() -> None:
        lookup(pg_store)
        owned.append(conn_here(pg_store))
        go_on.wait(timeout=5)
        assert lookup(pg_store).incident is None  # after close(): the deadline thread read
        owned.append(conn_here(pg_store))

    thread = threading.Thread(target=reader)
    thread.start()
    deadline = time.monotonic() + 5
    while not owned:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    pg_store.pg_reads.close()  # from another thread: not finished under the reader
    assert not owned[0].closed
    go_on.set()
    thread.join(timeout=5)
    assert owned[1] is None and owned[0].closed  # the reader finished its own


def test_waiting_for_a_server_that_hangs_takes_no_cpu_and_finishes_the_connection(
        proxied: Store, proxy: TcpProxy) -> None:
    """The read sleeps in poll() until its deadline (no busy loop), and the connection it
    gives up is finished at once, not left to the garbage collector."""
    proxied.create_schema()
    ready(proxied)
    lookup(proxied)
    assert proxied.pg_reads is not None
    conn = conn_here(proxied)
    proxy.mode = "blackhole"
    cpu = time.thread_time()
    with pytest.raises(StoreError):
        lookup(proxied, timeout_s=0.5)
    assert time.thread_time() - cpu < 0.1  # a busy loop would burn most of the 0.5 s
    assert conn.closed


def test_a_failed_connect_is_counted_and_the_opener_tries_again(pg_store: Store) -> None:
    assert pg_store.pg_reads is not None
    reads = pg_store.pg_reads
    connect = reads.connect
    calls: list[int] = []

    def flaky() -> Any:
        calls.append(1)
        if len(calls) <= 2:
            raise OSError("connection refused")
        return connect()

    reads.connect = flaky
    lookup(pg_store)  # no connection yet: read the other way, and ask the opener
    deadline = time.monotonic() + 3
    while reads.failures == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    reads._want()  # asked again after its pause: it tries again, fails, is asked again
    deadline = time.monotonic() + 3
    while reads.failures < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert reads.failures == 2
    ready(pg_store, timeout=5.0)  # the opener is still there and opens one now
    assert reads._opener is not None and reads._opener.daemon  # never holds the exit


def test_the_opener_keeps_exactly_its_spares(pg_store: Store) -> None:
    assert pg_store.pg_reads is not None
    pg_store.pg_reads.spare = 2
    ready(pg_store)
    time.sleep(0.5)  # let it settle
    assert pg_store.pg_reads._ready.qsize() == 2


def test_close_finishes_the_callers_own_connection(pg_store: Store) -> None:
    ready(pg_store)
    lookup(pg_store)
    assert pg_store.pg_reads is not None and on_this_thread(pg_store)
    conn = conn_here(pg_store)
    pg_store.pg_reads.close()
    assert conn.closed and pg_store.pg_reads._ready.qsize() == 0


def test_a_statement_the_server_refuses_is_a_store_error_with_its_reason(
        pg_store: Store) -> None:
    assert pg_store.pg_reads is not None
    ready(pg_store)
    lookup(pg_store)  # this thread takes a connection
    conn = conn_here(pg_store)
    with pytest.raises(StoreError, match="database error: .*division by zero"):
        pg_store.pg_reads.fetch_text("zero", "SELECT (1 / $1::int)::text", ["0"],
                                     timeout_s=2.0)
    assert not on_this_thread(pg_store)  # dropped: its state is not trusted after an error
    assert conn.closed  # and finished at once


class FullBuffer:
    """A pq connection whose send buffer is full twice (flush() answers 1) before the
    result arrives: the read waits for the socket to be writable, not readable."""

    def __init__(self, sock: Any) -> None:
        self.socket = sock.fileno()
        self.flushes = 0

    def flush(self) -> int:
        self.flushes += 1
        return 1 if self.flushes <= 2 else 0

    def is_busy(self) -> int:
        return 0

    def consume_input(self) -> None:
        pass

    def get_result(self) -> Any:
        if self.flushes == 3:
            self.flushes += 1
            return type("Result", (), {"status": 2})()
        return None


def test_a_full_send_buffer_waits_until_the_socket_is_writable() -> None:
    import socket

    from gateway.store.pg_reads import PgReads

    ours, theirs = socket.socketpair()  # writable, never readable: nobody sends to us
    try:
        pg = FullBuffer(ours)
        result = PgReads._results(PgReads(lambda: None), pg, time.monotonic() + 1.0)
        assert result.status == 2 and pg.flushes == 4
    finally:
        ours.close()
        theirs.close()


def test_fetch_text_returns_each_rows_first_column_as_text_or_none(pg_store: Store) -> None:
    assert pg_store.pg_reads is not None
    ready(pg_store)
    lookup(pg_store)  # this thread takes a connection
    rows = pg_store.pg_reads.fetch_text(
        "rows", "SELECT v, 'other' FROM (VALUES ($1::text), (NULL), ('b')) AS t(v)", ["a"],
        timeout_s=2.0)
    assert rows == ["a", None, "b"]


def signed_post(app: Any, params: dict[str, str]) -> Any:
    return app.test_client().post(
        "/twilio/voice", data=params,
        headers={"X-Twilio-Signature": signature(PUBLIC_URL + "/twilio/voice", params)})


def test_a_replayed_signed_request_is_answered_from_the_request_thread_read(
        pg_store: Store, make_app: Any) -> None:
    """The same signed webhook again, after the process forgot what it wrote: this
    thread's PostgreSQL read finds the stored step; same TwiML, stored once.  (pg_store
    first: the app's threads stop before its store is disposed.)"""
    from gateway.store import KnownSteps, call_steps

    app = make_app(store=pg_store)
    svc = app.extensions["gateway"]
    ready(pg_store)
    params = call_params("CAreplay", "+4915112345678")
    first = signed_post(app, params)
    assert svc.steps.flush(timeout=5)
    svc.store.known_steps = KnownSteps()
    again = signed_post(app, params)
    assert on_this_thread(pg_store)  # the request-thread read answered
    assert again.status_code == 200 and again.data == first.data
    assert svc.steps.flush(timeout=5)
    with pg_store.begin() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(call_steps).where(
            call_steps.c.call_sid == "CAreplay")).scalar() == 1


@pytest.mark.parametrize("call_sid", ["CA'; DROP TABLE call_steps; --", "CA\u65e5\u672c",
                                      "CA" + "f" * 300, "", "CA\x00CAother", "CA%00"])
def test_a_malformed_callsid_still_reaches_a_person(pg_store: Store, make_app: Any,
                                                    call_sid: str) -> None:
    app = make_app(store=pg_store)
    ready(pg_store)
    response = signed_post(app, call_params(call_sid, "+4915112345678"))
    assert response.status_code == 200
    assert dialled_number(parse(response.data)) == "+442079460100"  # eu-primary


def test_a_parameter_with_a_nul_is_refused_not_cut_short(pg_store: Store) -> None:
    """libpq would read "CA\\x00CAother" as "CA": another call's steps."""
    assert pg_store.pg_reads is not None
    ready(pg_store)
    lookup(pg_store)
    with pytest.raises(StoreError, match="NUL"):
        pg_store.pg_reads.fetch_text("nul", "SELECT $1::text", ["CA\x00CAother"],
                                     timeout_s=2.0)
    assert pg_store.pg_reads.fetch_text("nul", "SELECT $1::text", ["CA"],
                                        timeout_s=2.0) == ["CA"]
