"""Every car command through the one path (:mod:`gateway.owners.car_commands`), against a
real HTTP car (``FakeCarCommands`` on 127.0.0.1) through the real
:class:`VehicleCommandClient` and the durable queue, over a real database.

For each of immobilise, reactivate, unlock, start_tracking and stop_tracking: confirmed
at once; accepted, then the car's ``command_result``; rejected, then sent again under a
new key; unreachable, then retried by the worker and confirmed exactly once; invalid
input sends nothing.  Time for backoff and budgets is a hand-driven clock.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa

from gateway import theft
from gateway.adapters.vehicle_commands import VehicleCommandClient
from gateway.commands import CommandQueue, vehicle_commands
from gateway.errors import ValidationError
from gateway.owners import PinHasher, UnknownVehicleError, Vehicles
from gateway.owners.car_commands import (
    WORKER_GRACE_S,
    AlreadyTrackingError,
    CarCommands,
    CommandRequest,
    CommandServiceMissingError,
    apply_settled,
    command_view,
)
from gateway.store import Store
from tests.conftest import Clock
from tests.support.commands import CONFIRM_S, car_client, queue_builder, sqlite_store
from tests.support.fake_servers import FakeCarCommands

VIN = "WBA3A5C51CF256001"
OTHER_VIN = "WBA3A5C51CF256002"
PIN = "4711"
AGENT = "agent:a-1"
IVR = "ivr:CAowner1"


@pytest.fixture
def store(tmp_path: Any) -> Iterator[Store]:
    with sqlite_store(tmp_path / "car_commands.sqlite3") as store:
        yield store


@pytest.fixture
def car() -> Iterator[FakeCarCommands]:
    with FakeCarCommands(mode="confirm", slow_s=5.0) as fake:
        yield fake


@pytest.fixture
def client(car: FakeCarCommands) -> Iterator[VehicleCommandClient]:
    with car_client(car.url, attempts=2) as c:
        yield c


@pytest.fixture
def registry(store: Store, clock: Clock) -> Vehicles:
    registry = Vehicles(store, PinHasher(n=2**8), clock=clock)
    for vin in (VIN, OTHER_VIN):
        registry.register(vin=vin, owner_name="Owner", market="DE",
                          purchase_date=dt.date(2024, 1, 1), actor="test", pin=PIN,
                          owner_phone=None)
    return registry


@pytest.fixture
def queue(store: Store, client: VehicleCommandClient, clock: Clock) -> CommandQueue:
    return queue_builder(store, client, clock)(on_settled=apply_settled)


@pytest.fixture
def service(queue: CommandQueue, registry: Vehicles) -> CarCommands:
    return CarCommands(queue, registry, wait_s=0.3)


# -- the five commands, as a table ----------------------------------------------------


@dataclass(frozen=True)
class Case:
    #: puts the vehicle in the state the command changes
    setup: Callable[[Vehicles], Any]
    #: asks for the command; the request
    request: Callable[[CarCommands], CommandRequest]
    #: True once the command's effect is in the registry (unlock: audited)
    done: Callable[[Vehicles], bool]
    #: the audit action of the confirmation
    action: str
    #: the body the car receives
    body: dict[str, Any]


def _reactivate(service: CarCommands) -> CommandRequest:
    result = service.reactivate(VIN, actor=IVR, pin=PIN)
    assert result.ok and result.request is not None
    assert result.vehicle.vin == VIN and result.vehicle.immobilised  # as it was asked
    return result.request


def _vehicle(registry: Vehicles) -> Any:
    vehicle = registry.get(VIN)
    assert vehicle is not None
    return vehicle


def _actions(registry: Vehicles) -> list[str]:
    return [e.action for e in registry.audit_for(VIN)]


CASES = {
    "immobilise": Case(
        setup=lambda r: None,
        request=lambda s: s.immobilise(VIN, actor=AGENT, authority_reference=" POL-1 "),
        done=lambda r: bool(_vehicle(r).immobilised), action="immobilise",
        body={"command": "immobilise", "authority_reference": "POL-1"}),
    "reactivate": Case(
        setup=lambda r: r.immobilise(VIN, actor=AGENT, authority_reference="POL-1"),
        request=_reactivate, done=lambda r: not _vehicle(r).immobilised,
        action="reactivate", body={"command": "reactivate"}),
    "unlock": Case(
        setup=lambda r: None,
        request=lambda s: s.unlock(VIN, actor=IVR, call="CAowner1", relock_after_s=90),
        done=lambda r: "unlock" in _actions(r), action="unlock",
        body={"command": "unlock", "relock_after_s": 90}),
    "start_tracking": Case(
        setup=lambda r: None,
        request=lambda s: s.start_tracking(VIN, actor=AGENT, police_reference="P-1"),
        done=lambda r: bool(_vehicle(r).tracking), action="tracking_started",
        body={"command": "start_tracking"}),
    "stop_tracking": Case(
        setup=lambda r: r.start_tracking(VIN, actor=AGENT, police_reference="P-1"),
        request=lambda s: s.stop_tracking(VIN, actor=AGENT, reason="found"),
        done=lambda r: not _vehicle(r).tracking, action="tracking_stopped",
        body={"command": "stop_tracking"}),
}
ALL = pytest.mark.parametrize("name", list(CASES))
RETRIED = pytest.mark.parametrize("name", [n for n in CASES if n != "unlock"])


def wire(car: FakeCarCommands, name: str) -> list[dict[str, Any]]:
    return [c for c in car.commands if (c["body"] or {}).get("command") == name]


def rows(store: Store) -> list[dict[str, Any]]:
    with store.begin() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(vehicle_commands))]


def now_of(clock: Clock) -> dt.datetime:
    return dt.datetime.fromtimestamp(clock(), tz=dt.UTC)


#: what each confirmation writes: (registry fields, the audit entry's detail)
RECORDED: dict[str, Callable[[str], tuple[dict[str, Any], dict[str, Any]]]] = {
    "immobilise": lambda key: (
        {"immobilised": True, "immobilised_by": AGENT, "immobilised_reference": "POL-1"},
        {"key": key, "authority_reference": "POL-1", "changed": True}),
    "reactivate": lambda key: (
        {"immobilised": False, "reactivated_by": IVR, "immobilised_reference": "POL-1"},
        {"key": key, "changed": True}),
    "unlock": lambda key: ({"immobilised": False, "tracking": False}, {"key": key}),
    "start_tracking": lambda key: (
        {"tracking": True, "tracking_started_by": AGENT, "tracking_police_reference": "P-1"},
        {"police_reference": "P-1", "changed": True}),
    "stop_tracking": lambda key: (
        {"tracking": False, "tracking_police_reference": "P-1"}, {"reason": "found"}),
}


@ALL
def test_the_confirmation_records_who_what_and_when(
        name: str, service: CarCommands, registry: Vehicles, clock: Clock) -> None:
    case = CASES[name]
    case.setup(registry)
    clock.advance(30)
    sent = case.request(service)
    fields, detail = RECORDED[name](str(sent.row["key"]))
    vehicle = _vehicle(registry)
    assert {k: getattr(vehicle, k) for k in fields} == fields
    at = {"immobilise": vehicle.immobilised_at, "reactivate": vehicle.reactivated_at,
          "start_tracking": vehicle.tracking_started_at}.get(name, now_of(clock))
    assert at == now_of(clock)
    entry = registry.audit_for(VIN)[-1]
    assert (entry.action, entry.actor) == (case.action, IVR if name in (
        "reactivate", "unlock") else AGENT)
    if name.endswith("tracking"):  # written by gateway.theft, with its own fields
        assert {k: entry.detail.get(k) for k in detail} == detail
    else:
        assert entry.detail == detail
    assert entry.at == now_of(clock)
    assert (vehicle.updated_at == now_of(clock)) is (name != "unlock")  # unlock: no state
    other = registry.get(OTHER_VIN)
    assert other is not None and other.updated_at < now_of(clock)  # another car: untouched
    requested = [e for e in registry.audit_for(VIN) if e.action == f"{name}_requested"]
    assert requested[0].detail["key"] == sent.row["key"]
    assert sent.vehicle == vehicle  # the request answers the vehicle as it is now


def test_a_confirmation_changes_only_its_own_car(
        service: CarCommands, registry: Vehicles) -> None:
    registry.immobilise(OTHER_VIN, actor=AGENT, authority_reference="POL-9")
    registry.immobilise(VIN, actor=AGENT, authority_reference="POL-1")
    assert _reactivate(service).status == "confirmed"
    assert registry.get(OTHER_VIN).immobilised  # type: ignore[union-attr]
    assert service.immobilise(VIN, actor=AGENT, authority_reference="POL-2").status == (
        "confirmed")
    service.reactivate(OTHER_VIN, actor=IVR, pin=PIN)
    assert _vehicle(registry).immobilised


def test_a_request_leaves_other_commands_schedule_alone(
        service: CarCommands, registry: Vehicles, car: FakeCarCommands,
        queue: CommandQueue) -> None:
    car.mode = "503"
    other = service.immobilise(OTHER_VIN, actor=AGENT, authority_reference="P")
    assert other.status == "pending"
    car.mode = "confirm"
    service.immobilise(VIN, actor=AGENT, authority_reference="P")
    assert queue.get(str(other.row["key"]))["next_attempt_at"] == (  # type: ignore[index]
        other.row["next_attempt_at"])


def test_a_report_confirms_the_command_it_names(
        service: CarCommands, registry: Vehicles, car: FakeCarCommands) -> None:
    car.mode = "up"
    first = service.unlock(VIN, actor=IVR, call="CA1", relock_after_s=5)
    second = service.immobilise(VIN, actor=AGENT, authority_reference="P")
    done = service.command_result(VIN, key=str(second.row["key"]), command_id=None, ok=True,
                                  detail=None)
    assert done is not None and done["id"] == second.row["id"]
    assert queue_status(service, first) == "sent" and _vehicle(registry).immobilised


def queue_status(service: CarCommands, sent: CommandRequest) -> str:
    row = service.queue.get(str(sent.row["key"]))
    assert row is not None
    return str(row["status"])


def test_a_cancelled_unlock_is_sent_again_when_the_owner_asks_again(
        service: CarCommands, car: FakeCarCommands) -> None:
    car.mode = "503"
    cancelled = service.unlock(VIN, actor=IVR, call="CA1", relock_after_s=5)
    assert cancelled.status == "cancelled"
    car.mode = "confirm"
    again = service.unlock(VIN, actor=IVR, call="CA1", relock_after_s=5)
    assert again.status == "confirmed"
    assert again.row["key"] == f"{cancelled.row['key']}#{cancelled.row['id']}"


def test_a_confirmation_for_the_car_changes_nothing_else(
        service: CarCommands, registry: Vehicles) -> None:
    registry.start_tracking(VIN, actor=AGENT, police_reference="P-1")
    for sent in (service.immobilise(VIN, actor=AGENT, authority_reference="POL-1"),
                 service.unlock(VIN, actor=IVR, call="CA1", relock_after_s=5),
                 _reactivate(service)):
        assert sent.status == "confirmed"
        assert _vehicle(registry).tracking  # only a stop_tracking stops it


def test_rows_not_made_by_this_path_are_left_alone(
        service: CarCommands, registry: Vehicles, queue: CommandQueue, clock: Clock) -> None:
    queue.enqueue(key="raw:1", command="immobilise", vin=VIN, msisdn=None, params={})
    queue.enqueue(key="raw:2", command="flash_lights", vin=VIN, msisdn=None,
                  params={"_gateway": {"actor": AGENT, "episode": None}})
    assert queue.run_once() == 2
    assert queue.get("raw:1")["status"] == "confirmed"  # type: ignore[index]
    assert queue.get("raw:2")["status"] == "confirmed"  # type: ignore[index]
    assert not _vehicle(registry).immobilised
    assert _actions(registry) == ["register"]


def test_episode_markers_and_keys() -> None:
    from gateway.owners.car_commands import episode_marker

    cest = dt.timezone(dt.timedelta(hours=2))
    at = dt.datetime(2026, 5, 1, 12, 0, tzinfo=cest)
    assert episode_marker({"reactivated_at": at}, "immobilise") == "2026-05-01T10:00:00+00:00"
    assert episode_marker({"reactivated_at": None}, "immobilise") == "first"
    naive = dt.datetime(2026, 5, 1, 12, 0)  # SQLite: naive, stored as UTC
    assert episode_marker({"immobilised_at": naive}, "reactivate") == "2026-05-01T12:00:00+00:00"


@ALL
def test_confirmed_at_once_changes_the_state_once(
        name: str, service: CarCommands, registry: Vehicles, car: FakeCarCommands,
        queue: CommandQueue) -> None:
    case = CASES[name]
    case.setup(registry)
    assert not case.done(registry)
    sent = case.request(service)
    assert sent.status == "confirmed" and sent.created
    assert case.done(registry)
    [request] = wire(car, name)
    assert request["body"] == case.body  # the gateway's notes never reach the car
    assert request["idempotency_key"] == sent.row["key"]
    assert sent.row["key"] == {"unlock": f"unlock:{VIN}:CAowner1",
                               "immobilise": f"immobilise:{VIN}:first",
                               "start_tracking": f"start_tracking:{VIN}:first"}.get(
        name, sent.row["key"])
    assert sent.row["key"].startswith(f"{name}:{VIN}:")
    actions = _actions(registry)
    assert actions.count(f"{name}_requested") == 1 and actions.count(case.action) == 1
    assert actions.index(f"{name}_requested") < actions.index(case.action)
    assert service.unfinished(VIN) == []
    assert queue.run_once() == 0 and len(wire(car, name)) == 1  # nothing left to send


def test_a_repeated_request_sends_nothing_twice(service: CarCommands, registry: Vehicles,
                                                car: FakeCarCommands) -> None:
    first = service.immobilise(VIN, actor=AGENT, authority_reference="POL-1")
    again = service.immobilise(VIN, actor="agent:b-2", authority_reference="POL-2")
    assert again.row["key"] == first.row["key"] and not again.created
    assert again.status == "confirmed" and len(wire(car, "immobilise")) == 1
    assert _vehicle(registry).immobilised_reference == "POL-1"
    unlock = service.unlock(VIN, actor=IVR, call="CA1", relock_after_s=30)
    assert service.unlock(VIN, actor=IVR, call="CA1", relock_after_s=30).row == unlock.row
    assert len(wire(car, "unlock")) == 1
    service.unlock(VIN, actor=IVR, call="CA2", relock_after_s=30)  # another call
    assert len(wire(car, "unlock")) == 2
    registry.start_tracking(VIN, actor=AGENT, police_reference="P-1")
    with pytest.raises(AlreadyTrackingError):
        service.start_tracking(VIN, actor=AGENT, police_reference="P-1")
    assert wire(car, "start_tracking") == []


@ALL
def test_accepted_waits_for_the_cars_command_result(
        name: str, service: CarCommands, registry: Vehicles, car: FakeCarCommands,
        queue: CommandQueue) -> None:
    case = CASES[name]
    case.setup(registry)
    car.mode = "up"  # the command service takes it: "accepted"
    sent = case.request(service)
    assert sent.status == "sent" and not case.done(registry)
    [shown] = service.unfinished(VIN)
    assert (shown["command"], shown["status"], shown["attempts"]) == (name, "sent", 1)
    assert shown["command_id"] == "cmd-1" and shown["next_attempt_at"] is None
    assert queue.run_once() == 0  # sent rows wait for the car; never re-sent
    assert service.command_result(OTHER_VIN, key=str(sent.row["key"]), command_id=None,
                                  ok=True, detail=None) is None  # another car's report
    assert not case.done(registry)

    done = service.command_result(VIN, key=None, command_id="cmd-1", ok=True, detail="done")
    assert done is not None and done["status"] == "confirmed"
    assert done["result"] == {"status": "executed", "source": "command_result",
                              "command_id": "cmd-1", "detail": "done"}
    assert case.done(registry) and service.unfinished(VIN) == []
    replay = service.command_result(VIN, key=str(sent.row["key"]), command_id=None, ok=True,
                                    detail="done")
    assert replay is not None and command_view(replay) == command_view(done)
    late_no = service.command_result(VIN, key=str(sent.row["key"]), command_id=None,
                                     ok=False, detail="x")
    assert late_no is not None and late_no["status"] == "confirmed"  # settled stays
    assert _actions(registry).count(case.action) == 1
    assert len(wire(car, name)) == 1


UNCONFIRMED = f"not confirmed by the car within {CONFIRM_S}s"


@ALL
def test_a_command_the_car_never_confirms_fails_and_its_late_report_still_applies(
        name: str, service: CarCommands, registry: Vehicles, car: FakeCarCommands,
        queue: CommandQueue, clock: Clock) -> None:
    case = CASES[name]
    case.setup(registry)
    car.mode = "up"  # taken by the command service; the car's report does not come
    sent = case.request(service)
    key = str(sent.row["key"])
    assert sent.status == "sent" and not case.done(registry)
    clock.advance(CONFIRM_S)
    assert queue.run_once() == 0 and [c["key"] for c in service.unfinished(VIN)] == [key]
    clock.advance(1)
    assert queue.run_once() == 1
    assert queue_status(service, sent) == "failed" and not case.done(registry)
    assert service.unfinished(VIN) == []
    entry = registry.audit_for(VIN)[-1]
    assert (entry.action, entry.detail, entry.at) == (
        f"{name}_failed", {"key": key, "error": UNCONFIRMED}, now_of(clock))

    clock.advance(30)  # the car did execute it; its command_result comes late
    late = service.command_result(VIN, key=None, command_id="cmd-1", ok=True, detail="done")
    assert late is not None and late["status"] == "confirmed" and late["last_error"] is None
    assert case.done(registry)  # the registry ends as the car reports
    fields, detail = RECORDED[name](key)
    vehicle = _vehicle(registry)
    assert {k: getattr(vehicle, k) for k in fields} == fields
    entry = registry.audit_for(VIN)[-1]
    assert (entry.action, entry.at) == (case.action, now_of(clock))
    assert {k: entry.detail.get(k) for k in detail} == detail
    assert service.unfinished(VIN) == []

    audit, clock_then = registry.audit_for(VIN), now_of(clock)
    clock.advance(5)  # replays of the late report change nothing
    for ok in (True, False, True):
        again = service.command_result(VIN, key=key, command_id=None, ok=ok, detail="again")
        assert again is not None and command_view(again) == command_view(late)
    assert registry.audit_for(VIN) == audit and _vehicle(registry) == vehicle
    assert _actions(registry).count(case.action) == 1
    assert vehicle.updated_at <= clock_then
    clock.advance(3600)
    assert queue.run_once() == 0 and len(wire(car, name)) == 1  # never sent again


def test_a_request_after_an_unconfirmed_reactivation_sends_it_again(
        service: CarCommands, registry: Vehicles, car: FakeCarCommands, queue: CommandQueue,
        clock: Clock) -> None:
    """While a reactivation is ``sent`` a repeated request sends nothing; once it has
    failed for want of the car's report the owner's next request is sent again, under a
    new key; the late report of the first and the report of the second reactivate once."""
    registry.immobilise(VIN, actor=AGENT, authority_reference="POL-1")
    car.mode = "up"
    first = _reactivate(service)
    assert first.status == "sent"
    clock.advance(60)
    waiting = _reactivate(service)  # within the window: the same row, nothing sent
    assert waiting.row["key"] == first.row["key"] and waiting.status == "sent"
    assert len(wire(car, "reactivate")) == 1
    clock.advance(CONFIRM_S)
    assert queue.run_once() == 1 and queue_status(service, first) == "failed"
    second = _reactivate(service)
    assert second.status == "sent" and second.created
    assert second.row["key"] == f"{first.row['key']}#{first.row['id']}"
    assert [c["idempotency_key"] for c in wire(car, "reactivate")] == [
        first.row["key"], second.row["key"]]
    late = service.command_result(VIN, key=str(first.row["key"]), command_id=None, ok=True,
                                  detail=None)
    assert late is not None and late["status"] == "confirmed"
    reactivated = _vehicle(registry)
    assert not reactivated.immobilised and reactivated.reactivated_by == IVR
    clock.advance(10)
    done = service.command_result(VIN, key=str(second.row["key"]), command_id=None, ok=True,
                                  detail=None)
    assert done is not None and done["status"] == "confirmed"
    assert _vehicle(registry) == reactivated  # reactivated once
    assert [(e.action, e.detail.get("changed")) for e in registry.audit_for(VIN)
            if e.action == "reactivate"] == [("reactivate", True), ("reactivate", False)]


@pytest.mark.postgres
def test_postgres_a_late_report_after_the_window_reactivates(
        pg_store: Store, client: VehicleCommandClient, car: FakeCarCommands,
        clock: Clock) -> None:
    registry = Vehicles(pg_store, PinHasher(n=2**8), clock=clock)
    registry.register(vin=VIN, owner_name="Owner", market="DE",
                      purchase_date=dt.date(2024, 1, 1), actor="test", pin=PIN,
                      owner_phone=None)
    registry.immobilise(VIN, actor=AGENT, authority_reference="POL-1")
    queue = queue_builder(pg_store, client, clock)(on_settled=apply_settled)
    service = CarCommands(queue, registry, wait_s=0.3)
    car.mode = "up"
    sent = _reactivate(service)
    key = str(sent.row["key"])
    clock.advance(CONFIRM_S + 1)
    other = queue_builder(pg_store, client, clock)(on_settled=apply_settled)
    assert queue.run_once() + other.run_once() == 1
    assert queue_status(service, sent) == "failed" and _vehicle(registry).immobilised
    assert _actions(registry)[-1] == "reactivate_failed"
    clock.advance(30)
    late = service.command_result(VIN, key=None, command_id="cmd-1", ok=True, detail=None)
    assert late is not None and late["status"] == "confirmed"
    vehicle = _vehicle(registry)
    assert not vehicle.immobilised and vehicle.reactivated_at == now_of(clock)
    assert service.command_result(VIN, key=key, command_id=None, ok=True, detail=None) == late
    assert _actions(registry)[-2:] == ["reactivate_failed", "reactivate"]
    assert _vehicle(registry) == vehicle


@ALL
def test_the_car_reports_failure(name: str, service: CarCommands, registry: Vehicles,
                                 car: FakeCarCommands) -> None:
    case = CASES[name]
    case.setup(registry)
    car.mode = "up"
    sent = case.request(service)
    failed = service.command_result(VIN, key=str(sent.row["key"]), command_id=None, ok=False,
                                    detail="door open")
    assert failed is not None and failed["status"] == "failed"
    assert failed["last_error"] == "car reported failure: door open"
    assert failed["result"] == {"status": "failed", "source": "command_result",
                                "command_id": "cmd-1", "reason": "door open"}
    assert not case.done(registry)
    entry = registry.audit_for(VIN)[-1]
    assert (entry.action, entry.detail) == (f"{name}_failed", {
        "key": sent.row["key"], "error": "car reported failure: door open"})


@ALL
def test_rejected_then_a_new_request_is_sent_again(
        name: str, service: CarCommands, registry: Vehicles, car: FakeCarCommands) -> None:
    case = CASES[name]
    case.setup(registry)
    car.mode = "reject"
    refused = case.request(service)
    assert refused.status == "failed" and "vehicle is moving" in refused.row["last_error"]
    assert not case.done(registry)
    entry = registry.audit_for(VIN)[-1]
    assert (entry.action, entry.detail) == (f"{name}_failed", {
        "key": refused.row["key"], "error": refused.row["last_error"]})
    car.mode = "confirm"
    done = case.request(service)
    assert done.status == "confirmed" and case.done(registry)
    assert done.row["key"] == f"{refused.row['key']}#{refused.row['id']}"
    assert [c["idempotency_key"] for c in wire(car, name)] == [refused.row["key"],
                                                                done.row["key"]]


@RETRIED
def test_unreachable_then_the_worker_confirms_it_exactly_once(
        name: str, service: CarCommands, registry: Vehicles, car: FakeCarCommands,
        queue: CommandQueue, clock: Clock) -> None:
    case = CASES[name]
    case.setup(registry)
    car.mode = "503"
    sent = case.request(service)
    assert sent.status == "pending" and not case.done(registry)
    assert "503" in sent.row["last_error"]
    [shown] = service.unfinished(VIN)
    assert shown["status"] == "pending" and shown["next_attempt_at"] is not None
    assert (shown["id"], shown["key"], shown["last_error"]) == (
        sent.row["id"], sent.row["key"], sent.row["last_error"])
    assert set(shown) == {"id", "key", "command", "status", "attempts", "last_error",
                          "created_at", "updated_at", "next_attempt_at", "command_id"}
    assert shown["created_at"] == now_of(clock).isoformat() == shown["updated_at"]
    assert service.unfinished(OTHER_VIN) == []
    assert service.command_result(VIN, key=None, command_id="cmd-1", ok=True,
                                  detail=None) is None  # no answer yet: no command_id
    assert queue.run_once() == 0  # backoff: not due yet
    clock.advance(2)
    assert queue.run_once() == 1 and not case.done(registry)  # still down
    car.mode = "confirm"
    clock.advance(5)
    assert queue.run_once() == 1
    assert case.done(registry) and service.unfinished(VIN) == []
    assert _actions(registry).count(case.action) == 1
    assert {c["idempotency_key"] for c in wire(car, name)} == {sent.row["key"]}
    executed = [k for k, c in car.unique_commands.items() if c["body"]["command"] == name]
    assert executed == [sent.row["key"]]
    clock.advance(60)
    assert queue.run_once() == 0


def test_a_new_request_sends_a_pending_command_at_once(
        service: CarCommands, registry: Vehicles, car: FakeCarCommands) -> None:
    registry.immobilise(VIN, actor=AGENT, authority_reference="POL-1")
    car.mode = "503"
    assert _reactivate(service).status == "pending"
    car.mode = "confirm"
    again = _reactivate(service)  # not due for the worker yet: this request sends it
    assert again.status == "confirmed" and not again.created
    assert not _vehicle(registry).immobilised
    assert len({c["idempotency_key"] for c in wire(car, "reactivate")}) == 1


def test_a_command_the_worker_holds_is_not_sent_by_the_request(
        service: CarCommands, registry: Vehicles, car: FakeCarCommands,
        queue: CommandQueue) -> None:
    registry.immobilise(VIN, actor=AGENT, authority_reference="POL-1")
    car.mode = "503"
    pending = _reactivate(service)
    before = len(wire(car, "reactivate"))
    held = queue.claim_key(str(pending.row["key"]))  # the worker is sending it right now
    assert held is not None
    car.mode = "confirm"
    started = time.monotonic()
    waited = _reactivate(service)
    assert time.monotonic() - started < 2.0  # waited wait_s (0.3 s) for the worker, no more
    assert waited.status == "pending" and len(wire(car, "reactivate")) == before
    assert queue.handle(held) == "confirmed"  # the worker's send settles it
    assert not _vehicle(registry).immobilised
    assert len(wire(car, "reactivate")) == before + 1


def test_out_of_budget_fails_and_is_audited(service: CarCommands, registry: Vehicles,
                                            car: FakeCarCommands, queue: CommandQueue,
                                            clock: Clock) -> None:
    registry.immobilise(VIN, actor=AGENT, authority_reference="POL-1")
    car.mode = "503"
    _reactivate(service)
    clock.advance(61)
    assert queue.run_once() == 1  # expired, not sent
    assert _vehicle(registry).immobilised
    assert _actions(registry)[-1] == "reactivate_failed"
    assert service.unfinished(VIN) == []


def test_an_unlock_the_car_did_not_take_is_never_sent_later(
        service: CarCommands, registry: Vehicles, car: FakeCarCommands, queue: CommandQueue,
        clock: Clock) -> None:
    car.mode = "503"
    sent = service.unlock(VIN, actor=IVR, call="CA1", relock_after_s=90)
    assert sent.status == "cancelled" and sent.created and sent.vehicle.vin == VIN
    before = len(wire(car, "unlock"))
    car.mode = "confirm"
    clock.advance(WORKER_GRACE_S + 60)
    assert queue.run_once() == 0 and len(wire(car, "unlock")) == before
    assert "unlock" not in _actions(registry)
    entry = registry.audit_for(VIN)[-1]
    assert entry.action == "unlock_failed"
    assert entry.detail == {"key": sent.row["key"], "cancelled": True,
                            "error": sent.row["last_error"]}
    assert "503" in sent.row["last_error"]


def test_a_confirmation_from_an_earlier_episode_changes_nothing(
        service: CarCommands, registry: Vehicles, car: FakeCarCommands,
        store: Store, clock: Clock) -> None:
    car.mode = "up"
    old = service.start_tracking(VIN, actor=AGENT, police_reference="P-1")
    assert old.status == "sent"
    # meanwhile a session was started and stopped some other way
    registry.start_tracking(VIN, actor=AGENT, police_reference="P-0")
    clock.advance(10)
    theft.stop_tracking(store, vin=VIN, actor=AGENT, reason=None,
                        now=dt.datetime.fromtimestamp(clock(), tz=dt.UTC))
    done = service.command_result(VIN, key=str(old.row["key"]), command_id=None, ok=True,
                                  detail=None)
    assert done is not None and done["status"] == "confirmed"
    assert not _vehicle(registry).tracking
    entry = registry.audit_for(VIN)[-1]
    assert entry.action == "tracking_started"
    assert entry.detail == {"key": old.row["key"], "changed": False, "stale": True}


# -- nothing is sent for invalid input ---------------------------------------------------


INVALID: dict[str, tuple[Callable[[CarCommands], Any], type[Exception], set[str] | None]] = {
    "blank reference": (lambda s: s.immobilise(VIN, actor=AGENT, authority_reference=" "),
                        ValidationError, {"authority_reference"}),
    "long reference": (lambda s: s.immobilise(VIN, actor=AGENT,
                                              authority_reference="x" * 101),
                       ValidationError, {"authority_reference"}),
    "no actor": (lambda s: s.immobilise(VIN, actor=" ", authority_reference="P"),
                 ValidationError, {"actor"}),
    "unknown car": (lambda s: s.immobilise("WBA3A5C51CF256999", actor=AGENT,
                                           authority_reference="P"),
                    UnknownVehicleError, None),
    "police reference": (lambda s: s.start_tracking(VIN, actor=AGENT, police_reference=""),
                         ValidationError, {"police_reference"}),
    "not tracking": (lambda s: s.stop_tracking(VIN, actor=AGENT, reason=None),
                     theft.NotTrackingError, None),
    "no call": (lambda s: s.unlock(VIN, actor=IVR, call="", relock_after_s=90),
                ValidationError, {"call"}),
    "long call": (lambda s: s.unlock(VIN, actor=IVR, call="C" * 65, relock_after_s=90),
                  ValidationError, {"call"}),
    "no relock": (lambda s: s.unlock(VIN, actor=IVR, call="CA1", relock_after_s=0),
                  ValidationError, {"relock_after_s"}),
}
MESSAGES = {"call": "required, at most 64 characters",
            "relock_after_s": "a positive whole number of seconds"}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_input_records_and_sends_nothing(
        case: str, service: CarCommands, registry: Vehicles, car: FakeCarCommands,
        store: Store) -> None:
    call, error, fields = INVALID[case]
    before = _actions(registry)
    with pytest.raises(error) as info:
        call(service)
    if fields is not None:
        assert set(info.value.errors) == fields  # type: ignore[attr-defined]
        for field in fields & set(MESSAGES):
            assert info.value.errors[field] == MESSAGES[field]  # type: ignore[attr-defined]
    if error in (UnknownVehicleError, theft.NotTrackingError):
        assert info.value.vin in (VIN, "WBA3A5C51CF256999")  # type: ignore[attr-defined]
    assert car.commands == [] and rows(store) == [] and _actions(registry) == before


@pytest.mark.parametrize("pin", ["0000", "12ab", "４７１１", ""])
def test_a_wrong_or_malformed_pin_sends_nothing(
        pin: str, service: CarCommands, registry: Vehicles, car: FakeCarCommands,
        store: Store) -> None:
    registry.immobilise(VIN, actor=AGENT, authority_reference="POL-1")
    result = service.reactivate(VIN, actor=IVR, pin=pin)
    assert not result.ok and result.request is None and result.check.outcome == "wrong"
    assert car.commands == [] and rows(store) == [] and _vehicle(registry).immobilised


def test_the_shortest_relock_and_the_longest_call_are_taken(
        service: CarCommands, car: FakeCarCommands) -> None:
    sent = service.unlock(VIN, actor=IVR, call="C" * 64, relock_after_s=1)
    assert sent.status == "confirmed"
    assert wire(car, "unlock")[0]["body"] == {"command": "unlock", "relock_after_s": 1}


def test_already_tracking_says_which_car(service: CarCommands, registry: Vehicles) -> None:
    registry.start_tracking(VIN, actor=AGENT, police_reference="P-1")
    with pytest.raises(AlreadyTrackingError, match=f"vehicle {VIN} is being tracked"):
        service.start_tracking(VIN, actor=AGENT, police_reference="P-2")


def test_not_immobilised_sends_nothing(service: CarCommands, car: FakeCarCommands,
                                       store: Store) -> None:
    result = service.reactivate(VIN, actor=IVR, pin=PIN)
    assert result.ok and result.request is None and not result.vehicle.immobilised
    assert result.vehicle.vin == VIN
    assert car.commands == [] and rows(store) == []


def test_no_command_service_sends_nothing(store: Store, registry: Vehicles,
                                          clock: Clock) -> None:
    service = CarCommands(CommandQueue(store, None, clock=clock, on_settled=apply_settled),
                          registry)
    registry.immobilise(VIN, actor=AGENT, authority_reference="POL-1")
    before = _actions(registry)
    with pytest.raises(CommandServiceMissingError, match=r"no vehicle command service is "
                       r"configured \(GATEWAY_VEHICLE_COMMAND_URL\)"):
        service.reactivate(VIN, actor=IVR, pin=PIN)
    assert rows(store) == [] and _actions(registry) == before  # not even a PIN check


def test_immobilising_an_immobilised_car_keeps_the_first_reference(
        service: CarCommands, registry: Vehicles, clock: Clock) -> None:
    registry.immobilise(VIN, actor="agent:first", authority_reference="P-0")
    first_at = _vehicle(registry).immobilised_at
    clock.advance(60)
    sent = service.immobilise(VIN, actor=AGENT, authority_reference="P-1")
    assert sent.status == "confirmed"
    vehicle = _vehicle(registry)
    assert (vehicle.immobilised_by, vehicle.immobilised_reference, vehicle.immobilised_at) == (
        "agent:first", "P-0", first_at)
    assert registry.audit_for(VIN)[-1].detail["changed"] is False


def test_a_second_confirmation_of_one_reactivation_changes_nothing(
        service: CarCommands, registry: Vehicles, car: FakeCarCommands, clock: Clock) -> None:
    registry.immobilise(VIN, actor=AGENT, authority_reference="P-1")
    car.mode = "reject"
    rejected = _reactivate(service)
    car.mode = "up"
    retried = _reactivate(service)
    assert (rejected.status, retried.status) == ("failed", "sent")
    late = service.command_result(VIN, key=str(rejected.row["key"]), command_id=None,
                                  ok=True, detail=None)  # it did execute after all
    assert late is not None and late["status"] == "confirmed"
    reactivated = _vehicle(registry)
    assert not reactivated.immobilised
    clock.advance(60)
    service.command_result(VIN, key=str(retried.row["key"]), command_id=None, ok=True,
                           detail=None)
    again = _vehicle(registry)
    assert (again.reactivated_at, again.updated_at) == (reactivated.reactivated_at,
                                                        reactivated.updated_at)
    entry = registry.audit_for(VIN)[-1]
    assert (entry.action, entry.detail["changed"]) == ("reactivate", False)


def test_a_car_that_hangs_leaves_the_request_pending_in_bounded_time(
        service: CarCommands, registry: Vehicles, car: FakeCarCommands,
        queue: CommandQueue) -> None:
    car.mode = "hang"  # takes the request, never answers
    started = time.monotonic()
    result = service.immobilise(VIN, actor=AGENT, authority_reference="POL-9")
    assert time.monotonic() - started < 3.0  # the client's 1 s budget, not the car's silence
    assert result.status == "pending" and not _vehicle(registry).immobilised
    row = queue.get(str(result.row["key"]))
    assert row is not None and row["status"] == "pending" and row["last_error"]
