"""/metrics counts what happens: each metric moves when its event happens.

Read through the endpoint (Prometheus text parsed with prometheus_client's parser), as
a scraper would.  The outbox and breaker figures come from the database at scrape time,
so an app without a delivery worker reports them too; a hung database never hangs the
scrape.  Multiprocess mode and the separate worker process run as real processes.
"""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from gateway.adapters.assistance import AssistanceCentreClient
from gateway.config import DeliveryPolicy, Settings
from gateway.delivery import OutboxWorker
from gateway.plan import NumberPlan
from gateway.store import Store
from tests.conftest import PUBLIC_URL, Clock, Twilio, postgres_url
from tests.support.events import SWEDISH_CAR, crash_event
from tests.support.fake_servers import FakeAssistanceCentre
from tests.support.proxy import TcpProxy, proxied_url
from tests.support.server import REPO, free_port, gateway_env
from tests.support.twilio import call_params, dial_of, parse

EMERGENCY_NUMBER = "+442079460900"


def scrape_text(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(client: FlaskClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    return scrape_text(response.get_data(as_text=True))


def value(client: FlaskClient, name: str, **labels: str) -> float:
    """A sample's value; 0 when it has none (a counter not incremented yet)."""
    return scrape(client).get((name, frozenset(labels.items())), 0.0)


def post_event(client: FlaskClient, headers: dict[str, str], **overrides: Any) -> Any:
    return client.post("/v1/events", json=crash_event(**overrides), headers=headers)


# -- events ---------------------------------------------------------------------------------


def test_each_event_outcome_is_counted_by_type(client: FlaskClient,
                                               vehicle_headers: dict[str, str]) -> None:
    def events(kind: str, outcome: str) -> float:
        return value(client, "gateway_events_total", type=kind, outcome=outcome)

    event = crash_event(type="sos")
    assert client.post("/v1/events", json=event, headers=vehicle_headers).status_code == 201
    assert events("sos", "created") == 1
    assert client.post("/v1/events", json=event, headers=vehicle_headers).status_code == 200
    assert events("sos", "replayed") == 1
    other = {**event, "occupants": {"count": 4}}
    assert client.post("/v1/events", json=other, headers=vehicle_headers).status_code == 409
    assert events("sos", "conflict") == 1
    assert post_event(client, vehicle_headers, vin="not a vin").status_code == 422
    assert events("crash", "invalid") == 1
    assert post_event(client, vehicle_headers, type="teleport").status_code == 422
    assert client.post("/v1/events", data="x", headers=vehicle_headers).status_code == 415
    assert events("unknown", "invalid") == 2  # no known type: one label, never the input
    assert events("sos", "created") == 1  # nothing counted twice


def test_an_event_the_database_cannot_store_is_counted_unavailable(
        make_app: Callable[..., Flask], vehicle_headers: dict[str, str]) -> None:
    app = make_app(store=Store.from_url("postgresql://gateway@127.0.0.1:9/none"))
    client = app.test_client()
    assert post_event(client, vehicle_headers).status_code == 503
    assert value(client, "gateway_events_total", type="crash", outcome="unavailable") == 1


# -- webhooks, route decisions, fallbacks, hand-backs ---------------------------------------


def test_a_signed_webhook_counts_its_answer_decision_and_latency(
        client: FlaskClient, twilio: Twilio, vehicle_headers: dict[str, str]) -> None:
    assert post_event(client, vehicle_headers).status_code == 201
    assert twilio.post("/twilio/voice", call_params("CAm1", SWEDISH_CAR["msisdn"],
                                                    to=EMERGENCY_NUMBER)).status_code == 200
    route = "voice.incoming"
    assert value(client, "gateway_webhook_answers_total", route=route, outcome="centre") == 1
    assert value(client, "gateway_webhook_duration_seconds_count", route=route) == 1
    assert value(client, "gateway_webhook_duration_seconds_bucket", route=route, le="15.0") == 1
    assert value(client, "gateway_route_decisions_total", target="centre",
                 reason="new_call") == 1

    # Twilio's retry of the same step: the stored answer, no new decision
    twilio.post("/twilio/voice", call_params("CAm1", SWEDISH_CAR["msisdn"], to=EMERGENCY_NUMBER))
    assert value(client, "gateway_webhook_answers_total", route=route, outcome="replay") == 1
    assert value(client, "gateway_webhook_duration_seconds_count", route=route) == 2
    assert value(client, "gateway_route_decisions_total", target="centre",
                 reason="new_call") == 1

    # a forged request: refused, counted as such
    twilio.post("/twilio/voice", call_params("CAm2", SWEDISH_CAR["msisdn"]), sign=False)
    assert value(client, "gateway_webhook_answers_total", route=route, outcome="rejected") == 1


def test_a_hand_back_is_counted_with_its_reason(client: FlaskClient, twilio: Twilio,
                                                vehicle_headers: dict[str, str],
                                                clock: Clock) -> None:
    assert post_event(client, vehicle_headers).status_code == 201  # Denmark: no route
    root = parse(twilio.post("/twilio/voice", call_params(
        "CAhb", SWEDISH_CAR["msisdn"], to=EMERGENCY_NUMBER)).data)
    assert value(client, "gateway_hand_backs_total", reason="no_route") == 0
    clock.advance(25)  # the next line would overrun the deadline
    final = parse(twilio.post(dial_of(root).get("action", ""), call_params(
        "CAhb", SWEDISH_CAR["msisdn"], DialCallStatus="no-answer")).data)
    assert final.find("Dial") is None
    assert value(client, "gateway_hand_backs_total", reason="no_route") == 1
    assert value(client, "gateway_route_decisions_total", target="hand_back",
                 reason="centre_leg_ended") == 1
    assert value(client, "gateway_webhook_answers_total", route="voice.dial_result",
                 outcome="hand_back") == 1


class CentreLookupBug:
    """The real plan, except that centre lookups raise: a bug in the routing."""

    def __init__(self, plan: NumberPlan) -> None:
        self.plan = plan

    def __getattr__(self, name: str) -> Any:
        if name in ("centres_for", "centres", "centre"):
            raise RuntimeError(f"bug in plan.{name}")
        return getattr(self.plan, name)

    def __len__(self) -> int:
        return len(self.plan)


class EveryMethodBug:
    source = "exploding"

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"bug in plan.{name}")

    def __len__(self) -> int:
        return 0


class IncidentReadBug(Store):
    """A store whose incident read has a bug (not a database error)."""

    def incident(self, incident_id: str, *, timeout_s: float | None = None) -> Any:
        raise RuntimeError("bug in the incident read")


def test_fail_safe_and_last_resort_answers_are_counted_as_fallbacks(
        make_app: Callable[..., Flask], plan: NumberPlan) -> None:
    app = make_app(plan=CentreLookupBug(plan))
    twilio = Twilio(app.test_client())
    assert twilio.post("/twilio/voice", call_params("CAfs", "+4915112345678",
                                                    to=EMERGENCY_NUMBER)).status_code == 200
    client = app.test_client()
    assert value(client, "gateway_fallbacks_total", reason="handler_error") == 1
    assert value(client, "gateway_webhook_answers_total", route="voice.incoming",
                 outcome="failsafe") == 1
    assert value(client, "gateway_route_decisions_total", target="emergency",
                 reason="handler_error") == 1

    broken = make_app(plan=EveryMethodBug(), store=IncidentReadBug.from_url(
        app.extensions["gateway"].settings.database_url))
    Twilio(broken.test_client()).post("/twilio/voice", call_params("CAlr", "+4915112345678"))
    Twilio(broken.test_client()).post(PUBLIC_URL + "/twilio/voice/whisper?i=x&k=1",
                                      {"CallSid": "CAagent", "ParentCallSid": "CAlr"})
    client = broken.test_client()
    assert value(client, "gateway_fallbacks_total", reason="last_resort") == 1
    assert value(client, "gateway_webhook_answers_total", route="voice.incoming",
                 outcome="last_resort") == 1
    assert value(client, "gateway_fallbacks_total", reason="agent_leg_error") == 1
    assert value(client, "gateway_webhook_answers_total", route="voice.whisper",
                 outcome="failsafe") == 1


def test_a_twilio_fallback_url_request_is_counted(client: FlaskClient, twilio: Twilio) -> None:
    response = twilio.post("/twilio/voice/fallback", call_params(
        "CAfb", SWEDISH_CAR["msisdn"], to=EMERGENCY_NUMBER, ErrorCode="11200"))
    assert response.status_code == 200
    assert value(client, "gateway_fallbacks_total", reason="twilio_fallback_url") == 1
    decisions = sum(v for (name, labels), v in scrape(client).items()
                    if name == "gateway_route_decisions_total"
                    and ("reason", "twilio_fallback") in labels)
    assert decisions == 1


# -- delivery -------------------------------------------------------------------------------

FAST = DeliveryPolicy(timeout_s=0.5, backoff_initial_s=0.05, backoff_max_s=0.2, budget_s=0.3,
                      poll_s=0.05)


@pytest.fixture
def centre() -> Iterator[FakeAssistanceCentre]:
    with FakeAssistanceCentre() as fake:
        yield fake


def test_delivery_attempts_failures_and_outcomes_are_counters(
        make_app: Callable[..., Flask], settings: Settings, centre: FakeAssistanceCentre,
        vehicle_headers: dict[str, str]) -> None:
    app = make_app(settings=settings.replace(assistance_url=centre.url, delivery=FAST))
    svc, client = app.extensions["gateway"], app.test_client()
    worker = OutboxWorker(svc.store, AssistanceCentreClient(centre.url, timeout_s=0.5),
                          policy=FAST, health=svc.centre_health, clock=svc.clock,
                          metrics=svc.metrics)
    assert post_event(client, vehicle_headers).status_code == 201

    centre.mode = "503"
    assert [worker.deliver(r) for r in worker.claim(10)] == ["rescheduled"]
    attempts = value(client, "gateway_delivery_attempts_total")
    assert attempts >= 1
    assert value(client, "gateway_delivery_failures_total", kind="transient") == attempts
    assert value(client, "gateway_deliveries_total", outcome="rescheduled") == 1

    with svc.store.begin() as conn:  # due again now
        conn.execute(sa.text("UPDATE outbox SET next_attempt_at = created_at"))
    centre.mode = "400"
    assert [worker.deliver(r) for r in worker.claim(10)] == ["failed"]
    assert value(client, "gateway_delivery_failures_total", kind="permanent") == 1
    assert value(client, "gateway_deliveries_total", outcome="failed") == 1
    assert value(client, "gateway_delivery_attempts_total") == attempts + 1
    text = client.get("/metrics").get_data(as_text=True)
    assert "# TYPE gateway_delivery_total gauge" not in text  # the old gauge is gone
    assert "# TYPE gateway_deliveries_total counter" in text


def test_the_in_process_worker_counts_into_the_apps_metrics(
        make_app: Callable[..., Flask], settings: Settings, centre: FakeAssistanceCentre,
        vehicle_headers: dict[str, str]) -> None:
    app = make_app(settings=settings.replace(assistance_url=centre.url, delivery=FAST),
                   start_worker=True)
    client = app.test_client()
    try:
        assert post_event(client, vehicle_headers).status_code == 201
        centre.wait_for_incidents(1)
        deadline = time.monotonic() + 5
        while (value(client, "gateway_deliveries_total", outcome="delivered") < 1
               or value(client, "gateway_outbox_pending") != 0):  # the row is marked next
            assert time.monotonic() < deadline, scrape(client)
            time.sleep(0.05)
        assert value(client, "gateway_delivery_attempts_total") == 1
    finally:
        app.extensions["gateway"].worker.stop()


# -- read from the database at scrape time --------------------------------------------------


def test_outbox_pending_and_age_come_from_the_database_without_a_worker(
        client: FlaskClient, vehicle_headers: dict[str, str], clock: Clock) -> None:
    assert value(client, "gateway_outbox_pending") == 0
    assert value(client, "gateway_outbox_oldest_age_seconds") == 0
    for _ in range(3):
        assert post_event(client, vehicle_headers).status_code == 201
    clock.advance(42)
    assert client.application.extensions["gateway"].worker is None
    assert value(client, "gateway_outbox_pending") == 3
    assert value(client, "gateway_outbox_oldest_age_seconds") == pytest.approx(42, abs=1)
    assert value(client, "gateway_database_up") == 1


def test_breaker_state_per_centre_line_and_api(app: Flask, plan: NumberPlan) -> None:
    health = app.extensions["gateway"].centre_health
    line = plan.centres_for("SE")[0].centre_id
    client = app.test_client()
    assert value(client, "gateway_centre_state", centre=line, state="closed") == 1
    assert value(client, "gateway_centre_state", centre="api", state="closed") == 1
    for _ in range(health.failure_threshold):
        health.record(line, ok=False, reason="no-answer")
    assert value(client, "gateway_centre_state", centre=line, state="open") == 1
    assert value(client, "gateway_centre_state", centre=line, state="closed") == 0
    assert value(client, "gateway_centre_open", centre=line) == 1
    assert value(client, "gateway_centre_open", centre="api") == 0


class HungConnection:
    """A database whose connections never arrive (until released)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.released = threading.Event()

    def __call__(self) -> sqlite3.Connection:
        self.released.wait(10)
        return sqlite3.connect(self.path, check_same_thread=False)


def test_a_hung_database_never_hangs_the_scrape(make_app: Callable[..., Flask],
                                                tmp_path: Path) -> None:
    hung = HungConnection(tmp_path / "hung.sqlite3")
    app = make_app(store=Store(sa.create_engine("sqlite://", creator=hung)))
    try:
        started = time.monotonic()
        samples = scrape(app.test_client())
        assert time.monotonic() - started < 1.0
        assert samples[("gateway_database_up", frozenset())] == 0
        assert math.isnan(samples[("gateway_outbox_pending", frozenset())])
        assert math.isnan(samples[("gateway_outbox_oldest_age_seconds", frozenset())])
        assert not any(name == "gateway_centre_state" for name, _ in samples)
    finally:
        hung.released.set()


@pytest.mark.postgres
def test_a_blackholed_postgres_never_hangs_the_scrape(make_app: Callable[..., Flask],
                                                      pg_store: Store,
                                                      vehicle_headers: dict[str, str]) -> None:
    url = sa.engine.make_url(postgres_url() or "")
    with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        store = Store.from_url(proxied_url(postgres_url() or "", proxy))
        app = make_app(store=store)
        client = app.test_client()
        assert post_event(client, vehicle_headers).status_code == 201
        assert value(client, "gateway_outbox_pending") == 1
        proxy.mode = "blackhole"
        started = time.monotonic()
        samples = scrape(client)
        assert time.monotonic() - started < 1.0
        assert samples[("gateway_database_up", frozenset())] == 0
        assert math.isnan(samples[("gateway_outbox_pending", frozenset())])
        proxy.mode = "forward"
        store.dispose()


# -- several processes ----------------------------------------------------------------------

ONE_PROCESS = textwrap.dedent("""
    import json, sys
    from gateway.app import create_app
    from gateway.config import Settings
    from tests.support.events import crash_event
    from tests.support.fakes import NORDIC_BOXES, BoxLocator

    app = create_app(Settings.from_env(), locator=BoxLocator(NORDIC_BOXES))
    client = app.test_client()
    token = {"Authorization": "Bearer " + sys.argv[2]}
    status = client.post("/v1/events", json=crash_event(event_id=sys.argv[1]),
                         headers=token).status_code
    print(json.dumps({"status": status, "metrics": client.get("/metrics").get_data(as_text=True)}))
""")


def run_app_process(tmp_path: Path, env: dict[str, str], event_id: str) -> dict[str, Any]:
    from tests.support.twilio import VEHICLE_TOKEN

    done = subprocess.run([sys.executable, "-c", ONE_PROCESS, event_id, VEHICLE_TOKEN],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_multiprocess_mode_sums_every_process(tmp_path: Path) -> None:
    shared = tmp_path / "prometheus"
    shared.mkdir()
    env = gateway_env(tmp_path, free_port(), PROMETHEUS_MULTIPROC_DIR=str(shared))
    first = run_app_process(tmp_path, env, "evt-process-1")
    second = run_app_process(tmp_path, env, "evt-process-2")
    assert first["status"] == second["status"] == 201
    created = ("gateway_events_total", frozenset({("type", "crash"), ("outcome", "created")}))
    assert scrape_text(first["metrics"])[created] == 1
    assert scrape_text(second["metrics"])[created] == 2  # both processes' counts
    assert scrape_text(second["metrics"])[("gateway_outbox_pending", frozenset())] == 2
    assert any(shared.iterdir())  # the values live in the shared directory


@pytest.mark.slow
def test_the_worker_process_serves_its_metrics(tmp_path: Path, make_app: Callable[..., Flask],
                                               centre: FakeAssistanceCentre,
                                               vehicle_headers: dict[str, str]) -> None:
    # an incident waits in the outbox of the database the worker process will use
    app = make_app()
    assert post_event(app.test_client(), vehicle_headers).status_code == 201
    database_url = app.extensions["gateway"].settings.database_url
    port = free_port()
    env = gateway_env(tmp_path, free_port(), GATEWAY_DATABASE_URL=database_url,
                      GATEWAY_ASSISTANCE_URL=centre.url, GATEWAY_DELIVERY_POLL_S="0.05",
                      GATEWAY_WORKER_METRICS_PORT=str(port))
    env.pop("GATEWAY_TWILIO_AUTH_TOKEN")
    worker = subprocess.Popen([sys.executable, "-m", "gateway", "worker"], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        delivered = ("gateway_deliveries_total", frozenset({("outcome", "delivered")}))
        pending = ("gateway_outbox_pending", frozenset())
        while samples.get(delivered, 0) < 1 or samples.get(pending) != 0:
            assert worker.poll() is None, worker.communicate()[0]
            assert time.monotonic() < deadline, samples
            try:
                samples = scrape_text(requests.get(f"http://127.0.0.1:{port}/metrics",
                                                   timeout=1).text)
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        assert samples[("gateway_delivery_attempts_total", frozenset())] == 1
        assert len(centre.incidents) == 1
    finally:
        worker.terminate()
        output = worker.communicate(timeout=10)[0].decode()
    assert worker.returncode == 0, output
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert any("worker metrics on" in line["msg"] for line in lines)


def test_a_worker_metrics_port_in_use_is_one_line_and_exit_2(tmp_path: Path,
                                                             centre: FakeAssistanceCentre) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = gateway_env(tmp_path, free_port(), GATEWAY_ASSISTANCE_URL=centre.url)
        done = subprocess.run([sys.executable, "-m", "gateway", "worker", "--metrics-port",
                               str(port)], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=60, check=False)
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
