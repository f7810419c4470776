"""Reactivation confirmed by the car, through real processes: a gateway process (with
its command queue worker), the car behind a real HTTP fake of the vehicle command
service (``FakeCarCommands``).

A car that cannot be reached during reactivation stays immobilised in the registry;
once it is back, the queue worker (or the agent's retry) reactivates it and the command
reaches the car exactly once (one idempotency key per immobilisation, deduplicated by
the car).  An ``accepted`` answer changes nothing until the car's ``command_result``.
A replayed signed IVR PIN step sends no second command."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from tests.support.fake_servers import FakeCarCommands
from tests.support.server import GatewayProcess, running_gateway
from tests.support.twilio import VEHICLE_TOKEN, call_params, dial_of, parse

ADMIN_TOKEN = "e2e-admin-token-0123456789abcdef"
AGENT_TOKEN = "e2e-agent-token-0123456789abcdef"
OWNER_NUMBER = "+442079460902"  # numbers/inbound.csv: service owner (the IVR)
PIN = "73810592"
_draw = random.Random()


def digits(n: int) -> str:
    return "".join(_draw.choice("0123456789") for _ in range(n))


@dataclass
class World:
    gw: GatewayProcess
    car: FakeCarCommands


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("reactivation")
    url = os.environ.get("GATEWAY_TEST_POSTGRES_URL") or f"sqlite:///{tmp}/reactivation.sqlite3"
    with FakeCarCommands(mode="up", slow_s=4.0) as car:
        gateway = running_gateway(
            tmp, GATEWAY_DATABASE_URL=url, GATEWAY_ADMIN_API_TOKENS=ADMIN_TOKEN,
            GATEWAY_AGENT_API_TOKENS=f"{AGENT_TOKEN}:supervisor", GATEWAY_PIN_SCRYPT_N="1024",
            GATEWAY_VEHICLE_COMMAND_URL=car.url)
        with gateway as gw:
            yield World(gw, car)


def call(world: World, api: str, method: str, path: str, body: Any = None) -> requests.Response:
    token = ADMIN_TOKEN if api == "admin" else AGENT_TOKEN
    return requests.request(method, f"{world.gw.base_url}/v1/{api}{path}", json=body,
                            headers={"Authorization": f"Bearer {token}"}, timeout=30)


def immobilised_car(world: World) -> tuple[str, str]:
    """A car enrolled by the admin API and immobilised by an agent: (VIN, owner phone)."""
    vin, phone = f"WBA3A5C51CF{digits(6)}", f"+4915112{digits(6)}"
    created = call(world, "admin", "POST", "/vehicles", {
        "vin": vin, "car_msisdn": f"+4917{digits(8)}", "market": "DE",
        "purchase_date": "2024-06-01", "serviced_regularly": True, "owner_name": "Eva Braun",
        "owner_phones": [phone], "language": "de-DE"})
    assert created.status_code == 201, created.text
    assert call(world, "admin", "PUT", f"/vehicles/{vin}/pin", {"pin": PIN}).status_code == 200
    world.car.mode = "confirm"
    done = call(world, "agent", "POST", f"/vehicles/{vin}/immobilise",
                {"authority_reference": "POL-2026-7"})
    assert done.status_code == 200 and done.json()["immobilised"] is True, done.text
    return vin, phone


def reactivations(world: World, vin: str) -> tuple[int, int]:
    """(requests on the wire, commands the car executed) for ``reactivate`` to ``vin``."""
    wire = [c for c in world.car.commands
            if c["vin"] == vin and (c["body"] or {}).get("command") == "reactivate"]
    executed = [c for c in world.car.unique_commands.values()
                if c["vin"] == vin and c["body"]["command"] == "reactivate"]
    return len(wire), len(executed)


def registry(world: World, vin: str) -> dict[str, Any]:
    answer = call(world, "agent", "GET", f"/vehicles/{vin}")
    assert answer.status_code == 200
    return dict(answer.json())


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def keys_sent(world: World, vin: str) -> set[str]:
    return {c["idempotency_key"] for c in world.car.commands
            if c["vin"] == vin and (c["body"] or {}).get("command") == "reactivate"}


def audit_actions(world: World, vin: str) -> list[str]:
    answer = call(world, "admin", "GET", f"/vehicles/{vin}/audit")
    assert answer.status_code == 200
    return [e["action"] for e in answer.json()["entries"]]


def test_car_unreachable_then_the_worker_reactivates_it_once(world: World) -> None:
    vin, _ = immobilised_car(world)
    world.car.mode = "503"
    failed = call(world, "agent", "POST", f"/vehicles/{vin}/reactivate", {"pin": PIN})
    assert failed.status_code == 202, failed.text
    assert failed.json()["command"]["status"] == "pending"
    assert failed.json()["immobilised"] is True
    shown = registry(world, vin)
    assert shown["immobilised"] is True
    [pending] = shown["commands"]  # the agent sees the command waiting for the car
    assert pending["command"] == "reactivate" and pending["status"] == "pending"
    assert pending["attempts"] >= 1 and "503" in (pending["last_error"] or "")
    wire, executed = reactivations(world, vin)
    assert wire >= 1 and executed == 0

    world.car.mode = "confirm"  # the car is back: the queue worker sends it again
    assert wait_until(lambda: registry(world, vin)["immobilised"] is False, timeout=40)
    assert registry(world, vin)["commands"] == []
    assert reactivations(world, vin)[1] == 1  # executed once
    assert keys_sent(world, vin) == {pending["key"]}  # every try carried the same key
    assert audit_actions(world, vin).count("reactivate") == 1

    wire = reactivations(world, vin)[0]
    again = call(world, "agent", "POST", f"/vehicles/{vin}/reactivate", {"pin": PIN})
    assert again.status_code == 200 and again.json()["immobilised"] is False
    time.sleep(1.5)  # a worker pass or two: nothing more goes to the car
    assert reactivations(world, vin)[0] == wire


def test_car_unreachable_then_the_agents_retry_reactivates_it_once(world: World) -> None:
    vin, _ = immobilised_car(world)
    world.car.mode = "503"
    failed = call(world, "agent", "POST", f"/vehicles/{vin}/reactivate", {"pin": PIN})
    assert failed.status_code == 202 and registry(world, vin)["immobilised"] is True

    world.car.mode = "confirm"
    done = call(world, "agent", "POST", f"/vehicles/{vin}/reactivate", {"pin": PIN})
    assert done.status_code == 200 and done.json()["immobilised"] is False, done.text
    assert registry(world, vin)["immobilised"] is False
    assert reactivations(world, vin)[1] == 1
    assert keys_sent(world, vin) == {failed.json()["command"]["key"]}
    assert audit_actions(world, vin).count("reactivate") == 1


def test_accepted_changes_nothing_until_the_cars_command_result(world: World) -> None:
    vin, _ = immobilised_car(world)
    world.car.mode = "up"  # the command service takes it: {"status": "accepted"}
    taken = call(world, "agent", "POST", f"/vehicles/{vin}/reactivate", {"pin": PIN})
    assert taken.status_code == 202 and taken.json()["command"]["status"] == "sent"
    assert registry(world, vin)["immobilised"] is True
    report = {"command_id": taken.json()["command"]["command_id"], "ok": True,
              "detail": "immobiliser off"}
    url = f"{world.gw.base_url}/v1/vehicles/{vin}/command-results"
    headers = {"Authorization": f"Bearer {VEHICLE_TOKEN}"}
    first = requests.post(url, json=report, headers=headers, timeout=10)
    assert first.status_code == 200 and first.json()["status"] == "confirmed", first.text
    assert registry(world, vin)["immobilised"] is False
    replay = requests.post(url, json=report, headers=headers, timeout=10)
    assert replay.status_code == 200 and replay.json() == first.json()
    assert audit_actions(world, vin).count("reactivate") == 1
    assert reactivations(world, vin) == (1, 1)


def ivr_reactivate(world: World, phone: str, sid: str) -> tuple[Any, str, dict[str, str]]:
    """The IVR reactivation call; the last answer, and the PIN step's URL and form."""
    def post(url: str, **form: str) -> Any:
        response = world.gw.twilio(url, call_params(sid, phone, to=OWNER_NUMBER, **form))
        assert response.status_code == 200, response.text
        return parse(response.content)

    menu = post("/twilio/voice")
    ask_pin = post(menu.find("Gather").get("action"), Digits="4")  # 4: reactivate
    pin_url = ask_pin.find("Gather").get("action")
    return post(pin_url, Digits=PIN), pin_url, call_params(sid, phone, to=OWNER_NUMBER,
                                                            Digits=PIN)


def test_ivr_answer_lost_then_the_car_executes_it_once(world: World) -> None:
    """The car took the command but its answer never came (``hang``): the registry still
    says immobilised and the caller is put through to an agent; the retry (the worker's,
    or the owner's next call), with the car back, carries the same key, so the car does
    not execute it a second time."""
    vin, phone = immobilised_car(world)
    world.car.mode = "hang"
    first, _, _ = ivr_reactivate(world, phone, f"CAreact{digits(10)}")
    dial_of(first)  # "car unreachable", put through to an agent
    assert registry(world, vin)["immobilised"] is True

    world.car.mode = "confirm"
    second, _, _ = ivr_reactivate(world, phone, f"CAreact{digits(10)}")
    assert second.find("Dial") is None and second.find("Hangup") is not None
    assert wait_until(lambda: registry(world, vin)["immobilised"] is False, timeout=40)
    wire, executed = reactivations(world, vin)
    assert wire >= 2 and executed == 1
    assert len(keys_sent(world, vin)) == 1


def test_a_replayed_ivr_pin_step_sends_no_second_command(world: World) -> None:
    vin, phone = immobilised_car(world)
    world.car.mode = "confirm"
    done, pin_url, form = ivr_reactivate(world, phone, f"CAreact{digits(10)}")
    assert done.find("Hangup") is not None and registry(world, vin)["immobilised"] is False
    assert reactivations(world, vin) == (1, 1)
    answer = world.gw.twilio(pin_url, form).content
    for _ in range(5):  # the same signed request, captured and sent again
        replay = world.gw.twilio(pin_url, form)
        assert replay.status_code == 200 and replay.content == answer
    assert reactivations(world, vin) == (1, 1)
