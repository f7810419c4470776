"""The theft notifier on a fake clock against real HTTP fakes: Twilio's Messages API, the push
service and the assistance centre (through the delivery outbox).

Each test drives ``NotificationWorker.run_once`` and ``OutboxWorker.run_once`` second by
second of fake time; the fakes are real servers on 127.0.0.1 and record what reached them.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from gateway import theft
from gateway.adapters.assistance import AssistanceCentreClient
from gateway.adapters.messaging import PushClient, TwilioSms
from gateway.config import DeliveryPolicy, Settings
from gateway.delivery import OutboxWorker
from gateway.errors import ConfigError
from gateway.notify import NotificationWorker
from gateway.owner_texts import reference
from gateway.owners import PinHasher, Vehicles
from gateway.store import Store
from tests.conftest import Clock
from tests.support.events import SWEDISH_CAR, crash_event
from tests.support.fake_servers import FakeAssistanceCentre, FakePush, FakeTwilioMessages
from tests.support.twilio import AUTH_TOKEN

ACCOUNT_SID = "AC" + "2" * 32
SMS_FROM = "+442079460998"
VIN = "YV1ZW72U5N1234567"
OWNER = "+46701740605"
GERMAN_VIN = "WDD2050421F123456"
GERMAN_OWNER = "+4915112349001"
START = 1_795_000_000.0  # 2026-11-18, a whole second


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "postgres":
        yield request.getfixturevalue("pg_store")
        return
    store = Store.from_url(f"sqlite:///{tmp_path}/notify.sqlite3")
    store.create_schema()
    yield store
    store.dispose()


@pytest.fixture
def registry(store: Store, clock: Clock) -> Vehicles:
    clock.now = START
    registry = Vehicles(store, PinHasher(n=2**8, r=8, p=1), clock=clock)
    registry.register(vin=VIN, owner_name="Anna Lind", market="SE",
                      purchase_date=dt.date(2022, 3, 1), actor="test", owner_phone=OWNER)
    registry.register(vin=GERMAN_VIN, owner_name="Jan Bauer", market="DE",
                      purchase_date=dt.date(2023, 5, 1), actor="test", owner_phone=GERMAN_OWNER)
    return registry


@pytest.fixture
def twilio() -> Iterator[FakeTwilioMessages]:
    with FakeTwilioMessages(ACCOUNT_SID, AUTH_TOKEN, slow_s=1.0) as fake:
        yield fake


@pytest.fixture
def push() -> Iterator[FakePush]:
    with FakePush() as fake:
        yield fake


@pytest.fixture
def centre() -> Iterator[FakeAssistanceCentre]:
    with FakeAssistanceCentre() as fake:
        yield fake


@dataclass
class Rig:
    store: Store
    registry: Vehicles
    clock: Clock
    notifier: NotificationWorker
    outbox: OutboxWorker
    twilio: FakeTwilioMessages
    push: FakePush
    centre: FakeAssistanceCentre
    started: float = START

    def now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock.now, tz=dt.UTC)

    def alarm(self, *, escalation_s: float, vin: str = VIN,
              event_id: str = "alarm-1") -> dict[str, dict[str, Any]]:
        self.started = self.clock.now
        rows = theft.on_alarm_triggered(
            store=self.store, vehicles=self.registry, vin=vin, event_id=event_id,
            occurred_at=self.now() - dt.timedelta(seconds=3), now=self.now(),
            escalate_after=dt.timedelta(seconds=escalation_s))
        return {r["kind"]: r for r in rows}

    def run_until(self, seconds_after_alarm: float) -> None:
        """Both workers, once per fake second, up to ``seconds_after_alarm``."""
        while self.clock.now - self.started < seconds_after_alarm:
            self.notifier.run_once()
            self.outbox.run_once()
            self.clock.advance(1.0)
        self.notifier.run_once()
        self.outbox.run_once()

    def rows(self, vin: str = VIN) -> dict[str, dict[str, Any]]:
        return {r["kind"]: r for r in theft.notifications_for(self.store, vin)}

    def texts_to(self, number: str) -> list[dict[str, Any]]:
        return [m for m in self.twilio.messages if m["to"] == number]

    def escalations(self) -> list[dict[str, Any]]:
        return [i for i in self.centre.incidents.values() if i["type"] == "theft_escalation"]


@pytest.fixture
def rig(store: Store, registry: Vehicles, clock: Clock, twilio: FakeTwilioMessages,
        push: FakePush, centre: FakeAssistanceCentre) -> Iterator[Rig]:
    sms = TwilioSms(ACCOUNT_SID, AUTH_TOKEN, from_number=SMS_FROM, api_url=twilio.url,
                    timeout_s=0.5)
    pusher = PushClient(push.push_url, timeout_s=0.5)
    centre_client = AssistanceCentreClient(centre.url, timeout_s=0.5)
    notifier = NotificationWorker(store, sms=sms, push=pusher, clock=clock,
                                  backoff_initial_s=5.0, backoff_max_s=60.0,
                                  rng=random.Random(8))
    outbox = OutboxWorker(store, centre_client, clock=clock,
                          policy=DeliveryPolicy(timeout_s=0.5, backoff_initial_s=0.01,
                                                backoff_max_s=0.05, budget_s=0.2))
    yield Rig(store, registry, clock, notifier, outbox, twilio, push, centre)
    sms.close()
    pusher.close()
    centre_client.close()


# -- the must-show: an outage, a recovery, a disarm, the deadline ---------------------------


def test_sms_held_through_a_ten_minute_outage_is_delivered_once(rig: Rig) -> None:
    """The default escalation delay (600 s) and a 10-minute Twilio outage: the centre is
    told at the deadline, and the owner still gets the SMS, once, when Twilio recovers."""
    rig.twilio.mode = "500"
    rig.alarm(escalation_s=600)
    rig.run_until(599)  # ten minutes of fake time with Twilio answering 500
    rows = rig.rows()
    assert rig.twilio.messages == []
    assert rows["sms"]["status"] == "pending" and rows["sms"]["last_status"] == 500
    tries = rows["sms"]["attempts"]
    # retried with a capped backoff (5 s doubling to 60 s): neither hammered nor given up
    assert 10 <= tries <= 20, tries
    assert len(rig.twilio.requests) == tries  # one request per attempt (a lookup, or a send)
    assert len(rig.push.pushes) == 1 and rows["push"]["status"] == "sent"  # push was fine

    rig.run_until(601)  # the deadline: the centre is told the SMS is still failing
    [escalation] = rig.escalations()
    sms_report = escalation["owner_notifications"][0]
    assert sms_report["delivered"] is False and sms_report["status"] == "pending"
    assert "SMS still retried" in escalation["summary"]
    rig.twilio.mode = "up"
    rig.run_until(670)  # the capped backoff: the next try within a minute
    [message] = rig.texts_to(OWNER)
    assert message["from"] == SMS_FROM and reference("alarm-1:sms") in message["body"]
    sms = rig.rows()["sms"]
    assert sms["status"] == "sent" and sms["provider_ref"] == message["sid"]
    rig.run_until(2000)  # well past the deadline: still exactly one message, one escalation
    assert len(rig.twilio.messages) == 1 and len(rig.escalations()) == 1


def test_no_sms_after_a_disarm_with_the_key_during_the_outage(rig: Rig) -> None:
    rig.twilio.mode = "500"
    rig.alarm(escalation_s=900)
    rig.run_until(300)
    cancelled = theft.on_alarm_disarmed(store=rig.store, vin=VIN, event_id="disarm-1",
                                        now=rig.now(), reason="alarm disarmed with the key")
    assert {r["kind"] for r in cancelled} == {"sms", "escalation"}  # the push had gone out
    rig.twilio.mode = "up"
    seen = len(rig.twilio.requests)
    rig.run_until(1200)
    assert rig.twilio.messages == [] and len(rig.twilio.requests) == seen
    assert rig.centre.incidents == {}  # no escalation either
    assert rig.rows()["sms"]["status"] == "cancelled"


def test_escalation_at_the_deadline_says_what_failed(rig: Rig) -> None:
    rig.twilio.mode = "500"
    rig.push.mode = "503"
    rig.alarm(escalation_s=600)
    rig.run_until(599)
    assert rig.centre.incidents == {}  # not before the deadline
    rig.run_until(601)
    [escalation] = rig.escalations()
    assert escalation["vin"] == VIN and escalation["alarm_event_id"] == "alarm-1"
    assert escalation["failed_channels"] == ["sms", "push"]
    sms, push = escalation["owner_notifications"]
    assert sms["channel"] == "sms" and sms["status"] == "pending" and sms["last_status"] == 500
    assert sms["attempts"] >= 10 and "HTTP 500" in sms["last_error"]
    assert push["channel"] == "push" and push["status"] == "pending"
    assert "HTTP 503" in push["last_error"]
    assert "Not delivered to the owner: SMS still retried" in escalation["summary"]
    key = rig.rows()["escalation"]["provider_ref"]
    assert rig.centre.deliveries[key] == 1  # once at the centre
    # Twilio and the push service recover after the deadline: the owner is told, once,
    # and the centre is not told again
    rig.twilio.mode = "up"
    rig.push.mode = "up"
    rig.run_until(900)
    assert len(rig.texts_to(OWNER)) == 1 and len(rig.push.pushes) == 1
    assert len(rig.escalations()) == 1


def test_an_invalid_number_is_not_retried_and_is_reported(rig: Rig) -> None:
    rig.twilio.mode = "400"  # every send refused with 21211
    rig.alarm(escalation_s=120)
    rig.run_until(100)
    sms = rig.rows()["sms"]
    assert (sms["status"], sms["attempts"], sms["last_status"]) == ("failed", 1, 400)
    assert "21211" in sms["last_error"] and len(rig.twilio.requests) == 1
    rig.run_until(121)
    [escalation] = rig.escalations()
    report = escalation["owner_notifications"][0]
    assert report["status"] == "failed" and "21211" in report["last_error"]
    assert escalation["failed_channels"] == ["sms"]


# -- never twice: outcomes in doubt -------------------------------------------------------


@pytest.mark.parametrize("mode", ["accept-500", "accept-hang"])
def test_an_sms_twilio_took_without_answering_is_not_sent_again(rig: Rig, mode: str) -> None:
    rig.twilio.mode = mode  # the message is created, the answer is a 500 or never comes
    rig.alarm(escalation_s=600)
    rig.run_until(1)
    assert len(rig.twilio.messages) == 1
    assert rig.rows()["sms"]["in_doubt"] is True
    rig.twilio.mode = "up"
    rig.run_until(120)
    assert len(rig.twilio.messages) == 1  # found by its reference, not sent again
    sms = rig.rows()["sms"]
    assert sms["status"] == "sent" and sms["provider_ref"] == rig.twilio.messages[0]["sid"]
    assert len(rig.twilio.sends()) == 1 and len(rig.twilio.lookups()) == 1
    assert rig.twilio.lookups()[0].query == {"To": OWNER, "From": SMS_FROM, "PageSize": "20"}


def test_a_refused_connection_is_retried_without_a_lookup(rig: Rig) -> None:
    rig.twilio.mode = "refuse"  # nothing reached Twilio: no doubt, no lookup
    rig.alarm(escalation_s=600)
    rig.run_until(30)
    assert rig.rows()["sms"]["in_doubt"] is False
    rig.twilio.mode = "up"
    rig.run_until(120)
    assert len(rig.texts_to(OWNER)) == 1 and rig.twilio.lookups() == []


def test_a_sender_that_died_mid_request_is_followed_by_a_lookup(rig: Rig) -> None:
    rows = rig.alarm(escalation_s=600)
    sms_id = int(rows["sms"]["id"])
    # another sender claimed the SMS, recorded the attempt and sent it, then died
    [claimed] = [r for r in theft.claim_due(rig.store, now=rig.now(), lease=rig.notifier.lease)
                 if r["id"] == sms_id]
    assert theft.attempt_started(rig.store, sms_id, in_doubt=True)
    with TwilioSms(ACCOUNT_SID, AUTH_TOKEN, from_number=SMS_FROM, api_url=rig.twilio.url) as dead:
        dead.send(OWNER, str(claimed["body"]), idempotency_key=str(claimed["idempotency_key"]))
    rig.run_until(59)
    assert rig.rows()["sms"]["status"] == "pending"  # the lease still holds
    rig.run_until(120)
    assert len(rig.twilio.messages) == 1 and len(rig.twilio.sends()) == 1
    assert rig.rows()["sms"]["status"] == "sent"


def test_two_notifiers_send_one_sms(rig: Rig) -> None:
    other = NotificationWorker(rig.store, sms=rig.notifier.sms, push=rig.notifier.push,
                               clock=rig.clock)
    rig.twilio.slow_s = 0.3
    rig.twilio.mode = "slow"
    rig.alarm(escalation_s=600)
    threads = [threading.Thread(target=w.run_once) for w in (rig.notifier, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(rig.twilio.messages) == 1 and len(rig.push.pushes) == 1


# -- texts in the owner's language -----------------------------------------------------------


def test_a_german_owner_gets_german_texts(rig: Rig) -> None:
    rig.alarm(escalation_s=600, vin=GERMAN_VIN, event_id="alarm-de")
    rig.run_until(1)
    [message] = rig.texts_to(GERMAN_OWNER)
    assert message["body"].startswith("Diebstahlalarm an Ihrem Fahrzeug (FIN endet auf 123456)")
    [pushed] = rig.push.pushes
    assert pushed["title"] == "Fahrzeugalarm" and pushed["vin"] == GERMAN_VIN
    assert pushed["idempotency_key"] == "alarm-de:push"


# -- the backoff ---------------------------------------------------------------------------


def test_backoff_has_tenacitys_exponential_jitter_shape(store: Store) -> None:
    worker = NotificationWorker(store, sms=None, push=None, backoff_initial_s=5.0,
                                backoff_max_s=60.0, rng=random.Random(1))
    for attempts, low in [(1, 5.0), (2, 10.0), (3, 20.0), (4, 40.0)]:
        gaps = [worker.backoff_s(attempts) for _ in range(200)]
        assert all(low <= g <= min(low + 5.0, 60.0) for g in gaps), attempts
    assert {worker.backoff_s(n) for n in (5, 9, 40, 10_000)} == {60.0}
    with pytest.raises(ValueError):
        NotificationWorker(store, sms=None, push=None, backoff_initial_s=0.0)


def test_without_an_sms_service_the_sms_fails_and_is_reported(
    store: Store, registry: Vehicles, clock: Clock, push: FakePush
) -> None:
    with PushClient(push.push_url, timeout_s=0.5) as pusher:
        worker = NotificationWorker(store, sms=None, push=pusher, clock=clock)
        theft.on_alarm_triggered(store=store, vehicles=registry, vin=VIN, event_id="a",
                                 occurred_at=dt.datetime.fromtimestamp(clock.now, tz=dt.UTC),
                                 now=dt.datetime.fromtimestamp(clock.now, tz=dt.UTC))
        assert worker.run_once() == 2
    sms = {r["kind"]: r for r in theft.notifications_for(store, VIN)}["sms"]
    assert sms["status"] == "failed" and "GATEWAY_TWILIO_ACCOUNT_SID" in sms["last_error"]


# -- configuration --------------------------------------------------------------------------


def env(**values: str) -> dict[str, str]:
    return {"GATEWAY_TWILIO_AUTH_TOKEN": AUTH_TOKEN, **values}


def test_escalation_deadline_setting() -> None:
    assert Settings.from_env(env()).theft_escalation_s == 600
    assert Settings.from_env(env()).notify_retry_s == 5.0
    assert Settings.from_env(env(GATEWAY_THEFT_ESCALATION_S="900")).theft_escalation_s == 900


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"GATEWAY_THEFT_ESCALATION_S": "59"}, "GATEWAY_THEFT_ESCALATION_S"),
        ({"GATEWAY_THEFT_ESCALATION_S": "86401"}, "GATEWAY_THEFT_ESCALATION_S"),
        ({"GATEWAY_THEFT_ESCALATION_S": "ten minutes"}, "GATEWAY_THEFT_ESCALATION_S"),
        ({"GATEWAY_NOTIFY_RETRY_S": "0"}, "GATEWAY_NOTIFY_RETRY_S"),
        ({"GATEWAY_THEFT_ESCALATION_S": "120", "GATEWAY_NOTIFY_RETRY_S": "120"},
         "GATEWAY_NOTIFY_RETRY_S"),
    ],
)
def test_bad_escalation_settings_are_refused(values: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings.from_env(env(**values))


def test_the_app_schedules_the_escalation_at_the_configured_deadline(
    make_app: Callable[..., Flask], settings: Settings, clock: Clock,
    vehicle_headers: dict[str, str],
) -> None:
    app = make_app(settings=settings.replace(theft_escalation_s=900), sms=None, push=None)
    Vehicles(app.extensions["gateway"].store, PinHasher(n=2**8)).register(
        vin=SWEDISH_CAR["vin"], owner_name="Anna Lind", market="SE", actor="test",
        purchase_date=dt.date(2022, 3, 1), owner_phone=OWNER, car_msisdn=SWEDISH_CAR["msisdn"])
    event = crash_event(type="alarm_triggered")
    event.pop("crash")
    response = app.test_client().post("/v1/events", json=event, headers=vehicle_headers)
    body = response.get_json()
    assert response.status_code == 201 and isinstance(body, dict), body
    rows = {n["kind"]: n for n in body["notifications"]}
    now = dt.datetime.fromtimestamp(clock.now, tz=dt.UTC)
    assert rows["escalation"]["due_at"] == (now + dt.timedelta(seconds=900)).isoformat()
    # the owner's channels are retried past the escalation, for a day
    assert rows["sms"]["deadline_at"] == (now + dt.timedelta(hours=24)).isoformat()
    assert rows["sms"]["language"] == "sv" and "leased_until" not in rows["sms"]
