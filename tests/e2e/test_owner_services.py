"""Owner IVR, theft notification and ON CALL against real gateway processes.

Every outside party is a real HTTP server on 127.0.0.1: the vehicle command service,
Twilio's Messages API, the push service and the assistance centre.  When
GATEWAY_TEST_POSTGRES_URL is set (always in CI) the gateways share PostgreSQL,
otherwise one SQLite file.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gateway.owners import PinHasher, Vehicles
from gateway.store import Store, metadata, register_tables
from tests.support.events import crash_event
from tests.support.fake_servers import (
    FakeAssistanceCentre,
    FakePush,
    FakeTwilioApi,
    FakeVehicleService,
)
from tests.support.server import GatewayProcess, running_gateway
from tests.support.twilio import AUTH_TOKEN, call_params, dial_of, parse

IVR_NUMBER = "+442079460902"  # numbers/inbound.csv: service owner
ROADSIDE_NUMBER = "+442079460901"  # numbers/inbound.csv: service roadside (ON CALL)
ACCOUNT_SID = "AC" + "1" * 32
SMS_FROM = "+442079460998"
PIN = "738105"  # distinctive: searched for in logs and the database afterwards
TODAY = dt.date.today()


@dataclass
class Car:
    vin: str
    car_msisdn: str
    owner_phone: str
    purchase_date: dt.date
    serviced: bool
    market: str


OWNER = Car("WDD2050421F123456", "+4915112340001", "+4915112349001", TODAY - dt.timedelta(days=365), False, "DE")
LOCKED = Car("SAJAA01E22HA12345", "+447911123402", "+447911123902", TODAY - dt.timedelta(days=365), False, "GB")
NEW_CAR = Car("YV1ZW72U5N1000002", "+46701000002", "+46701009002", TODAY - dt.timedelta(days=2 * 365), False, "SE")
SERVICED = Car("YV1ZW72U5N1000004", "+46701000004", "+46701009004", TODAY - dt.timedelta(days=4 * 365 + 5), True, "SE")
UNSERVICED = Car("YV1ZW72U5N1000005", "+46701000005", "+46701009005", TODAY - dt.timedelta(days=4 * 365 + 5), False, "SE")
CARS = [OWNER, LOCKED, NEW_CAR, SERVICED, UNSERVICED]


@dataclass
class World:
    a: GatewayProcess
    b: GatewayProcess
    vehicles: FakeVehicleService
    twilio_api: FakeTwilioApi
    push: FakePush
    centre: FakeAssistanceCentre
    database_url: str
    tmp: Path


def database_url(tmp: Path) -> str:
    url = os.environ.get("GATEWAY_TEST_POSTGRES_URL")
    return url if url else f"sqlite:///{tmp}/shared.sqlite3"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("owners")
    url = database_url(tmp)
    store = Store.from_url(url)
    register_tables()
    metadata.drop_all(store.engine)
    store.create_schema()
    registry = Vehicles(store, PinHasher(n=2**8))
    for car in CARS:
        registry.register(vin=car.vin, owner_name="Test Owner", market=car.market,
                          purchase_date=car.purchase_date, actor="test:setup",
                          serviced_regularly=car.serviced, owner_phone=car.owner_phone,
                          car_msisdn=car.car_msisdn, pin=PIN)
    store.dispose()
    with FakeVehicleService() as vehicles, FakeTwilioApi(ACCOUNT_SID, AUTH_TOKEN) as twilio_api, \
            FakePush() as push, FakeAssistanceCentre() as centre:
        env = {
            "GATEWAY_DATABASE_URL": url,
            "GATEWAY_VEHICLE_COMMAND_URL": vehicles.url, "GATEWAY_UNLOCK_RELOCK_S": "90",
            "GATEWAY_TWILIO_ACCOUNT_SID": ACCOUNT_SID, "GATEWAY_TWILIO_API_URL": twilio_api.url,
            "GATEWAY_SMS_FROM": SMS_FROM, "GATEWAY_PUSH_URL": push.url + "/push",
            "GATEWAY_ASSISTANCE_URL": centre.url, "GATEWAY_ROADSIDE_FREE_MARKETS": "SE",
            "GATEWAY_DELIVERY_POLL_S": "0.05", "GATEWAY_NOTIFY_RETRY_S": "0.3",
            "GATEWAY_LOG_LEVEL": "DEBUG",
        }
        with running_gateway(tmp, **env) as a, running_gateway(tmp, "--no-worker", **env) as b:
            yield World(a, b, vehicles, twilio_api, push, centre, url, tmp)


def owner_call(gw: GatewayProcess, sid: str, car: Car) -> Any:
    return parse(gw.twilio("/twilio/voice", call_params(sid, car.owner_phone, to=IVR_NUMBER)).content)


def press(gw: GatewayProcess, root: Any, sid: str, car: Car, digits: str) -> Any:
    gather = root.find("Gather")
    assert gather is not None, root
    response = gw.twilio(gather.get("action"), call_params(sid, car.owner_phone, to=IVR_NUMBER,
                                                           Digits=digits))
    assert response.status_code == 200
    assert PIN not in response.text
    return parse(response.content)


def said(root: Any) -> str:
    return " ".join(s.text or "" for s in root.iter("Say"))


def test_correct_pin_unlocks_with_the_relock_window(world: World) -> None:
    menu = owner_call(world.a, "CAunlock", OWNER)
    # a German owner hears German (<Say language="de-DE">)
    assert "entriegeln" in said(menu) and menu.find("Gather/Say").get("language") == "de-DE"
    pin_prompt = press(world.a, menu, "CAunlock", OWNER, "2")
    assert "PIN" in said(pin_prompt)
    done = press(world.a, pin_prompt, "CAunlock", OWNER, PIN)
    assert "90 Sekunden" in said(done)
    assert done.find("Hangup") is not None
    sent = [c for c in world.vehicles.commands if c["vin"] == OWNER.vin]
    assert sent and sent[-1]["body"] == {"command": "unlock", "relock_after_s": 90}


def test_three_wrong_pins_lock_the_car_across_processes(world: World) -> None:
    root = press(world.a, owner_call(world.a, "CAwrong", LOCKED), "CAwrong", LOCKED, "2")
    for attempt in range(3):
        root = press(world.a, root, "CAwrong", LOCKED, "000000")
        if attempt < 2:
            assert "not correct" in said(root)
    assert "locked" in said(root) and dial_of(root) is not None  # put through to an agent
    # a new call, to the other gateway process, with the right PIN: still refused
    before = len(world.vehicles.commands)
    root = press(world.b, owner_call(world.b, "CAright", LOCKED), "CAright", LOCKED, "2")
    root = press(world.b, root, "CAright", LOCKED, PIN)
    assert "locked" in said(root)
    assert len(world.vehicles.commands) == before  # no unlock was sent


def test_no_pin_digits_in_logs_or_database(world: World) -> None:
    # after the PIN calls above: search everything the gateways wrote
    for gw in (world.a, world.b):
        assert PIN not in gw.logs()
    store = Store.from_url(world.database_url)
    try:
        with store.engine.begin() as conn:
            for table in metadata.sorted_tables:
                for row in conn.execute(sa.select(table)):
                    assert PIN not in repr(tuple(row)), table.name
    finally:
        store.dispose()


def alarm(gw: GatewayProcess, car: Car, event_id: str, kind: str, **extra: Any) -> dict[str, Any]:
    event = crash_event(vin=car.vin, msisdn=car.car_msisdn, type=kind, event_id=event_id, **extra)
    event.pop("crash")
    response = gw.post_event(event)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def wait_until(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_theft_sms_reaches_the_registered_number(world: World) -> None:
    alarm(world.a, OWNER, "alarm-1", "alarm_triggered")
    assert wait_until(lambda: any(m["to"] == OWNER.owner_phone for m in world.twilio_api.messages),
                      timeout=10)
    message = next(m for m in world.twilio_api.messages if m["to"] == OWNER.owner_phone)
    assert message["from"] == SMS_FROM and OWNER.vin[-6:] in message["body"]
    assert wait_until(lambda: bool(world.push.pushes), timeout=10)


def test_no_sms_after_alarm_disarmed_with_the_key(world: World) -> None:
    world.twilio_api.mode = "500"  # the SMS is stuck in retry
    seen = len(world.twilio_api.requests)
    alarm(world.a, SERVICED, "alarm-2", "alarm_triggered")
    assert wait_until(lambda: len(world.twilio_api.requests) > seen, timeout=10)
    answer = alarm(world.a, SERVICED, "disarm-2", "alarm_disarmed", disarmed_by="key")
    assert {n["kind"] for n in answer["notifications"]} >= {"sms", "escalation"}
    assert all(n["status"] == "cancelled" for n in answer["notifications"])
    world.twilio_api.mode = "up"
    time.sleep(1.5)  # several retry periods
    assert not any(m["to"] == SERVICED.owner_phone for m in world.twilio_api.messages)


@pytest.mark.parametrize(
    ("car", "costs"),
    [(NEW_CAR, False), (SERVICED, False), (UNSERVICED, True)],
    ids=["2-year-old", "4-year-old-serviced-SE", "4-year-old-unserviced"],
)
def test_on_call_entitlement(world: World, car: Car, costs: bool) -> None:
    event = crash_event(vin=car.vin, msisdn=car.car_msisdn, type="on_call",
                        event_id=f"oncall-{car.vin}")
    event.pop("crash")
    assert world.a.post_event(event).status_code == 201
    root = parse(world.a.twilio("/twilio/voice", call_params(f"CAoc{car.vin}", car.car_msisdn,
                                                             to=ROADSIDE_NUMBER)).content)
    dial = dial_of(root)
    assert ("kostar" in said(root)) is costs  # "costs apply", in Swedish
    whisper = parse(world.a.twilio(dial.find("Number").get("url"), {
        "CallSid": f"CAoc{car.vin}-agent", "ParentCallSid": f"CAoc{car.vin}"}).content)
    text = said(whisper)
    assert "Roadside" in text
    assert ("Costs apply" in text) is costs


def test_on_call_with_every_line_down_records_a_callback_not_an_emergency_dial(
    world: World, tmp_path: Path
) -> None:
    """The roadside lines fail (their own dial outcomes open their breakers): the ON CALL
    caller gets a callback, never an emergency number, now and on the next call."""
    own_db = f"sqlite:///{tmp_path}/lines-down.sqlite3"  # breakers are per database
    emergency = {"112", "999", "911"}
    with running_gateway(tmp_path, GATEWAY_DATABASE_URL=own_db,
                         GATEWAY_BREAKER_FAILURES="1") as gw:
        event = crash_event(vin=NEW_CAR.vin, msisdn=NEW_CAR.car_msisdn, type="on_call",
                            event_id="oncall-down")
        event.pop("crash")
        assert gw.post_event(event).status_code == 201
        root = parse(gw.twilio("/twilio/voice", call_params(
            "CAocfail", NEW_CAR.car_msisdn, to=ROADSIDE_NUMBER)).content)
        while root.find("Dial") is not None:  # every roadside line fails
            assert dial_of(root).find("Number").text not in emergency
            root = parse(gw.twilio(dial_of(root).get("action"), call_params(
                "CAocfail", NEW_CAR.car_msisdn, to=ROADSIDE_NUMBER,
                DialCallStatus="failed")).content)
        assert "S O S" in said(root) and root.find("Hangup") is not None
        time.sleep(2.5)  # the call path's copy of the line health refreshes
        gw.twilio("/twilio/voice", call_params("CAwarm", "+46701230000", to=ROADSIDE_NUMBER))
        time.sleep(0.5)
        root = parse(gw.twilio("/twilio/voice", call_params(
            "CAocdown", NEW_CAR.car_msisdn, to=ROADSIDE_NUMBER)).content)
        assert root.find("Dial") is None
        assert "S O S" in said(root) and root.find("Hangup") is not None
        time.sleep(1.0)  # step records are written after the answer
    store = Store.from_url(own_db)
    try:
        callbacks = [c for c in store.callbacks() if c["call_sid"] == "CAocdown"]
        decisions = store.decisions_for(call_sid="CAocdown")
    finally:
        store.dispose()
    assert len(callbacks) == 1 and callbacks[0]["number"] == NEW_CAR.car_msisdn
    assert [d["target"] for d in decisions] == ["callback"]
