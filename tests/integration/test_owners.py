"""The vehicle registry over a real database: PIN lockout, immobiliser, tracking, audit.

Every test runs on SQLite; the ones taking ``store`` also run on PostgreSQL
when GATEWAY_TEST_POSTGRES_URL is set (the ``pg_store`` fixture).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from gateway.commands import CommandQueue
from gateway.errors import StoreError, ValidationError
from gateway.owners import (
    PinHasher,
    UnknownVehicleError,
    Vehicle,
    Vehicles,
    audit,
    pin_failures,
    vehicles,
)
from gateway.owners.car_commands import CarCommands, apply_settled
from gateway.store import Store, metadata
from tests.conftest import Clock, postgres_url
from tests.support.fakes_adapters import RecordingVehicleCommands

VIN = "YV1ZW72U5N1234567"
PIN = "738105"  # distinctive: must never show up in the database or the logs
WRONG = "111111"
LOOKUP = "12345674"
OWNER = "+46701740605"
CAR = "+46701740606"
AGENT = "agent:a-17"
IVR = "ivr:CA0123456789abcdef0123456789abcdef"


def car_commands(registry: Vehicles, clock: Clock) -> CarCommands:
    """Reactivation goes through the command path; the car confirms at once."""
    queue = CommandQueue(registry.store, RecordingVehicleCommands(status="confirmed"),
                         clock=clock, on_settled=apply_settled)
    return CarCommands(queue, registry)


def fast_hasher() -> PinHasher:
    return PinHasher(n=2**8, r=8, p=1)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, str]]:
    """A fresh schema and the URL a second gateway process would use."""
    if request.param == "postgres":
        store: Store = request.getfixturevalue("pg_store")
        url = postgres_url()
        assert url
        yield store, url
        return
    url = f"sqlite:///{tmp_path}/owners.sqlite3"
    store = Store.from_url(url)
    store.create_schema()
    yield store, url
    store.dispose()


@pytest.fixture
def store(db: tuple[Store, str]) -> Store:
    return db[0]


@pytest.fixture
def registry(store: Store, clock: Clock) -> Vehicles:
    return Vehicles(store, fast_hasher(), clock=clock)


def register(registry: Vehicles, **overrides: object) -> Vehicle:
    values: dict[str, object] = {
        "vin": VIN, "owner_name": "Anna Lind", "market": "SE",
        "purchase_date": dt.date(2022, 3, 1), "actor": "import:dms", "owner_phone": OWNER,
        "car_msisdn": CAR, "language": "sv-SE", "lookup_code": LOOKUP, "pin": PIN,
    }
    values.update(overrides)
    return registry.register(**values)  # type: ignore[arg-type]


@pytest.fixture
def car(registry: Vehicles) -> Vehicle:
    return register(registry)


def at(clock: Clock) -> dt.datetime:
    return dt.datetime.fromtimestamp(clock(), tz=dt.UTC)


def actions(registry: Vehicles) -> list[str]:
    return [a.action for a in registry.audit_for(VIN)]


# -- registration and lookup ----------------------------------------------------------


def test_register_and_find_by_each_identifier(registry: Vehicles, car: Vehicle) -> None:
    assert car.has_pin and not car.immobilised and not car.tracking
    assert car.lookup_code == LOOKUP and car.market == "SE"
    assert registry.get(VIN) == car
    assert registry.get(VIN.lower()) == car
    assert registry.by_owner_phone(OWNER) == [car]
    assert registry.by_owner_phone("+46 70 174 06 05") == [car]  # normalised to E.164
    assert registry.by_car_msisdn(CAR) == car
    assert registry.by_lookup_code(LOOKUP) == car
    assert registry.by_lookup_code("12345675") is None  # check digit wrong
    assert registry.by_owner_phone("+46701740607") == []
    assert registry.by_owner_phone("not a number") == []


def test_owner_with_two_cars(registry: Vehicles, car: Vehicle) -> None:
    second = register(registry, vin="YV1ZW72U5N7654321", car_msisdn=None, lookup_code=None)
    assert second.lookup_code != LOOKUP and len(second.lookup_code) == 8
    assert [v.vin for v in registry.by_owner_phone(OWNER)] == [VIN, "YV1ZW72U5N7654321"]


def test_register_names_taken_and_invalid_fields(registry: Vehicles, car: Vehicle) -> None:
    with pytest.raises(ValidationError) as info:
        register(registry, vin="YV1ZW72U5N7654321", lookup_code=None)
    assert set(info.value.errors) == {"car_msisdn"}
    with pytest.raises(ValidationError) as info:
        register(registry, car_msisdn=None, lookup_code=None)
    assert set(info.value.errors) == {"vin"}
    with pytest.raises(ValidationError) as info:
        register(registry, vin="YV1ZW72U5N12345IO", market="se", owner_phone="12", pin="12")
    assert set(info.value.errors) == {"vin", "market", "owner_phone", "pin"}
    assert "12" not in info.value.errors["pin"]
    assert len(registry.by_owner_phone(OWNER)) == 1


# -- PIN and lockout ------------------------------------------------------------------


def test_right_pin_is_ok_and_audited(registry: Vehicles, car: Vehicle) -> None:
    check = registry.verify_pin(VIN, PIN, actor=IVR)
    assert (check.outcome, check.failures, check.locked_until) == ("ok", 0, None)
    entry = registry.audit_for(VIN)[-1]
    assert (entry.action, entry.actor) == ("pin_ok", IVR)


def test_three_wrong_lock_and_a_fourth_correct_is_refused(
    registry: Vehicles, car: Vehicle, clock: Clock
) -> None:
    first = registry.verify_pin(VIN, WRONG, actor=IVR)
    second = registry.verify_pin(VIN, "2222", actor=IVR)
    assert (first.outcome, first.failures, first.locked_until) == ("wrong", 1, None)
    assert (second.outcome, second.failures, second.locked_until) == ("wrong", 2, None)
    third = registry.verify_pin(VIN, "33333333", actor=IVR)
    assert (third.outcome, third.failures) == ("wrong", 3)
    assert third.locked_until == at(clock) + dt.timedelta(minutes=15)

    clock.advance(60)
    fourth = registry.verify_pin(VIN, PIN, actor=IVR)
    assert fourth.outcome == "locked" and not fourth.ok
    assert fourth.locked_until == third.locked_until
    assert fourth.failures == 3
    assert actions(registry)[-4:] == ["pin_wrong", "pin_wrong", "pin_wrong", "pin_locked"]
    trail = registry.audit_for(VIN)
    assert trail[-1].detail == {"failures": 3, "locked_until": third.locked_until.isoformat()}
    assert trail[-2].detail == {"failures": 3, "max_failures": 3,
                                "locked_until": third.locked_until.isoformat()}
    assert trail[-3].detail == {"failures": 2, "max_failures": 3}


def test_a_lock_is_logged_with_the_car_and_the_count(
    registry: Vehicles, car: Vehicle, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.owners"):
        for _ in range(3):
            registry.verify_pin(VIN, WRONG, actor=IVR)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"vehicle {VIN} locked after 3 wrong PIN attempts"]


def test_lock_lifts_after_fifteen_minutes(
    registry: Vehicles, car: Vehicle, clock: Clock
) -> None:
    for _ in range(3):
        registry.verify_pin(VIN, WRONG, actor=IVR)
    clock.advance(15 * 60 - 1)
    assert registry.verify_pin(VIN, PIN, actor=IVR).outcome == "locked"
    clock.advance(1)
    assert registry.verify_pin(VIN, PIN, actor=IVR).outcome == "ok"
    assert registry.lockout_state(VIN) == (0, None)


def test_after_the_lock_expires_a_wrong_pin_starts_a_new_count(
    registry: Vehicles, car: Vehicle, clock: Clock
) -> None:
    for _ in range(3):
        registry.verify_pin(VIN, WRONG, actor=IVR)
    clock.advance(15 * 60)
    again = registry.verify_pin(VIN, WRONG, actor=IVR)
    assert (again.outcome, again.failures, again.locked_until) == ("wrong", 1, None)


def test_success_resets_the_count(registry: Vehicles, car: Vehicle) -> None:
    registry.verify_pin(VIN, WRONG, actor=IVR)
    registry.verify_pin(VIN, WRONG, actor=IVR)
    assert registry.verify_pin(VIN, PIN, actor=IVR).ok
    registry.verify_pin(VIN, WRONG, actor=IVR)
    check = registry.verify_pin(VIN, WRONG, actor=IVR)
    assert (check.outcome, check.failures, check.locked_until) == ("wrong", 2, None)
    assert registry.verify_pin(VIN, PIN, actor=IVR).ok


def test_malformed_entry_counts_as_a_wrong_attempt(registry: Vehicles, car: Vehicle) -> None:
    for entry in ("", "12", "1*2#"):
        check = registry.verify_pin(VIN, entry, actor=IVR)
    assert (check.outcome, check.failures, check.malformed) == ("wrong", 3, True)
    assert check.locked_until is not None


class SpyHasher(PinHasher):
    def __init__(self) -> None:
        super().__init__(n=2**8, r=8, p=1)
        self.verified = 0

    def verify(self, pin: str, stored: str) -> bool:
        self.verified += 1
        return super().verify(pin, stored)


@pytest.mark.parametrize("entry", ["１２３４", "٧٣٨١٠٥", "12a4", "", "123456789", "7381O5"])
def test_malformed_entry_never_reaches_the_hash_even_a_damaged_one(
    store: Store, clock: Clock, entry: str
) -> None:
    spy = SpyHasher()
    registry = Vehicles(store, spy, clock=clock)
    register(registry)
    with store.engine.begin() as conn:
        conn.execute(vehicles.update().values(pin_hash="garbage"))  # would be a StoreError
    check = registry.verify_pin(VIN, entry, actor=IVR)
    assert (check.outcome, check.failures, check.malformed) == ("wrong", 1, True)
    assert spy.verified == 0
    entry_ = registry.audit_for(VIN)[-1]
    assert (entry_.action, entry_.detail) == (
        "pin_wrong", {"failures": 1, "max_failures": 3, "malformed": True})


def test_a_well_formed_wrong_pin_is_not_called_malformed(registry: Vehicles, car: Vehicle) -> None:
    check = registry.verify_pin(VIN, WRONG, actor=IVR)
    assert (check.outcome, check.malformed) == ("wrong", False)


def test_failures_older_than_the_window_are_forgotten(
    registry: Vehicles, car: Vehicle, clock: Clock
) -> None:
    """The issue's case: two wrong PINs months apart and one more must not lock."""
    assert registry.verify_pin(VIN, WRONG, actor=IVR).failures == 1
    clock.advance(60 * 24 * 3600)
    assert registry.verify_pin(VIN, WRONG, actor=IVR).failures == 1
    clock.advance(14 * 60 + 59)
    check = registry.verify_pin(VIN, WRONG, actor=IVR)
    assert (check.outcome, check.failures, check.locked_until) == ("wrong", 2, None)
    clock.advance(1)  # the first of the two is now exactly 15 minutes old
    assert registry.lockout_state(VIN) == (1, None)
    check = registry.verify_pin(VIN, WRONG, actor=IVR)
    assert (check.failures, check.locked_until) == (2, None)
    assert registry.verify_pin(VIN, PIN, actor=IVR).ok


def test_an_operator_unlock_clears_the_lock_and_is_audited_with_the_reason(
    registry: Vehicles, car: Vehicle, clock: Clock
) -> None:
    for _ in range(3):
        registry.verify_pin(VIN, WRONG, actor=IVR)
    locked = registry.lockout(VIN)
    assert (locked.failures, locked.locked) == (3, True)
    assert locked.locked_until == at(clock) + dt.timedelta(minutes=15)
    clock.advance(60)
    after = registry.unlock_pin(VIN, actor="admin:ops-1", reason=" owner identified by phone ")
    assert (after.failures, after.locked_until, after.locked) == (0, None, False)
    entry = registry.audit_for(VIN)[-1]
    assert (entry.action, entry.actor) == ("pin_unlock", "admin:ops-1")
    assert entry.detail == {"reason": "owner identified by phone", "failures": 3,
                            "locked_until": locked.locked_until.isoformat()}
    assert registry.verify_pin(VIN, PIN, actor=IVR).ok


@pytest.mark.parametrize("reason", ["", "  ", None, "x" * 201])
def test_unlock_needs_a_reason(registry: Vehicles, car: Vehicle, reason: str | None) -> None:
    with pytest.raises(ValidationError) as info:
        registry.unlock_pin(VIN, actor="admin:ops-1", reason=reason)  # type: ignore[arg-type]
    assert set(info.value.errors) == {"reason"}
    with pytest.raises(UnknownVehicleError) as unknown:
        registry.unlock_pin("YV1ZW72U5N0000000", actor="admin:ops-1", reason="r")
    assert unknown.value.vin == "YV1ZW72U5N0000000"
    with pytest.raises(UnknownVehicleError) as unknown:
        registry.set_pin("YV1ZW72U5N0000000", PIN, actor="admin:ops-1")
    assert unknown.value.vin == "YV1ZW72U5N0000000"
    with pytest.raises(UnknownVehicleError) as unknown:
        registry.verify_pin("YV1ZW72U5N0000000", PIN, actor=IVR)
    assert unknown.value.vin == "YV1ZW72U5N0000000"


def test_a_new_pin_updates_the_vehicle(registry: Vehicles, car: Vehicle, clock: Clock) -> None:
    clock.advance(90)
    registry.set_pin(VIN, "2468", actor="admin:ops-1")
    assert registry.get(VIN).updated_at == at(clock)  # type: ignore[union-attr]


def test_an_unlock_reason_may_be_200_characters(registry: Vehicles, car: Vehicle) -> None:
    registry.unlock_pin(VIN, actor="admin:ops-1", reason="r" * 200)  # more than 100
    assert registry.audit_for(VIN)[-1].detail["reason"] == "r" * 200


def test_policy_is_configurable(store: Store, clock: Clock) -> None:
    registry = Vehicles(store, fast_hasher(), clock=clock, max_failures=1,
                        lockout=dt.timedelta(minutes=2))
    register(registry)
    check = registry.verify_pin(VIN, WRONG, actor=IVR)
    assert check.locked_until == at(clock) + dt.timedelta(minutes=2)
    clock.advance(120)
    assert registry.verify_pin(VIN, PIN, actor=IVR).ok
    windowed = Vehicles(store, fast_hasher(), clock=clock, max_failures=2,
                        lockout=dt.timedelta(minutes=2), window=dt.timedelta(hours=1))
    assert windowed.verify_pin(VIN, WRONG, actor=IVR).failures == 1
    clock.advance(59 * 60)
    assert windowed.verify_pin(VIN, WRONG, actor=IVR).locked_until is not None


def test_vehicle_without_pin(registry: Vehicles) -> None:
    register(registry, pin=None)
    check = registry.verify_pin(VIN, PIN, actor=IVR)
    assert (check.outcome, check.failures, check.locked_until) == ("not_set", 0, None)
    assert registry.lockout_state(VIN) == (0, None)
    registry.set_pin(VIN, PIN, actor=AGENT)
    assert registry.verify_pin(VIN, PIN, actor=IVR).ok
    assert actions(registry)[-3:] == ["pin_not_set", "pin_set", "pin_ok"]


def test_set_pin_clears_a_lock(registry: Vehicles, car: Vehicle) -> None:
    for _ in range(3):
        registry.verify_pin(VIN, WRONG, actor=IVR)
    registry.set_pin(VIN, "4321", actor=AGENT)
    assert registry.verify_pin(VIN, PIN, actor=IVR).outcome == "wrong"  # old PIN is gone
    assert registry.verify_pin(VIN, "4321", actor=IVR).ok
    with pytest.raises(ValidationError) as info:
        registry.set_pin(VIN, "12a4", actor=AGENT)
    assert set(info.value.errors) == {"pin"} and "12a4" not in str(info.value)


def test_unknown_vehicle(registry: Vehicles) -> None:
    with pytest.raises(UnknownVehicleError):
        registry.verify_pin("YV1ZW72U5N0000000", PIN, actor=IVR)
    with pytest.raises(UnknownVehicleError):
        registry.immobilise("YV1ZW72U5N0000000", actor=AGENT, authority_reference="P-1")
    assert registry.get("YV1ZW72U5N0000000") is None


def test_lock_is_shared_by_two_gateway_instances(
    db: tuple[Store, str], clock: Clock
) -> None:
    store_a, url = db
    store_b = Store.from_url(url)  # a second process: its own engine and connections
    try:
        a = Vehicles(store_a, fast_hasher(), clock=clock)
        b = Vehicles(store_b, fast_hasher(), clock=clock)
        register(a)
        assert a.verify_pin(VIN, WRONG, actor="ivr:CA1").failures == 1
        assert b.verify_pin(VIN, WRONG, actor="ivr:CA2").failures == 2
        assert a.verify_pin(VIN, WRONG, actor="ivr:CA3").locked_until is not None
        assert b.verify_pin(VIN, PIN, actor="ivr:CA4").outcome == "locked"
        assert a.verify_pin(VIN, PIN, actor="ivr:CA5").outcome == "locked"
        clock.advance(15 * 60)
        assert b.verify_pin(VIN, PIN, actor="ivr:CA6").ok
    finally:
        store_b.dispose()


def test_concurrent_guesses_from_two_instances_get_at_most_three_checks(
    db: tuple[Store, str], clock: Clock
) -> None:
    store_a, url = db
    store_b = Store.from_url(url)
    try:
        instances = [Vehicles(s, fast_hasher(), clock=clock) for s in (store_a, store_b)]
        register(instances[0])
        callers = 8
        barrier = threading.Barrier(callers)
        outcomes: list[str] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def guess(i: int) -> None:
            try:
                barrier.wait(timeout=10)
                check = instances[i % 2].verify_pin(VIN, f"{1000 + i}", actor=f"ivr:CA{i}")
                with lock:
                    outcomes.append(check.outcome)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=guess, args=(i,)) for i in range(callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not errors, errors
        assert sorted(outcomes) == ["locked"] * 5 + ["wrong"] * 3
        failures, locked_until = instances[1].lockout_state(VIN)
        assert failures == 3 and locked_until is not None
        audited = [a.action for a in instances[0].audit_for(VIN)]
        assert audited.count("pin_wrong") == 3 and audited.count("pin_locked") == 5
    finally:
        store_b.dispose()


def dump_database(store: Store) -> str:
    lines: list[str] = []
    with store.engine.begin() as conn:
        for table in metadata.sorted_tables:
            for row in conn.execute(sa.select(table)):
                lines.append(f"{table.name}: {tuple(row)!r}")
    return "\n".join(lines)


def test_no_pin_digits_in_the_database_or_logs(
    store: Store, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    registry = Vehicles(store, fast_hasher(), clock=clock)
    register(registry)
    registry.immobilise(VIN, actor=AGENT, authority_reference="SE-POL-2026-0042")
    commands = car_commands(registry, clock)
    for round_ in range(4):
        registry.verify_pin(VIN, PIN, actor=IVR)
        for _ in range(3):
            registry.verify_pin(VIN, WRONG, actor=IVR)
        registry.verify_pin(VIN, PIN, actor=IVR)  # refused: locked
        commands.reactivate(VIN, actor=AGENT, pin=PIN)  # refused: locked
        clock.advance(15 * 60 + round_)
    done = commands.reactivate(VIN, actor=AGENT, pin=PIN).request
    assert done is not None and done.status == "confirmed" and not done.vehicle.immobilised
    registry.set_pin(VIN, PIN, actor=AGENT)

    dump = dump_database(store)
    assert "pin_locked" in dump and "pin_wrong" in dump and "reactivate" in dump
    assert dump.count("pin_") >= 20  # the attempts really were recorded
    assert PIN not in dump
    assert PIN not in caplog.text
    assert any("locked after" in r.getMessage() for r in caplog.records)


# -- immobiliser and tracking ---------------------------------------------------------


@pytest.mark.parametrize("reference", ["", "   ", None, "x" * 101])
def test_immobilise_needs_an_authority_reference(
    registry: Vehicles, car: Vehicle, reference: str | None
) -> None:
    with pytest.raises(ValidationError) as info:
        registry.immobilise(VIN, actor=AGENT, authority_reference=reference)  # type: ignore[arg-type]
    assert set(info.value.errors) == {"authority_reference"}
    assert registry.get(VIN).immobilised is False  # type: ignore[union-attr]
    assert "immobilise" not in actions(registry)


def test_immobilise_records_who_and_why(
    registry: Vehicles, car: Vehicle, clock: Clock
) -> None:
    after = registry.immobilise(VIN, actor=AGENT, authority_reference=" SE-POL-2026-0042 ")
    assert after.immobilised
    assert (after.immobilised_by, after.immobilised_reference) == (AGENT, "SE-POL-2026-0042")
    assert after.immobilised_at == at(clock) and after.updated_at == at(clock)
    entry = registry.audit_for(VIN)[-1]
    assert (entry.action, entry.actor) == ("immobilise", AGENT)
    assert entry.detail == {"authority_reference": "SE-POL-2026-0042", "changed": True}

    clock.advance(10)
    again = registry.immobilise(VIN, actor="agent:b-2", authority_reference="OTHER-1")
    assert (again.immobilised_by, again.immobilised_reference) == (AGENT, "SE-POL-2026-0042")
    assert registry.audit_for(VIN)[-1].detail["changed"] is False


def test_reactivate_needs_the_owners_pin(
    registry: Vehicles, car: Vehicle, clock: Clock
) -> None:
    registry.immobilise(VIN, actor=AGENT, authority_reference="SE-POL-2026-0042")
    clock.advance(3600)
    commands = car_commands(registry, clock)
    refused = commands.reactivate(VIN, actor=IVR, pin=WRONG)
    assert not refused.ok and refused.request is None
    assert refused.check.outcome == "wrong"
    assert refused.vehicle.immobilised and refused.vehicle.reactivated_by is None

    result = commands.reactivate(VIN, actor=IVR, pin=PIN)
    done = result.request
    assert result.ok and done is not None and done.status == "confirmed"
    assert not done.vehicle.immobilised
    assert (done.vehicle.reactivated_by, done.vehicle.reactivated_at) == (IVR, at(clock))
    # who immobilised it stays on record
    assert done.vehicle.immobilised_reference == "SE-POL-2026-0042"
    assert actions(registry)[-5:] == ["immobilise", "pin_wrong", "pin_ok",
                                      "reactivate_requested", "reactivate"]


def test_reactivate_is_refused_while_locked_even_with_the_right_pin(
    registry: Vehicles, car: Vehicle, clock: Clock
) -> None:
    registry.immobilise(VIN, actor=AGENT, authority_reference="SE-POL-2026-0042")
    commands = car_commands(registry, clock)
    for _ in range(3):
        commands.reactivate(VIN, actor=IVR, pin=WRONG)
    result = commands.reactivate(VIN, actor=AGENT, pin=PIN)
    assert result.check.outcome == "locked" and result.request is None
    assert commands.queue.commands.calls == []  # type: ignore[union-attr]
    assert registry.get(VIN).immobilised is True  # type: ignore[union-attr]


def test_start_tracking_records_the_police_reference(
    registry: Vehicles, car: Vehicle, clock: Clock
) -> None:
    with pytest.raises(ValidationError) as info:
        registry.start_tracking(VIN, actor=AGENT, police_reference="")
    assert set(info.value.errors) == {"police_reference"}
    tracked = registry.start_tracking(VIN, actor=AGENT, police_reference="SE-POL-2026-0042")
    assert tracked.tracking
    assert (tracked.tracking_started_by, tracked.tracking_police_reference) == (
        AGENT, "SE-POL-2026-0042"
    )
    assert tracked.tracking_started_at == at(clock)
    assert registry.audit_for(VIN)[-1].action == "tracking_started"


def test_actor_is_required(registry: Vehicles, car: Vehicle) -> None:
    with pytest.raises(ValidationError) as info:
        registry.immobilise(VIN, actor=" ", authority_reference="P-1")
    assert set(info.value.errors) == {"actor"}


def test_audit_trail_in_order_with_actors(
    registry: Vehicles, car: Vehicle, clock: Clock
) -> None:
    registry.verify_pin(VIN, WRONG, actor=IVR)
    clock.advance(1)
    registry.immobilise(VIN, actor=AGENT, authority_reference="P-9")
    registry.record(VIN, actor=AGENT, action="unlock_requested", detail={"channel": "agent"})
    trail = registry.audit_for(VIN)
    assert [(a.action, a.actor) for a in trail] == [
        ("register", "import:dms"), ("pin_wrong", IVR), ("immobilise", AGENT),
        ("unlock_requested", AGENT),
    ]
    assert trail[1].detail == {"failures": 1, "max_failures": 3}
    assert trail[2].at == trail[1].at + dt.timedelta(seconds=1)
    assert all(a.vin == VIN and a.at.tzinfo is not None for a in trail)


# -- failures -------------------------------------------------------------------------


def test_database_errors_surface_as_store_error(tmp_path: Path, clock: Clock) -> None:
    broken = Store.from_url(f"sqlite:///{tmp_path}/missing-dir/x.sqlite3")
    registry = Vehicles(broken, fast_hasher(), clock=clock)
    calls: list[Callable[[], object]] = [
        lambda: registry.get(VIN),
        lambda: registry.verify_pin(VIN, PIN, actor=IVR),
        lambda: register(registry),
        lambda: registry.audit_for(VIN),
    ]
    for call in calls:
        with pytest.raises(StoreError) as info:
            call()
        assert PIN not in str(info.value)


def test_damaged_pin_hash_is_a_store_error_and_counts_the_attempt(
    registry: Vehicles, store: Store, car: Vehicle, caplog: pytest.LogCaptureFixture
) -> None:
    with store.engine.begin() as conn:
        conn.execute(vehicles.update().values(pin_hash="garbage"))
    with caplog.at_level(logging.ERROR, logger="gateway.owners"), \
            pytest.raises(StoreError, match="^stored PIN hash is unreadable$"):
        registry.verify_pin(VIN, PIN, actor=IVR)
    assert registry.lockout_state(VIN)[0] == 1
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        f"stored PIN hash of vehicle {VIN} is unreadable"]


def test_lockout_row_is_created_when_missing(registry: Vehicles, store: Store,
                                             car: Vehicle) -> None:
    with store.engine.begin() as conn:
        conn.execute(pin_failures.delete())
    assert registry.verify_pin(VIN, WRONG, actor=IVR).failures == 1
    with store.engine.begin() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(audit)).scalar_one() >= 2
