"""One transaction per new event (issue 10): what POST /v1/events sends to the database,
counted at the engine, on SQLite and on PostgreSQL; and what one write commits."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Self

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.engine import Connection, Engine

from gateway.delivery import outbox, outbox_rows
from gateway.errors import StoreError
from gateway.events import parse_event
from gateway.incidents import EventConflictError, record_event
from gateway.plan import NumberPlan
from gateway.store import Store, incidents
from tests.support.events import crash_event


class Sent:
    """What the engine sends: statements, and transactions (BEGIN ... COMMIT/ROLLBACK on
    a connection in transaction mode; each statement on an autocommit connection, which
    is its own transaction).  ``round_trips``: statements, plus a BEGIN and a COMMIT for
    each transaction-mode transaction that ran one (psycopg sends both on their own)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.statements: list[str] = []
        self.transactions = 0
        self.round_trips = 0
        self._lock = threading.Lock()
        self._open: set[int] = set()  # transaction-mode connections that ran a statement

    @staticmethod
    def _autocommit(conn: Connection) -> bool:
        return conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT"

    def _statement(self, conn: Connection, _cursor: Any, statement: str, *_: Any) -> None:
        with self._lock:
            self.statements.append(" ".join(statement.split()))
            self.round_trips += 1
            if self._autocommit(conn):
                self.transactions += 1
            elif id(conn) not in self._open:
                self._open.add(id(conn))
                self.transactions += 1
                self.round_trips += 2  # BEGIN, and COMMIT or ROLLBACK

    def _end(self, conn: Connection) -> None:
        with self._lock:
            self._open.discard(id(conn))

    def __enter__(self) -> Self:
        sa.event.listen(self.engine, "before_cursor_execute", self._statement)
        sa.event.listen(self.engine, "commit", self._end)
        sa.event.listen(self.engine, "rollback", self._end)
        return self

    def __exit__(self, *_: object) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._statement)
        sa.event.remove(self.engine, "commit", self._end)
        sa.event.remove(self.engine, "rollback", self._end)

    def writes(self) -> list[str]:
        return [s for s in self.statements if not s.upper().startswith("SELECT")]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def event_store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Store]:
    if request.param == "postgresql":
        yield request.getfixturevalue("pg_store")
        return
    store = Store.from_url(f"sqlite:///{tmp_path}/events.sqlite3")
    store.create_schema()
    yield store
    store.dispose()


@pytest.fixture
def events_app(make_app: Callable[..., Flask], event_store: Store) -> Flask:
    return make_app(store=event_store)


def counts(store: Store) -> tuple[int, int]:
    with store.engine.connect() as conn:
        return (int(conn.execute(sa.select(sa.func.count()).select_from(incidents)).scalar_one()),
                int(conn.execute(sa.select(sa.func.count()).select_from(outbox)).scalar_one()))


def test_a_new_event_is_one_transaction(events_app: Flask, event_store: Store,
                                        vehicle_headers: dict[str, str]) -> None:
    client: FlaskClient = events_app.test_client()
    client.post("/v1/events", json=crash_event(), headers=vehicle_headers)  # warm caches
    with Sent(event_store.engine) as sent:
        response = client.post("/v1/events", json=crash_event(), headers=vehicle_headers)
    assert response.status_code == 201
    assert sent.transactions == 1, sent.statements
    if event_store.engine.dialect.name == "postgresql":
        # one statement in autocommit mode: the incident and its outbox row together
        assert sent.round_trips == 1, sent.statements
        [statement] = sent.statements
        assert "INSERT INTO incidents" in statement and "INSERT INTO outbox" in statement
    else:
        assert [s.split(" (")[0] for s in sent.statements] == [
            "INSERT INTO incidents", "INSERT INTO outbox"]
    assert counts(event_store) == (2, 2)


def test_a_replay_writes_nothing_and_answers_the_same_incident(
    events_app: Flask, event_store: Store, vehicle_headers: dict[str, str]
) -> None:
    client = events_app.test_client()
    event = crash_event()
    first = client.post("/v1/events", json=event, headers=vehicle_headers)
    with Sent(event_store.engine) as sent:
        again = client.post("/v1/events", json=event, headers=vehicle_headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json["incident_id"] == first.json["incident_id"]
    assert again.json["replayed"] is True
    assert counts(event_store) == (1, 1)
    # the insert that found the event_id taken, then the stored incident is read
    expected = 2 if event_store.engine.dialect.name == "postgresql" else 1
    assert sent.transactions == expected, sent.statements


def test_a_different_body_under_a_used_event_id_is_a_conflict_and_writes_nothing(
    events_app: Flask, event_store: Store, vehicle_headers: dict[str, str]
) -> None:
    client = events_app.test_client()
    event = crash_event()
    client.post("/v1/events", json=event, headers=vehicle_headers)
    response = client.post("/v1/events", json={**event, "type": "sos"}, headers=vehicle_headers)
    assert response.status_code == 409
    assert counts(event_store) == (1, 1)
    with event_store.engine.connect() as conn:
        assert conn.execute(sa.select(incidents.c.type)).scalar_one() == "crash"


def test_an_extra_row_that_fails_takes_the_incident_with_it(
    event_store: Store, plan: NumberPlan
) -> None:
    """Both or neither: the outbox row cannot be written (status NULL), so the incident
    is not committed either, and the caller gets StoreError (the car: 503, retry)."""

    def broken_outbox(row: Any) -> list[tuple[sa.Table, Any]]:
        [(table, values)] = outbox_rows(row)
        return [(table, {**values, "status": None})]

    event = parse_event(crash_event())
    with pytest.raises(StoreError):
        record_event(event, store=event_store, locator=None, plan=plan,
                     extra_rows=broken_outbox)
    assert counts(event_store) == (0, 0)
    # the same event_id is free: the car's retry is stored
    incident, created = record_event(event, store=event_store, locator=None, plan=plan,
                                     extra_rows=outbox_rows)
    assert created and counts(event_store) == (1, 1)
    stored = event_store.incident_by_event(event.event_id)
    assert stored is not None and stored["id"] == incident["id"]


def test_concurrent_requests_with_one_event_id_store_it_once(
    event_store: Store, plan: NumberPlan
) -> None:
    events = [parse_event(crash_event()) for _ in range(5)]
    conflicting = parse_event({**crash_event(event_id=events[0].event_id), "type": "sos"})
    barrier = threading.Barrier(4)
    results: list[tuple[str, str, bool]] = []
    conflicts: list[str] = []
    lock = threading.Lock()

    def post(n: int) -> None:
        barrier.wait()
        for event in events:
            candidate = conflicting if (n == 3 and event is events[0]) else event
            try:
                incident, created = record_event(candidate, store=event_store, locator=None,
                                                 plan=plan, extra_rows=outbox_rows)
            except EventConflictError:
                with lock:
                    conflicts.append(candidate.event_id)
                continue
            with lock:
                results.append((event.event_id, str(incident["id"]), created))

    threads = [threading.Thread(target=post, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for event in events:
        answers = [(incident_id, created) for event_id, incident_id, created in results
                   if event_id == event.event_id]
        assert sum(created for _, created in answers) == 1
        assert len({incident_id for incident_id, _ in answers}) == 1
    assert counts(event_store) == (5, 5)
    with event_store.engine.connect() as conn:
        assert set(conn.execute(sa.select(incidents.c.id)).scalars()) == set(
            conn.execute(sa.select(outbox.c.incident_id)).scalars())
    # the sos under crash's event_id: refused, unless it came first (then the crashes are)
    stored_type = event_store.incident_by_event(events[0].event_id)
    assert stored_type is not None
    assert (conflicts == [events[0].event_id]) == (stored_type["type"] == "crash")



@pytest.mark.postgres
def test_eight_events_at_once_reuse_pooled_connections(pg_store: Store,
                                                       plan: NumberPlan) -> None:
    """Eight events stored at once (the default serving threads), twice: the second time
    no connection is opened.  A pool that closes what it holds past its size on return
    opens a new server backend for some of them every time."""
    opened: list[int] = []
    sa.event.listen(pg_store.engine, "connect", lambda *_: opened.append(1))

    def eight_at_once() -> None:
        with pg_store.engine.connect() as lock:  # every insert waits: 8 connections held
            lock.execute(sa.text("LOCK TABLE incidents IN EXCLUSIVE MODE"))
            threads = [threading.Thread(target=record_event, args=(
                parse_event(crash_event()),), kwargs={
                "store": pg_store, "locator": None, "plan": plan,
                "extra_rows": outbox_rows}) for _ in range(8)]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 10
            while lock_waiters(pg_store) < 8 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert lock_waiters(pg_store) == 8
            lock.commit()
        for thread in threads:
            thread.join()

    eight_at_once()
    first = len(opened)
    eight_at_once()
    assert counts(pg_store) == (16, 16)
    assert len(opened) == first, (first, len(opened))


def lock_waiters(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE '%INSERT INTO incidents%'"
        )).scalar_one())
