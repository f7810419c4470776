"""``POST /v1/vehicles/<vin>/command-results``: the car reports a command it was sent.

Vehicle credentials; each bad field named; a command of another car is unknown; a
replay changes nothing and answers the same; ``ok`` applies the state change once."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from gateway.config import Settings
from gateway.owners import PinHasher, Vehicles
from tests.support.fakes_adapters import RecordingVehicleCommands

SUPERVISOR = "supervisor-token-0123456789abcd"
VIN = "WBA3A5C51CF256001"
OTHER_VIN = "WBA3A5C51CF256002"


@pytest.fixture
def app(make_app: Callable[..., Flask], settings: Settings) -> Flask:
    app = make_app(settings=settings.replace(
        agent_api_tokens={SUPERVISOR: frozenset({"supervisor"})}),
        commands=RecordingVehicleCommands(status="accepted"))
    registry = Vehicles(app.extensions["gateway"].store, PinHasher(n=2**8))
    for vin in (VIN, OTHER_VIN):
        registry.register(vin=vin, owner_name="Owner", market="DE",
                          purchase_date=dt.date(2024, 1, 1), actor="test", pin="4711")
    return app


def immobilise(client: FlaskClient, vin: str = VIN) -> dict[str, Any]:
    response = client.post(f"/v1/agent/vehicles/{vin}/immobilise",
                           json={"authority_reference": "POL-1"},
                           headers={"Authorization": f"Bearer {SUPERVISOR}"})
    assert response.status_code == 202 and response.json["command"]["status"] == "sent"
    return dict(response.json["command"])


def immobilised(client: FlaskClient, vin: str = VIN) -> bool:
    return bool(client.get(f"/v1/agent/vehicles/{vin}",
                           headers={"Authorization": f"Bearer {SUPERVISOR}"}).json["immobilised"])


def report(client: FlaskClient, headers: dict[str, str], body: Any,
           vin: str = VIN) -> Any:
    return client.post(f"/v1/vehicles/{vin}/command-results", json=body, headers=headers)


def test_ok_confirms_and_a_replay_answers_the_same(app: Flask,
                                                   vehicle_headers: dict[str, str]) -> None:
    client = app.test_client()
    command = immobilise(client)
    assert not immobilised(client)
    first = report(client, vehicle_headers, {"key": command["key"], "ok": True})
    assert first.status_code == 200
    assert first.json["status"] == "confirmed" and first.json["id"] == command["id"]
    assert first.json["command_id"] == command["command_id"]
    assert immobilised(client)
    for body in ({"key": command["key"], "ok": True},
                 {"command_id": command["command_id"], "ok": True},
                 {"key": command["key"], "ok": False, "detail": "late"}):
        again = report(client, vehicle_headers, body)
        assert again.status_code == 200 and again.json == first.json
    actions = [e.action for e in Vehicles(app.extensions["gateway"].store,
                                          PinHasher(n=2**8)).audit_for(VIN)]
    assert actions.count("immobilise") == 1


def test_not_ok_fails_the_command_and_changes_nothing(
        app: Flask, vehicle_headers: dict[str, str]) -> None:
    client = app.test_client()
    command = immobilise(client)
    failed = report(client, vehicle_headers, {"command_id": command["command_id"],
                                              "ok": False, "detail": "ignition on"})
    assert failed.status_code == 200 and failed.json["status"] == "failed"
    assert "ignition on" in failed.json["last_error"]
    assert not immobilised(client)


@pytest.mark.parametrize("body,field", [
    ({"ok": True}, "key"),
    ({"key": "k"}, "ok"),
    ({"key": "k", "ok": "yes"}, "ok"),
    ({"key": "has space", "ok": True}, "key"),
    ({"key": "k" * 129, "ok": True}, "key"),
    ({"command_id": "", "ok": True}, "command_id"),
    ({"key": None, "ok": True}, "key"),
    ({"key": "k", "ok": True, "detail": "x" * 301}, "detail"),
])
def test_invalid_reports_name_the_field(app: Flask, vehicle_headers: dict[str, str],
                                        body: dict[str, Any], field: str) -> None:
    client = app.test_client()
    command = immobilise(client)
    response = report(client, vehicle_headers, body)
    assert response.status_code == 422 and response.json["error"] == "invalid_request"
    assert set(response.json["fields"]) == {field}
    assert not immobilised(client)
    assert app.extensions["gateway"].command_queue.get(command["key"])["status"] == "sent"


def test_unknown_commands_other_cars_and_credentials(
        app: Flask, vehicle_headers: dict[str, str]) -> None:
    client = app.test_client()
    command = immobilise(client)
    unknown = report(client, vehicle_headers, {"key": "immobilise:nope", "ok": True})
    assert unknown.status_code == 404 and unknown.json["fields"] == {
        "key": "no command with this value for this vehicle"}
    by_id = report(client, vehicle_headers, {"command_id": "cmd-99", "ok": True})
    assert by_id.status_code == 404 and set(by_id.json["fields"]) == {"command_id"}
    other = report(client, vehicle_headers, {"key": command["key"], "ok": True},
                   vin=OTHER_VIN)  # another car cannot confirm this car's command
    assert other.status_code == 404
    assert report(client, {}, {"key": command["key"], "ok": True}).status_code == 401
    agent = {"Authorization": f"Bearer {SUPERVISOR}"}
    assert report(client, agent, {"key": command["key"], "ok": True}).status_code == 401
    form = client.post(f"/v1/vehicles/{VIN}/command-results", data="ok=1",
                       headers=vehicle_headers,
                       content_type="application/x-www-form-urlencoded")
    assert form.status_code == 415
    assert not immobilised(client)
