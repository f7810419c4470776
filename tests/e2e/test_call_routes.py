"""End to end: where a call goes is decided by the number called and where the car is.

A real gateway process; each webhook signed as Twilio signs it; the car's data message
through the vehicle API; the agent's dispatch through the agent API.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests

from gateway.plan import NumberPlan
from tests.support.events import crash_event
from tests.support.server import GatewayProcess, running_gateway
from tests.support.twilio import call_params, dial_of, dialled_number, parse

EMERGENCY_NUMBER = "+442079460900"
ROADSIDE_NUMBER = "+442079460901"
US_EMERGENCY_NUMBER = "+12025550150"
GB_CALLER_ID = "+442079460555"
DE_CALLER_ID = "+4930901820"
AGENT_TOKEN = "agent-e2e-token-0123456789abcdef"
GB_CAR = {"vin": "SAJWA0ES8DPS56028", "msisdn": "+442079460123"}
US_CAR = {"vin": "1HGCM82633A004352", "msisdn": "+12025550123"}
LONDON = {"lat": 51.5072, "lon": -0.1276}
BERLIN = {"lat": 52.52, "lon": 13.405}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with running_gateway(tmp_path_factory.mktemp("routes"), "--no-worker",
                         GATEWAY_EMERGENCY_CALLER_IDS=f"{GB_CALLER_ID},{DE_CALLER_ID}",
                         GATEWAY_AGENT_API_TOKENS=f"{AGENT_TOKEN}:read+dispatch") as gw:
        yield gw


def event(gw: GatewayProcess, car: dict[str, str], where: dict[str, float], **extra: Any
          ) -> dict[str, Any]:
    body = crash_event(**car, location=where, **extra)
    if body["type"] == "on_call":
        body.pop("crash")
    answer = gw.post_event(body)
    assert answer.status_code == 201, answer.text
    return answer.json()  # type: ignore[no-any-return]


def step(gw: GatewayProcess, url: str, sid: str, car: dict[str, str], to: str,
         **form: str) -> Any:
    response = gw.twilio(url, call_params(sid, car["msisdn"], to=to, **form))
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/xml")
    return parse(response.content)


def follow(gw: GatewayProcess, sid: str, car: dict[str, str], to: str,
           status: str = "no-answer") -> list[tuple[str, str]]:
    """Every leg of the call, ``(kind, number)``, when no leg is answered."""
    legs: list[tuple[str, str]] = []
    root = step(gw, "/twilio/voice", sid, car, to)
    for _ in range(12):
        dial = root.find("Dial")
        if dial is None:
            said = " ".join(s.text or "" for s in root.iter("Say"))
            legs.append(("end", said))
            return legs
        action = dial.get("action", "")
        kind = action.split("/twilio/voice/")[1].split("?")[0]
        legs.append((kind, dialled_number(root)))
        root = step(gw, action, sid, car, to, DialCallStatus=status)
    raise AssertionError(f"the call never ended: {legs}")


def test_on_call_incident_then_an_emergency_call_gets_centre_then_emergency(
    gateway: GatewayProcess, plan: NumberPlan
) -> None:
    answer = event(gateway, GB_CAR, LONDON, type="on_call", event_id="e2e-oncall-1")
    assert answer["call_number"] == ROADSIDE_NUMBER
    legs = follow(gateway, "CAe2e-oc-sos", GB_CAR, EMERGENCY_NUMBER)
    roadside = {c.roadside_number for c in plan.centres}
    assert legs[0] == ("dial-result", plan.centres_for("GB")[0].number)
    assert all(number not in roadside for _, number in legs)
    assert ("emergency-result", "999") in legs


def test_a_roadside_call_never_dials_an_emergency_number(gateway: GatewayProcess,
                                                         plan: NumberPlan) -> None:
    event(gateway, GB_CAR, LONDON, type="on_call", event_id="e2e-oncall-2")
    for status in ("busy", "no-answer", "failed"):
        legs = follow(gateway, f"CAe2e-rs-{status}", GB_CAR, ROADSIDE_NUMBER, status)
        roadside = {c.roadside_number for c in plan.centres}
        assert {kind for kind, _ in legs[:-1]} == {"roadside-result"}
        assert {number for _, number in legs[:-1]} <= roadside
        assert legs[-1][0] == "end" and "call you back" in legs[-1][1]


def test_us_car_crashes_in_london_dispatched_calls_again_gets_the_gb_route(
    gateway: GatewayProcess, plan: NumberPlan
) -> None:
    incident = event(gateway, US_CAR, LONDON, event_id="e2e-us-london")
    assert incident["route_country"] == "GB" and incident["call_number"] == US_EMERGENCY_NUMBER
    dispatched = requests.post(
        f"{gateway.base_url}/v1/agent/incidents/{incident['incident_id']}/dispatch",
        json={"note": "ambulance sent"}, timeout=5,
        headers={"Authorization": f"Bearer {AGENT_TOKEN}"})
    assert dispatched.status_code == 200 and dispatched.json()["status"] == "dispatched"
    legs = follow(gateway, "CAe2e-us-again", US_CAR, US_EMERGENCY_NUMBER)
    assert legs[0] == ("dial-result", plan.centres_for("US")[0].number)
    emergency = [number for kind, number in legs if kind == "emergency-result"]
    assert emergency and set(emergency) == {"999"}  # never 911: the car is in London


def test_us_car_in_berlin_reaches_eu_primary_before_the_catch_all(
    gateway: GatewayProcess, plan: NumberPlan
) -> None:
    event(gateway, US_CAR, BERLIN, event_id="e2e-us-berlin")
    legs = follow(gateway, "CAe2e-us-berlin", US_CAR, US_EMERGENCY_NUMBER)
    centres = [number for kind, number in legs if kind == "dial-result"]
    by_number = {c.number: c.centre_id for c in plan.centres}
    order = [by_number[n] for n in centres]
    assert order[:2] == ["na-primary", "eu-primary"]
    assert "global" not in order or order.index("global") > order.index("eu-primary")
    assert ("emergency-result", "112") in legs  # Germany, from the German caller ID
    # the Berlin call's emergency leg carries the German caller ID
    root = step(gateway, "/twilio/voice/fallback", "CAe2e-us-berlin-fb", US_CAR,
                US_EMERGENCY_NUMBER, ErrorCode="11205",
                ErrorUrl=f"{gateway.base_url}/twilio/voice/dial-result?t0=1&h=US&w=DE&k=2")
    assert dialled_number(root) == "112" and dial_of(root).get("callerId") == DE_CALLER_ID
