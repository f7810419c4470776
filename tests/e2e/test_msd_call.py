"""End to end: a car that speaks the eCall MSD (EN 15722) sends it, then calls; the call
is routed by the MSD's position.

A real gateway process (``python -m gateway serve``) with the offline country lookup;
the MSD through the vehicle API as base64; each webhook signed as Twilio signs it.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.plan import NumberPlan
from tests.support.fake_servers import FakeAssistanceCentre
from tests.support.msd import V1_VECTOR, V2_VECTOR, build_msd, msd_event
from tests.support.server import GatewayProcess, running_gateway
from tests.support.twilio import call_params, dial_of, dialled_number, parse

EMERGENCY_NUMBER = "+442079460900"
DE_CALLER_ID = "+4930901820"
#: the cars' SIMs: a British number, so the British centre is the home centre
GB_SIM = "+442079460123"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with running_gateway(tmp_path_factory.mktemp("msd"), "--no-worker",
                         GATEWAY_EMERGENCY_CALLER_IDS=DE_CALLER_ID) as gw:
        yield gw


def send(gw: GatewayProcess, msd: str | bytes, event_id: str) -> dict[str, Any]:
    response = gw.post_event(msd_event(msd, event_id=event_id, msisdn=GB_SIM))
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def step(gw: GatewayProcess, url: str, sid: str, **form: str) -> Any:
    response = gw.twilio(url, call_params(sid, GB_SIM, to=EMERGENCY_NUMBER, **form))
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/xml")
    return parse(response.content)


def follow(gw: GatewayProcess, sid: str) -> tuple[list[tuple[str, str]], Any]:
    """Every leg of the car's call when no leg is answered, ``(kind, number)``, and the
    last TwiML (the leg or the end that was reached)."""
    legs: list[tuple[str, str]] = []
    root = step(gw, "/twilio/voice", sid)
    for _ in range(12):
        dial = root.find("Dial")
        if dial is None:
            return legs, root
        action = dial.get("action", "")
        legs.append((action.split("/twilio/voice/")[1].split("?")[0], dialled_number(root)))
        if legs[-1][0] == "emergency-result":
            return legs, root
        root = step(gw, action, sid, DialCallStatus="no-answer")
    raise AssertionError(f"the call never ended: {legs}")


def said(root: Any) -> str:
    return " ".join(s.text or "" for s in root.iter("Say"))


def test_msd_crash_near_munich_then_the_call_dials_112_with_the_german_caller_id(
    gateway: GatewayProcess, plan: NumberPlan
) -> None:
    answer = send(gateway, V1_VECTOR, "e2e-msd-munich")
    assert answer["type"] == "crash" and answer["country"] == "DE"
    assert answer["route_reason"] == "location"
    assert answer["call_number"] == EMERGENCY_NUMBER and answer["emergency_number"] == "112"
    assert answer["fallback_dial"] == "112" and answer["test_call"] is False

    legs, last = follow(gateway, "CAe2e-msd-munich")
    centres = [number for kind, number in legs if kind == "dial-result"]
    assert centres and centres[0] == plan.centres_for("GB")[0].number  # the SIM's centre
    assert legs[-1] == ("emergency-result", "112")
    assert dial_of(last).get("callerId") == DE_CALLER_ID

    # the agent hears where the MSD put the car
    whisper_url = dial_of(step(gateway, "/twilio/voice", "CAe2e-msd-munich-2")).find(
        "Number").get("url")  # type: ignore[union-attr]
    whisper = parse(gateway.twilio(whisper_url or "", {
        "CallSid": "CAe2e-msd-agent", "ParentCallSid": "CAe2e-msd-munich-2",
        "CallStatus": "in-progress", "From": GB_SIM, "To": centres[0]}).content)
    assert "Crash alert" in said(whisper) and "Germany" in said(whisper)


def test_msd_crash_near_shenzhen_is_routed_to_china_and_handed_back(
    gateway: GatewayProcess, plan: NumberPlan
) -> None:
    answer = send(gateway, V2_VECTOR, "e2e-msd-shenzhen")
    assert answer["country"] == "CN" and answer["route_country"] == "CN"
    assert answer["emergency_number"] == "120" and answer["fallback_dial"] is None
    assert answer["hand_back_after_s"] is not None

    legs, last = follow(gateway, "CAe2e-msd-shenzhen")
    assert legs and all(kind == "dial-result" for kind, _ in legs)
    assert "120" not in {number for _, number in legs}  # Twilio cannot call it in China
    assert last.find("Dial") is None and "1 2 0" in said(last)  # the car dials it itself


def test_the_centre_receives_the_cars_msd_bytes_and_the_test_call_flag(
    tmp_path: Path
) -> None:
    """The version 1 vector re-encodes to other bytes: the centre gets the car's."""
    test_call = build_msd(control={"testCall": True, "positionCanBeTrusted": False})
    with FakeAssistanceCentre() as centre, running_gateway(
            tmp_path, GATEWAY_ASSISTANCE_URL=centre.url, GATEWAY_DELIVERY_POLL_S="0.05") as gw:
        crash = send(gw, V1_VECTOR, "e2e-msd-delivered")
        test = send(gw, test_call, "e2e-msd-test-call")
        assert test["test_call"] is True and test["hand_back_after_s"] is None
        assert "untrusted" in test["route_reason"] and "test call" in test["route_reason"]
        received = centre.wait_for_incidents(2, timeout=15)
    assert base64.b64decode(received[crash["incident_id"]]["msd"]) == bytes.fromhex(V1_VECTOR)
    assert received[crash["incident_id"]]["test_call"] is False
    assert base64.b64decode(received[test["incident_id"]]["msd"]) == test_call
    assert received[test["incident_id"]]["test_call"] is True
