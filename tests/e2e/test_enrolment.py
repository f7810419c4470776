"""An operator enrols two cars with no Python: one by the admin API, one by
``python -m gateway vehicles import``; then, for both, the owner's IVR unlock, the PIN
lockout and the admin's unlock, the theft SMS and the key disarm, against a real gateway
process and real HTTP fakes of the vehicle command service, Twilio's Messages API, the
push service and the assistance centre.

Only HTTP and the command line touch the gateway.  VINs, SIMs and phone numbers are
drawn per run, so a shared PostgreSQL (GATEWAY_TEST_POSTGRES_URL) needs no reset.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.events import crash_event
from tests.support.fake_servers import (
    FakeAssistanceCentre,
    FakePush,
    FakeTwilioApi,
    FakeVehicleService,
)
from tests.support.server import REPO, GatewayProcess, running_gateway
from tests.support.twilio import AUTH_TOKEN, call_params, dial_of, parse

ADMIN_TOKEN = "e2e-admin-token-0123456789abcdef"
OWNER_NUMBER = "+442079460902"  # numbers/inbound.csv: service owner (the IVR)
ACCOUNT_SID = "AC" + "2" * 32
SMS_FROM = "+442079460998"
WRONG = "00000000"
_draw = random.Random()


def digits(n: int) -> str:
    return "".join(_draw.choice("0123456789") for _ in range(n))


@dataclass
class Car:
    how: str  # "api" or "import"
    vin: str
    car_msisdn: str
    owner_phones: list[str]
    pin: str
    market: str
    language: str
    customer_number: str = ""
    sids: dict[str, int] = field(default_factory=dict)

    def call_sid(self, purpose: str) -> str:
        n = self.sids[purpose] = self.sids.get(purpose, 0) + 1
        return f"CA{self.how}{purpose}{n}{self.vin[-6:]}"


@dataclass
class World:
    gw: GatewayProcess
    vehicles: FakeVehicleService
    twilio_api: FakeTwilioApi
    push: FakePush
    env: dict[str, str]
    tmp: Path
    cars: dict[str, Car]
    outputs: list[str] = field(default_factory=list)


def cars() -> dict[str, Car]:
    return {
        "api": Car("api", f"SAJAA01E22H{digits(6)}", f"+447400{digits(6)}",
                   [f"+44750{digits(7)}", f"+447400{digits(6)}"], "73810592", "GB", "en-GB"),
        "import": Car("import", f"YV1ZW72U5N{digits(7)}", f"+4670{digits(7)}",
                      [f"+4670{digits(7)}"], "61940537", "SE", "sv-SE"),
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("enrolment")
    url = os.environ.get("GATEWAY_TEST_POSTGRES_URL") or f"sqlite:///{tmp}/enrolment.sqlite3"
    with FakeVehicleService() as vehicles, FakeTwilioApi(ACCOUNT_SID, AUTH_TOKEN) as twilio_api, \
            FakePush() as push, FakeAssistanceCentre() as centre:
        env = {
            "GATEWAY_DATABASE_URL": url, "GATEWAY_ADMIN_API_TOKENS": ADMIN_TOKEN,
            "GATEWAY_PIN_SCRYPT_N": "1024",
            "GATEWAY_VEHICLE_COMMAND_URL": vehicles.url, "GATEWAY_UNLOCK_RELOCK_S": "90",
            "GATEWAY_TWILIO_ACCOUNT_SID": ACCOUNT_SID, "GATEWAY_TWILIO_API_URL": twilio_api.url,
            "GATEWAY_SMS_FROM": SMS_FROM, "GATEWAY_PUSH_URL": push.url + "/push",
            "GATEWAY_ASSISTANCE_URL": centre.url, "GATEWAY_DELIVERY_POLL_S": "0.05",
            "GATEWAY_NOTIFY_RETRY_S": "0.3", "GATEWAY_LOG_LEVEL": "DEBUG",
        }
        with running_gateway(tmp, **env) as gw:
            yield World(gw, vehicles, twilio_api, push, env, tmp, cars())


def admin(world: World, method: str, path: str, body: Any = None) -> requests.Response:
    response = requests.request(method, f"{world.gw.base_url}/v1/admin{path}", json=body,
                                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
    world.outputs.append(response.text)
    return response


def cli(world: World, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update({"PYTHONPATH": str(REPO), "GATEWAY_DATABASE_URL": world.env["GATEWAY_DATABASE_URL"],
                "GATEWAY_PIN_SCRYPT_N": world.env["GATEWAY_PIN_SCRYPT_N"]})
    result = subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                            text=True, timeout=60, env=env, cwd=world.tmp, check=False)
    world.outputs += [result.stdout, result.stderr]
    return result


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# -- enrolment -----------------------------------------------------------------------------


def test_enrol_one_car_by_the_admin_api(world: World) -> None:
    car = world.cars["api"]
    body = {"vin": car.vin, "car_msisdn": car.car_msisdn, "market": car.market,
            "purchase_date": "2024-06-01", "serviced_regularly": True,
            "owner_name": "Ann Smith", "owner_phones": car.owner_phones,
            "language": car.language}
    created = admin(world, "POST", "/vehicles", body)
    assert created.status_code == 201, created.text
    car.customer_number = created.json()["customer_number"]
    assert re.fullmatch(r"[0-9]{8}", car.customer_number)
    assert admin(world, "POST", "/vehicles", body).status_code == 200  # replayed: same car
    pin = admin(world, "PUT", f"/vehicles/{car.vin}/pin", {"pin": car.pin})
    assert pin.status_code == 200 and pin.json()["has_pin"] is True


def test_enrol_another_car_by_the_bulk_import(world: World) -> None:
    car = world.cars["import"]
    path = world.tmp / "delivery-centre.csv"
    path.write_text(
        "vin,car_msisdn,market,purchase_date,serviced_regularly,owner_name,owner_phones,"
        "language,pin\n"
        f"{car.vin},{car.car_msisdn},{car.market},2025-02-01,no,Anna Lind,"
        f"{';'.join(car.owner_phones)},{car.language},{car.pin}\n", encoding="utf-8")
    result = cli(world, "vehicles", "import", str(path))
    assert result.returncode == 0, result.stderr
    found = re.search(rf"{car.vin} created, customer number ([0-9]{{8}})", result.stdout)
    assert found, result.stdout
    car.customer_number = found[1]
    assert result.stdout.splitlines()[-1].endswith("1 created, 0 updated, 0 unchanged")
    again = cli(world, "vehicles", "import", str(path))
    assert again.returncode == 0 and "0 created, 0 updated, 1 unchanged" in again.stdout
    shown = admin(world, "GET", f"/vehicles/{car.vin}").json()
    assert (shown["customer_number"], shown["has_pin"]) == (car.customer_number, True)


# -- the owner's IVR, for both cars ---------------------------------------------------------

BOTH = pytest.mark.parametrize("how", ["api", "import"])


def stranger() -> str:
    """A caller number no car lists: the IVR must ask for the customer number."""
    return f"+4670{digits(7)}"


class Call:
    def __init__(self, world: World, car: Car, purpose: str) -> None:
        self.world, self.car = world, car
        self.sid, self.caller = car.call_sid(purpose), stranger()
        self.root = self._post("/twilio/voice", {})

    def _post(self, url: str, extra: dict[str, str]) -> Any:
        response = self.world.gw.twilio(url, call_params(self.sid, self.caller,
                                                         to=OWNER_NUMBER, **extra))
        assert response.status_code == 200, response.text
        self.world.outputs.append(response.text)
        return parse(response.content)

    def press(self, keys: str) -> Any:
        gather = self.root.find("Gather")
        assert gather is not None, self.root
        self.root = self._post(gather.get("action"), {"Digits": keys})
        return self.root

    def to_pin_prompt(self) -> None:
        self.press("2")  # unlock: the caller is unknown, so the IVR asks the customer number
        assert self.action().endswith("/identify") or "/identify?" in self.action()
        self.press(self.car.customer_number)
        assert "/pin" in self.action(), "the customer number did not find the car"

    def action(self) -> str:
        gather = self.root.find("Gather")
        return "" if gather is None else str(gather.get("action"))


def unlocks_for(world: World, vin: str) -> list[dict[str, Any]]:
    return [c for c in world.vehicles.commands if c["vin"] == vin
            and isinstance(c["body"], dict) and c["body"].get("command") == "unlock"]


@BOTH
def test_the_ivr_finds_the_car_by_its_customer_number_and_the_pin_unlocks(
    world: World, how: str
) -> None:
    car = world.cars[how]
    call = Call(world, car, "unlock")
    assert call.root.find("Gather/Say") is not None
    call.to_pin_prompt()
    assert call.root.find("Gather/Say").get("language") == car.language
    call.press(car.pin)
    assert wait_until(lambda: bool(unlocks_for(world, car.vin)), timeout=10)
    assert unlocks_for(world, car.vin)[-1]["body"] == {"command": "unlock", "relock_after_s": 90}
    assert call.root.find("Hangup") is not None and "90" in " ".join(
        s.text or "" for s in call.root.iter("Say"))


@BOTH
def test_three_wrong_pins_lock_and_the_admin_unlock_clears_it(world: World, how: str) -> None:
    car = world.cars[how]
    call = Call(world, car, "wrong")
    call.to_pin_prompt()
    for attempt in range(3):
        call.press(WRONG)
        if attempt < 2:
            assert "/pin" in call.action()  # asked again
    assert dial_of(call.root) is not None  # locked: put through to an agent
    shown = admin(world, "GET", f"/vehicles/{car.vin}").json()["pin_lockout"]
    assert (shown["failures"], shown["locked"]) == (3, True) and shown["locked_until"]

    before = len(unlocks_for(world, car.vin))
    locked = Call(world, car, "locked")
    locked.to_pin_prompt()
    locked.press(car.pin)  # the right PIN, refused while locked
    assert dial_of(locked.root) is not None
    time.sleep(0.3)
    assert len(unlocks_for(world, car.vin)) == before

    refused = admin(world, "POST", f"/vehicles/{car.vin}/pin/unlock", {})
    assert refused.status_code == 422 and "reason" in refused.json()["fields"]
    cleared = admin(world, "POST", f"/vehicles/{car.vin}/pin/unlock",
                    {"reason": "owner identified at the dealer"})
    assert cleared.status_code == 200 and cleared.json()["pin_lockout"]["locked"] is False
    audit = admin(world, "GET", f"/vehicles/{car.vin}/audit").json()["entries"]
    unlock = [e for e in audit if e["action"] == "pin_unlock"][-1]
    assert unlock["detail"]["reason"] == "owner identified at the dealer"
    assert unlock["actor"].startswith("admin:")

    again = Call(world, car, "after")
    again.to_pin_prompt()
    again.press(car.pin)
    assert wait_until(lambda: len(unlocks_for(world, car.vin)) > before, timeout=10)


# -- theft: SMS to the enrolled owner, cancelled by the key ---------------------------------


def alarm(world: World, car: Car, kind: str, **extra: Any) -> dict[str, Any]:
    event = crash_event(vin=car.vin, msisdn=car.car_msisdn, type=kind,
                        event_id=f"{kind}-{car.vin}-{digits(6)}", **extra)
    event.pop("crash")
    response = world.gw.post_event(event)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


@BOTH
def test_the_theft_sms_reaches_the_enrolled_owner_and_the_key_disarms(world: World,
                                                                      how: str) -> None:
    car = world.cars[how]
    owner = car.owner_phones[0]
    alarm(world, car, "alarm_triggered")
    assert wait_until(lambda: any(m["to"] == owner for m in world.twilio_api.messages), 10)
    message = next(m for m in world.twilio_api.messages if m["to"] == owner)
    assert message["from"] == SMS_FROM and car.vin[-6:] in message["body"]
    answer = alarm(world, car, "alarm_disarmed", disarmed_by="key")
    escalations = [n for n in answer["notifications"] if n["kind"] == "escalation"]
    assert escalations and all(n["status"] == "cancelled" for n in escalations)


def test_a_key_disarm_cancels_an_sms_still_in_retry(world: World) -> None:
    car = world.cars["import"]
    owner = car.owner_phones[0]
    sent = sum(1 for m in world.twilio_api.messages if m["to"] == owner)
    world.twilio_api.mode = "500"
    try:
        seen = len(world.twilio_api.requests)
        alarm(world, car, "alarm_triggered")
        assert wait_until(lambda: len(world.twilio_api.requests) > seen, timeout=10)
        answer = alarm(world, car, "alarm_disarmed", disarmed_by="key")
        assert {n["kind"] for n in answer["notifications"]} >= {"sms", "escalation"}
        assert all(n["status"] == "cancelled" for n in answer["notifications"])
    finally:
        world.twilio_api.mode = "up"
    time.sleep(1.5)  # several retry periods
    assert sum(1 for m in world.twilio_api.messages if m["to"] == owner) == sent


def test_no_pin_in_any_answer_output_or_log(world: World) -> None:
    for car in world.cars.values():
        assert all(car.pin not in text for text in world.outputs), car.how
        assert car.pin not in world.gw.logs()
