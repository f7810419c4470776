"""Two gateway instances on one PostgreSQL, as behind a load balancer: the steps of one
call alternate between them, events arrive at either (and again at the other), and
everything happens exactly once: incidents, steps, status callbacks, and deliveries to
the centre (counted on the wire)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from gateway.plan import NumberPlan
from tests.support.events import crash_event
from tests.support.fake_servers import FakeAssistanceCentre
from tests.support.server import GatewayProcess, running_gateway
from tests.support.twilio import VEHICLE_TOKEN, call_params, parse, path_of, signature

pytestmark = pytest.mark.postgres

PUBLIC = "https://gateway.example.com"  # what Twilio calls: the load balancer
DATABASE = "test_two_instances"  # private: other tests drop the tables of "test"
SWEDE = {"vin": "YV1ZW72U5N1234567", "msisdn": "+46701234567"}
EVENTS = 40


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    base = os.environ.get("GATEWAY_TEST_POSTGRES_URL")
    if not base:
        if os.environ.get("CI"):
            pytest.fail("CI must provide PostgreSQL: set GATEWAY_TEST_POSTGRES_URL")
        pytest.skip("PostgreSQL not configured: set GATEWAY_TEST_POSTGRES_URL")
    admin_url = sa.engine.make_url(base.replace("postgresql://", "postgresql+psycopg://", 1))
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"))
        conn.execute(sa.text(f"CREATE DATABASE {DATABASE}"))
    try:
        yield admin_url.set(database=DATABASE).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"))
        admin.dispose()


def webhook(gw: GatewayProcess, url: str, params: dict[str, str]) -> requests.Response:
    """A signed webhook for the public URL, delivered to one instance."""
    absolute = url if url.startswith("http") else PUBLIC + url
    response = requests.post(gw.base_url + path_of(absolute), data=params, timeout=10,
                             headers={"X-Twilio-Signature": signature(absolute, params)})
    assert response.status_code == 200, response.text
    return response


def post_event(gw: GatewayProcess, event: dict[str, Any]) -> requests.Response:
    """As a car does: a 503 (not stored) is retried with the same event_id after its
    Retry-After (a few times at most); anything else is the answer."""
    for _ in range(5):
        response = requests.post(f"{gw.base_url}/v1/events", json=event, timeout=10,
                                 headers={"Authorization": f"Bearer {VEHICLE_TOKEN}"})
        if response.status_code != 503:
            return response
        time.sleep(float(response.headers.get("Retry-After", "1")))
    return response


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def count(engine: sa.Engine, sql: str, **params: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(sql), params).scalar_one())


def test_one_call_alternating_between_two_instances_happens_exactly_once(
    tmp_path: Path, database_url: str, plan: NumberPlan
) -> None:
    engine = sa.create_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    with FakeAssistanceCentre() as centre:
        env = {"GATEWAY_DATABASE_URL": database_url, "GATEWAY_PUBLIC_URL": PUBLIC,
               "GATEWAY_ASSISTANCE_URL": centre.url, "GATEWAY_DELIVERY_POLL_S": "0.05",
               "GATEWAY_DIAL_ATTEMPTS": "2"}
        # two instances, each a gunicorn master with two workers: four delivery workers
        with running_gateway(tmp_path, "--workers", "2", **env) as a, \
                running_gateway(tmp_path, "--workers", "2", **env) as b:
            assert len(a.worker_pids(at_least=2)) == 2 and len(b.worker_pids(at_least=2)) == 2
            instances = (a, b)

            # -- one crash call, its steps alternating between the instances -----------
            event = crash_event(**SWEDE, event_id="two-instances-call",
                                location={"lat": 55.6761, "lon": 12.5683})
            first = post_event(a, event)
            assert first.status_code == 201, first.text
            again = post_event(b, event)  # the car's retry reaches the other instance
            assert again.status_code == 200
            assert again.json()["incident_id"] == first.json()["incident_id"]

            sid = "CAtwoinstances"
            params = call_params(sid, SWEDE["msisdn"], to=first.json()["call_number"])
            url, step_params = "/twilio/voice", params
            dialled: list[str] = []
            for n in range(6):
                answer, other = instances[(n + 1) % 2], instances[n % 2]
                response = webhook(answer, url, step_params)
                root = parse(response.content)
                # the step is stored once; Twilio's retry of it at the other instance
                # gets the stored TwiML
                stored = n + 1
                wait_for(lambda stored=stored: count(  # type: ignore[misc]
                    engine, "SELECT count(*) FROM call_steps WHERE call_sid = :sid",
                    sid=sid) >= stored, 30, f"step {n} stored")
                assert webhook(other, url, step_params).content == response.content
                dial = root.find("Dial")
                if dial is None:
                    break
                number = dial.find("Number")
                dialled.append(number.text if number is not None and number.text
                               else (dial.text or "").strip())
                webhook(other, "/twilio/voice/status", {
                    "CallSid": sid, "CallStatus": "in-progress", "SequenceNumber": str(n),
                    "CallbackSource": "call-progress-events"})
                url = dial.get("action", "")
                step_params = call_params(sid, SWEDE["msisdn"], to=params["To"],
                                          DialCallStatus="no-answer")
            centres = [c.number for c in plan.centres_for("SE")][:2]
            assert dialled[:2] == centres, dialled
            steps_sent = n + 1

            # -- events at either instance, each sent twice ------------------------------
            incident_ids = {first.json()["incident_id"]}
            for n in range(EVENTS):
                event = crash_event(**SWEDE, event_id=f"two-instances-{n}")
                created = post_event(instances[n % 2], event)
                assert created.status_code == 201, created.text
                replay = post_event(instances[(n + 1) % 2], event)
                assert replay.json()["incident_id"] == created.json()["incident_id"]
                incident_ids.add(created.json()["incident_id"])

            wait_for(lambda: incident_ids <= set(centre.incidents), 60,
                     "every incident at the centre")
            wait_for(lambda: count(engine, "SELECT count(*) FROM outbox WHERE status = "
                                           "'delivered'") == len(incident_ids),
                     30, "every outbox row marked delivered")
            time.sleep(1.0)  # a second delivery would show up now

        assert set(centre.incidents) == incident_ids
        on_the_wire = {key: centre.deliveries[key] for key in incident_ids}
        assert set(on_the_wire.values()) == {1}, on_the_wire  # exactly once on the wire
        assert count(engine, "SELECT count(*) FROM incidents") == EVENTS + 1
        assert count(engine, "SELECT count(*) FROM outbox") == EVENTS + 1
        assert count(engine, "SELECT count(*) FROM call_steps WHERE call_sid = :sid",
                     sid=sid) == steps_sent
        assert count(engine, "SELECT count(*) FROM routing_decisions WHERE call_sid = :sid",
                     sid=sid) == steps_sent
        assert count(engine, "SELECT count(*) FROM call_status WHERE call_sid = :sid",
                     sid=sid) == len(dialled)
    engine.dispose()
