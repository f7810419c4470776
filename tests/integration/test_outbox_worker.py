"""The outbox worker as it runs: its loop, its thread, the worker process, what it
records and logs.  The centre is a real HTTP server on 127.0.0.1 (FakeAssistanceCentre);
a sink fake of the IncidentSink port only where a failure's text must be exact."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

import pytest
import requests
import sqlalchemy as sa
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from gateway.centre_health import API, CentreHealth
from gateway.config import DeliveryPolicy, Settings
from gateway.delivery import (
    OutboxWorker,
    address_of,
    build_worker,
    outbox,
    run_worker_process,
)
from gateway.errors import PermanentUpstreamError, TransientUpstreamError
from gateway.metrics import Metrics
from gateway.store import as_utc
from tests.conftest import Clock
from tests.support.events import crash_event
from tests.support.fake_servers import FakeAssistanceCentre
from tests.support.server import free_port

FAST = DeliveryPolicy(timeout_s=1.0, backoff_initial_s=0.01, backoff_max_s=0.05, budget_s=1.0,
                      poll_s=0.05, concurrency=2, breaker_failures=3, breaker_open_s=30.0)


@pytest.fixture
def centre() -> Iterator[FakeAssistanceCentre]:
    with FakeAssistanceCentre() as fake:
        yield fake


@pytest.fixture
def outbox_app(make_app: Callable[..., Flask], settings: Settings,
               centre: FakeAssistanceCentre) -> Flask:
    return make_app(settings=settings.replace(assistance_url=centre.url, delivery=FAST))


def post(app: Flask, headers: dict[str, str], **overrides: Any) -> str:
    response = app.test_client().post("/v1/events", json=crash_event(**overrides),
                                      headers=headers)
    assert response.status_code == 201, response.json
    return str(response.json["incident_id"])  # type: ignore[index]


def rows(app: Flask) -> dict[str, dict[str, Any]]:
    with app.extensions["gateway"].store.engine.begin() as conn:
        return {r.incident_id: dict(r._mapping) for r in conn.execute(sa.select(outbox))}


def built_worker(app: Flask, **kwargs: Any) -> OutboxWorker:
    svc = app.extensions["gateway"]
    worker = build_worker(svc.settings, svc.store, svc.centre_health, svc.clock, **kwargs)
    assert worker is not None
    return worker


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(metrics.render().decode())
            for s in family.samples}


# -- the loop --------------------------------------------------------------------------


def test_run_once_delivers_what_is_due_and_says_how_many(
    outbox_app: Flask, centre: FakeAssistanceCentre, vehicle_headers: dict[str, str]
) -> None:
    worker = built_worker(outbox_app)
    assert worker.run_once() == 0
    keys = [post(outbox_app, vehicle_headers) for _ in range(3)]
    assert worker.pending() == 3
    assert worker.run_once() == 3
    assert set(centre.incidents) == set(keys)
    assert worker.pending() == 0
    assert worker.run_once() == 0
    assert worker.counters.values["delivered"] == 3


def test_run_once_claims_four_rows_per_delivery_slot(
    outbox_app: Flask, centre: FakeAssistanceCentre, vehicle_headers: dict[str, str]
) -> None:
    for _ in range(FAST.concurrency * 4 + 1):
        post(outbox_app, vehicle_headers)
    worker = built_worker(outbox_app)
    assert worker.run_once() == FAST.concurrency * 4
    assert worker.pending() == 1
    assert worker.run_once() == 1


def test_pending_counts_only_rows_still_to_deliver(
    outbox_app: Flask, centre: FakeAssistanceCentre, vehicle_headers: dict[str, str]
) -> None:
    delivered = post(outbox_app, vehicle_headers)
    worker = built_worker(outbox_app)
    worker.run_once()
    centre.mode = "400"
    post(outbox_app, vehicle_headers)
    worker.run_once()  # refused: failed, not pending
    post(outbox_app, vehicle_headers)
    statuses = sorted(r["status"] for r in rows(outbox_app).values())
    assert statuses == ["delivered", "failed", "pending"]
    assert rows(outbox_app)[delivered]["status"] == "delivered"
    assert worker.pending() == 1


def test_the_thread_delivers_as_events_arrive_and_stops_at_once(
    outbox_app: Flask, centre: FakeAssistanceCentre, vehicle_headers: dict[str, str]
) -> None:
    worker = built_worker(outbox_app)
    worker.policy = dataclasses.replace(FAST, poll_s=30.0)
    thread = worker.start_thread()
    try:
        assert thread.name == "outbox-worker" and thread.daemon and thread.is_alive()
        key = post(outbox_app, vehicle_headers)
        worker.wake.set()  # what the view does for a new incident
        assert centre.wait_for_incidents(1)
        assert list(centre.incidents) == [key]
        wait_for(lambda: rows(outbox_app)[key]["status"] == "delivered")
    finally:
        started = time.monotonic()
        worker.stop()
        thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - started < 2.0  # not a 30 s poll


def test_a_database_error_in_a_pass_is_logged_and_the_loop_goes_on(
    outbox_app: Flask, centre: FakeAssistanceCentre, vehicle_headers: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = outbox_app.extensions["gateway"].store
    with store.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE outbox RENAME TO outbox_away"))
    worker = built_worker(outbox_app)
    with caplog.at_level(logging.INFO, logger="gateway.delivery"):
        thread = worker.start_thread()
        try:
            wait_for(lambda: any("database unavailable" in r.getMessage()
                                 for r in caplog.records))
            with store.engine.begin() as conn:
                conn.execute(sa.text("ALTER TABLE outbox_away RENAME TO outbox"))
            key = post(outbox_app, vehicle_headers)
            assert centre.wait_for_incidents(1)
            assert list(centre.incidents) == [key]
        finally:
            worker.stop()
            thread.join(5)
    messages = [r.getMessage() for r in caplog.records if r.name == "gateway.delivery"]
    assert messages[0] == "delivery worker started"
    assert messages[-1] == "delivery worker stopped"
    [unavailable, *_] = [r for r in caplog.records if "database unavailable" in r.getMessage()]
    assert unavailable.levelno == logging.ERROR
    assert unavailable.getMessage().startswith(
        "delivery worker: database unavailable (database error: OperationalError")


def test_an_unexpected_error_in_a_pass_is_logged_and_the_loop_goes_on(
    outbox_app: Flask, vehicle_headers: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """A sink that breaks its contract (raises something that is neither transient nor
    permanent) fails that pass; the next pass still runs."""

    class Broken:
        calls = 0

        def send_incident(self, payload: Any, *, idempotency_key: str) -> int:
            Broken.calls += 1
            if Broken.calls == 1:
                raise ValueError("a bug")
            return 201

    svc = outbox_app.extensions["gateway"]
    worker = OutboxWorker(svc.store, Broken(), policy=FAST, clock=svc.clock)
    key = post(outbox_app, vehicle_headers)
    with caplog.at_level(logging.ERROR, logger="gateway.delivery"):
        thread = worker.start_thread()
        try:
            wait_for(lambda: any(r.getMessage() == "delivery worker pass failed"
                                 and r.exc_info for r in caplog.records))
            svc.clock.advance(FAST.lease_s + 1)  # the broken pass left the row leased
            wait_for(lambda: rows(outbox_app)[key]["status"] == "delivered")
        finally:
            worker.stop()
            thread.join(5)
    assert Broken.calls == 2


def test_an_idle_worker_polls_every_poll_s_and_a_failing_one_does_not_spin(
    outbox_app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing due: one look every poll_s (0.05 s).  The database failing: one error a
    pass, one pass every poll_s, not a busy loop."""
    store = outbox_app.extensions["gateway"].store
    statements: list[str] = []
    sa.event.listen(store.engine, "before_cursor_execute",
                    lambda *args: statements.append(args[2]))
    worker = built_worker(outbox_app)
    thread = worker.start_thread()
    try:
        time.sleep(0.5)
        idle = len(statements)
        with store.engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE outbox RENAME TO outbox_away"))
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="gateway.delivery"):
            time.sleep(0.5)
        failing = [r for r in caplog.records if "database unavailable" in r.getMessage()]
    finally:
        worker.stop()
        thread.join(5)
    assert 1 <= idle <= 0.5 / FAST.poll_s + 3, idle
    assert 1 <= len(failing) <= 0.5 / FAST.poll_s + 3, len(failing)


def test_run_once_delivers_at_most_concurrency_at_a_time_on_its_own_threads(
    outbox_app: Flask, vehicle_headers: dict[str, str]
) -> None:
    class Counting:
        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.now = self.most = 0
            self.threads: set[str] = set()

        def send_incident(self, payload: Any, *, idempotency_key: str) -> int:
            with self.lock:
                self.now += 1
                self.most = max(self.most, self.now)
                self.threads.add(threading.current_thread().name)
            time.sleep(0.05)
            with self.lock:
                self.now -= 1
            return 201

    for _ in range(8):
        post(outbox_app, vehicle_headers)
    sink = Counting()
    svc = outbox_app.extensions["gateway"]
    worker = OutboxWorker(svc.store, sink, policy=FAST, clock=svc.clock)
    assert worker.run_once() == 8
    assert sink.most == FAST.concurrency == 2
    assert len(sink.threads) == 2
    assert all(name.startswith("deliver_") for name in sink.threads), sink.threads


def test_claimed_rows_come_earliest_due_first(
    outbox_app: Flask, vehicle_headers: dict[str, str], clock: Clock
) -> None:
    first = post(outbox_app, vehicle_headers)
    svc = outbox_app.extensions["gateway"]
    worker = OutboxWorker(svc.store, Refusing("HTTP 503"), clock=svc.clock,
                          policy=dataclasses.replace(FAST, budget_s=0.01))
    assert [worker.deliver(r) for r in worker.claim(1)] == ["rescheduled"]  # due later
    second = post(outbox_app, vehicle_headers)
    clock.advance(FAST.backoff_max_s)
    assert [r["incident_id"] for r in worker.claim(10)] == [second, first]


def test_a_row_the_worker_cannot_read_fails_each_pass_once_per_poll(
    outbox_app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    """An outbox row with an unreadable time makes every pass fail (not a database
    error): logged once a pass, one pass every poll_s, not in a hot loop."""
    store = outbox_app.extensions["gateway"].store
    with store.engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO outbox (incident_id, payload, status, created_at, next_attempt_at, "
            "attempts) VALUES ('broken', '{}', 'pending', '0000-broken', '0000-broken', 0)"))
    worker = built_worker(outbox_app)
    with caplog.at_level(logging.ERROR, logger="gateway.delivery"):
        thread = worker.start_thread()
        try:
            time.sleep(0.5)
        finally:
            worker.stop()
            thread.join(5)
    failed = [r for r in caplog.records if r.getMessage() == "delivery worker pass failed"]
    assert 1 <= len(failed) <= 0.5 / FAST.poll_s + 3, len(failed)


def test_an_address_that_cannot_be_stored_is_still_delivered_and_logged(
    outbox_app: Flask, vehicle_headers: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    key = post(outbox_app, vehicle_headers)
    worker = geocoded_worker(outbox_app, Geocoder(ADDRESS))
    (row,) = worker.claim(1)
    store = outbox_app.extensions["gateway"].store
    with store.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE outbox RENAME TO outbox_away"))
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.delivery"):
            assert worker.with_address(row)["address"] == ADDRESS
    finally:
        with store.engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE outbox_away RENAME TO outbox"))
    assert [r.getMessage() for r in caplog.records if r.name == "gateway.delivery"] == [
        f"address of {key} not stored (database error: OperationalError); delivered with it"]
    assert address_of(store, key) is None


# -- what a pass records and logs --------------------------------------------------------


class Refusing:
    """A centre answering every attempt with a transient failure, with this text."""

    def __init__(self, text: str) -> None:
        self.text = text

    def send_incident(self, payload: Any, *, idempotency_key: str) -> int:
        raise TransientUpstreamError(self.text)


def test_a_rescheduled_row_keeps_the_error_at_most_300_characters(
    outbox_app: Flask, vehicle_headers: dict[str, str], clock: Clock
) -> None:
    key = post(outbox_app, vehicle_headers)
    svc = outbox_app.extensions["gateway"]
    short = dataclasses.replace(FAST, budget_s=0.1)
    for text, stored in (("HTTP 503 from the centre", "HTTP 503 from the centre"),
                         ("x" * 299 + "yz", "x" * 299 + "y")):
        worker = OutboxWorker(svc.store, Refusing(text), policy=short, clock=svc.clock)
        assert [worker.deliver(r) for r in worker.claim(1)] == ["rescheduled"]
        row = rows(outbox_app)[key]
        assert row["last_error"] == stored
        assert row["status"] == "pending" and row["leased_until"] is None
        assert as_utc(row["next_attempt_at"]) == dt.datetime.fromtimestamp(
            clock.now, tz=dt.UTC) + dt.timedelta(seconds=FAST.backoff_max_s)
        clock.advance(FAST.backoff_max_s)


def test_a_refused_row_keeps_the_error_at_most_300_characters(
    outbox_app: Flask, centre: FakeAssistanceCentre, vehicle_headers: dict[str, str]
) -> None:
    key = post(outbox_app, vehicle_headers)
    centre.mode = "400"
    worker = built_worker(outbox_app)
    assert [worker.deliver(r) for r in worker.claim(1)] == ["failed"]
    row = rows(outbox_app)[key]
    assert row["status"] == "failed" and row["last_status"] == 400
    assert row["last_error"] and "400" in row["last_error"] and len(row["last_error"]) <= 300
    assert row["delivered_at"] is None and row["leased_until"] is None


def test_a_refusal_keeps_its_text_at_most_300_characters(
    outbox_app: Flask, vehicle_headers: dict[str, str]
) -> None:
    class Refused:
        def send_incident(self, payload: Any, *, idempotency_key: str) -> int:
            raise PermanentUpstreamError("r" * 299 + "st", status=422)

    key = post(outbox_app, vehicle_headers)
    svc = outbox_app.extensions["gateway"]
    worker = OutboxWorker(svc.store, Refused(), policy=FAST, clock=svc.clock)
    assert [worker.deliver(r) for r in worker.claim(1)] == ["failed"]
    row = rows(outbox_app)[key]
    assert (row["status"], row["last_status"], row["last_error"]) == (
        "failed", 422, "r" * 299 + "s")


def test_a_delivered_row_records_when_and_no_error(
    outbox_app: Flask, centre: FakeAssistanceCentre, vehicle_headers: dict[str, str],
    clock: Clock, caplog: pytest.LogCaptureFixture,
) -> None:
    key = post(outbox_app, vehicle_headers)
    worker = built_worker(outbox_app)
    with caplog.at_level(logging.INFO, logger="gateway.delivery"):
        assert [worker.deliver(r) for r in worker.claim(1)] == ["delivered"]
    assert [r.getMessage() for r in caplog.records if r.name == "gateway.delivery"] == [
        f"incident {key} delivered (HTTP 201)"]
    row = rows(outbox_app)[key]
    assert row["status"] == "delivered" and row["last_status"] == 201
    assert row["last_error"] is None and row["leased_until"] is None
    assert as_utc(row["delivered_at"]) == dt.datetime.fromtimestamp(clock.now, tz=dt.UTC)


def test_each_failed_attempt_is_logged_counted_and_fed_to_the_breaker(
    outbox_app: Flask, centre: FakeAssistanceCentre, vehicle_headers: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = post(outbox_app, vehicle_headers)
    svc = outbox_app.extensions["gateway"]
    metrics = Metrics()
    worker = OutboxWorker(svc.store, built_worker(outbox_app).sink, metrics=metrics,
                          health=svc.centre_health, clock=svc.clock, policy=FAST)
    centre.mode = "503"
    with caplog.at_level(logging.WARNING, logger="gateway.delivery"):
        assert [worker.deliver(r) for r in worker.claim(1)] == ["rescheduled"]
    retries = [r.getMessage() for r in caplog.records if r.name == "gateway.delivery"]
    assert len(retries) >= 2, retries
    for message in retries:
        assert re.fullmatch(rf"delivery of {key} failed \(assistance centre answered HTTP "
                            r"503: .*\); retrying in 0\.0[1-5]s", message), message
    failures = ("gateway_delivery_failures_total", frozenset({("kind", "transient")}))
    assert samples(metrics)[failures] == len(centre.requests) == len(retries) + 1
    assert worker.counters.values["transient_failures"] == len(centre.requests)
    assert worker.counters.values["rescheduled"] == 1
    assert svc.centre_health.states()[API] == "open"
    centre.mode = "400"
    svc.clock.advance(FAST.backoff_max_s)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="gateway.delivery"):
        assert [worker.deliver(r) for r in worker.claim(1)] == ["failed"]
    [refused] = [r.getMessage() for r in caplog.records if r.name == "gateway.delivery"]
    assert re.fullmatch(rf"incident {key} refused by the centre \(HTTP 400\): "
                        r"assistance centre answered HTTP 400.*; not retried", refused), refused
    permanent = ("gateway_delivery_failures_total", frozenset({("kind", "permanent")}))
    assert samples(metrics)[permanent] == 1
    outcomes = {dict(labels)["outcome"]: value for (name, labels), value
                in samples(metrics).items() if name == "gateway_deliveries_total"}
    assert outcomes == {"rescheduled": 1, "failed": 1}


@pytest.mark.parametrize(("outcome", "when"), [
    ("delivered", "before it was marked delivered"),
    ("refused", "before its refusal was recorded"),
    ("transient", "before it was rescheduled"),
])
def test_a_lease_lost_during_the_send_changes_nothing_and_is_logged(
    outbox_app: Flask, vehicle_headers: dict[str, str], clock: Clock, outcome: str,
    when: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """A's send outlives its lease and B claims the row meanwhile: whatever A's send
    answered, A records nothing and says so."""
    key = post(outbox_app, vehicle_headers)
    svc = outbox_app.extensions["gateway"]
    b = built_worker(outbox_app)
    taken: list[dict[str, Any]] = []

    class Stalled:
        def send_incident(self, payload: Any, *, idempotency_key: str) -> int:
            clock.advance(FAST.lease_s + 1)
            taken.extend(b.claim(1))
            if outcome == "refused":
                raise PermanentUpstreamError("HTTP 422", status=422)
            if outcome == "transient":
                raise TransientUpstreamError("HTTP 503")
            return 201

    a = OutboxWorker(svc.store, Stalled(), clock=svc.clock,
                     policy=dataclasses.replace(FAST, budget_s=0.01))
    (row_a,) = a.claim(1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gateway.delivery"):
        assert a.deliver(row_a) == "lost"
    assert (f"delivery of {key}: lease lost {when}; the row is another worker's"
            in [r.getMessage() for r in caplog.records if r.name == "gateway.delivery"])
    row = rows(outbox_app)[key]
    assert (row["status"], row["last_error"], row["delivered_at"]) == ("pending", None, None)
    assert as_utc(row["leased_until"]) == taken[0]["leased_until"]  # B's lease, untouched
    assert a.counters.values["lease_lost"] == 1


def test_a_stopping_worker_makes_its_attempt_and_no_second(
    outbox_app: Flask, centre: FakeAssistanceCentre, vehicle_headers: dict[str, str]
) -> None:
    key = post(outbox_app, vehicle_headers)
    worker = built_worker(outbox_app)
    centre.mode = "503"
    worker.stop()  # stopping: the attempt under way is made, no retry after it
    assert [worker.deliver(r) for r in worker.claim(1)] == ["rescheduled"]
    assert len(centre.requests) == 1
    row = rows(outbox_app)[key]
    assert row["attempts"] == 1
    assert row["last_error"] == "_Stopping"  # the reason it was not retried, by its type


def test_a_lost_lease_is_logged_with_the_incident_and_when(
    outbox_app: Flask, centre: FakeAssistanceCentre, vehicle_headers: dict[str, str],
    clock: Clock, caplog: pytest.LogCaptureFixture,
) -> None:
    key = post(outbox_app, vehicle_headers)
    a, b = built_worker(outbox_app), built_worker(outbox_app)
    (row_a,) = a.claim(1)
    clock.advance(FAST.lease_s + 1)
    (row_b,) = b.claim(1)
    with caplog.at_level(logging.WARNING, logger="gateway.delivery"):
        assert a.deliver(row_a) == "lost"
    [record] = [r for r in caplog.records if r.name == "gateway.delivery"]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        f"delivery of {key}: lease lost before an attempt; the row is another worker's")
    assert a.counters.values["lease_lost"] == 1
    assert b.deliver(row_b) == "delivered"


# -- the address lookup before a delivery (the geocoder's port: lookup(lat, lon)) --------


class Geocoder:
    def __init__(self, answer: Any = None, error: Exception | None = None) -> None:
        self.answer = answer
        self.error = error
        self.asked: list[tuple[Any, Any]] = []

    def lookup(self, lat: Any, lon: Any) -> Any:
        self.asked.append((lat, lon))
        if self.error is not None:
            raise self.error
        return self.answer


def geocoded_worker(app: Flask, geocoder: Geocoder) -> OutboxWorker:
    svc = app.extensions["gateway"]
    client_worker = built_worker(app)
    return OutboxWorker(svc.store, client_worker.sink, policy=FAST, clock=svc.clock,
                        geocoder=geocoder)


ADDRESS = {"road": "Vesterbrogade 1", "city": "Copenhagen", "country_code": "DK"}


def test_a_payload_that_has_its_address_is_not_looked_up_again(
    outbox_app: Flask, centre: FakeAssistanceCentre, vehicle_headers: dict[str, str]
) -> None:
    key = post(outbox_app, vehicle_headers)
    geocoder = Geocoder(ADDRESS)
    worker = geocoded_worker(outbox_app, geocoder)
    (row,) = worker.claim(1)
    assert worker.with_address(row)["address"] == ADDRESS
    assert len(geocoder.asked) == 1
    assert address_of(outbox_app.extensions["gateway"].store, key) == ADDRESS
    stored = {**row, "payload": rows(outbox_app)[key]["payload"]}  # a later pass's row
    assert worker.with_address(stored)["address"] == ADDRESS
    assert len(geocoder.asked) == 1


@pytest.mark.parametrize("location", [{"lat": 55.6761, "lon": None},
                                      {"lat": None, "lon": 12.5683},
                                      {"lat": "55.6", "lon": "12.5"}, None])
def test_no_lookup_without_a_position_in_numbers(
    outbox_app: Flask, vehicle_headers: dict[str, str], location: Any
) -> None:
    geocoder = Geocoder(ADDRESS)
    worker = geocoded_worker(outbox_app, geocoder)
    post(outbox_app, vehicle_headers)
    (row,) = worker.claim(1)
    payload = {**row["payload"], "location": location}
    assert worker.with_address({**row, "payload": payload}) == payload
    assert geocoder.asked == []


@pytest.mark.parametrize("payload", ["not an object", ["a", "list"], None])
def test_a_payload_that_is_not_an_object_is_delivered_as_it_is(
    outbox_app: Flask, vehicle_headers: dict[str, str], payload: Any
) -> None:
    geocoder = Geocoder(ADDRESS)
    worker = geocoded_worker(outbox_app, geocoder)
    post(outbox_app, vehicle_headers)
    (row,) = worker.claim(1)
    assert worker.with_address({**row, "payload": payload}) == payload
    assert geocoder.asked == []


def test_a_geocoder_that_raises_is_logged_and_the_incident_delivered_without_address(
    outbox_app: Flask, centre: FakeAssistanceCentre, vehicle_headers: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = post(outbox_app, vehicle_headers)
    worker = geocoded_worker(outbox_app, Geocoder(error=RuntimeError("a bug")))
    with caplog.at_level(logging.ERROR, logger="gateway.delivery"):
        assert [worker.deliver(r) for r in worker.claim(1)] == ["delivered"]
    [record] = [r for r in caplog.records if r.name == "gateway.delivery"]
    assert record.getMessage() == "address lookup failed" and record.exc_info is not None
    assert "address" not in centre.incidents[key]


# -- build_worker and the worker process ---------------------------------------------


def test_build_worker_feeds_the_api_breaker_and_the_metrics(
    make_app: Callable[..., Flask], settings: Settings, centre: FakeAssistanceCentre,
    vehicle_headers: dict[str, str], caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_app(settings=settings.replace(assistance_url=centre.url, delivery=FAST))
    metrics = Metrics()
    health: CentreHealth = app.extensions["gateway"].centre_health
    worker = built_worker(app, metrics=metrics)
    assert worker.policy == FAST
    centre.mode = "503"
    post(app, vehicle_headers)
    assert [worker.deliver(r) for r in worker.claim(1)] == ["rescheduled"]
    assert health.states()[API] == "open"  # three or more failed attempts in the budget
    attempts = samples(metrics)[("gateway_delivery_attempts_total", frozenset())]
    assert attempts >= 3
    centre.mode = "up"
    app.extensions["gateway"].clock.advance(FAST.backoff_max_s)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert [worker.deliver(r) for r in worker.claim(1)] == ["delivered"]
    assert health.states()[API] == "closed"
    delivered = ("gateway_deliveries_total", frozenset({("outcome", "delivered")}))
    assert samples(metrics)[delivered] == 1
    # no geocoder: no address lookup tried, none failed
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_build_worker_needs_the_centre_url(app: Flask) -> None:
    svc = app.extensions["gateway"]
    assert svc.settings.assistance_url in (None, "")
    assert build_worker(svc.settings, svc.store, svc.centre_health, svc.clock) is None


def test_address_of_an_incident_without_an_outbox_row_is_none(app: Flask) -> None:
    assert address_of(app.extensions["gateway"].store, "no-such-incident") is None


@pytest.fixture
def restore_signals() -> Iterator[None]:
    """Harmless handlers while the test runs (run_worker_process installs its own): a
    signal sent before the worker's handler is set, or after it returned or failed,
    never ends or hangs the test session."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in handlers:
        signal.signal(sig, lambda *_: None)
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


class Stopper(threading.Thread):
    """Sends ``sig`` to this process once ``ready()`` (or after 20 s), and again every
    second until the test says run_worker_process returned (``done``): a signal that
    came before the worker's handler was set is not lost.  After 10 s of ``sig``, SIGTERM,
    so a worker that ignores ``sig`` fails the test instead of hanging it."""

    def __init__(self, sig: int, ready: Callable[[], bool]) -> None:
        super().__init__(name="stopper")
        self.sig, self.ready = sig, ready
        self.done = threading.Event()
        self.first_sent: float | None = None

    def run(self) -> None:
        deadline = time.monotonic() + 20
        while not self.done.is_set() and not self.ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.first_sent = time.monotonic()
        while not self.done.is_set():
            late = time.monotonic() - self.first_sent > 10
            os.kill(os.getpid(), signal.SIGTERM if late else self.sig)
            self.done.wait(1.0)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        self.join(30)

    def stopped_within(self, seconds: float) -> bool:
        return (self.first_sent is not None
                and time.monotonic() - self.first_sent < seconds)


@pytest.mark.usefixtures("restore_signals")
def test_the_worker_process_delivers_until_sigterm(
    make_app: Callable[..., Flask], settings: Settings, centre: FakeAssistanceCentre,
    vehicle_headers: dict[str, str], caplog: pytest.LogCaptureFixture,
) -> None:
    """``python -m gateway worker`` in this process: it delivers what the app stored,
    then SIGTERM stops it and it returns 0."""
    worker_settings = settings.replace(assistance_url=centre.url, delivery=FAST)
    # stored by an app without a centre (and so without a delivery thread of its own):
    # only the worker under test delivers, so SIGTERM comes after its handler is set
    # (an app delivering first sent it before, to whatever handler was there: a hang)
    key = post(make_app(settings=settings), vehicle_headers)

    with caplog.at_level(logging.INFO, logger="gateway.delivery"), \
            Stopper(signal.SIGTERM, lambda: len(centre.incidents) >= 1) as stopper:
        assert run_worker_process(worker_settings) == 0
        assert stopper.stopped_within(5)
    assert list(centre.incidents) == [key]
    messages = [r.getMessage() for r in caplog.records]
    assert "delivery worker started" in messages and "delivery worker stopped" in messages


@pytest.mark.usefixtures("restore_signals")
def test_the_worker_process_serves_its_metrics_and_stops_on_sigint(
    make_app: Callable[..., Flask], settings: Settings, centre: FakeAssistanceCentre,
    vehicle_headers: dict[str, str], plan: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    """Its metrics on their port: the delivery counted, the outbox read from the
    database, every centre line of the plan and the api key with its breaker state."""
    worker_settings = settings.replace(assistance_url=centre.url, delivery=FAST)
    app = make_app(settings=settings)  # without a centre: only the worker delivers
    post(app, vehicle_headers)
    port = free_port()
    scraped: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    delivered = ("gateway_deliveries_total", frozenset({("outcome", "delivered")}))

    def scraped_enough() -> bool:
        try:
            text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
        except requests.ConnectionError:
            return False
        scraped.clear()
        scraped.update({(s.name, frozenset(s.labels.items())): s.value
                        for f in text_string_to_metric_families(text) for s in f.samples})
        return scraped.get(delivered) == 1 and scraped.get(
            ("gateway_outbox_pending", frozenset())) == 0

    with caplog.at_level(logging.INFO, logger="gateway.delivery"), \
            Stopper(signal.SIGINT, scraped_enough) as stopper:
        assert run_worker_process(worker_settings, metrics_port=port) == 0
        assert stopper.stopped_within(5)  # by SIGINT, not the fallback SIGTERM
    assert scraped.get(delivered) == 1, scraped
    assert scraped[("gateway_database_up", frozenset())] == 1
    lines = {c.centre_id for c in plan.centres} | {API}
    closed = {dict(labels)["centre"] for (name, labels), value in scraped.items()
              if name == "gateway_centre_state" and ("state", "closed") in labels
              and value == 1}
    assert closed == lines
    assert f"worker metrics on http://127.0.0.1:{port}/metrics" in [
        r.getMessage() for r in caplog.records if r.name == "gateway.delivery"]
    # listening on the loopback address only (/proc/net/tcp: address:port in hex)
    listening = [line.split()[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                 if line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"]
    assert listening == [f"0100007F:{port:04X}"], listening
    # the worker fed the api breaker of the shared database
    health = app.extensions["gateway"].centre_health
    assert health.states() == {API: "closed"}


@pytest.mark.usefixtures("restore_signals")
def test_the_worker_process_without_a_number_plan_still_delivers(
    make_app: Callable[..., Flask], settings: Settings, centre: FakeAssistanceCentre,
    vehicle_headers: dict[str, str], tmp_path: Path,
) -> None:
    worker_settings = settings.replace(assistance_url=centre.url, delivery=FAST)
    key = post(make_app(settings=settings), vehicle_headers)  # only the worker delivers
    broken = worker_settings.replace(number_plan_dir=tmp_path / "no-plan-here")
    with Stopper(signal.SIGTERM, lambda: len(centre.incidents) >= 1):
        assert run_worker_process(broken) == 0
    assert list(centre.incidents) == [key]


@pytest.mark.usefixtures("restore_signals")
def test_the_worker_process_without_a_centre_says_so_and_exits_2(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="gateway.delivery"):
        assert run_worker_process(settings.replace(assistance_url=None)) == 2
    assert [r.getMessage() for r in caplog.records if r.name == "gateway.delivery"] == [
        "GATEWAY_ASSISTANCE_URL is not set: nothing to deliver to"]


@pytest.mark.usefixtures("restore_signals")
def test_the_worker_process_with_its_metrics_port_taken_exits_2(
    settings: Settings, centre: FakeAssistanceCentre, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.ERROR, logger="gateway.delivery"):
            assert run_worker_process(settings.replace(assistance_url=centre.url),
                                      metrics_port=port) == 2
    [record] = [r for r in caplog.records if r.name == "gateway.delivery"]
    assert record.getMessage().startswith(f"worker metrics: cannot listen on 127.0.0.1:{port} (")
    assert "Address already in use" in record.getMessage()
