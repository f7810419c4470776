"""The emergency call path through signed webhooks (Flask test client)."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient

from gateway.routing import TWILIO_RING_SLACK_S
from tests.conftest import Clock, Twilio
from tests.support.events import SWEDISH_CAR, crash_event
from tests.support.twilio import call_params, dial_of, dialled_number, parse


def post_event(client: FlaskClient, headers: dict[str, str], **overrides: Any) -> dict[str, Any]:
    response = client.post("/v1/events", json=crash_event(**overrides), headers=headers)
    assert response.status_code == 201, response.json
    return response.json  # type: ignore[return-value]


def test_crash_call_rings_home_centre_with_whisper_then_falls_back_to_local_route(
    client: FlaskClient, twilio: Twilio, vehicle_headers: dict[str, str], plan: Any, clock: Clock,
    app: Any,
) -> None:
    incident = post_event(client, vehicle_headers)
    assert incident["country"] == "DK"

    first = twilio.post("/twilio/voice", call_params("CA100", SWEDISH_CAR["msisdn"]))
    assert first.status_code == 200
    root = parse(first.data)
    dial = dial_of(root)
    assert dial.get("answerOnBridge") == "true"
    assert int(dial.get("timeout", "0")) == app.extensions["gateway"].settings.voice.ring_timeout_s
    primary = plan.centres_for("SE")[0]
    assert dialled_number(root) == primary.number
    number = dial.find("Number")
    assert number is not None and "/twilio/voice/whisper" in number.get("url", "")
    # the caller hears Swedish: the car is Swedish
    assert root.find("Say").get("language") == "sv-SE"  # type: ignore[union-attr]

    # the centre does not answer: the next centre (backup) is tried
    clock.advance(20)
    second = twilio.post(dial.get("action", ""), call_params("CA100", SWEDISH_CAR["msisdn"],
                                                             DialCallStatus="no-answer"))
    root2 = parse(second.data)
    backup = plan.centres_for("SE")[1]
    assert dialled_number(root2) == backup.number

    # no answer again: attempts used up -> the emergency route of Denmark, where the car is
    clock.advance(20)
    third = twilio.post(dial_of(root2).get("action", ""),
                        call_params("CA100", SWEDISH_CAR["msisdn"], DialCallStatus="no-answer"))
    root3 = parse(third.data)
    assert dialled_number(root3) == plan.entry("DK").fallback_dial
    assert "emergency-result" in dial_of(root3).get("action", "")
    store = app.extensions["gateway"].store
    decisions = store.decisions_for(incident_id=incident["incident_id"])
    assert [d["target"] for d in decisions] == ["centre", "centre", "emergency"]
    assert "route of DK" in decisions[-1]["reason"]


@pytest.mark.parametrize("status", ["busy", "failed", "canceled", "no-answer"])
def test_every_unreached_status_moves_on(status: str, client: FlaskClient, twilio: Twilio,
                                         vehicle_headers: dict[str, str], plan: Any) -> None:
    post_event(client, vehicle_headers)
    root = parse(twilio.post("/twilio/voice", call_params("CA1", SWEDISH_CAR["msisdn"])).data)
    nxt = parse(twilio.post(dial_of(root).get("action", ""),
                            call_params("CA1", SWEDISH_CAR["msisdn"], DialCallStatus=status)).data)
    assert dialled_number(nxt) == plan.centres_for("SE")[1].number


def test_answered_and_accepted_call_ends_after_the_conversation(
    client: FlaskClient, twilio: Twilio, vehicle_headers: dict[str, str]
) -> None:
    post_event(client, vehicle_headers)
    root = parse(twilio.post("/twilio/voice", call_params("CA2", SWEDISH_CAR["msisdn"])).data)
    whisper_url = dial_of(root).find("Number").get("url")  # type: ignore[union-attr]
    agent_leg = {"CallSid": "CA2-agent", "ParentCallSid": "CA2", "From": "+46701234567",
                 "To": "+442079460100", "CallStatus": "in-progress", "Direction": "outbound-dial"}
    whisper = parse(twilio.post(whisper_url, agent_leg).data)
    gather = whisper.find("Gather")
    assert gather is not None and gather.get("numDigits") == "1"
    said = " ".join(s.text or "" for s in gather.iter("Say"))
    assert "Crash alert" in said and "Airbags deployed" in said and "2 occupants" in said
    assert "Denmark" in said
    accepted = parse(twilio.post(gather.get("action", ""), {**agent_leg, "Digits": "1"}).data)
    assert accepted.find("Hangup") is None  # an empty document bridges the call
    done = parse(twilio.post(dial_of(root).get("action", ""),
                             call_params("CA2", SWEDISH_CAR["msisdn"], DialCallStatus="completed",
                                         DialCallDuration="300")).data)
    assert done.find("Hangup") is not None and done.find("Dial") is None


def test_voicemail_that_completes_without_the_key_is_not_answered(
    client: FlaskClient, twilio: Twilio, vehicle_headers: dict[str, str], plan: Any
) -> None:
    post_event(client, vehicle_headers)
    root = parse(twilio.post("/twilio/voice", call_params("CA3", SWEDISH_CAR["msisdn"])).data)
    whisper_url = dial_of(root).find("Number").get("url")  # type: ignore[union-attr]
    agent_leg = {"CallSid": "CA3-agent", "ParentCallSid": "CA3", "From": "+1", "To": "+2"}
    gather = parse(twilio.post(whisper_url, agent_leg).data).find("Gather")
    refused = parse(twilio.post(gather.get("action", ""), {**agent_leg, "Digits": "9"}).data)  # type: ignore[union-attr]
    assert refused.find("Hangup") is not None
    # Twilio reports "completed" for the voicemail's leg; no acceptance was recorded
    nxt = parse(twilio.post(dial_of(root).get("action", ""),
                            call_params("CA3", SWEDISH_CAR["msisdn"], DialCallStatus="completed")).data)
    assert dialled_number(nxt) == plan.centres_for("SE")[1].number


def test_dial_bridged_false_is_not_answered(client: FlaskClient, twilio: Twilio,
                                            vehicle_headers: dict[str, str], plan: Any) -> None:
    post_event(client, vehicle_headers)
    root = parse(twilio.post("/twilio/voice", call_params("CA4", SWEDISH_CAR["msisdn"])).data)
    nxt = parse(twilio.post(dial_of(root).get("action", ""),
                            call_params("CA4", SWEDISH_CAR["msisdn"], DialCallStatus="completed",
                                        DialBridged="false")).data)
    assert dialled_number(nxt) == plan.centres_for("SE")[1].number


def test_budget_is_never_exceeded(client: FlaskClient, twilio: Twilio, app: Any,
                                  vehicle_headers: dict[str, str], clock: Clock, plan: Any) -> None:
    policy = app.extensions["gateway"].settings.voice
    post_event(client, vehicle_headers)
    root = parse(twilio.post("/twilio/voice", call_params("CA5", SWEDISH_CAR["msisdn"])).data)
    # the first attempt took almost the whole budget: a second one could not ring long enough
    clock.advance(policy.budget_s - TWILIO_RING_SLACK_S - 2)
    nxt = parse(twilio.post(dial_of(root).get("action", ""),
                            call_params("CA5", SWEDISH_CAR["msisdn"], DialCallStatus="no-answer")).data)
    assert dialled_number(nxt) == plan.entry("DK").fallback_dial


def test_shortened_ring_timeout_fits_the_remaining_budget(
    client: FlaskClient, twilio: Twilio, app: Any, vehicle_headers: dict[str, str], clock: Clock
) -> None:
    policy = app.extensions["gateway"].settings.voice
    post_event(client, vehicle_headers)
    root = parse(twilio.post("/twilio/voice", call_params("CA6", SWEDISH_CAR["msisdn"])).data)
    clock.advance(policy.budget_s - TWILIO_RING_SLACK_S - 8)
    nxt = parse(twilio.post(dial_of(root).get("action", ""),
                            call_params("CA6", SWEDISH_CAR["msisdn"], DialCallStatus="busy")).data)
    timeout = int(dial_of(nxt).get("timeout", "0"))
    assert timeout == 8
    assert (policy.budget_s - TWILIO_RING_SLACK_S - 8) + timeout + TWILIO_RING_SLACK_S <= policy.budget_s


def test_car_without_data_message_is_put_through_by_sim_country(twilio: Twilio, plan: Any) -> None:
    root = parse(twilio.post("/twilio/voice", call_params("CA7", "+4915112345678")).data)
    assert dialled_number(root) == plan.centres_for("DE")[0].number
    assert "h=DE" in dial_of(root).get("action", "")


def test_anonymous_caller_is_still_put_through(twilio: Twilio, plan: Any) -> None:
    root = parse(twilio.post("/twilio/voice", call_params("CA8", "anonymous")).data)
    assert dial_of(root).find("Number") is not None


def test_retried_step_answers_the_same_twiml(client: FlaskClient, twilio: Twilio,
                                             vehicle_headers: dict[str, str], clock: Clock) -> None:
    post_event(client, vehicle_headers)
    first = twilio.post("/twilio/voice", call_params("CA9", SWEDISH_CAR["msisdn"]))
    clock.advance(3)
    again = twilio.post("/twilio/voice", call_params("CA9", SWEDISH_CAR["msisdn"]))
    assert first.data == again.data


def test_emergency_dial_retries_then_tells_the_caller_what_to_dial(
    client: FlaskClient, twilio: Twilio, vehicle_headers: dict[str, str], app: Any, clock: Clock
) -> None:
    policy = app.extensions["gateway"].settings.voice
    post_event(client, vehicle_headers)
    root = parse(twilio.post("/twilio/voice", call_params("CA10", SWEDISH_CAR["msisdn"])).data)
    clock.advance(policy.budget_s)  # budget gone: straight to the emergency route
    root = parse(twilio.post(dial_of(root).get("action", ""),
                             call_params("CA10", SWEDISH_CAR["msisdn"], DialCallStatus="no-answer")).data)
    for _ in range(policy.emergency_attempts - 1):
        assert "emergency-result" in dial_of(root).get("action", "")
        root = parse(twilio.post(dial_of(root).get("action", ""),
                                 call_params("CA10", SWEDISH_CAR["msisdn"], DialCallStatus="failed")).data)
    final = parse(twilio.post(dial_of(root).get("action", ""),
                              call_params("CA10", SWEDISH_CAR["msisdn"], DialCallStatus="failed")).data)
    assert final.find("Dial") is None
    assert "1 1 2" in " ".join(s.text or "" for s in final.iter("Say"))


def test_status_callbacks_are_ordered_by_sequence_number(twilio: Twilio, app: Any) -> None:
    for seq, status in [(2, "completed"), (0, "initiated"), (1, "ringing")]:
        response = twilio.post("/twilio/voice/status", {
            "CallSid": "CA11", "CallStatus": status, "SequenceNumber": str(seq),
            "CallbackSource": "call-progress-events"})
        assert response.status_code == 200
    # a duplicate delivery is stored once
    twilio.post("/twilio/voice/status", {"CallSid": "CA11", "CallStatus": "ringing",
                                         "SequenceNumber": "1", "CallbackSource": "call-progress-events"})
    latest = app.extensions["gateway"].store.latest_status("CA11")
    assert latest["status"] == "completed"


def test_fallback_url_dials_the_emergency_route_at_once(
    client: FlaskClient, twilio: Twilio, vehicle_headers: dict[str, str], plan: Any
) -> None:
    post_event(client, vehicle_headers)
    root = parse(twilio.post("/twilio/voice/fallback", call_params(
        "CA12", SWEDISH_CAR["msisdn"], ErrorCode="11200",
        ErrorUrl="https://gateway.example.com/twilio/voice")).data)
    assert dialled_number(root) == plan.entry("DK").fallback_dial


def test_fallback_recovers_the_state_from_the_failed_url(twilio: Twilio, plan: Any) -> None:
    failed = "https://gateway.example.com/twilio/voice/dial-result?i=x&t0=1&h=SE&c=FR&n=2"
    root = parse(twilio.post("/twilio/voice/fallback", call_params(
        "CA13", "+46701234567", ErrorCode="11205", ErrorUrl=failed)).data)
    assert dialled_number(root) == plan.entry("FR").fallback_dial


def test_the_newest_emergency_wins_and_an_emergency_beats_a_newer_on_call(
    client: FlaskClient, twilio: Twilio, vehicle_headers: dict[str, str], plan: Any, clock: Clock,
) -> None:
    post_event(client, vehicle_headers)  # crash in Copenhagen
    clock.advance(60)
    newer = post_event(client, vehicle_headers, type="sos",
                       location={"lat": 59.33, "lon": 18.07})  # SOS in Stockholm
    clock.advance(60)
    post_event(client, vehicle_headers, type="on_call")  # ON CALL pressed afterwards
    root = parse(twilio.post("/twilio/voice", call_params("CAprio", SWEDISH_CAR["msisdn"])).data)
    action = dial_of(root).get("action", "")
    assert "dial-result" in action  # the emergency path, not the roadside line
    assert f"i={newer['incident_id']}" in action and "c=SE" in action
