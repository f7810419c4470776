"""The embedded SQLite's voice read on the request thread (gateway.store.sqlite_reads) and
its step batches without RETURNING: the same answers as the SQLAlchemy path, a
deadline that holds against a locked file and a runaway statement, and steps new
exactly once when two writers race."""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import StoreError
from gateway.steps import StepRecord, StepWriter
from gateway.store import Store, call_steps, incidents, routing_decisions
from gateway.store.sqlite_reads import SqliteReads
from tests.conftest import PUBLIC_URL
from tests.support.statements import count_statements
from tests.support.twilio import call_params, dialled_number, parse, signature

SINCE = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)


@pytest.fixture
def file_store(tmp_path: Path) -> Iterator[Store]:
    store = Store.from_url(f"sqlite:///{tmp_path}/reads.sqlite3")
    store.create_schema()
    assert store.sqlite_reads is not None
    yield store
    store.dispose()


def plain_twin(store: Store) -> Store:
    """The same file read the SQLAlchemy way (through within(), all columns)."""
    twin = Store(store.engine)
    twin.sqlite_reads = None
    return twin


REALS = st.one_of(st.none(), st.floats(allow_nan=False), st.floats(-180, 180))
JSONS = st.one_of(st.none(), st.dictionaries(st.text(max_size=5), st.one_of(
    st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
    st.booleans(), st.none()), max_size=4))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lat=REALS, lon=REALS, heading=REALS, accuracy=REALS, crash=JSONS, occupants=JSONS,
       trusted=st.one_of(st.none(), st.booleans()), test_call=st.one_of(st.none(), st.booleans()),
       text=st.text(max_size=30), micros=st.integers(0, 999_999),
       detail=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
def test_the_packed_read_returns_what_the_sqlalchemy_read_returns(
        file_store: Store, lat: float | None, lon: float | None, heading: float | None,
        accuracy: float | None, crash: Any, occupants: Any, trusted: bool | None,
        test_call: bool | None, text: str, micros: int, detail: dict[str, str]) -> None:
    msisdn = "+4670" + uuid.uuid4().hex[:7]
    call_sid = "CA" + uuid.uuid4().hex
    at = dt.datetime(2026, 11, 26, 3, 4, 5, micros, tzinfo=dt.UTC)
    with file_store.begin() as conn:
        conn.execute(incidents.insert().values(
            id=str(uuid.uuid4()), event_id=call_sid, payload_sha256="0" * 64, type="crash",
            vin="WVWZZZ1JZXW000001", msisdn=msisdn, occurred_at=at, received_at=at,
            lat=lat, lon=lon, heading_deg=heading, accuracy_m=accuracy, trusted=trusted,
            crash=crash, occupants=occupants, route_reason=text, emergency_number="112",
            fallback_dial="+46000000000", status="open", msd=text or None,
            test_call=test_call))
    assert file_store.record_call_step(call_sid=call_sid, step="voice", incident_id=None,
                                       twiml=f"<Response>{text}</Response>", detail=detail)
    kwargs: dict[str, Any] = {"call_sid": call_sid, "steps": ("voice", "accept:1"),
                              "msisdn": msisdn, "since": SINCE, "types": ("crash", "sos"),
                              "timeout_s": 2.0}
    packed = file_store.voice_lookup(**kwargs)
    plain = plain_twin(file_store).voice_lookup(**kwargs)
    assert packed.incident == plain.incident
    assert packed.steps == plain.steps
    assert packed.incident is not None and set(packed.steps) == {"voice"}
    assert packed.incident["received_at"] == at
    assert packed.incident["test_call"] is test_call
    assert packed.incident["route_reason"] == text
    assert packed.steps["voice"]["detail"] == detail


def test_a_real_column_is_never_packed() -> None:
    """json_object writes a REAL with 15 significant digits: not always the same double."""
    from gateway.store.voice_read import _json_row

    with pytest.raises(StoreError, match="lat"):
        _json_row([incidents.c.id, incidents.c.lat], incidents.c.id)


def test_nothing_found_is_no_incident_and_no_step(file_store: Store) -> None:
    found = file_store.voice_lookup(call_sid="CAnone", steps=("voice",), msisdn="+46700000000",
                                    since=SINCE, types=("crash",), timeout_s=2.0)
    assert found.incident is None and found.steps == {}


def lock_exclusively(store: Store) -> sqlite3.Connection:
    """Another connection holding the file's exclusive lock (WAL readers wait too); the
    store's own connections are closed first, as exclusive mode needs the file alone."""
    assert store.sqlite_reads is not None
    store.dispose()
    holder = sqlite3.connect(store.sqlite_reads.path, isolation_level=None, timeout=5)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("DELETE FROM call_steps WHERE call_sid = 'nobody'")
    return holder


def test_a_locked_file_fails_the_read_within_its_deadline_then_reads_again(
        file_store: Store) -> None:
    assert file_store.sqlite_reads is not None
    holder = lock_exclusively(file_store)
    started = time.monotonic()
    with pytest.raises(StoreError):
        file_store.voice_lookup(call_sid="CA1", steps=("voice",), msisdn="+46700000000",
                                since=SINCE, types=("crash",), timeout_s=0.3)
    assert 0.25 < time.monotonic() - started < 1.0
    holder.execute("ROLLBACK")
    holder.close()
    found = file_store.voice_lookup(call_sid="CA1", steps=("voice",), msisdn="+46700000000",
                                    since=SINCE, types=("crash",), timeout_s=0.3)
    assert found.incident is None


def test_a_statement_running_past_its_deadline_is_interrupted(tmp_path: Path) -> None:
    reads = SqliteReads(str(tmp_path / "any.sqlite3"), progress_ops=100)
    # ~2.4 s of counting here: long past the deadline, short enough that a read
    # without the deadline fails on time instead of hanging the suite
    endless = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
               "WHERE x < 20000000) SELECT count(*) FROM c")
    started = time.monotonic()
    with pytest.raises(StoreError, match="did not answer within 0.10 s"):
        reads.fetch(endless, (), timeout_s=0.1)
    assert time.monotonic() - started < 1.0
    assert reads.fetch("SELECT ?", (7,), timeout_s=0.1) == [(7,)]  # the connection is fine
    with pytest.raises(StoreError, match="OperationalError.*readonly"):  # it reads only
        reads.fetch("CREATE TABLE t (x)", (), timeout_s=0.1)
    with pytest.raises(StoreError, match="database error: ProgrammingError"):
        reads.fetch("SELECT ?", (), timeout_s=0.1)  # a parameter missing
    reads.close()
    assert reads.fetch("SELECT 1", (), timeout_s=0.1) == [(1,)]  # reopened after close()


def test_an_sos_call_on_a_locked_database_still_dials_a_person(make_app: Any) -> None:
    app: Flask = make_app()
    store: Store = app.extensions["gateway"].store
    assert store.sqlite_reads is not None
    params = call_params("CAlocked", "+4915112345678")
    holder = lock_exclusively(store)
    try:
        started = time.monotonic()
        response = app.test_client().post(  # not Twilio.post: it waits for the step write
            "/twilio/voice", data=params,
            headers={"X-Twilio-Signature": signature(PUBLIC_URL + "/twilio/voice", params)})
        elapsed = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert response.status_code == 200
    assert dialled_number(parse(response.data)) == "+442079460100"  # eu-primary
    assert elapsed < 1.5  # the 0.3 s read deadline, not the 2 s busy timeout of writes


def step(n: int, call_sid: str) -> StepRecord:
    return StepRecord(call_sid=call_sid, step=f"dial-result:{n}", incident_id=None,
                      twiml=f"<Response>{n}</Response>", detail={"n": n},
                      decision={"target": "centre", "number": "+4610000000",
                                "centre_id": "eu-primary", "reason": f"attempt {n}"})


def test_two_writers_racing_on_one_file_make_each_step_new_exactly_once(
        tmp_path: Path) -> None:
    """Two processes' writers (two engines) write overlapping batches at once: with the
    write lock taken before the existing keys are read, each step is new once."""
    url = f"sqlite:///{tmp_path}/race.sqlite3"
    first = Store.from_url(url)
    first.create_schema()
    second = Store.from_url(url)
    writers = [StepWriter(store, autostart=False) for store in (first, second)]
    sids = [f"CA{i:03d}" for i in range(40)]
    news: list[list[bool]] = [[], []]
    barrier = threading.Barrier(2)

    def write(index: int) -> None:
        barrier.wait(timeout=5)
        order = sids if index == 0 else list(reversed(sids))
        for start in range(0, len(order), 8):
            batch = [step(n, sid) for sid in order[start:start + 8] for n in (1, 2)]
            news[index] += writers[index].write_batch(batch)

    threads = [threading.Thread(target=write, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sum(news[0]) + sum(news[1]) == 80  # 40 calls x 2 steps, each new once
    with first.begin() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(call_steps)).scalar() == 80
        assert conn.execute(
            sa.select(sa.func.count()).select_from(routing_decisions)).scalar() == 80
    for store in (first, second):
        store.dispose()


def test_the_read_runs_on_the_calling_thread_in_one_statement_of_one_column(
        file_store: Store) -> None:
    """No hand-off to a deadline thread, and one packed column (each column fetched is a
    GIL release in CPython 3.11's sqlite3, a context switch under load)."""
    from tests.support.statements import count_statements

    seen = count_statements(file_store)
    for _ in range(3):
        file_store.voice_lookup(call_sid="CA1", steps=("voice", "accept:1"),
                                msisdn="+46700000000", since=SINCE,
                                types=("crash", "sos"), timeout_s=0.3)
    assert file_store.deadline._alive == 0  # no deadline thread was ever started
    assert len(seen) == 3 and all(s.lstrip().upper().startswith("SELECT json_array(".upper())
                                  for s in seen)
    from gateway.store.voice_read import _packed_voice_query

    sql = _packed_voice_query(file_store.engine.dialect, 2, 2).sql
    assert "?" in sql and ":vl_" not in sql  # positional parameters


@pytest.mark.parametrize(("url", "reads"), [
    ("sqlite:///{tmp}/a.sqlite3", True),
    ("sqlite:///{tmp}/a.sqlite3?timeout=5", False),  # URL options: SQLAlchemy's path
    ("sqlite://", False),
    ("sqlite:///:memory:", False),
])
def test_only_a_plain_sqlite_file_reads_on_the_request_thread(tmp_path: Path, url: str,
                                                              reads: bool) -> None:
    store = Store.from_url(url.format(tmp=tmp_path))
    assert (store.sqlite_reads is not None) is reads
    store.dispose()


def test_close_never_closes_a_connection_another_thread_owns(tmp_path: Path) -> None:
    """Each thread closes its own connection at its next read after close()."""
    reads = SqliteReads(str(tmp_path / "own.sqlite3"))
    owned: list[Any] = []
    go_on = threading.Event()

    def reader() -> None:
        reads.fetch("SELECT 1", (), timeout_s=1.0)
        owned.append(reads._local.conn)
        go_on.wait(timeout=5)
        reads.fetch("SELECT 1", (), timeout_s=1.0)  # after close(): its own, anew
        owned.append(reads._local.conn)

    for _ in range(2):  # every close(), not only the first, reaches the reader
        owned.clear()
        go_on.clear()
        thread = threading.Thread(target=reader)
        thread.start()
        while not owned:
            time.sleep(0.01)
        reads.close()  # from another thread
        assert owned[0].execute("SELECT 2").fetchall() == [(2,)]  # still open: not ours
        go_on.set()
        thread.join(timeout=5)
        assert owned[1] is not owned[0]
        with pytest.raises(sqlite3.ProgrammingError):  # the owner closed the old one
            owned[0].execute("SELECT 3")


def test_a_long_statement_within_its_deadline_is_not_interrupted(tmp_path: Path) -> None:
    """The progress handler runs (every 100 VM steps here) and lets a statement that is
    long but within its deadline finish."""
    reads = SqliteReads(str(tmp_path / "long.sqlite3"), progress_ops=100)
    counted = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
               "WHERE x < 20000) SELECT count(*) FROM c")
    assert reads.fetch(counted, (), timeout_s=5.0) == [(20000,)]


TABLE_READ = "SELECT count(*) FROM call_steps"  # a read that needs the file's lock


def test_the_lock_wait_follows_each_reads_deadline_on_one_connection(
        file_store: Store) -> None:
    """One thread, one connection: a 2 s read, then a 0.2 s one, waits 0.2 s for a lock
    (its busy timeout is set again), and the PRAGMA runs only when the deadline changes."""
    reads = file_store.sqlite_reads
    assert reads is not None
    seen: list[str] = []
    reads.trace = seen.append
    for _ in range(3):
        reads.fetch("SELECT 1", (), timeout_s=2.0)
    assert sum("busy_timeout" in s for s in seen) == 1  # once, not once per read
    holder = lock_exclusively(file_store)  # closes this thread's connection first
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match="database is locked"):
            reads.fetch(TABLE_READ, (), timeout_s=1.0)  # a new connection: 1 s wait
        assert time.monotonic() - started > 0.9
        started = time.monotonic()
        with pytest.raises(StoreError, match="database is locked"):
            reads.fetch(TABLE_READ, (), timeout_s=0.2)
        assert time.monotonic() - started < 0.6
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_every_close_reaches_the_connections_opened_since_the_last(tmp_path: Path) -> None:
    reads = SqliteReads(str(tmp_path / "twice.sqlite3"))
    conns = []
    for _ in range(3):
        reads.fetch("SELECT 1", (), timeout_s=1.0)
        conns.append(reads._local.conn)
        reads.close()
    assert len({id(c) for c in conns}) == 3
    for conn in conns:
        with pytest.raises(sqlite3.ProgrammingError):
            conn.execute("SELECT 1")


def signed_post(app: Flask, params: dict[str, str]) -> Any:
    return app.test_client().post(
        "/twilio/voice", data=params,
        headers={"X-Twilio-Signature": signature(PUBLIC_URL + "/twilio/voice", params)})


def test_a_replayed_signed_request_is_answered_from_the_database_read(make_app: Any) -> None:
    """The same signed webhook again, after the process forgot what it wrote (as another
    worker would): the request-thread read finds the stored step, the TwiML is the same
    and the step is stored once."""
    from gateway.store import KnownSteps, call_steps

    app: Flask = make_app()
    svc = app.extensions["gateway"]
    assert svc.store.sqlite_reads is not None
    params = call_params("CAreplay", "+4915112345678")
    first = signed_post(app, params)
    assert svc.steps.flush(timeout=5)
    svc.store.known_steps = KnownSteps()
    seen = count_statements(svc.store)
    again = signed_post(app, params)
    assert again.status_code == 200 and again.data == first.data
    assert len(seen) == 1  # answered by the one read, nothing else
    assert svc.steps.flush(timeout=5)
    with svc.store.begin() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(call_steps).where(
            call_steps.c.call_sid == "CAreplay")).scalar() == 1


MALFORMED_SIDS = ["CA'; DROP TABLE call_steps; --", "CA\u65e5\u672c\u8a9e", "CA" + "f" * 300,
                  "", "CA\x00CAother", "CA%00", "\ud7ff"]


@pytest.mark.parametrize("call_sid", MALFORMED_SIDS)
def test_a_malformed_callsid_still_reaches_a_person_and_reads_nothing_else(
        make_app: Any, call_sid: str) -> None:
    app: Flask = make_app()
    response = signed_post(app, call_params(call_sid, "+4915112345678"))
    assert response.status_code == 200
    assert dialled_number(parse(response.data)) == "+442079460100"  # eu-primary
