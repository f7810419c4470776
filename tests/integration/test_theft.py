"""Theft notifications and tracking over a real database: created once per alarm, retried
until the deadline, cancelled by a disarm with the key, escalated with what failed; tracking
sessions and their police notification."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gateway import theft
from gateway.delivery import outbox
from gateway.errors import ValidationError
from gateway.owner_texts import owner_language, owner_texts, reference
from gateway.owners import PinHasher, UnknownVehicleError, Vehicles
from gateway.store import Store
from gateway.theft import (
    claim_due,
    escalate,
    mark_failed,
    mark_sent,
    notifications,
    notifications_for,
    on_alarm_disarmed,
    on_alarm_triggered,
    pending_notifications,
)
from tests.conftest import Clock

VIN = "YV1ZW72U5N1234567"
OTHER_VIN = "YV1ZW72U5N7654321"
PIN = "738105"
LOOKUP = "12345674"
OWNER = "+46701740605"
T0 = dt.datetime(2026, 11, 25, 10, 15, tzinfo=dt.UTC)
TEN_MINUTES = dt.timedelta(minutes=10)
A_DAY = dt.timedelta(hours=24)
DISARMED = "alarm_disarmed with key"
AGENT = "agent:0123456789ab"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "postgres":
        yield request.getfixturevalue("pg_store")
        return
    store = Store.from_url(f"sqlite:///{tmp_path}/theft.sqlite3")
    store.create_schema()
    yield store
    store.dispose()


@pytest.fixture
def registry(store: Store, clock: Clock) -> Vehicles:
    registry = Vehicles(store, PinHasher(n=2**8, r=8, p=1), clock=clock)
    registry.register(
        vin=VIN, owner_name="Anna Lind", market="SE", purchase_date=dt.date(2022, 3, 1),
        actor="import:dms", owner_phone=OWNER, car_msisdn="+46701740606",
        lookup_code=LOOKUP, pin=PIN,
    )
    return registry


def trigger(store: Store, registry: Vehicles, event_id: str = "alarm-1",
            now: dt.datetime = T0, vin: str = VIN,
            escalate_after: dt.timedelta = TEN_MINUTES) -> list[dict[str, Any]]:
    return on_alarm_triggered(
        store=store, vehicles=registry, vin=vin, event_id=event_id,
        occurred_at=now - dt.timedelta(seconds=5), now=now, escalate_after=escalate_after,
    )


def by_kind(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["kind"]: r for r in rows}


def count(store: Store, table: sa.Table = notifications) -> int:
    with store.engine.begin() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def outbox_rows(store: Store) -> list[dict[str, Any]]:
    with store.engine.begin() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(outbox).order_by(outbox.c.id))]


# -- creating and cancelling --------------------------------------------------------------


def test_trigger_creates_sms_push_and_escalation(store: Store, registry: Vehicles) -> None:
    rows = by_kind(trigger(store, registry))
    assert set(rows) == {"sms", "push", "escalation"}
    assert rows["sms"]["target"] == OWNER
    assert rows["push"]["target"] == f"vin:{VIN}"
    assert all(r["status"] == "pending" and r["vin"] == VIN for r in rows.values())
    assert all(r["alarm_event_id"] == "alarm-1" and r["attempts"] == 0 for r in rows.values())
    assert rows["sms"]["due_at"] == T0 and rows["push"]["due_at"] == T0
    # the escalation is due at the deadline; the owner's channels are retried for a day
    assert rows["escalation"]["due_at"] == T0 + TEN_MINUTES
    assert rows["sms"]["deadline_at"] == rows["push"]["deadline_at"] == T0 + A_DAY
    sms = str(rows["sms"]["body"])
    assert "234567" in sms and "10:14 UTC" in sms
    assert reference("alarm-1:sms") in sms  # what the notifier looks for at Twilio
    for row in rows.values():
        body = str(row["body"])
        assert PIN not in body and LOOKUP not in body and "scrypt" not in body
    assert registry.audit_for(VIN)[-1].action == "theft_alarm"


def test_escalation_deadline_is_configurable(store: Store, registry: Vehicles) -> None:
    rows = by_kind(trigger(store, registry, escalate_after=dt.timedelta(seconds=90)))
    assert rows["escalation"]["due_at"] == T0 + dt.timedelta(seconds=90)
    assert rows["sms"]["deadline_at"] == T0 + A_DAY
    assert registry.audit_for(VIN)[-1].detail["escalation_at"] == (
        T0 + dt.timedelta(seconds=90)).isoformat()
    with pytest.raises(ValueError):
        trigger(store, registry, event_id="alarm-0", escalate_after=dt.timedelta(0))


@pytest.mark.parametrize(
    ("language", "market", "expected", "sms_word", "push_title"),
    [
        (None, "SE", "sv", "Stöldlarm", "Billarm"),
        (None, "DE", "de", "Diebstahlalarm", "Fahrzeugalarm"),
        (None, "FR", "fr", "Alarme antivol", "Alarme du véhicule"),
        (None, "GB", "en", "Theft alarm", "Vehicle alarm"),
        ("fr-CH", "CH", "fr", "Alarme antivol", "Alarme du véhicule"),  # the car's own language
        ("de", "SE", "de", "Diebstahlalarm", "Fahrzeugalarm"),
        ("sv-FI", "FI", "sv", "Stöldlarm", "Billarm"),
        ("fi", "FI", "en", "Theft alarm", "Vehicle alarm"),  # no Finnish texts: English
        ("en-US", "DE", "en", "Theft alarm", "Vehicle alarm"),
        ("no", "NO", "nb", "Tyverialarm", "Bilalarm"),
        (None, "PL", "en", "Theft alarm", "Vehicle alarm"),
    ],
)
def test_owner_texts_follow_the_vehicles_language_then_its_market(
    language: str | None, market: str, expected: str, sms_word: str, push_title: str
) -> None:
    assert owner_language(language, market) == expected
    texts = owner_texts(vin=VIN, occurred_at=T0, language=language, market=market,
                        sms_key="e:sms")
    assert texts.language == expected
    assert sms_word in texts.sms and push_title == texts.push_title
    assert "234567" in texts.sms and reference("e:sms") in texts.sms
    assert "10:15 UTC" in texts.push_body


def test_a_german_car_gets_german_rows(store: Store, registry: Vehicles) -> None:
    registry.register(vin=OTHER_VIN, owner_name="B", market="DE", owner_phone="+4915112349001",
                      purchase_date=dt.date(2022, 3, 1), actor="import:dms")
    rows = by_kind(trigger(store, registry, event_id="alarm-de", vin=OTHER_VIN))
    assert rows["sms"]["language"] == rows["push"]["language"] == "de"
    assert "Diebstahlalarm" in rows["sms"]["body"] and rows["push"]["title"] == "Fahrzeugalarm"
    assert "Theft alarm on VIN" in rows["escalation"]["body"]  # the agents read English


def test_replayed_event_creates_nothing_more(store: Store, registry: Vehicles) -> None:
    first = trigger(store, registry)
    again = trigger(store, registry, now=T0 + dt.timedelta(seconds=30))
    assert [r["id"] for r in again] == [r["id"] for r in first]
    assert count(store) == 3
    assert [a.action for a in registry.audit_for(VIN)].count("theft_alarm") == 1
    trigger(store, registry, event_id="alarm-2")
    assert count(store) == 6


def test_event_id_of_another_vehicle_is_refused(store: Store, registry: Vehicles) -> None:
    registry.register(vin=OTHER_VIN, owner_name="B", market="SE",
                      purchase_date=dt.date(2022, 3, 1), actor="import:dms")
    trigger(store, registry)
    with pytest.raises(ValidationError) as info:
        trigger(store, registry, vin=OTHER_VIN)
    assert set(info.value.errors) == {"event_id"}
    assert count(store) == 3


def test_no_sms_without_a_registered_phone(store: Store, registry: Vehicles) -> None:
    registry.register(vin=OTHER_VIN, owner_name="B", market="SE",
                      purchase_date=dt.date(2022, 3, 1), actor="import:dms")
    rows = trigger(store, registry, event_id="alarm-9", vin=OTHER_VIN)
    assert sorted(r["kind"] for r in rows) == ["escalation", "push"]


def test_unknown_vehicle_is_refused(store: Store, registry: Vehicles) -> None:
    with pytest.raises(UnknownVehicleError):
        trigger(store, registry, vin="YV1ZW72U5N0000000")
    assert count(store) == 0


def test_disarm_cancels_everything_pending_and_records_why(
    store: Store, registry: Vehicles
) -> None:
    trigger(store, registry)
    later = T0 + dt.timedelta(minutes=2)
    cancelled = on_alarm_disarmed(store=store, vin=VIN, event_id="disarm-1", now=later,
                                  reason=DISARMED)
    assert sorted(r["kind"] for r in cancelled) == ["escalation", "push", "sms"]
    rows = notifications_for(store, VIN)
    assert all(r["status"] == "cancelled" for r in rows)
    assert all(r["cancelled_at"] == later and r["cancel_reason"] == DISARMED for r in rows)
    assert pending_notifications(store, now=T0 + dt.timedelta(hours=1), limit=10) == []
    entry = registry.audit_for(VIN)[-1]
    assert entry.action == "notifications_cancelled"
    assert entry.detail["reason"] == DISARMED and entry.detail["event_id"] == "disarm-1"
    assert sorted(c["kind"] for c in entry.detail["cancelled"]) == ["escalation", "push", "sms"]


def test_disarm_after_sending_leaves_sent_ones_alone(store: Store, registry: Vehicles) -> None:
    rows = by_kind(trigger(store, registry))
    assert mark_sent(store, int(rows["sms"]["id"]), now=T0 + dt.timedelta(seconds=3),
                     provider_ref="SM" + "a" * 32)
    cancelled = on_alarm_disarmed(store=store, vin=VIN, event_id="disarm-1",
                                  now=T0 + dt.timedelta(minutes=2), reason=DISARMED)
    assert sorted(r["kind"] for r in cancelled) == ["escalation", "push"]
    after = by_kind(notifications_for(store, VIN))
    assert after["sms"]["status"] == "sent" and after["sms"]["provider_ref"] == "SM" + "a" * 32
    assert after["sms"]["sent_at"] == T0 + dt.timedelta(seconds=3)
    assert after["sms"]["cancelled_at"] is None and after["sms"]["cancel_reason"] is None
    assert after["push"]["status"] == "cancelled"
    # a sender that finishes after the disarm cannot flip a cancelled row to sent
    assert mark_sent(store, int(rows["push"]["id"])) is False
    assert by_kind(notifications_for(store, VIN))["push"]["status"] == "cancelled"


def test_disarm_with_nothing_pending_is_still_audited(store: Store, registry: Vehicles) -> None:
    assert on_alarm_disarmed(store=store, vin=VIN, event_id="d-0", now=T0,
                             reason=DISARMED) == []
    assert registry.audit_for(VIN)[-1].detail["cancelled"] == []
    with pytest.raises(ValidationError):
        on_alarm_disarmed(store=store, vin=VIN, event_id="d-1", now=T0, reason=" ")


# -- the sender's side --------------------------------------------------------------------


def test_pending_only_returns_due_rows(store: Store, registry: Vehicles) -> None:
    trigger(store, registry)
    due_now = pending_notifications(store, now=T0, limit=10)
    assert sorted(r["kind"] for r in due_now) == ["push", "sms"]
    due_later = pending_notifications(store, now=T0 + TEN_MINUTES, limit=10)
    assert [r["kind"] for r in due_later][-1] == "escalation" and len(due_later) == 3
    assert len(pending_notifications(store, now=T0 + dt.timedelta(hours=1), limit=1)) == 1


def test_a_claimed_row_goes_to_one_sender_until_its_lease_ends(
    store: Store, registry: Vehicles
) -> None:
    trigger(store, registry)
    lease = dt.timedelta(seconds=60)
    first = claim_due(store, now=T0, lease=lease)
    assert sorted(r["kind"] for r in first) == ["push", "sms"]
    assert claim_due(store, now=T0 + dt.timedelta(seconds=59), lease=lease) == []
    # a sender that died: the lease runs out and another sender takes the rows
    again = claim_due(store, now=T0 + dt.timedelta(seconds=61), lease=lease)
    assert sorted(r["kind"] for r in again) == ["push", "sms"]


def test_transient_failure_is_retried_at_the_given_time(store: Store, registry: Vehicles) -> None:
    sms = by_kind(trigger(store, registry))["sms"]
    sms_id = int(sms["id"])
    claim_due(store, now=T0, lease=dt.timedelta(seconds=60))
    assert theft.attempt_started(store, sms_id, in_doubt=True)
    retry_at = T0 + dt.timedelta(seconds=7)
    row = mark_failed(store, sms_id, "Twilio answered HTTP 500", permanent=False, now=T0,
                      retry_at=retry_at, in_doubt=True, status=500)
    assert row is not None
    assert (row["status"], row["attempts"], row["last_status"]) == ("pending", 1, 500)
    assert row["due_at"] == retry_at and row["in_doubt"] is True and row["leased_until"] is None
    assert sms_id not in {r["id"] for r in claim_due(store, now=T0, lease=dt.timedelta(1))}
    assert sms_id in {r["id"] for r in claim_due(store, now=retry_at, lease=dt.timedelta(1))}
    with pytest.raises(ValueError):
        mark_failed(store, sms_id, "x", permanent=False, now=T0)  # no retry time


def test_no_retry_at_or_after_the_deadline(store: Store, registry: Vehicles) -> None:
    sms = by_kind(trigger(store, registry))["sms"]
    deadline = T0 + A_DAY
    row = mark_failed(store, int(sms["id"]), "timeout", permanent=False,
                      now=deadline - dt.timedelta(seconds=20), retry_at=deadline)
    assert row is not None and row["status"] == "expired"
    assert row["given_up_at"] == deadline - dt.timedelta(seconds=20)
    assert mark_failed(store, int(sms["id"]), "late", permanent=False, retry_at=deadline) is None


def test_permanent_failure_fails_at_once(store: Store, registry: Vehicles) -> None:
    push = by_kind(trigger(store, registry))["push"]
    row = mark_failed(store, int(push["id"]), "x" * 900, permanent=True, now=T0, status=400)
    assert row is not None and row["status"] == "failed" and len(row["last_error"]) == 500
    assert row["last_status"] == 400 and row["given_up_at"] == T0
    cancelled = on_alarm_disarmed(store=store, vin=VIN, event_id="d", now=T0, reason=DISARMED)
    assert sorted(r["kind"] for r in cancelled) == ["escalation", "sms"]


# -- escalation -----------------------------------------------------------------------------


def test_escalation_goes_to_the_outbox_with_what_failed(store: Store, registry: Vehicles) -> None:
    rows = by_kind(trigger(store, registry))
    deadline = T0 + TEN_MINUTES
    mark_failed(store, int(rows["push"]["id"]), "push provider answered HTTP 400", permanent=True,
                now=T0, status=400)
    theft.attempt_started(store, int(rows["sms"]["id"]), in_doubt=True)
    mark_failed(store, int(rows["sms"]["id"]), "Twilio answered HTTP 500", permanent=False,
                now=T0, retry_at=T0 + dt.timedelta(seconds=6), in_doubt=True, status=500)
    key = escalate(store, rows["escalation"], now=deadline)
    assert key is not None and len(key) == 36
    after = by_kind(notifications_for(store, VIN))
    assert after["escalation"]["status"] == "sent" and after["escalation"]["provider_ref"] == key
    assert after["sms"]["status"] == "pending"  # the owner is still texted after the escalation
    [row] = outbox_rows(store)
    assert row["incident_id"] == key and row["status"] == "pending"
    payload = row["payload"]
    assert payload["type"] == "theft_escalation" and payload["vin"] == VIN
    assert payload["alarm_event_id"] == "alarm-1" and payload["failed_channels"] == ["sms", "push"]
    sms, push = payload["owner_notifications"]
    assert (sms["channel"], sms["status"], sms["attempts"], sms["last_status"]) == (
        "sms", "pending", 1, 500)
    assert sms["last_error"] == "Twilio answered HTTP 500" and sms["target"] == OWNER
    assert (push["channel"], push["status"], push["last_status"]) == ("push", "failed", 400)
    assert "SMS still retried after 1 attempt(s)" in payload["summary"]
    assert registry.audit_for(VIN)[-1].action == "theft_escalated"
    # a second sender with the same row changes nothing
    assert escalate(store, rows["escalation"], now=deadline) is None
    assert len(outbox_rows(store)) == 1


def test_a_delivered_channel_is_reported_as_delivered(store: Store, registry: Vehicles) -> None:
    rows = by_kind(trigger(store, registry))
    mark_sent(store, int(rows["sms"]["id"]), now=T0, provider_ref="SM" + "b" * 32)
    escalate(store, rows["escalation"], now=T0 + TEN_MINUTES)
    payload = outbox_rows(store)[0]["payload"]
    sms = payload["owner_notifications"][0]
    assert sms["delivered"] is True and sms["message_id"] == "SM" + "b" * 32
    assert payload["failed_channels"] == ["push"]


def test_a_disarmed_alarm_is_not_escalated(store: Store, registry: Vehicles) -> None:
    rows = by_kind(trigger(store, registry))
    on_alarm_disarmed(store=store, vin=VIN, event_id="d", now=T0, reason=DISARMED)
    assert escalate(store, rows["escalation"], now=T0 + TEN_MINUTES) is None
    assert outbox_rows(store) == []


# -- tracking and the police ------------------------------------------------------------------


def test_start_tracking_queues_one_police_notification_per_session(
    store: Store, registry: Vehicles
) -> None:
    trigger(store, registry)
    first = theft.start_tracking(store, vin=VIN, actor=AGENT, police_reference="SE-POL-1", now=T0)
    assert first.started and first.police_reference == "SE-POL-1"
    assert first.notification_status == "pending"
    replay = theft.start_tracking(store, vin=VIN, actor=AGENT, police_reference="SE-POL-1",
                                  now=T0 + dt.timedelta(seconds=5))
    other = theft.start_tracking(store, vin=VIN, actor=AGENT, police_reference="SE-POL-2",
                                 now=T0 + dt.timedelta(seconds=9))
    assert not replay.started and not other.started
    assert first.notification_key == replay.notification_key == other.notification_key
    assert other.police_reference == "SE-POL-1"  # the first reference stands
    [row] = outbox_rows(store)
    assert row["incident_id"] == first.notification_key
    payload = row["payload"]
    assert payload["type"] == "police_notification" and payload["police_reference"] == "SE-POL-1"
    assert payload["vin"] == VIN and payload["market"] == "SE"
    assert payload["alarm_event_id"] == "alarm-1" and payload["requested_by"] == AGENT
    car = registry.get(VIN)
    assert car is not None and car.tracking and car.tracking_police_reference == "SE-POL-1"
    actions = [(a.action, a.detail.get("changed")) for a in registry.audit_for(VIN)]
    assert actions.count(("tracking_started", True)) == 1
    assert actions.count(("tracking_started", False)) == 2

    theft.stop_tracking(store, vin=VIN, actor=AGENT, reason="car recovered",
                        now=T0 + dt.timedelta(hours=1))
    stopped = registry.audit_for(VIN)[-1]
    assert (stopped.action, stopped.actor) == ("tracking_stopped", AGENT)
    assert stopped.detail["reason"] == "car recovered"
    assert stopped.detail["police_reference"] == "SE-POL-1"
    car = registry.get(VIN)
    assert car is not None and not car.tracking
    with pytest.raises(theft.NotTrackingError):
        theft.stop_tracking(store, vin=VIN, actor=AGENT, reason=None,
                            now=T0 + dt.timedelta(hours=1))
    # a new session is a new police notification
    again = theft.start_tracking(store, vin=VIN, actor=AGENT, police_reference="SE-POL-3",
                                 now=T0 + dt.timedelta(hours=2))
    assert again.started and again.notification_key != first.notification_key
    assert [r["payload"]["police_reference"] for r in outbox_rows(store)] == [
        "SE-POL-1", "SE-POL-3"]


@pytest.mark.parametrize("bad", ["", "   ", "x" * 101, None, 42])
def test_police_reference_is_checked(store: Store, registry: Vehicles, bad: Any) -> None:
    with pytest.raises(ValidationError) as info:
        theft.start_tracking(store, vin=VIN, actor=AGENT, police_reference=bad, now=T0)
    assert set(info.value.errors) == {"police_reference"}
    assert outbox_rows(store) == []
    car = registry.get(VIN)
    assert car is not None and not car.tracking


def test_tracking_an_unknown_vehicle(store: Store, registry: Vehicles) -> None:
    with pytest.raises(UnknownVehicleError):
        theft.start_tracking(store, vin=OTHER_VIN, actor=AGENT, police_reference="P", now=T0)
    with pytest.raises(UnknownVehicleError):
        theft.stop_tracking(store, vin=OTHER_VIN, actor=AGENT, reason=None, now=T0)
    assert outbox_rows(store) == []
