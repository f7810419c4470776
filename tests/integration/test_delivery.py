"""Delivering incidents to a real (fake) assistance centre over HTTP on 127.0.0.1."""

from __future__ import annotations

import datetime as dt
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
from gateway.errors import TransientUpstreamError
from gateway.store import Store, as_utc
from tests.conftest import Clock, Twilio
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
    # exponential backoff: 0.1-0.2 s, 0.2-0.3 s, 0.4-0.5 s, ... (jitter up to 0.1 s, so
    # neighbours may meet at a boundary; two steps apart they never do)
    assert gaps[0] < gaps[2] and gaps[1] < gaps[3], gaps
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
    delivery_app: Flask, centre: FakeAssistanceCentre, vehicle_headers: dict[str, str],
    clock: Clock,
) -> None:
    incident = post(delivery_app, vehicle_headers)
    centre.mode = "refuse"
    policy = DeliveryPolicy(timeout_s=0.5, backoff_initial_s=0.05, backoff_max_s=0.2,
                            budget_s=1.0, poll_s=0.05)
    worker = worker_for(delivery_app, policy)
    assert [worker.deliver(r) for r in worker.claim(10)] == ["rescheduled"]
    row = outbox_row(delivery_app, incident["incident_id"])
    assert row["status"] == "pending" and row["attempts"] >= 2
    assert row["leased_until"] is None
    # due again only after the backoff cap, not at once
    due = dt.datetime.fromtimestamp(clock.now, tz=dt.UTC) + dt.timedelta(seconds=0.2)
    assert as_utc(row["next_attempt_at"]) == due
    assert worker.claim(10) == []
    clock.advance(0.1)
    assert worker.claim(10) == []
    clock.advance(0.1)
    assert [r["incident_id"] for r in worker.claim(10)] == [incident["incident_id"]]


class FailingSink:
    """A centre that answers every attempt with a transient failure, after ``slow_s``."""

    def __init__(self, slow_s: float = 0.0) -> None:
        self.slow_s = slow_s
        self.times: list[tuple[float, float]] = []  # (start, end) of each attempt

    def send_incident(self, payload: Any, *, idempotency_key: str) -> int:
        started = time.monotonic()
        time.sleep(self.slow_s)
        self.times.append((started, time.monotonic()))
        raise TransientUpstreamError("HTTP 503")


def test_backoff_grows_to_its_cap_and_stays_there(
    delivery_app: Flask, vehicle_headers: dict[str, str]
) -> None:
    post(delivery_app, vehicle_headers)
    policy = DeliveryPolicy(timeout_s=1.0, backoff_initial_s=0.01, backoff_max_s=0.04,
                            budget_s=0.6)
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        time.sleep(seconds)

    svc = delivery_app.extensions["gateway"]
    worker = OutboxWorker(svc.store, FailingSink(), policy=policy, clock=svc.clock, sleep=sleep)
    assert [worker.deliver(r) for r in worker.claim(1)] == ["rescheduled"]
    assert len(sleeps) >= 6, sleeps
    assert sleeps[0] < sleeps[2], sleeps  # it grows...
    assert max(sleeps) <= 0.04, sleeps  # ...to the cap, jitter included
    assert sleeps[-3:] == [0.04] * 3, sleeps  # and stays there


@pytest.mark.parametrize("slow_s", [0.0, 0.15])
def test_a_pass_ends_within_its_budget_so_never_outlives_its_lease(
    delivery_app: Flask, vehicle_headers: dict[str, str], slow_s: float
) -> None:
    """No attempt starts once its wait would spend the budget (stop_before_delay): the
    pass ends within budget + one attempt's timeout, inside the lease.  With
    stop_after_delay an attempt could start up to a whole backoff cap after the budget
    (the issue's 60 + 30 + 10 s against a 70 s lease)."""
    post(delivery_app, vehicle_headers)
    policy = DeliveryPolicy(timeout_s=0.2, backoff_initial_s=0.02, backoff_max_s=0.3,
                            budget_s=0.6)
    sink = FailingSink(slow_s=slow_s)
    svc = delivery_app.extensions["gateway"]
    worker = OutboxWorker(svc.store, sink, policy=policy, clock=svc.clock)
    rows = worker.claim(1)
    started = time.monotonic()
    assert [worker.deliver(r) for r in rows] == ["rescheduled"]
    elapsed = time.monotonic() - started
    first, last = sink.times[0][0], sink.times[-1]
    assert len(sink.times) >= 3
    assert last[0] - first < policy.budget_s, sink.times  # the last attempt began in budget
    assert last[1] - first <= policy.budget_s + policy.timeout_s, sink.times
    assert elapsed < policy.budget_s + policy.timeout_s + 0.5 < policy.lease_s


def test_a_worker_that_lost_its_lease_changes_nothing(
    delivery_app: Flask, centre: FakeAssistanceCentre, vehicle_headers: dict[str, str],
    clock: Clock,
) -> None:
    """A's lease runs out while it is still at work; B claims the row and delivers it.
    A's later updates (counting an attempt, marking it delivered or rescheduled) all
    carry A's lease and change nothing."""
    incident = post(delivery_app, vehicle_headers)
    key = incident["incident_id"]
    a, b = worker_for(delivery_app), worker_for(delivery_app)
    (row_a,) = a.claim(1)
    clock.advance(FAST.lease_s + 1)
    (row_b,) = b.claim(1)
    assert row_b["id"] == row_a["id"] and row_b["leased_until"] > row_a["leased_until"]
    assert b.deliver(row_b) == "delivered"
    after_b = outbox_row(delivery_app, key)
    assert after_b["status"] == "delivered" and after_b["attempts"] == 1

    # A comes back: it neither sends again nor touches the row
    assert a.deliver(row_a) == "lost"
    assert len(centre.requests) == 1
    assert outbox_row(delivery_app, key) == after_b
    assert a.counters.values["lease_lost"] == 1

    # the finishing UPDATEs themselves carry the lease
    for finish in (lambda: a._finish(row_a, status="delivered", last_status=201, error=None),
                   lambda: a._finish(row_a, status="failed", last_status=400, error="x"),
                   lambda: a._reschedule(row_a, error="x")):
        assert finish() is False
        assert outbox_row(delivery_app, key) == after_b


def test_lease_lost_during_an_attempt_leaves_the_row_to_its_new_holder(
    delivery_app: Flask, vehicle_headers: dict[str, str], clock: Clock
) -> None:
    incident = post(delivery_app, vehicle_headers)
    key = incident["incident_id"]
    svc = delivery_app.extensions["gateway"]
    b = worker_for(delivery_app)
    taken: list[dict[str, Any]] = []

    class StalledSink:
        """A's attempt stalls past its lease; meanwhile B claims the row."""

        def send_incident(self, payload: Any, *, idempotency_key: str) -> int:
            clock.advance(FAST.lease_s + 1)
            taken.extend(b.claim(1))
            return 201

    a = OutboxWorker(svc.store, StalledSink(), policy=FAST, clock=svc.clock)
    (row_a,) = a.claim(1)
    assert a.deliver(row_a) == "lost"
    row = outbox_row(delivery_app, key)
    assert row["status"] == "pending" and row["delivered_at"] is None
    assert [r["id"] for r in taken] == [row_a["id"]]
    assert as_utc(row["leased_until"]) == taken[0]["leased_until"]  # still B's lease
    assert b.deliver(taken[0]) == "delivered"
    assert outbox_row(delivery_app, key)["status"] == "delivered"


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


def test_postgres_claim_skips_rows_another_claimer_holds(pg_store: Store, plan: Any) -> None:
    """FOR UPDATE SKIP LOCKED: a row locked by a claimer still in its transaction is
    skipped at once, not waited for (a plain UPDATE would queue behind the lock)."""
    from gateway.delivery import outbox_rows
    from gateway.events import parse_event
    from gateway.incidents import record_event

    for _ in range(3):
        record_event(parse_event(crash_event()), store=pg_store, locator=None, plan=plan,
                     extra_rows=outbox_rows)
    with pg_store.engine.connect() as other, other.begin():
        held = other.execute(sa.select(outbox.c.id).order_by(outbox.c.id).limit(1)
                             .with_for_update()).scalar_one()
        started = time.monotonic()
        claimed = OutboxWorker(pg_store, AcceptAll(), policy=FAST).claim(10)
        took = time.monotonic() - started
        assert held not in [r["id"] for r in claimed]
        assert len(claimed) == 2
        assert took < 1.0, took
    later = OutboxWorker(pg_store, AcceptAll(), policy=FAST).claim(10)
    assert [r["id"] for r in later] == [held]


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


# -- centre health: the breaker's counts and its one probe ---------------------------------


def test_a_success_resets_a_lines_failure_count(delivery_app: Flask) -> None:
    """Threshold 3: two failures, a success, two failures: never three in a row."""
    health: CentreHealth = delivery_app.extensions["gateway"].centre_health
    for ok in (False, False, True, False, False):
        health.record("eu-primary", ok=ok, reason="dial")
    assert health.states()["eu-primary"] == "closed"
    assert "eu-primary" not in health.unreachable()
    health.record("eu-primary", ok=False, reason="dial")
    assert health.states()["eu-primary"] == "open"


@pytest.mark.parametrize("stuck_probe", [False, True], ids=["open", "probe_never_reported"])
def test_exactly_one_instance_claims_the_probe(pg_store: Store, clock: Clock,
                                               stuck_probe: bool) -> None:
    """Two instances (their own stores and health objects, one database) read the open
    line at the same moment, then both try to claim its probe: exactly one wins.

    Deterministic: a third connection holds the row's lock until both claims wait on it,
    so both read the row before either writes.  A probe that never reported (half-open
    past its window) is claimed again; only the ``updated_at`` guard then tells the
    second claimer that the first took it."""
    from gateway.centre_health import centre_health

    line = "eu-primary"
    one, two = pg_store, Store.from_url(pg_store.engine.url.render_as_string(False))
    try:
        healths = [CentreHealth(s, centre_ids=[line], failure_threshold=1, open_for_s=30,
                                probe_window_s=60, clock=clock) for s in (one, two)]
        healths[0].record(line, ok=False, reason="dial failed")
        clock.advance(31)
        if stuck_probe:
            assert healths[0].unreachable() == set()  # a probe that then never reports
            clock.advance(61)
        clock.advance(1)
        results: list[set[str]] = []
        lock = threading.Lock()

        def ask(h: CentreHealth) -> None:
            down = h.unreachable(timeout_s=5.0)
            with lock:
                results.append(down)

        with pg_store.engine.connect() as blocker, blocker.begin():
            blocker.execute(sa.select(centre_health.c.key)
                            .where(centre_health.c.key == line).with_for_update())
            threads = [threading.Thread(target=ask, args=(h,)) for h in healths]
            for t in threads:
                t.start()
            wait_for(lambda: _lock_waiters(pg_store) >= 2, timeout=5)
        for t in threads:
            t.join(timeout=10)
        assert sorted(results, key=len) == [set(), {line}], results  # one probes, one skips
        with pg_store.engine.connect() as conn:
            state = conn.execute(sa.select(centre_health.c.state)
                                 .where(centre_health.c.key == line)).scalar_one()
        assert state == "half_open"
    finally:
        two.dispose()


def _lock_waiters(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database()")).scalar_one())


class AcceptAll:
    """A sink that takes everything (the race is about claiming, not sending)."""

    def send_incident(self, payload: Any, *, idempotency_key: str) -> int:
        return 201
