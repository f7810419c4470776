"""Tracking through the agent API: start with a police reference (one ``police_notification``
at the centre, however often the request is replayed), stop (role, audit, 404, 409).

The car's command service and the centre are real HTTP fakes; the delivery outbox worker is
driven by hand.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from gateway.adapters.assistance import AssistanceCentreClient
from gateway.adapters.vehicle_commands import VehicleCommandClient
from gateway.config import DeliveryPolicy, Settings
from gateway.delivery import OutboxWorker
from gateway.owners import PinHasher, Vehicles
from tests.conftest import Clock
from tests.support.fake_servers import FakeAssistanceCentre, FakeCarCommands

READER = "reader-token-0123456789abcdef"
DISPATCHER = "dispatch-token-0123456789abcdef"
VIN = "WBA3A5C51CF256001"
UNKNOWN_VIN = "WBA3A5C51CF256999"


@pytest.fixture
def car_service() -> Iterator[FakeCarCommands]:
    with FakeCarCommands(mode="confirm", slow_s=1.0) as fake:  # the car executes at once
        yield fake


@pytest.fixture
def centre() -> Iterator[FakeAssistanceCentre]:
    with FakeAssistanceCentre() as fake:
        yield fake


@pytest.fixture
def app(make_app: Callable[..., Flask], settings: Settings, car_service: FakeCarCommands,
        centre: FakeAssistanceCentre) -> Iterator[Flask]:
    tokens = {READER: frozenset({"read"}), DISPATCHER: frozenset({"read", "dispatch"})}
    with VehicleCommandClient(car_service.url, timeout_s=0.3, attempts=1,
                              total_budget_s=1.0) as commands:
        app = make_app(settings=settings.replace(agent_api_tokens=tokens,
                                                 assistance_url=centre.url),
                       commands=commands)
        Vehicles(app.extensions["gateway"].store, PinHasher(n=2**8)).register(
            vin=VIN, owner_name="Owner", market="DE", purchase_date=dt.date(2024, 1, 1),
            actor="test", owner_phone="+4915112349999")
        yield app


@pytest.fixture
def deliver(app: Flask, centre: FakeAssistanceCentre, clock: Clock) -> Iterator[Callable[[], int]]:
    """One pass of the delivery outbox worker, as ``serve`` runs it."""
    client = AssistanceCentreClient(centre.url, timeout_s=0.5)
    worker = OutboxWorker(app.extensions["gateway"].store, client, clock=clock,
                          policy=DeliveryPolicy(timeout_s=0.5, backoff_initial_s=0.01,
                                                backoff_max_s=0.05, budget_s=0.2))
    yield worker.run_once
    client.close()


def call(client: FlaskClient, path: str, token: str = DISPATCHER,
         body: dict[str, Any] | None = None, method: str = "POST") -> Any:
    return client.open(path, method=method, json=body,
                       headers={"Authorization": f"Bearer {token}"})


def police_notifications(centre: FakeAssistanceCentre) -> list[dict[str, Any]]:
    return [i for i in centre.incidents.values() if i["type"] == "police_notification"]


def audit(app: Flask) -> list[Any]:
    return Vehicles(app.extensions["gateway"].store, PinHasher(n=2**8)).audit_for(VIN)


def commands_sent(car_service: FakeCarCommands, command: str) -> int:
    return sum(1 for c in car_service.commands if c["body"]["command"] == command)


def test_tracking_start_notifies_the_police_once_even_when_replayed(
    app: Flask, centre: FakeAssistanceCentre, car_service: FakeCarCommands,
    deliver: Callable[[], int],
) -> None:
    client = app.test_client()
    path = f"/v1/agent/vehicles/{VIN}/tracking"
    first = call(client, path, body={"police_reference": "DE-POL-2026-77"})
    assert first.status_code == 200, first.json
    assert first.json["tracking"] is True
    assert first.json["tracking_police_reference"] == "DE-POL-2026-77"
    notification = first.json["police_notification"]
    assert notification["status"] == "pending" and len(notification["id"]) == 36
    for body in ({"police_reference": "DE-POL-2026-77"}, {"police_reference": "DE-POL-2026-78"}):
        replay = call(client, path, body=body)  # the agent's client retries, or a colleague
        assert replay.status_code == 200
        assert replay.json["police_notification"]["id"] == notification["id"]
        assert replay.json["tracking_police_reference"] == "DE-POL-2026-77"
    assert deliver() == 1
    assert deliver() == 0
    [sent] = police_notifications(centre)
    assert sent["vin"] == VIN and sent["police_reference"] == "DE-POL-2026-77"
    assert sent["market"] == "DE" and sent["requested_by"].startswith("agent:")
    assert centre.deliveries[notification["id"]] == 1
    assert commands_sent(car_service, "start_tracking") == 1  # the car got one command
    again = call(client, path, body={"police_reference": "DE-POL-2026-77"})
    assert again.json["police_notification"]["status"] == "delivered"
    started = [a for a in audit(app) if a.action == "tracking_started"]
    assert [a.detail["changed"] for a in started] == [True, False, False, False]


def test_a_bad_reference_sends_nothing(app: Flask, car_service: FakeCarCommands,
                                       deliver: Callable[[], int]) -> None:
    client = app.test_client()
    path = f"/v1/agent/vehicles/{VIN}/tracking"
    for body in ({}, {"police_reference": " "}, {"police_reference": "x" * 101}):
        response = call(client, path, body=body)
        assert response.status_code == 422
        assert "police_reference" in response.json["fields"]
    assert car_service.commands == [] and deliver() == 0
    assert call(client, f"/v1/agent/vehicles/{UNKNOWN_VIN}/tracking",
                body={"police_reference": "P-1"}).status_code == 404
    assert car_service.commands == []


def test_an_unreachable_car_is_not_tracked_and_nobody_is_notified(
    app: Flask, car_service: FakeCarCommands, deliver: Callable[[], int]
) -> None:
    car_service.mode = "timeout"
    client = app.test_client()
    response = call(client, f"/v1/agent/vehicles/{VIN}/tracking",
                    body={"police_reference": "P-1"})
    assert response.status_code == 202 and response.json["command"]["status"] == "pending"
    assert "police_notification" not in response.json
    assert call(client, f"/v1/agent/vehicles/{VIN}", READER, method="GET").json[
        "tracking"] is False
    assert deliver() == 0


def test_stop_tracking(app: Flask, centre: FakeAssistanceCentre,
                       car_service: FakeCarCommands, deliver: Callable[[], int]) -> None:
    client = app.test_client()
    stop = f"/v1/agent/vehicles/{VIN}/tracking/stop"
    not_tracking = call(client, stop, body={"reason": "recovered"})
    assert not_tracking.status_code == 409 and not_tracking.json["error"] == "not_tracking"
    assert call(client, f"/v1/agent/vehicles/{UNKNOWN_VIN}/tracking/stop").status_code == 404
    assert commands_sent(car_service, "stop_tracking") == 0
    call(client, f"/v1/agent/vehicles/{VIN}/tracking", body={"police_reference": "P-1"})

    assert call(client, stop, READER).status_code == 403
    assert call(client, stop, "not-a-token-0123456789").status_code == 401
    assert call(client, stop, body={"reason": 7}).status_code == 422
    refused = client.post(stop, data="not json", content_type="application/json",
                          headers={"Authorization": f"Bearer {DISPATCHER}"})
    assert refused.status_code == 422
    assert commands_sent(car_service, "stop_tracking") == 0

    stopped = call(client, stop, body={"reason": "car recovered by the police"})
    assert stopped.status_code == 200 and stopped.json["tracking"] is False
    assert commands_sent(car_service, "stop_tracking") == 1
    entry = audit(app)[-1]
    assert entry.action == "tracking_stopped" and entry.actor.startswith("agent:")
    assert entry.detail["reason"] == "car recovered by the police"
    assert entry.detail["police_reference"] == "P-1"
    assert call(client, stop).status_code == 409  # a replayed stop

    # a new theft, a new session: a second police notification
    restarted = call(client, f"/v1/agent/vehicles/{VIN}/tracking",
                     body={"police_reference": "P-2"})
    assert restarted.json["tracking_police_reference"] == "P-2"
    assert deliver() == 2
    assert sorted(p["police_reference"] for p in police_notifications(centre)) == ["P-1", "P-2"]


def test_stop_without_a_body_and_with_an_unreachable_car(
    app: Flask, car_service: FakeCarCommands
) -> None:
    client = app.test_client()
    call(client, f"/v1/agent/vehicles/{VIN}/tracking", body={"police_reference": "P-1"})
    car_service.mode = "404"
    refused = client.post(f"/v1/agent/vehicles/{VIN}/tracking/stop",
                          headers={"Authorization": f"Bearer {DISPATCHER}"})
    assert refused.status_code == 502  # the command service refused: still tracking
    assert call(client, f"/v1/agent/vehicles/{VIN}", READER, method="GET").json["tracking"]
    car_service.mode = "confirm"
    done = client.post(f"/v1/agent/vehicles/{VIN}/tracking/stop",
                       headers={"Authorization": f"Bearer {DISPATCHER}"})
    assert done.status_code == 200 and audit(app)[-1].detail["reason"] is None
