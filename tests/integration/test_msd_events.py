"""POST /v1/events with an eCall MSD (EN 15722): the incident it makes, the JSON fields
beside it, test calls, untrusted and unknown positions, the bytes forwarded unchanged,
and malformed MSDs refused with the decoder's reason and nothing stored."""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.adapters.assistance import AssistanceCentreClient
from gateway.config import DeliveryPolicy, Settings
from gateway.delivery import OutboxWorker, incident_payload, outbox, outbox_rows
from gateway.events import parse_event
from gateway.incidents import record_event
from gateway.msd import UNKNOWN_POSITION
from gateway.plan import NumberPlan
from gateway.store import Store, incidents
from gateway.whisper import whisper_summary
from tests.conftest import Clock
from tests.support.events import crash_event
from tests.support.fake_servers import FakeAssistanceCentre
from tests.support.fakes import NORDIC_BOXES, BoxLocator
from tests.support.msd import V1_VECTOR, V2_VECTOR, b64, build_msd, msd_event

#: the test boxes, and boxes around the public vectors' positions
BOXES = [*NORDIC_BOXES, ("DE", 48.0, 48.6, 11.3, 11.9), ("CN", 22.4, 22.6, 113.8, 114.0)]
#: Copenhagen in milliarcseconds, for MSDs built from the version 2 vector
COPENHAGEN_MAS = {"positionLatitude": round(55.6761 * 3_600_000),
                  "positionLongitude": round(12.5683 * 3_600_000)}


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app(locator=BoxLocator(BOXES))


def post(client: FlaskClient, headers: dict[str, str], body: dict[str, Any]) -> Any:
    return client.post("/v1/events", json=body, headers=headers)


def stored(app: Flask, event_id: str) -> dict[str, Any]:
    incident = app.extensions["gateway"].store.incident_by_event(event_id)
    assert incident is not None
    return dict(incident)


def count(app: Flask, table: sa.Table = incidents) -> int:
    with app.extensions["gateway"].store.engine.begin() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def outbox_payload(app: Flask, incident_id: str) -> dict[str, Any]:
    with app.extensions["gateway"].store.engine.begin() as conn:
        row = conn.execute(sa.select(outbox.c.payload)
                           .where(outbox.c.incident_id == incident_id)).one()
    return dict(row.payload)


# -- an MSD alone ---------------------------------------------------------------------


def test_an_msd_alone_makes_the_incident(app: Flask, client: FlaskClient,
                                         vehicle_headers: dict[str, str]) -> None:
    body = msd_event(V2_VECTOR)
    response = post(client, vehicle_headers, body)
    assert response.status_code == 201, response.json
    answer = response.json
    assert answer["type"] == "crash" and answer["country"] == "CN"
    assert answer["route_reason"] == "location" and answer["test_call"] is False
    assert answer["hand_back_after_s"] is not None
    incident = stored(app, body["event_id"])
    assert incident["vin"] == "ECALLEXAMPLE02023" and incident["msisdn"] == "+46701234567"
    assert incident["occurred_at"] == dt.datetime(2023, 9, 11, 6, 48, 31, tzinfo=dt.UTC)
    assert incident["lat"] == pytest.approx(22.5125, abs=1e-4)
    assert incident["lon"] == pytest.approx(113.9359, abs=1e-4)
    assert incident["heading_deg"] == 0.0 and incident["trusted"] is True
    assert incident["occupants"] == {"count": 2} and incident["crash"] is None
    assert incident["msd"] == body["msd"] and incident["test_call"] is False


def test_a_version_1_msd_near_munich_routes_to_germany(app: Flask, client: FlaskClient,
                                                       vehicle_headers: dict[str, str],
                                                       clock: Clock) -> None:
    body = msd_event(V1_VECTOR)
    answer = post(client, vehicle_headers, body).json
    assert answer["country"] == "DE" and answer["emergency_number"] == "112"
    incident = stored(app, body["event_id"])
    assert incident["vin"] == "WM9VDSVDSYA123456" and incident["heading_deg"] == 28.0
    # its timestamp (1973) is no time the gateway accepts: the event counts from arrival
    assert incident["occurred_at"] == dt.datetime.fromtimestamp(clock.now, tz=dt.UTC)


def test_a_manual_activation_is_an_sos(app: Flask, client: FlaskClient,
                                       vehicle_headers: dict[str, str]) -> None:
    body = msd_event(build_msd(control={"automaticActivation": False}))
    assert post(client, vehicle_headers, body).json["type"] == "sos"


def test_the_msd_bytes_are_forwarded_unchanged(app: Flask, client: FlaskClient,
                                               vehicle_headers: dict[str, str]) -> None:
    """The version 1 vector re-encodes to other bytes; the centre gets the car's."""
    body = msd_event(V1_VECTOR)
    answer = post(client, vehicle_headers, body).json
    payload = outbox_payload(app, answer["incident_id"])
    assert base64.b64decode(payload["msd"]) == bytes.fromhex(V1_VECTOR)
    assert payload["test_call"] is False and payload["vin"] == "WM9VDSVDSYA123456"
    json.dumps(payload, allow_nan=False)


def test_the_centre_receives_the_msd_base64(make_app: Callable[..., Flask], settings: Settings,
                                            vehicle_headers: dict[str, str]) -> None:
    policy = DeliveryPolicy(timeout_s=2.0, backoff_initial_s=0.1, backoff_max_s=1.0,
                            budget_s=5.0, poll_s=0.05, breaker_failures=3, breaker_open_s=30.0)
    with FakeAssistanceCentre() as centre:
        app = make_app(settings=settings.replace(assistance_url=centre.url, delivery=policy),
                       locator=BoxLocator(BOXES))
        answer = post(app.test_client(), vehicle_headers, msd_event(V2_VECTOR)).json
        svc = app.extensions["gateway"]
        worker = OutboxWorker(svc.store, AssistanceCentreClient(centre.url, timeout_s=2.0),
                              policy=policy, clock=svc.clock)
        for row in worker.claim(10):
            assert worker.deliver(row) == "delivered"
        received = centre.incidents[answer["incident_id"]]
    assert received["msd"] == b64(V2_VECTOR) and received["type"] == "crash"


def test_a_replay_of_the_same_body_is_the_same_incident(app: Flask, client: FlaskClient,
                                                        vehicle_headers: dict[str, str]) -> None:
    body = msd_event(V2_VECTOR)
    first = post(client, vehicle_headers, body)
    again = post(client, vehicle_headers, body)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json["incident_id"] == first.json["incident_id"] and count(app) == 1
    other = post(client, vehicle_headers, {**body, "msd": b64(V1_VECTOR)})
    assert other.status_code == 409 and count(app) == 1


# -- JSON fields beside the MSD --------------------------------------------------------


def test_json_fields_that_agree_are_accepted_and_complete_the_msd(
    app: Flask, client: FlaskClient, vehicle_headers: dict[str, str]
) -> None:
    body = msd_event(build_msd(vehicleLocation=COPENHAGEN_MAS), type="crash",
                     vin="ecallexample02023", occurred_at="2023-09-11T08:48:31.4+02:00",
                     location={"lat": 55.67615, "lon": 12.5683, "accuracy_m": 8.0},
                     occupants={"count": 2, "seats": ["driver", "front"]},
                     crash={"airbag_deployed": True})
    response = post(client, vehicle_headers, body)
    assert response.status_code == 201, response.json
    assert response.json["country"] == "DK"
    incident = stored(app, body["event_id"])
    assert incident["lat"] == 55.67615 and incident["accuracy_m"] == 8.0
    assert incident["heading_deg"] == 0.0 and incident["trusted"] is True  # from the MSD
    assert incident["occupants"]["seats"] == ["driver", "front"]
    assert incident["crash"] == {"airbag_deployed": True}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"type": "sos"}, "type"),
        ({"type": "on_call"}, "type"),
        ({"vin": "YV1ZW72U5N1234567"}, "vin"),
        ({"occurred_at": "2023-09-11T06:48:35Z"}, "occurred_at"),
        ({"location": {"lat": 22.52, "lon": 113.9359}}, "location.lat"),
        ({"location": {"lat": 22.5125, "lon": 113.95}}, "location.lon"),
        ({"location": {"lat": 22.5125, "lon": 113.9359, "trusted": False}}, "location.trusted"),
        ({"location": {"lat": 22.5125, "lon": 113.9359, "heading_deg": 90}},
         "location.heading_deg"),
        ({"occupants": {"count": 3}}, "occupants.count"),
    ],
)
def test_a_json_field_that_disagrees_with_the_msd_is_named(
    app: Flask, client: FlaskClient, vehicle_headers: dict[str, str],
    fields: dict[str, Any], field: str,
) -> None:
    response = post(client, vehicle_headers, msd_event(V2_VECTOR, **fields))
    assert response.status_code == 422
    assert field in response.json["fields"] and "MSD" in response.json["fields"][field]
    assert count(app) == 0 and count(app, outbox) == 0


def test_msisdn_and_event_id_are_still_required(app: Flask, client: FlaskClient,
                                                vehicle_headers: dict[str, str]) -> None:
    response = post(client, vehicle_headers, {"msd": b64(V2_VECTOR)})
    assert response.status_code == 422
    assert set(response.json["fields"]) == {"event_id", "msisdn"}


def test_json_fields_beside_a_bad_msd_are_still_checked(app: Flask, client: FlaskClient,
                                                        vehicle_headers: dict[str, str]) -> None:
    response = post(client, vehicle_headers, msd_event(b"\x02\x05", vin="short"))
    assert response.status_code == 422
    assert set(response.json["fields"]) == {"msd", "vin"}


# -- test calls, untrusted and unknown positions --------------------------------------


def test_a_test_call_is_recorded_and_flagged_never_handed_back(
    app: Flask, client: FlaskClient, vehicle_headers: dict[str, str]
) -> None:
    body = msd_event(build_msd(control={"testCall": True}, vehicleLocation=COPENHAGEN_MAS))
    response = post(client, vehicle_headers, body)
    assert response.status_code == 201
    answer = response.json
    assert answer["test_call"] is True and answer["hand_back_after_s"] is None
    assert answer["type"] == "crash" and answer["call_number"]
    assert "test call" in answer["route_reason"]
    incident = stored(app, body["event_id"])
    assert incident["test_call"] is True and incident["type"] == "crash"
    assert outbox_payload(app, incident["id"])["test_call"] is True
    # the voice path's one read carries the flag for the call plan
    lookup = app.extensions["gateway"].store.voice_lookup(
        call_sid="CAtest", steps=("voice",), msisdn=body["msisdn"],
        since=incident["received_at"] - dt.timedelta(minutes=1), types=("crash", "sos"))
    assert lookup.incident is not None and lookup.incident["test_call"] is True


def test_an_untrusted_position_is_marked_for_the_agent_and_in_the_reason(
    app: Flask, client: FlaskClient, vehicle_headers: dict[str, str]
) -> None:
    body = msd_event(build_msd(control={"positionCanBeTrusted": False},
                               vehicleLocation=COPENHAGEN_MAS))
    answer = post(client, vehicle_headers, body).json
    assert answer["route_country"] == "DK" and "untrusted" in answer["route_reason"]
    incident = stored(app, body["event_id"])
    assert incident["trusted"] is False
    spoken = whisper_summary(incident, plan=app.extensions["gateway"].plan, sim_country="SE")
    assert "untrusted" in spoken


def test_an_unknown_position_falls_back_to_the_sim_country(
    app: Flask, client: FlaskClient, vehicle_headers: dict[str, str]
) -> None:
    body = msd_event(build_msd(vehicleLocation={"positionLatitude": UNKNOWN_POSITION,
                                                "positionLongitude": UNKNOWN_POSITION}))
    response = post(client, vehicle_headers, body)
    assert response.status_code == 201, response.json
    answer = response.json
    assert answer["country"] is None and answer["route_country"] == "SE"
    assert answer["route_reason"].startswith("sim-country (no position")
    assert "MSD's position is unknown" in answer["route_reason"]
    incident = stored(app, body["event_id"])
    assert incident["lat"] is None and incident["lon"] is None
    payload = outbox_payload(app, incident["id"])
    assert payload["location"]["lat"] is None
    json.dumps(payload, allow_nan=False)
    spoken = whisper_summary(incident, plan=app.extensions["gateway"].plan, sim_country="SE")
    assert "Position unknown, routed to Sweden" in spoken


def test_an_unknown_position_uses_the_last_known_country_first(
    app: Flask, client: FlaskClient, vehicle_headers: dict[str, str]
) -> None:
    earlier = crash_event(type="on_call", vin="ECALLEXAMPLE02023")  # in Copenhagen
    assert post(client, vehicle_headers, earlier).status_code == 201
    body = msd_event(build_msd(vehicleLocation={"positionLongitude": UNKNOWN_POSITION}))
    answer = post(client, vehicle_headers, body).json
    assert answer["route_country"] == "DK"
    assert answer["route_reason"].startswith("last-known-country (no position)")


def test_a_json_location_beside_an_msd_without_one_is_used(
    app: Flask, client: FlaskClient, vehicle_headers: dict[str, str]
) -> None:
    body = msd_event(build_msd(vehicleLocation={"positionLatitude": UNKNOWN_POSITION},
                               control={"positionCanBeTrusted": False}),
                     location={"lat": 55.6761, "lon": 12.5683})
    answer = post(client, vehicle_headers, body).json
    assert answer["country"] == "DK"
    assert stored(app, body["event_id"])["trusted"] is False  # the car's doubt is kept


# -- malformed MSDs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("msd", "reason"),
    [
        ("not base64!", "not base64"),
        (12, "must be text"),
        (b64(b"\x09\x00"), "unknown MSD version 9"),
        (b64(bytes.fromhex(V2_VECTOR)[:20]), "out of data"),
        (b64(build_msd(vehicleLocation={"positionLatitude": 400_000_000})), "positionLatitude"),
    ],
)
def test_a_malformed_msd_is_refused_with_the_reason_and_nothing_stored(
    app: Flask, client: FlaskClient, vehicle_headers: dict[str, str], msd: Any, reason: str
) -> None:
    response = post(client, vehicle_headers, {**msd_event(), "msd": msd})
    assert response.status_code == 422
    body = response.json
    assert body["error"] == "invalid_event" and reason in body["fields"]["msd"]
    assert count(app) == 0 and count(app, outbox) == 0


FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def msd_bytes(draw: st.DrawFn) -> bytes:
    """Random bytes, half of them starting with a known version byte; and the public
    vectors with bits flipped, whole or cut short."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=160))
    if kind == 1:
        return bytes([draw(st.sampled_from([1, 2, 3]))]) + draw(st.binary(max_size=140))
    raw = bytearray.fromhex(draw(st.sampled_from([V1_VECTOR, V2_VECTOR])))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(raw) - 1))
        raw[at] ^= 1 << draw(st.integers(0, 7))
    if kind == 3:
        return bytes(raw[:draw(st.integers(1, len(raw)))])
    return bytes(raw)


@FUZZ
@given(raw=msd_bytes())
def test_random_bytes_as_msd_are_422_or_201_never_a_5xx(
    app: Flask, client: FlaskClient, vehicle_headers: dict[str, str], raw: bytes
) -> None:
    before = count(app)
    response = post(client, vehicle_headers, msd_event(raw))
    assert response.status_code in (201, 422), (response.status_code, response.get_data()[:300])
    if response.status_code == 422:
        assert set(response.json["fields"]) == {"msd"}, response.json
        assert count(app) == before
        return
    incident = stored(app, response.json["event_id"])
    assert base64.b64decode(incident["msd"]) == raw and count(app) == before + 1
    json.dumps(incident_payload(incident), allow_nan=False)
    whisper_summary(incident, plan=app.extensions["gateway"].plan, sim_country="SE")


@pytest.mark.postgres
def test_msd_incidents_on_postgres(pg_store: Store, plan: NumberPlan) -> None:
    """The MSD column, the test-call flag and an unknown position, on PostgreSQL."""
    test_call = parse_event(msd_event(build_msd(
        control={"testCall": True},
        vehicleLocation={"positionLatitude": UNKNOWN_POSITION,
                         "positionLongitude": UNKNOWN_POSITION})))
    incident, created = record_event(test_call, store=pg_store, locator=BoxLocator(BOXES),
                                     plan=plan, extra_rows=outbox_rows)
    assert created and incident["route_country"] == "SE"
    again = pg_store.incident_by_event(test_call.event_id)
    assert again is not None and again["lat"] is None and again["test_call"] is True
    assert base64.b64decode(again["msd"]) == test_call.msd.raw  # type: ignore[union-attr]
    lookup = pg_store.voice_lookup(call_sid="CApg", steps=("voice",), msisdn="+46701234567",
                                   since=again["received_at"] - dt.timedelta(minutes=1),
                                   types=("crash", "sos"))
    assert lookup.incident is not None and lookup.incident["test_call"] is True
    crash = parse_event(msd_event(V1_VECTOR))
    stored_crash, _ = record_event(crash, store=pg_store, locator=BoxLocator(BOXES), plan=plan)
    assert stored_crash["route_country"] == "DE" and stored_crash["test_call"] is False
