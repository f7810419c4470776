"""Every IVR step happens once per call: a replayed request returns the stored answer and
sends nothing again (captured, correctly signed requests included)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from gateway.owners import PinHasher, Vehicles
from tests.conftest import Twilio
from tests.support.fakes_adapters import RecordingVehicleCommands
from tests.support.twilio import call_params, dial_of, parse

OWNER_NUMBER = "+442079460902"  # numbers/inbound.csv: service owner
VIN = "WBA3A5C51CF256001"
OWNER_PHONE = "+4915112349999"
PIN = "4711"


@pytest.fixture
def commands() -> RecordingVehicleCommands:
    return RecordingVehicleCommands()


@pytest.fixture
def ivr_app(make_app: Callable[..., Flask], commands: RecordingVehicleCommands) -> Flask:
    app = make_app(commands=commands)
    registry = Vehicles(app.extensions["gateway"].store, PinHasher(n=2**8))
    registry.register(vin=VIN, owner_name="Owner", market="DE",
                      purchase_date=dt.date(2024, 1, 1), actor="test", pin=PIN,
                      owner_phone=OWNER_PHONE)
    return app


def post(twilio: Twilio, url: str, sid: str, **form: str) -> Any:
    response = twilio.post(url, call_params(sid, OWNER_PHONE, to=OWNER_NUMBER, **form))
    assert response.status_code == 200
    return response


def test_a_replayed_pin_step_sends_no_second_command(ivr_app: Flask,
                                                     commands: RecordingVehicleCommands) -> None:
    twilio = Twilio(ivr_app.test_client())
    menu = parse(post(twilio, "/twilio/voice", "CAivr1").data)
    choose_url = menu.find("Gather").get("action")  # type: ignore[union-attr]
    ask_pin = parse(post(twilio, choose_url, "CAivr1", Digits="2").data)  # 2: unlock
    pin_url = ask_pin.find("Gather").get("action")  # type: ignore[union-attr]
    first = post(twilio, pin_url, "CAivr1", Digits=PIN)
    assert [c.args["command"] for c in commands.calls] == ["unlock"]
    for _ in range(10):  # the same signed request, captured and sent again
        again = post(twilio, pin_url, "CAivr1", Digits=PIN)
        assert again.data == first.data
    assert [c.args["command"] for c in commands.calls] == ["unlock"]
    # a replay with other digits is still the same step: no new PIN check, no command
    post(twilio, pin_url, "CAivr1", Digits="0000")
    assert len(commands.calls) == 1


def test_a_new_call_is_a_new_step(ivr_app: Flask, commands: RecordingVehicleCommands) -> None:
    twilio = Twilio(ivr_app.test_client())
    for sid in ("CAivrA", "CAivrB"):
        menu = parse(post(twilio, "/twilio/voice", sid).data)
        ask = parse(post(twilio, menu.find("Gather").get("action"), sid, Digits="2").data)  # type: ignore[union-attr]
        post(twilio, ask.find("Gather").get("action"), sid, Digits=PIN)  # type: ignore[union-attr]
    assert [c.args["command"] for c in commands.calls] == ["unlock", "unlock"]


def test_a_replayed_busy_outcome_opens_no_breaker(ivr_app: Flask, plan: Any) -> None:
    services = ivr_app.extensions["gateway"]
    twilio = Twilio(ivr_app.test_client())
    menu = parse(post(twilio, "/twilio/voice", "CAivr2").data)
    agent = parse(post(twilio, menu.find("Gather").get("action"), "CAivr2", Digits="0").data)  # type: ignore[union-attr]
    action = dial_of(agent).get("action", "")
    centre = action.split("centre=")[1].split("&")[0]
    first = post(twilio, action, "CAivr2", DialCallStatus="busy")
    for _ in range(services.settings.delivery.breaker_failures + 2):
        assert post(twilio, action, "CAivr2", DialCallStatus="busy").data == first.data
    assert services.centre_health.states().get(centre) != "open"
    assert centre not in services.centre_health.unreachable()
