"""End to end: a real gateway process, real HTTP, webhooks signed like Twilio's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.plan import NumberPlan
from tests.support.events import crash_event
from tests.support.server import GatewayProcess, running_gateway
from tests.support.twilio import call_params, dial_of, dialled_number, parse

SWEDE = {"vin": "YV1ZW72U5N1234567", "msisdn": "+46701234567"}


GB_CALLER_ID = "+442079460555"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    # one centre line, so a single no-answer leads to the emergency leg; caller IDs for
    # Great Britain only: elsewhere the call is handed back to the car
    with running_gateway(tmp_path_factory.mktemp("e2e"), "--no-worker",
                         GATEWAY_DIAL_ATTEMPTS="1",
                         GATEWAY_EMERGENCY_CALLER_IDS=GB_CALLER_ID) as gw:
        yield gw


def crash_call(gateway: GatewayProcess, call_sid: str, car: dict[str, str], lat: float,
               lon: float, **extra: Any) -> tuple[dict[str, Any], Any]:
    answer = gateway.post_event(crash_event(**car, location={"lat": lat, "lon": lon}, **extra))
    assert answer.status_code == 201, answer.text
    body = answer.json()
    response = gateway.twilio("/twilio/voice", call_params(call_sid, car["msisdn"],
                                                           to=body["call_number"]))
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/xml")
    return body, parse(response.content)


def said(root: Any) -> str:
    return " ".join(s.text or "" for s in root.iter("Say"))


def test_swedish_car_in_copenhagen_is_handed_back_in_denmark(gateway: GatewayProcess,
                                                             plan: NumberPlan) -> None:
    incident, root = crash_call(gateway, "CAe2e1", SWEDE, 55.6761, 12.5683)
    assert incident["country"] == "DK" and incident["fallback_dial"] is None

    # the Swedish car's centre is dialled, the agent first hears the whisper
    assert dialled_number(root) == plan.centres_for("SE")[0].number
    dial = dial_of(root)
    assert dial.get("answerOnBridge") == "true" and dial.get("timeout")
    whisper_url = dial.find("Number").get("url")  # type: ignore[union-attr]
    whisper = parse(gateway.twilio(whisper_url, {
        "CallSid": "CAe2e1-agent", "ParentCallSid": "CAe2e1", "CallStatus": "in-progress",
        "From": SWEDE["msisdn"], "To": plan.centres_for("SE")[0].number}).content)
    assert "Crash alert" in said(whisper) and "Denmark" in said(whisper)
    assert "Press 1" in said(whisper)

    # nobody answers, and Twilio cannot call 112 in Denmark: the car dials it itself
    final = parse(gateway.twilio(dial.get("action", ""), call_params(
        "CAe2e1", SWEDE["msisdn"], DialCallStatus="no-answer", DialCallSid="CAchild")).content)
    assert final.find("Dial") is None and final.find("Hangup") is not None
    assert "Bilen ringer nu själv larmnumret 1 1 2" in said(final)  # told, in Swedish


@pytest.mark.parametrize(
    ("lat", "lon", "country"),
    [
        (55.5850, 12.7700, "DK"),  # Øresund bridge, western (Danish) half
        (55.5640, 12.9000, "SE"),  # Øresund bridge, eastern (Swedish) half
        (51.1000, 1.3600, "GB"),  # Dover-Calais ferry leaving Dover
        (50.9900, 1.8000, "FR"),  # the same ferry approaching Calais
    ],
)
def test_bridge_and_ferry_get_the_coastal_country(gateway: GatewayProcess, lat: float,
                                                  lon: float, country: str) -> None:
    sid = f"CAe2e-{lat}-{lon}"
    incident, root = crash_call(gateway, sid, SWEDE, lat, lon, type="sos")
    assert incident["country"] == country
    nxt = parse(gateway.twilio(dial_of(root).get("action", ""), call_params(
        sid, SWEDE["msisdn"], DialCallStatus="no-answer")).content)
    if country == "GB":  # Twilio dials 999 there, from the British caller ID
        assert dialled_number(nxt) == "999" and dial_of(nxt).get("callerId") == GB_CALLER_ID
    else:
        assert nxt.find("Dial") is None and "1 1 2" in said(nxt)


def test_unsigned_webhook_is_refused_by_the_real_server(gateway: GatewayProcess) -> None:
    import requests

    response = requests.post(gateway.base_url + "/twilio/voice",
                             data=call_params("CAx", SWEDE["msisdn"]), timeout=5)
    assert response.status_code == 403


def test_readyz_reports_every_dependency(gateway: GatewayProcess) -> None:
    import requests

    body = requests.get(gateway.base_url + "/readyz", timeout=5).json()
    assert body["status"] == "ready"
    assert set(body["checks"]) == {"database", "number_plan", "emergency_routes", "boundaries"}


def test_logs_carry_the_call_sid(gateway: GatewayProcess, tmp_path: Path) -> None:
    gateway.twilio("/twilio/voice/fallback", call_params("CAlogged", SWEDE["msisdn"],
                                                         ErrorCode="11200"))
    assert '"call_sid": "CAlogged"' in gateway.logs()
