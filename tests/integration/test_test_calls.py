"""An eCall test call (MSD control flag) reaches the centre, never the emergency services."""

from __future__ import annotations

from typing import Any

from flask import Flask

from tests.conftest import PUBLIC_URL, Clock, Twilio
from tests.support.msd import build_msd, msd_event
from tests.support.twilio import call_params, dial_of, dialled_number, parse

LONDON_MAS = {"positionLatitude": round(51.5072 * 3_600_000),
              "positionLongitude": round(-0.1276 * 3_600_000)}
CAR = "+442079460123"
EMERGENCY_NUMBERS = {"112", "999", "911"}


def post_msd(client: Any, headers: dict[str, str], *, test: bool) -> dict[str, Any]:
    body = msd_event(build_msd(control={"testCall": test}, vehicleLocation=LONDON_MAS),
                     msisdn=CAR)
    response = client.post("/v1/events", json=body, headers=headers)
    assert response.status_code == 201, response.json
    assert response.json["test_call"] is test
    return response.json  # type: ignore[no-any-return]


def numbers_dialled(twilio: Twilio, clock: Clock, sid: str) -> tuple[list[str], Any]:
    root = parse(twilio.post("/twilio/voice", call_params(sid, CAR)).data)
    dialled = []
    while root.find("Dial") is not None:
        dialled.append(dialled_number(root))
        clock.advance(25)
        root = parse(twilio.post(dial_of(root).get("action", ""),
                                 call_params(sid, CAR, DialCallStatus="no-answer")).data)
    return dialled, root


def test_a_test_call_rings_the_centre_then_ends_without_an_emergency_leg(
    app: Flask, client: Any, vehicle_headers: dict[str, str], clock: Clock, plan: Any,
) -> None:
    post_msd(client, vehicle_headers, test=True)
    twilio = Twilio(client)
    dialled, final = numbers_dialled(twilio, clock, "CAtest1")
    assert dialled == [plan.centres_for("GB")[0].number]
    assert not set(dialled) & EMERGENCY_NUMBERS
    assert final.find("Hangup") is not None
    assert "test call was received" in " ".join(s.text or "" for s in final.iter("Say"))
    assert app.extensions["gateway"].command_queue.get("handback:CAtest1") is None


def test_the_agent_hears_it_is_a_test(app: Flask, client: Any, vehicle_headers: dict[str, str],
                                      ) -> None:
    post_msd(client, vehicle_headers, test=True)
    twilio = Twilio(client)
    root = parse(twilio.post("/twilio/voice", call_params("CAtest2", CAR)).data)
    whisper_url = dial_of(root).find("Number").get("url")  # type: ignore[union-attr]
    headline = " ".join(s.text or "" for s in parse(twilio.post(whisper_url, {
        "CallSid": "CAtest2-agent", "ParentCallSid": "CAtest2"}).data).iter("Say"))
    assert headline.startswith("Test call")


def test_a_failing_step_of_a_test_call_never_dials_emergency(make_app: Any, plan: Any) -> None:
    class Exploding:
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError(f"bug in plan.{name}")

    app = make_app(plan=Exploding())
    twilio = Twilio(app.test_client())
    root = parse(twilio.post(PUBLIC_URL + "/twilio/voice/dial-result?t0=5&w=GB&x=1&k=1",
                             call_params("CAtest3", CAR, DialCallStatus="busy")).data)
    assert root.find("Dial") is None and root.find("Hangup") is not None


def test_a_real_call_later_is_a_real_emergency(
    app: Flask, client: Any, vehicle_headers: dict[str, str], clock: Clock,
) -> None:
    post_msd(client, vehicle_headers, test=True)
    clock.advance(600)  # the test was ten minutes ago: this SOS without data is real
    dialled, _ = numbers_dialled(Twilio(client), clock, "CAreal")
    assert "999" in dialled
    root = parse(Twilio(client).post("/twilio/voice", call_params("CAreal2", CAR)).data)
    assert "x=1" not in dial_of(root).get("action", "")


def test_a_real_msd_crash_dials_the_emergency_route(
    app: Flask, client: Any, vehicle_headers: dict[str, str], clock: Clock,
) -> None:
    post_msd(client, vehicle_headers, test=False)
    dialled, _ = numbers_dialled(Twilio(client), clock, "CAreal3")
    assert dialled[-1] == "999"
