"""The call path through signed webhooks (Flask test client, real SQLite file)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from gateway.config import Settings
from gateway.plan import NumberPlan
from tests.conftest import GB_CALLER_ID, Clock, Twilio
from tests.support.events import SWEDISH_CAR, crash_event
from tests.support.twilio import call_params, dial_of, dialled_number, parse

EMERGENCY_NUMBER = "+442079460900"  # numbers/inbound.csv: emergency, any country
ROADSIDE_NUMBER = "+442079460901"
US_CAR = {"vin": "1HGCM82633A004352", "msisdn": "+12025550123"}
GB_CAR = {"vin": "SAJWA0ES8DPS56028", "msisdn": "+442079460123"}
LONDON = {"lat": 51.5072, "lon": -0.1276}
PARIS = {"lat": 48.8566, "lon": 2.3522}
AGENT = {"Authorization": "Bearer agent-token-0123456789abcdef"}


def post_event(client: FlaskClient, headers: dict[str, str], **overrides: Any) -> dict[str, Any]:
    response = client.post("/v1/events", json=crash_event(**overrides), headers=headers)
    assert response.status_code == 201, response.json
    return response.json  # type: ignore[return-value]


def said(root: Any) -> str:
    return " ".join(s.text or "" for s in root.iter("Say"))


def call(twilio: Twilio, sid: str, car: dict[str, str], to: str = EMERGENCY_NUMBER) -> Any:
    response = twilio.post("/twilio/voice", call_params(sid, car["msisdn"], to=to))
    assert response.status_code == 200 and response.mimetype == "text/xml"
    return parse(response.data)


def result(twilio: Twilio, root: Any, sid: str, car: dict[str, str], **form: str) -> Any:
    response = twilio.post(dial_of(root).get("action", ""), call_params(sid, car["msisdn"], **form))
    assert response.status_code == 200
    return parse(response.data)


def services(app: Flask) -> Any:
    return app.extensions["gateway"]


@pytest.fixture
def roomy_app(make_app: Callable[..., Flask], settings: Settings) -> Flask:
    """A 120 s emergency deadline: room for every centre line of the plan."""
    voice = dataclasses.replace(settings.voice, emergency_deadline_s=120, ring_timeout_s=10)
    return make_app(settings=settings.replace(voice=voice))


def test_crash_call_rings_home_centre_then_hands_back_where_no_route_completes(
    client: FlaskClient, twilio: Twilio, vehicle_headers: dict[str, str], plan: NumberPlan,
    clock: Clock, app: Flask,
) -> None:
    incident = post_event(client, vehicle_headers)
    assert incident["country"] == "DK"
    assert incident["call_number"] == EMERGENCY_NUMBER
    assert incident["fallback_dial"] is None  # no Twilio emergency calling in Denmark
    assert incident["emergency_number"] == "112" and incident["hand_back_after_s"] > 40

    root = call(twilio, "CA100", SWEDISH_CAR)
    dial = dial_of(root)
    assert dial.get("answerOnBridge") == "true"
    assert int(dial.get("timeout", "0")) == services(app).settings.voice.ring_timeout_s
    assert dialled_number(root) == plan.centres_for("SE")[0].number
    number = dial.find("Number")
    assert number is not None and "/twilio/voice/whisper" in number.get("url", "")
    assert root.find("Say").get("language") == "sv-SE"  # type: ignore[union-attr]

    # nobody answers; the next line would overrun the 40 s deadline: the car dials itself
    clock.advance(25)
    final = result(twilio, root, "CA100", SWEDISH_CAR, DialCallStatus="no-answer")
    assert final.find("Dial") is None and final.find("Hangup") is not None
    assert "själv larmnumret 1 1 2" in said(final)
    decisions = services(app).store.decisions_for(incident_id=incident["incident_id"])
    assert [d["target"] for d in decisions] == ["centre", "hand_back"]
    assert "DK" in decisions[-1]["reason"]
    command = services(app).command_queue.get("handback:CA100")
    assert command["command"] == "dial_emergency" and command["msisdn"] == SWEDISH_CAR["msisdn"]
    assert command["params"] == {"number": "112", "country": "DK"}


@pytest.mark.parametrize("status", ["busy", "failed", "canceled", "no-answer"])
def test_every_unreached_status_moves_to_the_next_line(status: str, roomy_app: Flask,
                                                       vehicle_headers: dict[str, str],
                                                       plan: NumberPlan) -> None:
    client, twilio = roomy_app.test_client(), Twilio(roomy_app.test_client())
    post_event(client, vehicle_headers)
    root = call(twilio, "CA1", SWEDISH_CAR)
    nxt = result(twilio, root, "CA1", SWEDISH_CAR, DialCallStatus=status)
    assert dialled_number(nxt) == plan.centres_for("SE")[1].number


def test_answered_and_accepted_call_ends_after_the_conversation(
    client: FlaskClient, twilio: Twilio, vehicle_headers: dict[str, str]
) -> None:
    post_event(client, vehicle_headers)
    root = call(twilio, "CA2", SWEDISH_CAR)
    whisper_url = dial_of(root).find("Number").get("url")  # type: ignore[union-attr]
    agent_leg = {"CallSid": "CA2-agent", "ParentCallSid": "CA2", "From": "+46701234567",
                 "To": "+442079460100", "CallStatus": "in-progress", "Direction": "outbound-dial"}
    whisper = parse(twilio.post(whisper_url, agent_leg).data)
    gather = whisper.find("Gather")
    assert gather is not None and gather.get("numDigits") == "1"
    headline = said(gather)
    assert "Crash alert" in headline and "Airbags deployed" in headline
    assert "2 aboard" in headline and "Denmark" in headline and "Press 1" in headline
    assert len(headline.split()) <= 16
    accepted = parse(twilio.post(gather.get("action", ""), {**agent_leg, "Digits": "1"}).data)
    assert accepted.find("Hangup") is None  # the details, then the bridge
    assert "2 occupants" in said(accepted) and "latitude 55.6761" in said(accepted)
    done = result(twilio, root, "CA2", SWEDISH_CAR, DialCallStatus="completed",
                  DialCallDuration="300")
    assert done.find("Hangup") is not None and done.find("Dial") is None


def test_voicemail_that_completes_without_the_key_counts_against_the_line(
    roomy_app: Flask, vehicle_headers: dict[str, str], plan: NumberPlan
) -> None:
    client, twilio = roomy_app.test_client(), Twilio(roomy_app.test_client())
    post_event(client, vehicle_headers)
    root = call(twilio, "CA3", SWEDISH_CAR)
    whisper_url = dial_of(root).find("Number").get("url")  # type: ignore[union-attr]
    agent_leg = {"CallSid": "CA3-agent", "ParentCallSid": "CA3", "From": "+1", "To": "+2"}
    gather = parse(twilio.post(whisper_url, agent_leg).data).find("Gather")
    refused = parse(twilio.post(gather.get("action", ""), {**agent_leg, "Digits": "9"}).data)  # type: ignore[union-attr]
    assert refused.find("Hangup") is not None
    nxt = result(twilio, root, "CA3", SWEDISH_CAR, DialCallStatus="completed")
    assert dialled_number(nxt) == plan.centres_for("SE")[1].number
    failures = services(roomy_app).centre_health.states()
    assert "eu-primary" in failures


def test_dial_bridged_false_is_not_answered(roomy_app: Flask, vehicle_headers: dict[str, str],
                                            plan: NumberPlan) -> None:
    client, twilio = roomy_app.test_client(), Twilio(roomy_app.test_client())
    post_event(client, vehicle_headers)
    root = call(twilio, "CA4", SWEDISH_CAR)
    nxt = result(twilio, root, "CA4", SWEDISH_CAR, DialCallStatus="completed", DialBridged="false")
    assert dialled_number(nxt) == plan.centres_for("SE")[1].number


def test_car_without_data_message_is_routed_by_its_sim_country(twilio: Twilio,
                                                               plan: NumberPlan) -> None:
    root = call(twilio, "CA7", {"msisdn": "+4915112345678"})
    assert dialled_number(root) == plan.centres_for("DE")[0].number
    assert "w=DE" in dial_of(root).get("action", "")


@pytest.mark.parametrize("caller", ["anonymous", "+266696687", "Restricted", "", "client:alice"])
def test_a_caller_we_cannot_read_still_rings_the_catch_all(twilio: Twilio, plan: NumberPlan,
                                                           caller: str) -> None:
    root = call(twilio, f"CA8{len(caller)}", {"msisdn": caller})
    catch_all = next(c for c in plan.centres if c.is_catch_all)
    assert dialled_number(root) == catch_all.number


def test_sip_caller_is_the_same_car(client: FlaskClient, twilio: Twilio,
                                    vehicle_headers: dict[str, str], plan: NumberPlan,
                                    clock: Clock) -> None:
    sos = post_event(client, vehicle_headers, type="sos", location=PARIS)
    root = call(twilio, "CAsip", {"msisdn": f"sip:{SWEDISH_CAR['msisdn']}@trunk.example.com"})
    assert dialled_number(root) == plan.centres_for("SE")[0].number  # a centre, not 112
    assert f"i={sos['incident_id']}" in dial_of(root).get("action", "")
    clock.advance(25)
    final = result(twilio, root, "CAsip", {"msisdn": f"sip:{SWEDISH_CAR['msisdn']}@x"},
                   DialCallStatus="no-answer")
    assert final.find("Dial") is None  # France: no caller ID configured, hand back
    assert "1 1 2" in said(final)


def test_retried_step_answers_the_same_twiml(client: FlaskClient, twilio: Twilio,
                                             vehicle_headers: dict[str, str], clock: Clock) -> None:
    post_event(client, vehicle_headers)
    first = twilio.post("/twilio/voice", call_params("CA9", SWEDISH_CAR["msisdn"]))
    clock.advance(3)
    again = twilio.post("/twilio/voice", call_params("CA9", SWEDISH_CAR["msisdn"]))
    assert first.data == again.data


def test_emergency_legs_then_hand_back(client: FlaskClient, twilio: Twilio, app: Flask,
                                       vehicle_headers: dict[str, str], clock: Clock) -> None:
    policy = services(app).settings.voice
    post_event(client, vehicle_headers, **GB_CAR, location=LONDON)
    root = call(twilio, "CA10", GB_CAR)
    clock.advance(policy.emergency_deadline_s)
    root = result(twilio, root, "CA10", GB_CAR, DialCallStatus="no-answer")
    for attempt in range(policy.emergency_attempts):
        dial = dial_of(root)
        assert "emergency-result" in dial.get("action", "")
        assert dialled_number(root) == "999" and dial.get("callerId") == GB_CALLER_ID
        assert dial.get("timeout") == str(policy.emergency_ring_s)
        if attempt:
            assert "did not connect" in said(root)
        root = result(twilio, root, "CA10", GB_CAR, DialCallStatus="failed")
    assert root.find("Dial") is None
    assert "9 9 9" in said(root)


@pytest.mark.parametrize("status", ["answered", "completed"])
def test_connected_emergency_leg_ends_the_call(client: FlaskClient, twilio: Twilio, app: Flask,
                                               vehicle_headers: dict[str, str], clock: Clock,
                                               status: str) -> None:
    post_event(client, vehicle_headers, **GB_CAR, location=LONDON)
    root = call(twilio, "CA10c", GB_CAR)
    clock.advance(60)
    root = result(twilio, root, "CA10c", GB_CAR, DialCallStatus="no-answer")
    assert dialled_number(root) == "999"
    done = result(twilio, root, "CA10c", GB_CAR, DialCallStatus=status)
    assert done.find("Dial") is None and done.find("Hangup") is not None
    assert said(done) == ""


def test_status_callbacks_are_ordered_by_sequence_number(twilio: Twilio, app: Flask) -> None:
    for seq, status in [(2, "completed"), (0, "initiated"), (1, "ringing")]:
        response = twilio.post("/twilio/voice/status", {
            "CallSid": "CA11", "CallStatus": status, "SequenceNumber": str(seq),
            "CallbackSource": "call-progress-events"})
        assert response.status_code == 200
    twilio.post("/twilio/voice/status", {"CallSid": "CA11", "CallStatus": "ringing",
                                         "SequenceNumber": "1",
                                         "CallbackSource": "call-progress-events"})
    latest = services(app).store.latest_status("CA11")
    assert latest["status"] == "completed"


def test_the_newest_emergency_wins_and_an_emergency_beats_a_newer_on_call(
    client: FlaskClient, twilio: Twilio, vehicle_headers: dict[str, str], clock: Clock,
) -> None:
    post_event(client, vehicle_headers)  # crash in Copenhagen
    clock.advance(60)
    newer = post_event(client, vehicle_headers, type="sos", location={"lat": 59.33, "lon": 18.07})
    clock.advance(60)
    post_event(client, vehicle_headers, type="on_call")
    root = call(twilio, "CAprio", SWEDISH_CAR)
    action = dial_of(root).get("action", "")
    assert "dial-result" in action
    assert f"i={newer['incident_id']}" in action and "w=SE" in action


def test_on_call_incident_never_captures_an_emergency_call(
    client: FlaskClient, twilio: Twilio, vehicle_headers: dict[str, str], plan: NumberPlan,
    clock: Clock,
) -> None:
    """ON CALL pressed, then SOS without a fresh data message: centre, then emergency."""
    on_call = post_event(client, vehicle_headers, **GB_CAR, type="on_call", location=LONDON)
    assert on_call["call_number"] == ROADSIDE_NUMBER and on_call["hand_back_after_s"] is None
    root = call(twilio, "CAoc", GB_CAR)
    roadside = {c.roadside_number for c in plan.centres}
    assert dialled_number(root) == plan.centres_for("GB")[0].number
    assert dialled_number(root) not in roadside
    assert "dial-result" in dial_of(root).get("action", "")
    whisper_url = dial_of(root).find("Number").get("url")  # type: ignore[union-attr]
    headline = said(parse(twilio.post(whisper_url, {"CallSid": "CAoc-a", "ParentCallSid": "CAoc"})
                          .data))
    assert "Roadside" not in headline and "Emergency call" in headline
    clock.advance(30)
    nxt = result(twilio, root, "CAoc", GB_CAR, DialCallStatus="no-answer")
    assert dialled_number(nxt) == "999" and dial_of(nxt).get("callerId") == GB_CALLER_ID


def test_a_roadside_call_never_dials_an_emergency_number(
    client: FlaskClient, twilio: Twilio, vehicle_headers: dict[str, str], plan: NumberPlan,
    clock: Clock, app: Flask,
) -> None:
    post_event(client, vehicle_headers, **GB_CAR, type="on_call", location=LONDON)
    root = call(twilio, "CArs", GB_CAR, to=ROADSIDE_NUMBER)
    roadside = {c.roadside_number for c in plan.centres}
    dialled = []
    while root.find("Dial") is not None:
        dialled.append(dialled_number(root))
        assert "roadside-result" in dial_of(root).get("action", "")
        clock.advance(20)
        root = result(twilio, root, "CArs", GB_CAR, DialCallStatus="busy")
    assert dialled and set(dialled) <= roadside
    assert root.find("Hangup") is not None and "call you back" in said(root)
    # and the fail-safe of a roadside step is a callback too, never 999
    broken = twilio.post("/twilio/voice/fallback", call_params(
        "CArs2", GB_CAR["msisdn"], to=ROADSIDE_NUMBER, ErrorCode="11200",
        ErrorUrl="https://gateway.example.com/twilio/voice"))
    assert dialled_number(parse(broken.data)) in roadside


def test_us_car_in_london_keeps_the_gb_route_after_dispatch(
    client: FlaskClient, twilio: Twilio, vehicle_headers: dict[str, str], plan: NumberPlan,
    clock: Clock,
) -> None:
    incident = post_event(client, vehicle_headers, **US_CAR, location=LONDON)
    assert incident["route_country"] == "GB"
    assert incident["call_number"] == "+12025550150"  # the US cars' SOS number
    assert client.post(f"/v1/agent/incidents/{incident['incident_id']}/dispatch", json={},
                       headers=AGENT).status_code == 200
    root = call(twilio, "CAus", US_CAR, to="+12025550150")
    action = dial_of(root).get("action", "")
    assert "w=GB" in action and "h=US" in action
    assert dialled_number(root) == plan.centres_for("US")[0].number  # the car's own centre
    clock.advance(30)
    nxt = result(twilio, root, "CAus", US_CAR, DialCallStatus="no-answer")
    assert dialled_number(nxt) == "999"  # never 911: the car is in London


def test_us_car_in_berlin_reaches_eu_primary_before_the_catch_all(
    roomy_app: Flask, vehicle_headers: dict[str, str], clock: Clock
) -> None:
    client, twilio = roomy_app.test_client(), Twilio(roomy_app.test_client())
    post_event(client, vehicle_headers, **US_CAR, location={"lat": 52.52, "lon": 13.405})
    root = call(twilio, "CAber", US_CAR)
    rung = []
    while "dial-result" in dial_of(root).get("action", ""):
        rung.append(dial_of(root).get("action", "").split("centre=")[-1].split("&")[0])
        clock.advance(16)
        root = result(twilio, root, "CAber", US_CAR, DialCallStatus="no-answer")
    # home country's line, then the location's; dial_attempts (3) ends before the catch-all
    assert rung == ["na-primary", "eu-primary", "eu-backup"]
    assert dialled_number(root) == "112"  # Germany, from the German caller ID
