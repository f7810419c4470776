"""Delivering incidents to a real (fake) assistance centre over HTTP on 127.0.0.1."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from gateway.adapters.assistance import AssistanceCentreClient
from gateway.centre_health import API, CentreHealth
from gateway.config import DeliveryPolicy, Settings
from gateway.delivery import OutboxWorker, outbox
from gateway.store import Store
from tests.conftest import Twilio
from tests.support.events import SWEDISH_CAR, crash_event
from tests.support.fake_servers import FakeAssistanceCentre
from tests.support.twilio import call_params, dial_of, dialled_number, parse

FAST = DeliveryPolicy(timeout_s=1.0, backoff_initial_s=0.1, backoff_max_s=30.0, budget_s=15.0,
                      poll_s=0.05, breaker_failures=3, breaker_open_s=30.0)


@pytest.fixture
def centre() -> Iterator[FakeAssistanceCentre]:
    with FakeAssistanceCentre() as fake:
        yield fake


@pytest.fixture
def delivery_app(make_app: Callable[..., Flask], settings: Settings,
                 centre: FakeAssistanceCentre) -> Flask:
    return make_app(settings=settings.replace(assistance_url=centre.url, delivery=FAST))


def worker_for(app: Flask, policy: DeliveryPolicy = FAST) -> OutboxWorker:
    svc = app.extensions["gateway"]
    client = AssistanceCentreClient(svc.settings.assistance_url, timeout_s=policy.timeout_s)
    return OutboxWorker(svc.store, client, policy=policy, health=svc.centre_health,
                        clock=svc.clock)


def post(app: Flask, headers: dict[str, str], **overrides: Any) -> dict[str, Any]:
    response = app.test_client().post("/v1/events", json=crash_event(**overrides), headers=headers)
    assert response.status_code == 201, response.json
    return response.json  # type: ignore[return-value]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def outbox_row(app: Flask, incident_id: str) -> dict[str, Any]:
    with app.extensions["gateway"].store.engine.begin() as conn:
        row = conn.execute(sa.select(outbox).where(outbox.c.incident_id == incident_id)).one()
    return dict(row._mapping)


def test_outbox_row_commits_with_the_incident(delivery_app: Flask,
                                              vehicle_headers: dict[str, str]) -> None:
    incident = post(delivery_app, vehicle_headers)
    row = outbox_row(delivery_app, incident["incident_id"])
    assert row["status"] == "pending"
    assert row["payload"]["vin"] == SWEDISH_CAR["vin"]
    assert row["payload"]["location"]["country"] == "DK"


def test_503_is_retried_with_growing_gaps_then_delivered_once(
    delivery_app: Flask, centre: FakeAssistanceCentre, vehicle_headers: dict[str, str]
) -> None:
    incident = post(delivery_app, vehicle_headers)
    centre.mode = "503"
    worker = worker_for(delivery_app)
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.extend(
        worker.deliver(r) for r in worker.claim(10)))
    thread.start()
    wait_for(lambda: len(centre.requests) >= 4)
    centre.mode = "up"
    thread.join(timeout=20)
    assert result == ["delivered"]
    times = [r.time for r in centre.requests]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) >= 5
    assert gaps[0] < gaps[1] < gaps[2], gaps  # exponential backoff
    key = incident["incident_id"]
    assert list(centre.incidents) == [key]
    assert centre.incidents[key]["vin"] == SWEDISH_CAR["vin"]
    assert all(r.headers.get("Idempotency-Key") == key for r in centre.requests)
    row = outbox_row(delivery_app, key)
    assert row["status"] == "delivered" and row["attempts"] == len(times)


def test_permanent_refusal_is_recorded_not_retried(
    delivery_app: Flask, centre: FakeAssistanceCentre, vehicle_headers: dict[str, str]
) -> None:
    incident = post(delivery_app, vehicle_headers)
    centre.mode = "400"
    worker = worker_for(delivery_app)
    assert [worker.deliver(r) for r in worker.claim(10)] == ["failed"]
    assert len(centre.requests) == 1
    row = outbox_row(delivery_app, incident["incident_id"])
    assert row["status"] == "failed" and row["last_status"] == 400
    assert worker.counters.values["permanent_failures"] == 1


def test_budget_exhausted_reschedules_and_keeps_the_row(
    delivery_app: Flask, centre: FakeAssistanceCentre, vehicle_headers: dict[str, str]
) -> None:
    incident = post(delivery_app, vehicle_headers)
    centre.mode = "refuse"
    policy = DeliveryPolicy(timeout_s=0.5, backoff_initial_s=0.05, backoff_max_s=0.2,
                            budget_s=0.5, poll_s=0.05)
    worker = worker_for(delivery_app, policy)
    assert [worker.deliver(r) for r in worker.claim(10)] == ["rescheduled"]
    row = outbox_row(delivery_app, incident["incident_id"])
    assert row["status"] == "pending" and row["attempts"] >= 2
    assert row["leased_until"] is None


def test_a_row_is_claimed_by_one_worker_only(delivery_app: Flask,
                                             vehicle_headers: dict[str, str]) -> None:
    for _ in range(20):
        post(delivery_app, vehicle_headers)
    a, b = worker_for(delivery_app), worker_for(delivery_app)
    claimed: list[list[dict[str, Any]]] = [[], []]
    threads = [threading.Thread(target=lambda i=i, w=w: claimed[i].extend(w.claim(20)))
               for i, w in enumerate((a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [r["id"] for r in claimed[0] + claimed[1]]
    assert len(ids) == 20 and len(set(ids)) == 20


def test_centre_api_down_alone_never_skips_a_staffed_line(
    delivery_app: Flask, centre: FakeAssistanceCentre, vehicle_headers: dict[str, str],
    plan: Any,
) -> None:
    """The incident API and the phone lines fail independently: an API outage opens
    the ``api`` breaker (reported) but a crash call still rings the staffed line."""
    post(delivery_app, vehicle_headers)
    centre.mode = "503"
    policy = DeliveryPolicy(timeout_s=0.5, backoff_initial_s=0.01, backoff_max_s=0.05,
                            budget_s=0.3, breaker_failures=3)
    worker = worker_for(delivery_app, policy)
    worker.deliver(worker.claim(1)[0])
    health: CentreHealth = delivery_app.extensions["gateway"].centre_health
    assert health.states()[API] == "open"
    assert health.unreachable() == set()

    post(delivery_app, vehicle_headers)
    root = parse(Twilio(delivery_app.test_client()).post(
        "/twilio/voice", call_params("CAapidown", SWEDISH_CAR["msisdn"])).data)
    assert dialled_number(root) == plan.centres_for("SE")[0].number


def test_api_breaker_closes_on_a_successful_delivery(
    delivery_app: Flask, vehicle_headers: dict[str, str]
) -> None:
    health: CentreHealth = delivery_app.extensions["gateway"].centre_health
    for _ in range(3):
        health.record(API, ok=False, reason="test")
    assert health.states()[API] == "open"
    assert health.unreachable() == set()  # never a line
    post(delivery_app, vehicle_headers)
    worker = worker_for(delivery_app)
    assert [worker.deliver(r) for r in worker.claim(10)] == ["delivered"]
    assert health.states()[API] == "closed"


def test_half_open_probe_then_recovery(delivery_app: Flask, plan: Any, clock: Any) -> None:
    health: CentreHealth = delivery_app.extensions["gateway"].centre_health
    line = plan.centres_for("SE")[0].centre_id
    for _ in range(3):
        health.record(line, ok=False, reason="dial failed")
    assert health.unreachable() == {line}
    clock.advance(31)  # open long enough: exactly one caller gets to probe
    assert health.unreachable() == set()
    assert health.unreachable() == {line}  # others still skip
    # the probe's dial was answered: the line is back for everyone
    health.record(line, ok=True, reason="probe: dial answered")
    assert health.unreachable() == set()


def test_failed_probe_opens_again(delivery_app: Flask, clock: Any) -> None:
    health: CentreHealth = delivery_app.extensions["gateway"].centre_health
    for _ in range(3):
        health.record("eu-primary", ok=False, reason="dial no-answer")
    clock.advance(31)
    assert "eu-primary" not in health.unreachable()  # this caller probes
    health.record("eu-primary", ok=False, reason="probe: dial busy")
    assert "eu-primary" in health.unreachable()


def test_dial_failures_open_one_centre_and_calls_skip_it(
    delivery_app: Flask, plan: Any, vehicle_headers: dict[str, str]
) -> None:
    twilio = Twilio(delivery_app.test_client())
    primary, backup = plan.centres_for("SE")[:2]
    for n in range(3):
        sid = f"CAfail{n}"
        root = parse(twilio.post("/twilio/voice", call_params(sid, SWEDISH_CAR["msisdn"])).data)
        assert dialled_number(root) == primary.number
        twilio.post(dial_of(root).get("action", ""),
                    call_params(sid, SWEDISH_CAR["msisdn"], DialCallStatus="failed"))
    # the call path reads line health from memory, refreshed in the background
    delivery_app.extensions["gateway"].line_health.refresh()
    root = parse(twilio.post("/twilio/voice", call_params("CAnext", SWEDISH_CAR["msisdn"])).data)
    assert dialled_number(root) == backup.number


def test_claim_race_on_postgres(pg_store: Store, settings: Settings, plan: Any) -> None:
    from gateway.delivery import outbox_rows
    from gateway.events import parse_event
    from gateway.incidents import record_event

    for _ in range(30):
        record_event(parse_event(crash_event()), store=pg_store, locator=None, plan=plan,
                     extra_rows=outbox_rows)
    workers = [OutboxWorker(pg_store, AcceptAll(), policy=FAST) for _ in range(3)]
    claimed: list[int] = []
    lock = threading.Lock()

    def claim(w: OutboxWorker) -> None:
        rows = w.claim(30)
        with lock:
            claimed.extend(r["id"] for r in rows)

    threads = [threading.Thread(target=claim, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == 30 and len(set(claimed)) == 30


class AcceptAll:
    """A sink that takes everything (the race is about claiming, not sending)."""

    def send_incident(self, payload: Any, *, idempotency_key: str) -> int:
        return 201
