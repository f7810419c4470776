"""Reactivation is confirmed by the car: the PIN is checked first, the command is sent,
and the registry says "reactivated" only once the car acknowledged it: its synchronous
``confirmed`` answer (the fake here answers ``confirmed`` unless told otherwise), or its
later ``command_result``.  An ``accepted`` answer (the vehicle command service took the
command) is no acknowledgement: 202, state unchanged (before the one command path it
counted as one).  Immobilise and tracking validate everything before the car gets a
command."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from gateway import prompts
from gateway.config import Settings
from gateway.errors import PermanentUpstreamError, TransientUpstreamError
from gateway.owners import PinHasher, Vehicles
from tests.conftest import Twilio
from tests.support.commands import car_client
from tests.support.fake_servers import FakeCarCommands
from tests.support.fakes_adapters import RecordingVehicleCommands
from tests.support.twilio import call_params, dial_of, parse

SUPERVISOR = "supervisor-token-0123456789abcd"
VIN = "WBA3A5C51CF256001"
PIN = "4711"
OWNER_PHONE = "+4915112349999"
OWNER_NUMBER = "+442079460902"  # numbers/inbound.csv: service owner


@pytest.fixture
def commands() -> RecordingVehicleCommands:
    return RecordingVehicleCommands(status="confirmed")


@pytest.fixture
def app(make_app: Callable[..., Flask], settings: Settings,
        commands: RecordingVehicleCommands) -> Flask:
    tokens = {SUPERVISOR: frozenset({"supervisor"})}
    app = make_app(settings=settings.replace(agent_api_tokens=tokens), commands=commands)
    registry = Vehicles(app.extensions["gateway"].store, PinHasher(n=2**8))
    registry.register(vin=VIN, owner_name="Owner", market="DE",
                      purchase_date=dt.date(2024, 1, 1), actor="test", pin=PIN,
                      owner_phone=OWNER_PHONE)
    registry.immobilise(VIN, actor="agent:a-1", authority_reference="POL-1")
    return app


def agent(client: FlaskClient, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    return client.open(path, method=method, json=body,
                       headers={"Authorization": f"Bearer {SUPERVISOR}"})


def state(client: FlaskClient) -> dict[str, Any]:
    return dict(agent(client, "GET", f"/v1/agent/vehicles/{VIN}").json)


def sent(commands: RecordingVehicleCommands, command: str) -> list[Any]:
    return [c for c in commands.calls if c.args["command"] == command]


def audit(app: Flask) -> list[str]:
    registry = Vehicles(app.extensions["gateway"].store, PinHasher(n=2**8))
    return [e.action for e in registry.audit_for(VIN)]


# -- agent API ------------------------------------------------------------------------


def test_unreachable_car_stays_immobilised_and_a_retry_reactivates(
        app: Flask, commands: RecordingVehicleCommands) -> None:
    client = app.test_client()
    commands.fail_always(TransientUpstreamError("car unreachable"))
    path = f"/v1/agent/vehicles/{VIN}/reactivate"
    failed = agent(client, "POST", path, {"pin": PIN})
    assert failed.status_code == 202  # recorded, not confirmed: the queue retries it
    assert failed.json["immobilised"] is True
    assert failed.json["command"]["status"] == "pending"
    assert "car unreachable" in failed.json["detail"]
    assert "car unreachable" in failed.json["command"]["last_error"]
    shown = state(client)
    assert shown["immobilised"] is True and shown["reactivated_by"] is None
    assert [c["command"] for c in shown["commands"]] == ["reactivate"]
    assert "reactivate_requested" in audit(app) and "reactivate" not in audit(app)

    commands.succeed()
    done = agent(client, "POST", path, {"pin": PIN})
    assert done.status_code == 200 and done.json["immobilised"] is False
    assert done.json["command"]["status"] == "confirmed"
    assert done.json["command"]["key"] == failed.json["command"]["key"]
    assert state(client)["immobilised"] is False and state(client)["commands"] == []
    tries = sent(commands, "reactivate")
    assert len(tries) == 2 and len([c for c in tries if c.ok]) == 1
    # the retry carries the same idempotency key: the car executes it once
    assert tries[0].args["params"]["idempotency_key"] == tries[1].args["params"]["idempotency_key"]
    assert audit(app)[-1] == "reactivate"

    # a further retry: nothing to do, no command
    again = agent(client, "POST", path, {"pin": PIN})
    assert again.status_code == 200 and again.json["immobilised"] is False
    assert len(sent(commands, "reactivate")) == 2


def test_a_wrong_pin_sends_no_command(app: Flask, commands: RecordingVehicleCommands) -> None:
    client = app.test_client()
    response = agent(client, "POST", f"/v1/agent/vehicles/{VIN}/reactivate", {"pin": "0000"})
    assert response.status_code == 403
    assert sent(commands, "reactivate") == []
    assert state(client)["immobilised"] is True


def test_a_car_that_rejects_stays_immobilised(app: Flask,
                                              commands: RecordingVehicleCommands) -> None:
    client = app.test_client()
    commands.fail_next(PermanentUpstreamError("unknown vehicle", 404))
    response = agent(client, "POST", f"/v1/agent/vehicles/{VIN}/reactivate", {"pin": PIN})
    assert response.status_code == 502 and response.json["immobilised"] is True
    assert state(client)["immobilised"] is True


def test_a_rejected_answer_is_no_acknowledgement(
        app: Flask, commands: RecordingVehicleCommands) -> None:
    client = app.test_client()
    commands.status = "rejected"
    response = agent(client, "POST", f"/v1/agent/vehicles/{VIN}/reactivate", {"pin": PIN})
    assert response.status_code == 502 and "vehicle is moving" in response.json["detail"]
    assert response.json["command"]["status"] == "failed"
    assert state(client)["immobilised"] is True
    assert audit(app)[-1] == "reactivate_failed"
    # a new request after a rejection is sent again, under a new key
    commands.status = "confirmed"
    done = agent(client, "POST", f"/v1/agent/vehicles/{VIN}/reactivate", {"pin": PIN})
    assert done.status_code == 200 and done.json["immobilised"] is False
    keys = [c.args["params"]["idempotency_key"] for c in sent(commands, "reactivate")]
    assert len(keys) == 2 and keys[1] == f"{keys[0]}#{response.json['command']['id']}"


def test_an_accepted_answer_is_no_acknowledgement_until_the_car_reports(
        app: Flask, commands: RecordingVehicleCommands, vehicle_headers: dict[str, str]) -> None:
    client = app.test_client()
    commands.status = "accepted"
    path = f"/v1/agent/vehicles/{VIN}/reactivate"
    taken = agent(client, "POST", path, {"pin": PIN})
    assert taken.status_code == 202 and taken.json["immobilised"] is True
    assert taken.json["command"]["status"] == "sent"
    assert taken.json["command"]["command_id"] == "cmd-1"
    again = agent(client, "POST", path, {"pin": PIN})  # the agent asks again: nothing sent
    assert again.status_code == 202 and len(sent(commands, "reactivate")) == 1
    assert state(client)["immobilised"] is True
    report = client.post(f"/v1/vehicles/{VIN}/command-results", headers=vehicle_headers,
                         json={"command_id": "cmd-1", "ok": True, "detail": "engine enabled"})
    assert report.status_code == 200 and report.json["status"] == "confirmed"
    assert state(client)["immobilised"] is False and state(client)["commands"] == []
    assert audit(app).count("reactivate") == 1


def test_a_reactivation_the_car_never_reports_fails_and_its_late_report_reactivates(
        make_app: Callable[..., Flask], settings: Settings, clock: Any,
        vehicle_headers: dict[str, str]) -> None:
    """Through the agent and vehicle APIs, with the real client and an HTTP car that takes
    the command (``accepted``) and never reports within the window."""
    with FakeCarCommands(mode="up") as car, car_client(car.url, attempts=1) as commands:
        tokens = {SUPERVISOR: frozenset({"supervisor"})}
        app = make_app(settings=settings.replace(agent_api_tokens=tokens, command_confirm_s=60),
                       commands=commands)
        registry = Vehicles(app.extensions["gateway"].store, PinHasher(n=2**8))
        registry.register(vin=VIN, owner_name="Owner", market="DE",
                          purchase_date=dt.date(2024, 1, 1), actor="test", pin=PIN,
                          owner_phone=OWNER_PHONE)
        registry.immobilise(VIN, actor="agent:a-1", authority_reference="POL-1")
        client = app.test_client()
        taken = agent(client, "POST", f"/v1/agent/vehicles/{VIN}/reactivate", {"pin": PIN})
        assert taken.status_code == 202 and taken.json["command"]["status"] == "sent"
        assert "failed if it has not reported 60s after it was sent" in taken.json["detail"]
        queue = app.extensions["gateway"].command_queue
        clock.advance(60)
        assert queue.run_once() == 0 and [c["status"] for c in state(client)["commands"]] == [
            "sent"]
        clock.advance(1)
        assert queue.run_once() == 1
        shown = state(client)
        assert shown["immobilised"] is True and shown["commands"] == []
        assert audit(app)[-1] == "reactivate_failed"
        # the agent the owner calls next sees what happened to it, and why
        [failed] = shown["recent_commands"]
        assert (failed["command"], failed["status"]) == ("reactivate", "failed")
        assert failed["last_error"] == "not confirmed by the car within 60s"
        assert failed["command_id"] == "cmd-1"

        clock.advance(30)  # the car did reactivate; its report comes late
        report = client.post(f"/v1/vehicles/{VIN}/command-results", headers=vehicle_headers,
                             json={"command_id": "cmd-1", "ok": True, "detail": "engine enabled"})
        assert report.status_code == 200 and report.json["status"] == "confirmed"
        assert report.json["last_error"] is None
        assert state(client)["immobilised"] is False
        assert [(c["command"], c["status"]) for c in state(client)["recent_commands"]] == [
            ("reactivate", "confirmed")]
        assert audit(app)[-2:] == ["reactivate_failed", "reactivate"]
        replay = client.post(f"/v1/vehicles/{VIN}/command-results", headers=vehicle_headers,
                             json={"command_id": "cmd-1", "ok": True, "detail": "engine enabled"})
        assert replay.status_code == 200 and replay.json == report.json
        assert audit(app).count("reactivate") == 1 and len(car.commands) == 1


@pytest.mark.parametrize("path,field", [("immobilise", "authority_reference"),
                                        ("tracking", "police_reference")])
def test_immobilise_and_tracking_validate_before_sending(
        app: Flask, commands: RecordingVehicleCommands, path: str, field: str) -> None:
    client = app.test_client()
    before = len(commands.calls)
    response = agent(client, "POST", f"/v1/agent/vehicles/{VIN}/{path}", {field: "x" * 101})
    assert response.status_code == 422 and field in response.json["fields"]
    assert len(commands.calls) == before


# -- IVR ------------------------------------------------------------------------------


def said(key: str) -> str:
    return prompts.say(key, "de")[0]  # the car's market is DE


def ivr_reactivate(twilio: Twilio, sid: str) -> Any:
    def post(url: str, **form: str) -> Any:
        response = twilio.post(url, call_params(sid, OWNER_PHONE, to=OWNER_NUMBER, **form))
        assert response.status_code == 200
        return response

    menu = parse(post("/twilio/voice").data)
    ask_pin = parse(post(menu.find("Gather").get("action"), Digits="4").data)  # type: ignore[union-attr,arg-type]
    return post(ask_pin.find("Gather").get("action"), Digits=PIN)  # type: ignore[union-attr,arg-type]


def test_ivr_unreachable_car_goes_to_an_agent_and_a_retry_reactivates(
        app: Flask, commands: RecordingVehicleCommands) -> None:
    twilio = Twilio(app.test_client())
    client = app.test_client()
    commands.fail_always(TransientUpstreamError("car unreachable"))
    answer = ivr_reactivate(twilio, "CAreact1")
    text = answer.get_data(as_text=True)
    dial_of(parse(answer.data))  # put through to an agent
    assert said("ivr_car_unreachable") in text and said("ivr_reactivated") not in text
    assert state(client)["immobilised"] is True

    commands.succeed()
    answer = ivr_reactivate(twilio, "CAreact2")
    assert said("ivr_reactivated") in answer.get_data(as_text=True)
    assert state(client)["immobilised"] is False
    assert len([c for c in sent(commands, "reactivate") if c.ok]) == 1

    answer = ivr_reactivate(twilio, "CAreact3")  # the car is no longer immobilised
    assert said("ivr_not_immobilised") in answer.get_data(as_text=True)
    assert len(sent(commands, "reactivate")) == 2


def test_a_rejected_immobilise_changes_nothing(
        app: Flask, commands: RecordingVehicleCommands) -> None:
    client = app.test_client()
    assert agent(client, "POST", f"/v1/agent/vehicles/{VIN}/reactivate",
                 {"pin": PIN}).status_code == 200
    commands.status = "rejected"
    response = agent(client, "POST", f"/v1/agent/vehicles/{VIN}/immobilise",
                     {"authority_reference": "POL-2"})
    assert response.status_code == 502 and "vehicle is moving" in response.json["detail"]
    assert state(client)["immobilised"] is False


def test_an_immobilise_retry_carries_the_same_key(
        app: Flask, commands: RecordingVehicleCommands) -> None:
    client = app.test_client()
    assert agent(client, "POST", f"/v1/agent/vehicles/{VIN}/reactivate",
                 {"pin": PIN}).status_code == 200
    commands.fail_next(TransientUpstreamError("car unreachable"))
    path = f"/v1/agent/vehicles/{VIN}/immobilise"
    assert agent(client, "POST", path, {"authority_reference": "POL-2"}).status_code == 202
    assert state(client)["immobilised"] is False
    assert agent(client, "POST", path, {"authority_reference": "POL-2"}).status_code == 200
    assert state(client)["immobilised"] is True
    keys = [c.args["params"]["idempotency_key"] for c in sent(commands, "immobilise")]
    assert len(keys) == 2 and keys[0] == keys[1]


# -- IVR unlock through the same path --------------------------------------------------


def ivr_unlock(twilio: Twilio, sid: str) -> Any:
    def post(url: str, **form: str) -> Any:
        response = twilio.post(url, call_params(sid, OWNER_PHONE, to=OWNER_NUMBER, **form))
        assert response.status_code == 200
        return response

    menu = parse(post("/twilio/voice").data)
    ask_pin = parse(post(menu.find("Gather").get("action"), Digits="2").data)  # type: ignore[union-attr,arg-type]
    return post(ask_pin.find("Gather").get("action"), Digits=PIN)  # type: ignore[union-attr,arg-type]


@pytest.mark.parametrize("answer,prompt", [("confirmed", "ivr_unlocked"),
                                           ("accepted", "ivr_unlock_sent")])
def test_ivr_unlock_says_what_the_car_answered(
        app: Flask, commands: RecordingVehicleCommands, answer: str, prompt: str) -> None:
    commands.status = answer
    text = ivr_unlock(Twilio(app.test_client()), f"CAunlock{answer}").get_data(as_text=True)
    relock = app.extensions["gateway"].settings.unlock_relock_s
    assert prompts.say(prompt, "de", seconds=str(relock))[0] in text
    [unlock] = sent(commands, "unlock")
    assert unlock.args["params"] == {"idempotency_key": f"unlock:{VIN}:CAunlock{answer}",
                                     "relock_after_s": relock}
    assert ("unlock" in audit(app)) is (answer == "confirmed")


def test_ivr_unlock_with_the_car_unreachable_goes_to_an_agent_and_is_not_retried(
        app: Flask, commands: RecordingVehicleCommands, clock: Any) -> None:
    commands.fail_always(TransientUpstreamError("car unreachable"))
    answer = ivr_unlock(Twilio(app.test_client()), "CAunlockdown")
    dial_of(parse(answer.data))
    assert said("ivr_car_unreachable") in answer.get_data(as_text=True)
    commands.succeed()
    clock.advance(600)
    assert app.extensions["gateway"].command_queue.run_once() == 0
    assert len(sent(commands, "unlock")) == 1
    assert audit(app)[-1] == "unlock_failed"
