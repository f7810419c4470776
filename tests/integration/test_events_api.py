"""POST /v1/events: durable, idempotent, and clear about bad input."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from gateway.delivery import incident_payload
from gateway.store import incidents
from gateway.whisper import whisper_summary
from tests.conftest import Clock
from tests.support.events import COPENHAGEN, crash_event


def count_incidents(app: Flask) -> int:
    with app.extensions["gateway"].store.engine.begin() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(incidents)).scalar_one())


def test_event_creates_an_incident_with_the_route(client: FlaskClient,
                                                  vehicle_headers: dict[str, str]) -> None:
    response = client.post("/v1/events", json=crash_event(), headers=vehicle_headers)
    assert response.status_code == 201
    body = response.json
    assert body["country"] == "DK" and body["emergency_number"] == "112"
    assert body["route_reason"] == "location"
    assert body["incident_id"]


def test_replay_answers_the_same_incident_and_stores_once(
    app: Flask, client: FlaskClient, vehicle_headers: dict[str, str]
) -> None:
    event = crash_event()
    first = client.post("/v1/events", json=event, headers=vehicle_headers)
    again = client.post("/v1/events", json=event, headers=vehicle_headers)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json["incident_id"] == first.json["incident_id"]
    assert again.json["replayed"] is True
    assert count_incidents(app) == 1


def test_same_event_id_with_another_body_is_a_conflict(
    app: Flask, client: FlaskClient, vehicle_headers: dict[str, str]
) -> None:
    event = crash_event()
    client.post("/v1/events", json=event, headers=vehicle_headers)
    other = {**event, "type": "sos"}
    response = client.post("/v1/events", json=other, headers=vehicle_headers)
    assert response.status_code == 409
    assert "event_id" in response.json["fields"]
    assert count_incidents(app) == 1


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"event_id": ""}, "event_id"),
        ({"type": "fire"}, "type"),
        ({"vin": "YV1ZW72U5N12345"}, "vin"),
        ({"vin": "YV1ZW72U5N123456O"}, "vin"),
        ({"msisdn": "0701234567"}, "msisdn"),
        ({"msisdn": "+4670"}, "msisdn"),
        ({"occurred_at": "yesterday"}, "occurred_at"),
        ({"occurred_at": "2026-11-25T10:15:00"}, "occurred_at"),
        ({"location": {"lat": 91, "lon": 12}}, "location.lat"),
        ({"location": {"lat": 55, "lon": "12"}}, "location.lon"),
        ({"location": {"lat": 55, "lon": 12, "heading_deg": 360}}, "location.heading_deg"),
        ({"location": {"lat": 55, "lon": 12, "accuracy_m": -1}}, "location.accuracy_m"),
        ({"location": {"lat": 55, "lon": 12, "trusted": "yes"}}, "location.trusted"),
        ({"location": None}, "location"),
        ({"crash": {"airbag_deployed": "yes"}}, "crash.airbag_deployed"),
        ({"crash": {"delta_v_kmh": True}}, "crash.delta_v_kmh"),
        ({"occupants": {"count": -1}}, "occupants.count"),
        ({"occupants": "two"}, "occupants"),
    ],
)
def test_bad_input_names_the_field_and_stores_nothing(
    app: Flask, client: FlaskClient, vehicle_headers: dict[str, str], change: dict[str, Any], field: str
) -> None:
    response = client.post("/v1/events", json=crash_event(**change), headers=vehicle_headers)
    assert response.status_code == 422
    assert field in response.json["fields"], response.json
    assert count_incidents(app) == 0


def test_every_bad_field_is_named_at_once(client: FlaskClient, vehicle_headers: dict[str, str]) -> None:
    response = client.post("/v1/events", json={"type": "crash"}, headers=vehicle_headers)
    assert response.status_code == 422
    assert {"event_id", "vin", "msisdn", "occurred_at", "location"} <= set(response.json["fields"])


@pytest.mark.parametrize("body", [b"not json", b"[1,2]", b"{\"a\": "])
def test_malformed_json_is_a_clear_error(client: FlaskClient, vehicle_headers: dict[str, str],
                                         body: bytes) -> None:
    response = client.post("/v1/events", data=body, headers={**vehicle_headers,
                                                             "Content-Type": "application/json"})
    assert response.status_code == 422
    assert "body" in response.json["fields"]


def test_wrong_content_type_is_refused(client: FlaskClient, vehicle_headers: dict[str, str]) -> None:
    response = client.post("/v1/events", data="x=1", headers=vehicle_headers)
    assert response.status_code == 415


def test_event_at_sea_uses_the_last_known_country(client: FlaskClient,
                                                  vehicle_headers: dict[str, str]) -> None:
    client.post("/v1/events", json=crash_event(type="on_call"), headers=vehicle_headers)  # in DK
    at_sea = crash_event(location={"lat": 56.5, "lon": 11.0})  # Kattegat, outside the test boxes
    body = client.post("/v1/events", json=at_sea, headers=vehicle_headers).json
    assert body["country"] is None
    assert body["route_country"] == "DK"
    assert body["route_reason"].startswith("last-known-country")


def test_event_at_sea_without_history_uses_the_sim_country(client: FlaskClient,
                                                           vehicle_headers: dict[str, str]) -> None:
    body = client.post("/v1/events", json=crash_event(location={"lat": 0.0, "lon": -30.0}),
                       headers=vehicle_headers).json
    assert body["route_country"] == "SE"
    assert body["route_reason"].startswith("sim-country")


def test_untrusted_position_is_used_and_flagged(client: FlaskClient,
                                                vehicle_headers: dict[str, str]) -> None:
    event = crash_event(location={"lat": 55.6761, "lon": 12.5683, "trusted": False})
    body = client.post("/v1/events", json=event, headers=vehicle_headers).json
    assert body["route_country"] == "DK" and "untrusted" in body["route_reason"]


# -- input that cannot be carried (issue 7, item 8) -----------------------------------


def post_raw(client: FlaskClient, headers: dict[str, str], body: bytes | str) -> Any:
    return client.post("/v1/events", data=body,
                       headers={**headers, "Content-Type": "application/json"})


def assert_refused(app: Flask, response: Any, field: str, *, stored: int = 0) -> None:
    """422 in the usual form naming ``field``; still only ``stored`` incidents."""
    assert response.status_code == 422, response.get_data(as_text=True)[:500]
    body = response.json
    assert body["error"] == "invalid_event" and body["detail"]
    assert field in body["fields"], body
    assert count_incidents(app) == stored


def with_raw(literal: str, **change: Any) -> str:
    """A crash event as JSON text with ``"@"`` replaced by a raw literal (NaN, 1e400, ...)."""
    return json.dumps(crash_event(**change)).replace('"@"', literal)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"location": {"lat": "@", "lon": 12.5}}, "location.lat"),
        ({"location": {**COPENHAGEN, "accuracy_m": "@"}}, "location.accuracy_m"),
        ({"crash": {"delta_v_kmh": "@"}}, "crash.delta_v_kmh"),
        ({"crash": {"sensors": [1.0, {"g": "@"}]}}, "crash.sensors[1].g"),
        ({"occupants": {"count": 1, "seat_weights": ["@"]}}, "occupants.seat_weights[0]"),
        ({"firmware": {"temp": "@"}}, "firmware.temp"),  # unknown fields too
    ],
)
def test_nan_and_infinity_are_refused_anywhere(
    app: Flask, client: FlaskClient, vehicle_headers: dict[str, str],
    change: dict[str, Any], field: str,
) -> None:
    for literal in ["NaN", "Infinity", "-Infinity", "1e400", "-1e999"]:
        response = post_raw(client, vehicle_headers, with_raw(literal, **change))
        assert_refused(app, response, field)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"location": {"lat": "@", "lon": 12.5}}, "location.lat"),
        ({"crash": {"delta_v_kmh": "@"}}, "crash.delta_v_kmh"),
        ({"occupants": "@"}, "occupants"),
        ({"occupants": {"count": "@"}}, "occupants.count"),
        ({"firmware": {"build": "@"}}, "firmware.build"),
    ],
)
def test_integers_too_large_to_carry_are_refused(
    app: Flask, client: FlaskClient, vehicle_headers: dict[str, str],
    change: dict[str, Any], field: str,
) -> None:
    # 10**400, -10**400, 2**64, -2**63 - 1, and past int()'s 4300-digit limit
    for number in ["1" + "0" * 400, "-1" + "0" * 400, str(2**64), str(-(2**63) - 1), "9" * 5000]:
        response = post_raw(client, vehicle_headers, with_raw(number, **change))
        assert_refused(app, response, field)


def test_a_64_bit_integer_in_an_unknown_field_is_kept(
    app: Flask, client: FlaskClient, vehicle_headers: dict[str, str]
) -> None:
    event = crash_event(firmware={"build": 2**64 - 1, "offset": -(2**63)})
    assert client.post("/v1/events", json=event, headers=vehicle_headers).status_code == 201


@pytest.mark.parametrize(
    ("delta_v", "status"),
    [(0, 201), (38.5, 201), (500, 201), (-1, 422), (500.01, 422), (1e308, 422), (10**18, 422)],
)
def test_delta_v_must_be_plausible(
    app: Flask, client: FlaskClient, vehicle_headers: dict[str, str], delta_v: float, status: int
) -> None:
    response = client.post("/v1/events", json=crash_event(crash={"delta_v_kmh": delta_v}),
                           headers=vehicle_headers)
    assert response.status_code == status
    if status == 422:
        assert_refused(app, response, "crash.delta_v_kmh")


@pytest.mark.parametrize(
    "stamp",
    [
        "0001-01-01T00:00:00+01:00",  # before year 1 in UTC: OverflowError in astimezone
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59-01:00",  # after year 9999 in UTC
        "9999-12-31T23:59:59Z",
        "1999-12-31T23:59:59Z",
        "2000-01-01T00:00:00+01:00",  # 1999-12-31T23:00Z
    ],
)
def test_out_of_range_dates_are_refused(
    app: Flask, client: FlaskClient, vehicle_headers: dict[str, str], stamp: str
) -> None:
    response = client.post("/v1/events", json=crash_event(occurred_at=stamp),
                           headers=vehicle_headers)
    assert_refused(app, response, "occurred_at")


def test_occurred_at_is_checked_against_the_gateway_clock(
    app: Flask, client: FlaskClient, vehicle_headers: dict[str, str], clock: Clock
) -> None:
    now = dt.datetime.fromtimestamp(clock(), tz=dt.UTC)
    ahead = (now + dt.timedelta(days=1, seconds=1)).isoformat()
    assert_refused(app, client.post("/v1/events", json=crash_event(occurred_at=ahead),
                                    headers=vehicle_headers), "occurred_at")
    skewed = (now + dt.timedelta(hours=12)).isoformat()  # a car clock a little ahead is fine
    assert client.post("/v1/events", json=crash_event(occurred_at=skewed),
                       headers=vehicle_headers).status_code == 201
    early = "2000-01-01T00:00:00Z"
    assert client.post("/v1/events", json=crash_event(occurred_at=early),
                       headers=vehicle_headers).status_code == 201


@pytest.mark.parametrize(
    ("opener", "depth"), [("[", 33), ("[", 10_000), ("[", 30_000), ('{"a":', 33), ('{"a":', 10_000)]
)
def test_deep_nesting_is_refused_without_recursion(
    app: Flask, client: FlaskClient, vehicle_headers: dict[str, str], depth: int, opener: str
) -> None:
    closer = "]" if opener == "[" else "}"
    nested = opener * depth + "1" + closer * depth
    response = post_raw(client, vehicle_headers, nested)
    assert_refused(app, response, "body")
    assert "nested" in response.json["fields"]["body"]
    inside = json.dumps(crash_event(crash={"deep": "@"})).replace('"@"', nested)
    assert_refused(app, post_raw(client, vehicle_headers, inside), "body")


def test_nesting_up_to_the_limit_is_read(
    app: Flask, client: FlaskClient, vehicle_headers: dict[str, str]
) -> None:
    # the body object is level 1: 31 arrays inside it reach 32
    at_limit = json.dumps(crash_event()).replace("{", '{"x": ' + "[" * 31 + "]" * 31 + ", ", 1)
    assert post_raw(client, vehicle_headers, at_limit).status_code == 201
    over = json.dumps(crash_event()).replace("{", '{"x": ' + "[" * 32 + "]" * 32 + ", ", 1)
    assert_refused(app, post_raw(client, vehicle_headers, over), "body", stored=1)
    # brackets inside strings do not count
    text = crash_event(crash={"impact": "[" * 100 + "{" * 100 + '\\"['})
    assert client.post("/v1/events", json=text, headers=vehicle_headers).status_code == 201


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"crash": {"impact": "x" * 5000}}, "crash"),
        ({"crash": {"notes": ["y" * 1000] * 5}}, "crash"),
        ({"crash": {"a": {"b": {"c": {"d": 1}}}}}, "crash"),  # 4 levels
        ({"crash": {"a": [[[1]]]}}, "crash"),
        ({"occupants": {"count": 1, "names": "z" * 5000}}, "occupants"),
        ({"occupants": {"count": 1, "a": {"b": {"c": []}}}}, "occupants"),
    ],
)
def test_stored_free_form_objects_are_bounded(
    app: Flask, client: FlaskClient, vehicle_headers: dict[str, str],
    change: dict[str, Any], field: str,
) -> None:
    response = client.post("/v1/events", json=crash_event(**change), headers=vehicle_headers)
    assert_refused(app, response, field)


def test_stored_objects_at_the_bounds_are_kept(
    app: Flask, client: FlaskClient, vehicle_headers: dict[str, str]
) -> None:
    crash = {"delta_v_kmh": 38, "a": {"b": {"c": 1}}, "impact": "front"}
    crash["pad"] = "p" * (4096 - len(json.dumps({**crash, "pad": ""}, separators=(",", ":"))))
    assert len(json.dumps(crash, separators=(",", ":"))) == 4096
    response = client.post("/v1/events", json=crash_event(crash=crash), headers=vehicle_headers)
    assert response.status_code == 201
    stored = app.extensions["gateway"].store.incident_by_event(response.json["event_id"])
    assert stored["crash"] == crash


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"impact": "\\ud800"}', "crash.impact"),  # a lone surrogate: not Unicode
        ('{"\\udfff": 1}', "crash.\\udfff"),
    ],
)
def test_text_that_is_not_unicode_is_refused(
    app: Flask, client: FlaskClient, vehicle_headers: dict[str, str], text: str, field: str
) -> None:
    body = json.dumps(crash_event(crash="@")).replace('"@"', text)
    assert_refused(app, post_raw(client, vehicle_headers, body), field)


def test_a_body_over_64_kib_is_refused_before_reading(
    app: Flask, client: FlaskClient, vehicle_headers: dict[str, str]
) -> None:
    response = post_raw(client, vehicle_headers, "[" * 70_000 + "]" * 70_000)
    assert response.status_code == 413 and count_incidents(app) == 0


@pytest.mark.parametrize(
    "body",
    [b"\xff\xfe\xfa", b'{"event_id": "\xc3\x28"}', b"", b"   ", b"NaN", b"[" * 5, b'"\\ud800"'],
)
def test_unreadable_bodies_are_a_clear_error(
    app: Flask, client: FlaskClient, vehicle_headers: dict[str, str], body: bytes
) -> None:
    assert_refused(app, post_raw(client, vehicle_headers, body), "body")


def test_what_is_stored_can_be_delivered_and_spoken(
    app: Flask, client: FlaskClient, vehicle_headers: dict[str, str]
) -> None:
    event = crash_event(crash={"delta_v_kmh": 499.6, "rollover": True, "impact": "Ünïcode ☃ 🚗"},
                        occupants={"count": 3, "seats": [1, 2, 4]})
    response = client.post("/v1/events", json=event, headers=vehicle_headers)
    assert response.status_code == 201
    gateway = app.extensions["gateway"]
    stored = gateway.store.incident_by_event(event["event_id"])
    json.dumps(incident_payload(stored), allow_nan=False)
    spoken = whisper_summary(stored, plan=gateway.plan, sim_country="SE")
    assert "Change of speed 500 kilometres per hour." in spoken and "3 occupants." in spoken
