"""POST /v1/events: durable, idempotent, and clear about bad input."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from gateway.store import incidents
from tests.support.events import crash_event


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
