"""Theft notifications: created once per alarm, cancelled by a disarm with the key."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gateway.errors import ValidationError
from gateway.owners import PinHasher, UnknownVehicleError, Vehicles
from gateway.store import Store
from gateway.theft import (
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
PIN = "738105"
LOOKUP = "12345674"
OWNER = "+46701740605"
T0 = dt.datetime(2026, 11, 25, 10, 15, tzinfo=dt.UTC)
DISARMED = "alarm_disarmed with key"


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
            now: dt.datetime = T0) -> list[dict[str, Any]]:
    return on_alarm_triggered(
        store=store, vehicles=registry, vin=VIN, event_id=event_id,
        occurred_at=now - dt.timedelta(seconds=5), now=now,
    )


def count(store: Store) -> int:
    with store.engine.begin() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(notifications)).scalar_one())


def test_trigger_creates_sms_push_and_escalation(store: Store, registry: Vehicles) -> None:
    rows = trigger(store, registry)
    by_kind = {r["kind"]: r for r in rows}
    assert set(by_kind) == {"sms", "push", "escalation"}
    assert by_kind["sms"]["target"] == OWNER
    assert by_kind["push"]["target"] == f"vin:{VIN}"
    assert all(r["status"] == "pending" and r["vin"] == VIN for r in rows)
    assert all(r["alarm_event_id"] == "alarm-1" and r["attempts"] == 0 for r in rows)
    assert by_kind["sms"]["due_at"] == T0 and by_kind["push"]["due_at"] == T0
    assert by_kind["escalation"]["due_at"] == T0 + dt.timedelta(minutes=10)
    assert "234567" in str(by_kind["sms"]["body"]) and "10:14 UTC" in str(by_kind["sms"]["body"])
    for row in rows:
        body = str(row["body"])
        assert PIN not in body and LOOKUP not in body and "scrypt" not in body
    assert registry.audit_for(VIN)[-1].action == "theft_alarm"


def test_replayed_event_creates_nothing_more(store: Store, registry: Vehicles) -> None:
    first = trigger(store, registry)
    again = trigger(store, registry, now=T0 + dt.timedelta(seconds=30))
    assert [r["id"] for r in again] == [r["id"] for r in first]
    assert count(store) == 3
    assert [a.action for a in registry.audit_for(VIN)].count("theft_alarm") == 1
    trigger(store, registry, event_id="alarm-2")
    assert count(store) == 6


def test_event_id_of_another_vehicle_is_refused(store: Store, registry: Vehicles) -> None:
    registry.register(vin="YV1ZW72U5N7654321", owner_name="B", market="SE",
                      purchase_date=dt.date(2022, 3, 1), actor="import:dms")
    trigger(store, registry)
    with pytest.raises(ValidationError) as info:
        on_alarm_triggered(store=store, vehicles=registry, vin="YV1ZW72U5N7654321",
                           event_id="alarm-1", occurred_at=T0, now=T0)
    assert set(info.value.errors) == {"event_id"}
    assert count(store) == 3


def test_no_sms_without_a_registered_phone(store: Store, registry: Vehicles) -> None:
    registry.register(vin="YV1ZW72U5N7654321", owner_name="B", market="SE",
                      purchase_date=dt.date(2022, 3, 1), actor="import:dms")
    rows = on_alarm_triggered(store=store, vehicles=registry, vin="YV1ZW72U5N7654321",
                              event_id="alarm-9", occurred_at=T0, now=T0)
    assert sorted(r["kind"] for r in rows) == ["escalation", "push"]


def test_unknown_vehicle_is_refused(store: Store, registry: Vehicles) -> None:
    with pytest.raises(UnknownVehicleError):
        on_alarm_triggered(store=store, vehicles=registry, vin="YV1ZW72U5N0000000",
                           event_id="alarm-1", occurred_at=T0, now=T0)
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
    rows = {r["kind"]: r for r in trigger(store, registry)}
    assert mark_sent(store, int(rows["sms"]["id"]), now=T0 + dt.timedelta(seconds=3))
    cancelled = on_alarm_disarmed(store=store, vin=VIN, event_id="disarm-1",
                                  now=T0 + dt.timedelta(minutes=2), reason=DISARMED)
    assert sorted(r["kind"] for r in cancelled) == ["escalation", "push"]
    after = {r["kind"]: r for r in notifications_for(store, VIN)}
    assert after["sms"]["status"] == "sent"
    assert after["sms"]["sent_at"] == T0 + dt.timedelta(seconds=3)
    assert after["sms"]["cancelled_at"] is None and after["sms"]["cancel_reason"] is None
    assert after["push"]["status"] == "cancelled"
    # a sender that finishes after the disarm cannot flip a cancelled row to sent
    assert mark_sent(store, int(rows["push"]["id"])) is False
    assert notifications_for(store, VIN)[1]["status"] == "cancelled"


def test_disarm_with_nothing_pending_is_still_audited(store: Store, registry: Vehicles) -> None:
    assert on_alarm_disarmed(store=store, vin=VIN, event_id="d-0", now=T0,
                             reason=DISARMED) == []
    assert registry.audit_for(VIN)[-1].detail["cancelled"] == []
    with pytest.raises(ValidationError):
        on_alarm_disarmed(store=store, vin=VIN, event_id="d-1", now=T0, reason=" ")


def test_pending_only_returns_due_rows(store: Store, registry: Vehicles) -> None:
    trigger(store, registry)
    due_now = pending_notifications(store, now=T0, limit=10)
    assert sorted(r["kind"] for r in due_now) == ["push", "sms"]
    due_later = pending_notifications(store, now=T0 + dt.timedelta(minutes=10), limit=10)
    assert [r["kind"] for r in due_later][-1] == "escalation" and len(due_later) == 3
    assert len(pending_notifications(store, now=T0 + dt.timedelta(hours=1), limit=1)) == 1


def test_transient_failure_retries_then_gives_up(store: Store, registry: Vehicles) -> None:
    sms = next(r for r in trigger(store, registry) if r["kind"] == "sms")
    sms_id = int(sms["id"])
    row = mark_failed(store, sms_id, "timeout", permanent=False, now=T0, max_attempts=2)
    assert row is not None
    assert (row["status"], row["attempts"], row["last_error"]) == ("pending", 1, "timeout")
    assert row["due_at"] == T0 + dt.timedelta(minutes=1)
    assert sms_id not in {r["id"] for r in pending_notifications(store, now=T0, limit=10)}
    row = mark_failed(store, sms_id, "timeout", permanent=False, now=T0 + dt.timedelta(minutes=1),
                      max_attempts=2)
    assert row is not None and (row["status"], row["attempts"]) == ("failed", 2)
    assert mark_failed(store, sms_id, "late", permanent=False) is None


def test_permanent_failure_fails_at_once(store: Store, registry: Vehicles) -> None:
    push = next(r for r in trigger(store, registry) if r["kind"] == "push")
    row = mark_failed(store, int(push["id"]), "x" * 900, permanent=True, now=T0)
    assert row is not None and row["status"] == "failed" and len(row["last_error"]) == 500
    cancelled = on_alarm_disarmed(store=store, vin=VIN, event_id="d", now=T0, reason=DISARMED)
    assert sorted(r["kind"] for r in cancelled) == ["escalation", "sms"]
