"""The durable vehicle command queue against a real HTTP car-command server.

The car is ``FakeCarCommands`` on 127.0.0.1 (refused connections, 503s, a socket
that takes the request and never answers, 4xx); the queue talks to it through the
real :class:`VehicleCommandClient`.  Time for backoff, budget and leases is a
hand-driven clock; the HTTP timeouts are real.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from gateway.adapters.vehicle_commands import VehicleCommandClient
from gateway.commands import EXPIRE_BATCH, CommandQueue, enqueue_command, vehicle_commands
from gateway.config import Settings
from gateway.metrics import Metrics
from gateway.owners import vehicles
from gateway.store import Store, incidents
from tests.conftest import Clock
from tests.support.commands import (
    CONFIRM_S,
    QUEUE_SETTINGS,
    car_client,
    queue_builder,
    sqlite_store,
)
from tests.support.fake_servers import FakeCarCommands

VIN = "WVWZZZ1JZXW000001"
OTHER_VIN = "WVWZZZ1JZXW000002"
CAR_MSISDN = "+4520000001"
CALL_SID = "CA" + "0123456789abcdef" * 2
HANDBACK = {"number": "112", "country": "DK"}
TIMEOUT = 0.3  # the adapter's per-attempt timeout in these tests


@pytest.fixture
def store(tmp_path: Any) -> Iterator[Store]:
    with sqlite_store(tmp_path / "commands.sqlite3") as store:
        yield store


@pytest.fixture
def car() -> Iterator[FakeCarCommands]:
    with FakeCarCommands(mode="confirm", slow_s=30.0) as fake:
        yield fake


@pytest.fixture
def client(car: FakeCarCommands) -> Iterator[VehicleCommandClient]:
    with car_client(car.url, attempts=2, timeout_s=TIMEOUT) as c:
        yield c


@pytest.fixture
def make_queue(store: Store, client: VehicleCommandClient,
               clock: Clock) -> Callable[..., CommandQueue]:
    return queue_builder(store, client, clock)


@pytest.fixture
def queue(make_queue: Callable[..., CommandQueue]) -> CommandQueue:
    return make_queue()


def handback(queue: CommandQueue, *, vin: str | None = VIN, msisdn: str | None = CAR_MSISDN,
             call_sid: str = CALL_SID) -> dict[str, Any]:
    return queue.enqueue(key=f"handback:{call_sid}", command="dial_emergency", vin=vin,
                         msisdn=msisdn, params=HANDBACK)


def count_rows(store: Store) -> int:
    with store.begin() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(vehicle_commands))
                   .scalar_one())


# -- enqueueing --------------------------------------------------------------------------


def test_enqueue_twice_keeps_one_row(store: Store, queue: CommandQueue) -> None:
    first = handback(queue)
    again = handback(queue)
    assert again["id"] == first["id"] and count_rows(store) == 1
    assert first["status"] == "pending" and first["attempts"] == 0
    assert first["params"] == HANDBACK and first["command"] == "dial_emergency"
    assert queue.wake.is_set()


def test_enqueue_command_in_the_callers_transaction(store: Store, clock: Clock) -> None:
    now = dt.datetime.fromtimestamp(clock(), tz=dt.UTC)
    args: dict[str, Any] = {"key": "handback:CA1", "command": "dial_emergency", "vin": None,
                            "msisdn": CAR_MSISDN, "params": HANDBACK, "now": now}
    with store.begin() as conn:
        assert enqueue_command(conn, **args) is True
        assert enqueue_command(conn, **args) is False  # no error, the transaction lives on
        conn.execute(sa.text("SELECT 1"))
    with pytest.raises(RuntimeError), store.begin() as conn:  # rolled back with the caller
        enqueue_command(conn, **{**args, "key": "handback:CA2"})
        raise RuntimeError("the caller's step failed")
    assert count_rows(store) == 1


@pytest.mark.parametrize("bad", [{"key": ""}, {"command": ""}, {"vin": None, "msisdn": None},
                                 {"params": {"vin": "x"}}, {"params": {"at": object()}}])
def test_enqueue_rejects_malformed_commands(queue: CommandQueue, bad: dict[str, Any]) -> None:
    args: dict[str, Any] = {"key": "k", "command": "flash_lights", "vin": VIN, "msisdn": None,
                            "params": {}}
    with pytest.raises((ValueError, TypeError)):
        queue.enqueue(**{**args, **bad})


# -- sending -----------------------------------------------------------------------------


def test_handback_confirmed_by_the_car(queue: CommandQueue, car: FakeCarCommands) -> None:
    row = handback(queue)
    assert queue.run_once() == 1
    done = queue.get(row["key"])
    assert done is not None and done["status"] == "confirmed" and done["attempts"] == 1
    assert done["confirmed_at"] is not None and done["result"]["status"] == "confirmed"
    [sent] = car.commands
    assert sent["vin"] == VIN and sent["idempotency_key"] == f"handback:{CALL_SID}"
    assert sent["body"] == {"command": "dial_emergency", "number": "112", "country": "DK"}
    assert queue.run_once() == 0 and len(car.commands) == 1  # never sent again
    handback(queue)  # a replayed enqueue of a confirmed command
    assert queue.run_once() == 0 and len(car.commands) == 1 and queue.pending() == []


def test_accepted_is_sent_until_the_car_confirms(queue: CommandQueue,
                                                 car: FakeCarCommands, clock: Clock) -> None:
    car.mode = "up"  # the service answers {"status": "accepted", "command_id": ...}
    row = handback(queue)
    assert queue.run_once() == 1
    sent = queue.get(row["key"])
    assert sent is not None and sent["status"] == "sent"
    assert sent["result"]["command_id"] == "cmd-1" and sent["confirmed_at"] is None
    assert [r["key"] for r in queue.pending()] == [row["key"]]
    clock.advance(CONFIRM_S)  # the whole confirmation window: still sent, never re-sent
    assert queue.run_once() == 0 and len(car.commands) == 1
    assert [r["key"] for r in queue.pending()] == [row["key"]]

    done = queue.confirm(key=row["key"], ok=True, result={"dialled": "112"})
    assert done is not None and done["status"] == "confirmed" and done["result"] == {
        "dialled": "112"}
    replay = queue.confirm(key=row["key"], ok=False, result={"error": "late"})
    assert replay is not None and replay["status"] == "confirmed"  # a finished row stays
    assert queue.confirm(key="handback:unknown", ok=True, result={}) is None
    assert queue.pending() == []


def test_car_reports_failure_later(queue: CommandQueue, car: FakeCarCommands) -> None:
    car.mode = "up"
    row = handback(queue)
    queue.run_once()
    by_id = queue.confirm(key=str(row["id"]), ok=False, result={"error": "no network"})
    assert by_id is not None and by_id["status"] == "failed"
    assert by_id["last_error"] == "car reported failure: no network"


@pytest.mark.parametrize("down", ["503", "refuse"])
def test_car_down_then_up_is_sent_once_after_recovery(
        queue: CommandQueue, car: FakeCarCommands, clock: Clock, down: str) -> None:
    car.mode = down
    row = handback(queue)
    assert queue.run_once() == 1
    waiting = queue.get(row["key"])
    assert waiting is not None and waiting["status"] == "pending" and waiting["attempts"] == 1
    assert waiting["lease_token"] is None and waiting["last_error"]
    assert waiting["next_attempt_at"] > dt.datetime.fromtimestamp(clock(), tz=dt.UTC)
    before = len(car.commands)
    assert queue.run_once() == 0 and len(car.commands) == before  # backoff: not due yet

    car.mode = "confirm"
    clock.advance(4.0)  # backoff_max_s
    assert queue.run_once() == 1
    done = queue.get(row["key"])
    assert done is not None and done["status"] == "confirmed" and done["attempts"] == 2
    assert len(car.commands) == before + 1  # exactly one request after recovery
    for _ in range(3):
        clock.advance(60)
        queue.run_once()
    assert len(car.commands) == before + 1
    assert {c["idempotency_key"] for c in car.commands} == {row["key"]}
    assert list(car.unique_commands) == [row["key"]]


def test_hanging_car_times_out_and_the_thread_stops(
        store: Store, client: VehicleCommandClient, car: FakeCarCommands) -> None:
    car.mode = "hang"  # takes the request, never answers (until the fake closes)
    queue = CommandQueue(store, client, poll_s=0.05, backoff_initial_s=0.2, backoff_max_s=0.5)
    row = handback(queue)
    started = time.monotonic()
    queue.start_thread()
    try:
        assert car.wait_until(lambda: len(car.commands) >= 1, timeout=2)
        deadline = time.monotonic() + 5
        current = queue.get(row["key"])
        while time.monotonic() < deadline and not (current and current["last_error"]):
            time.sleep(0.05)
            current = queue.get(row["key"])
        assert current is not None and current["status"] == "pending"
        assert "did not answer" in current["last_error"]
        assert time.monotonic() - started < 3.0  # the adapter's budget, not the car's 30 s
    finally:
        queue.stop(wait_s=5.0)
    assert queue.thread is not None and not queue.thread.is_alive()
    assert {c["idempotency_key"] for c in car.commands} == {row["key"]}


def test_budget_exceeded_fails_without_sending_again(
        queue: CommandQueue, car: FakeCarCommands, clock: Clock) -> None:
    car.mode = "refuse"
    row = handback(queue)
    queue.run_once()
    clock.advance(61)  # budget_s
    car.mode = "confirm"
    assert queue.run_once() == 1
    failed = queue.get(row["key"])
    assert failed is not None and failed["status"] == "failed" and failed["attempts"] == 1
    assert failed["last_error"] == "not sent within 60s"
    assert car.commands == []
    # the car may still report that it did it after all
    late = queue.confirm(key=row["key"], ok=True, result={"dialled": "112"})
    assert late is not None and late["status"] == "confirmed"


def test_attempt_ending_past_the_budget_fails(
        make_queue: Callable[..., CommandQueue], client: VehicleCommandClient,
        car: FakeCarCommands, clock: Clock) -> None:
    class SlowToGiveUp:
        def send(self, vin: str, command: str, **params: Any) -> dict[str, Any]:
            clock.advance(61)  # the send spans the end of the budget
            return client.send(vin, command, **params)

    car.mode = "503"
    queue = make_queue(commands=SlowToGiveUp())
    row = handback(queue)
    assert queue.run_once() == 1
    failed = queue.get(row["key"])
    assert failed is not None and failed["status"] == "failed"
    assert failed["last_error"].startswith("gave up after 1 attempt(s) in 60s: ")


@pytest.mark.parametrize(("mode", "error"), [("404", "HTTP 404"), ("reject", "vehicle is moving")])
def test_refused_commands_fail_at_once(queue: CommandQueue, car: FakeCarCommands,
                                       mode: str, error: str) -> None:
    car.mode = mode
    row = handback(queue)
    assert queue.run_once() == 1
    failed = queue.get(row["key"])
    assert failed is not None and failed["status"] == "failed" and error in failed["last_error"]
    assert len(car.commands) == 1


def test_not_configured_fails(make_queue: Callable[..., CommandQueue]) -> None:
    queue = make_queue(commands=None)
    row = handback(queue)
    queue.run_once()
    failed = queue.get(row["key"])
    assert failed is not None and failed["status"] == "failed"
    assert "not configured" in failed["last_error"]


# -- leases ------------------------------------------------------------------------------


def test_a_worker_cannot_finish_a_row_it_does_not_hold(
        make_queue: Callable[..., CommandQueue], car: FakeCarCommands, clock: Clock) -> None:
    a, b = make_queue(), make_queue()
    row = handback(a)
    [held_by_a] = a.claim(4)
    assert held_by_a["lease_token"] and held_by_a["attempts"] == 1
    assert b.run_once() == 0 and car.commands == []  # leased: b leaves it alone

    clock.advance(11)  # a's lease (10 s) runs out; b takes the row over
    [held_by_b] = b.claim(4)
    assert held_by_b["lease_token"] != held_by_a["lease_token"]
    car.mode = "503"
    assert a.handle(held_by_a) == "lost"  # a's late outcome changes nothing
    current = a.get(row["key"])
    assert current is not None and current["lease_token"] == held_by_b["lease_token"]
    assert current["status"] == "pending" and current["last_error"] is None

    car.mode = "confirm"
    assert b.handle(held_by_b) == "confirmed"
    assert a.handle(held_by_a) == "lost"
    done = a.get(row["key"])
    assert done is not None and done["status"] == "confirmed" and done["attempts"] == 2
    assert list(car.unique_commands) == [row["key"]]  # one command for the car


def test_confirm_while_sending_wins_over_the_worker(queue: CommandQueue,
                                                    car: FakeCarCommands) -> None:
    car.mode = "up"
    row = handback(queue)
    [held] = queue.claim(4)
    confirmed = queue.confirm(key=row["key"], ok=True, result={"dialled": "112"})
    assert confirmed is not None and confirmed["status"] == "confirmed"
    assert queue.handle(held) == "lost"
    after = queue.get(row["key"])
    assert after is not None and after["status"] == "confirmed"
    assert after["result"] == {"dialled": "112"}


# -- finding the car ---------------------------------------------------------------------


def add_incident(store: Store, *, vin: str, msisdn: str, received_at: dt.datetime) -> None:
    with store.begin() as conn:
        conn.execute(incidents.insert().values(
            id=str(uuid.uuid4()), event_id=str(uuid.uuid4()), payload_sha256="0" * 64,
            type="sos", vin=vin, msisdn=msisdn, occurred_at=received_at,
            received_at=received_at, lat=55.676, lon=12.568, route_reason="test",
            emergency_number="112", fallback_dial="112"))


def add_vehicle(store: Store, *, vin: str, car_msisdn: str) -> None:
    with store.begin() as conn:
        conn.execute(vehicles.insert().values(
            vin=vin, car_msisdn=car_msisdn, owner_name="Test Owner", market="DK",
            purchase_date=dt.date(2024, 1, 1), lookup_code=vin[-8:],
            updated_at=dt.datetime.now(dt.UTC)))


def test_vin_resolved_from_the_newest_incident(store: Store, queue: CommandQueue,
                                               car: FakeCarCommands, clock: Clock) -> None:
    now = dt.datetime.fromtimestamp(clock(), tz=dt.UTC)
    add_incident(store, vin=OTHER_VIN, msisdn=CAR_MSISDN, received_at=now - dt.timedelta(days=9))
    add_incident(store, vin=VIN, msisdn=CAR_MSISDN, received_at=now)
    add_vehicle(store, vin=OTHER_VIN, car_msisdn=CAR_MSISDN)  # the incident comes first
    row = handback(queue, vin=None)
    assert row["vin"] is None
    queue.run_once()
    assert [c["vin"] for c in car.commands] == [VIN]
    done = queue.get(row["key"])
    assert done is not None and done["vin"] == VIN and done["status"] == "confirmed"


def test_vin_resolved_from_the_registry(store: Store, queue: CommandQueue,
                                        car: FakeCarCommands) -> None:
    add_vehicle(store, vin=OTHER_VIN, car_msisdn=CAR_MSISDN)
    handback(queue, vin=None)
    queue.run_once()
    assert [c["vin"] for c in car.commands] == [OTHER_VIN]


def test_unknown_msisdn_fails(queue: CommandQueue, car: FakeCarCommands) -> None:
    row = handback(queue, vin=None, msisdn="+4599999999")
    queue.run_once()
    failed = queue.get(row["key"])
    assert failed is not None and failed["status"] == "failed"
    assert failed["last_error"] == "no vehicle known for msisdn +4599999999"
    assert car.commands == []


# -- sent, and the car never reports: the confirmation window -----------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_store(request: pytest.FixtureRequest, store: Store) -> Store:
    """The SQLite store, or the test PostgreSQL (``pg_store``)."""
    if request.param == "sqlite":
        return store
    pg: Store = request.getfixturevalue("pg_store")
    return pg


class Settlements:
    """An ``on_settled`` hook recording (key, status, last_error, the status the row has
    inside the settling transaction) for each call."""

    def __init__(self, hold_s: float = 0.0) -> None:
        self.calls: list[tuple[str, str, str | None, str]] = []
        self.hold_s = hold_s
        self.lock = threading.Lock()

    def __call__(self, conn: Any, row: Any) -> None:
        inside = conn.execute(sa.select(vehicle_commands.c.status)
                              .where(vehicle_commands.c.id == row["id"])).scalar_one()
        time.sleep(self.hold_s)  # the settling transaction stays open a while
        with self.lock:
            self.calls.append((row["key"], row["status"], row["last_error"], inside))


UNCONFIRMED = f"not confirmed by the car within {CONFIRM_S}s"


@contextlib.contextmanager
def before_first_update(store: Store, action: Callable[[], Any]) -> Iterator[None]:
    """Run ``action`` (another instance, its own connection, committed) once, just before
    the first UPDATE of vehicle_commands inside the block: between a read and its write."""
    started: list[bool] = []

    def hook(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if not started and statement.lstrip().upper().startswith("UPDATE VEHICLE_COMMANDS"):
            started.append(True)  # once: the action's own statements pass through
            action()

    sa.event.listen(store.engine, "before_cursor_execute", hook)
    try:
        yield
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", hook)


def now_of(clock: Clock) -> dt.datetime:
    return dt.datetime.fromtimestamp(clock(), tz=dt.UTC)


def test_a_sent_command_the_car_never_confirms_fails_once_after_the_window(
        any_store: Store, client: VehicleCommandClient, car: FakeCarCommands, clock: Clock,
        caplog: pytest.LogCaptureFixture) -> None:
    settled = Settlements()
    queue = queue_builder(any_store, client, clock)(on_settled=settled)
    car.mode = "up"  # the service takes it ("accepted"); the car never reports
    row = handback(queue)
    clock.advance(5)
    assert queue.run_once() == 1
    sent = queue.get(row["key"])
    assert sent is not None and sent["status"] == "sent" and sent["updated_at"] == now_of(clock)
    clock.advance(CONFIRM_S)  # the window counts from the send, not from the request
    assert queue.run_once() == 0
    assert queue.get(row["key"]) == sent and settled.calls == []
    clock.advance(0.5)
    with caplog.at_level(logging.ERROR, logger="gateway.commands"):
        assert queue.run_once() == 1
    failed = queue.get(row["key"])
    assert failed is not None and failed["status"] == "failed"
    assert failed["last_error"] == UNCONFIRMED and failed["updated_at"] == now_of(clock)
    assert failed["result"] == sent["result"]  # the service's answer (its command_id) stays
    assert failed["confirmed_at"] is None and failed["attempts"] == 1
    assert failed["lease_token"] is None and failed["lease_until"] is None
    assert settled.calls == [(row["key"], "failed", UNCONFIRMED, "failed")]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        f"command {row['key']} (dial_emergency) to {VIN} failed: {UNCONFIRMED} (command_id cmd-1)"]
    assert queue.pending() == []
    for _ in range(3):  # exactly once, and never sent again
        clock.advance(600)
        assert queue.run_once() == 0
    assert len(settled.calls) == 1 and len(car.commands) == 1


def test_only_sent_commands_past_their_window_fail(
        any_store: Store, client: VehicleCommandClient, car: FakeCarCommands,
        clock: Clock) -> None:
    settled = Settlements()
    queue = queue_builder(any_store, client, clock)(on_settled=settled, budget_s=1000.0)
    car.mode = "up"
    old = handback(queue, call_sid="CAold")
    assert queue.run_once() == 1
    clock.advance(60)
    young = handback(queue, call_sid="CAyoung")
    assert queue.run_once() == 1
    car.mode = "confirm"
    done = handback(queue, call_sid="CAdone")
    assert queue.run_once() == 1
    car.mode = "503"
    waiting = handback(queue, call_sid="CAwaiting")
    assert queue.run_once() == 1
    settled.calls.clear()
    clock.advance(CONFIRM_S - 60 + 0.5)  # old: past its window; young: half-way
    assert queue.run_once() == 1 + 1  # old failed; waiting retried (still down)
    statuses = {k: (queue.get(r["key"]) or {}).get("status")
                for k, r in (("old", old), ("young", young), ("done", done),
                             ("waiting", waiting))}
    assert statuses == {"old": "failed", "young": "sent", "done": "confirmed",
                        "waiting": "pending"}
    assert settled.calls == [(old["key"], "failed", UNCONFIRMED, "failed")]
    assert [r["key"] for r in queue.pending()] == [young["key"], waiting["key"]]
    clock.advance(60)
    assert queue.run_once() >= 1
    assert (queue.get(young["key"]) or {}).get("status") == "failed"


def test_a_late_confirmation_after_the_window_confirms_once(
        any_store: Store, client: VehicleCommandClient, car: FakeCarCommands, clock: Clock,
        caplog: pytest.LogCaptureFixture) -> None:
    settled = Settlements()
    queue = queue_builder(any_store, client, clock)(on_settled=settled)
    car.mode = "up"
    row = handback(queue)
    queue.run_once()
    clock.advance(CONFIRM_S + 1)
    assert queue.run_once() == 1
    failed = queue.get(row["key"])
    assert failed is not None and failed["status"] == "failed"

    clock.advance(30)
    refused = queue.confirm(key=row["key"], ok=False, result={"error": "no network"})
    assert refused == failed  # a failed row stays failed, with its own reason
    with caplog.at_level(logging.WARNING, logger="gateway.commands"):
        late = queue.confirm(key=row["key"], ok=True, result={"dialled": "112"})
    assert late is not None and late["status"] == "confirmed" and late["last_error"] is None
    assert late["confirmed_at"] == now_of(clock) == late["updated_at"]
    assert late["result"] == {"dialled": "112"}
    assert f"command {row['key']} confirmed by the car after it was failed" in caplog.text
    assert settled.calls == [(row["key"], "failed", UNCONFIRMED, "failed"),
                             (row["key"], "confirmed", None, "confirmed")]

    clock.advance(5)  # replays of the report change nothing
    assert queue.confirm(key=row["key"], ok=True, result={"dialled": "112"}) == late
    assert queue.confirm(key=str(row["id"]), ok=False, result={"error": "x"}) == late
    clock.advance(3600)
    assert queue.run_once() == 0 and queue.get(row["key"]) == late
    assert len(settled.calls) == 2 and len(car.commands) == 1


def test_a_confirmation_racing_the_expiry_is_not_lost(
        any_store: Store, client: VehicleCommandClient, car: FakeCarCommands,
        clock: Clock) -> None:
    """The car's report is read as ``sent``; before it is written, another instance fails
    the row for its window.  The report still confirms it (and settles it once more)."""
    settled = Settlements()
    build = queue_builder(any_store, client, clock)
    reporter, other = build(on_settled=settled), build(on_settled=settled)
    car.mode = "up"
    row = handback(reporter)
    reporter.run_once()
    clock.advance(CONFIRM_S + 1)
    raced: list[int] = []
    with before_first_update(any_store, lambda: raced.append(other.run_once())):
        confirmed = reporter.confirm(key=row["key"], ok=True, result={"dialled": "112"})
    assert raced == [1]  # the other instance did fail it in between
    assert confirmed is not None and confirmed["status"] == "confirmed"
    assert confirmed["result"] == {"dialled": "112"} and confirmed["last_error"] is None
    assert settled.calls == [(row["key"], "failed", UNCONFIRMED, "failed"),
                             (row["key"], "confirmed", None, "confirmed")]
    assert reporter.get(row["key"]) == confirmed


@pytest.mark.parametrize("first_ok", [True, False], ids=["replayed-ok", "failure-vs-ok"])
def test_a_report_racing_a_confirmation_changes_nothing(
        any_store: Store, client: VehicleCommandClient, car: FakeCarCommands,
        clock: Clock, first_ok: bool) -> None:
    """The car's report is read as ``sent``; before it is written, another instance
    records the car's ``ok`` for the same row.  The late writer must change nothing:
    a replayed ``ok`` does not settle the row twice (the registry change and its audit
    once), and a failure report does not overwrite the confirmation."""
    settled = Settlements()
    build = queue_builder(any_store, client, clock)
    reporter, other = build(on_settled=settled), build(on_settled=settled)
    car.mode = "up"
    row = handback(reporter)
    reporter.run_once()
    assert reporter.get(row["key"])["status"] == "sent"  # type: ignore[index]
    raced: list[Any] = []
    with before_first_update(any_store, lambda: raced.append(
            other.confirm(key=row["key"], ok=True, result={"dialled": "112"}))):
        answer = reporter.confirm(key=row["key"], ok=first_ok,
                                  result={"dialled": "112"} if first_ok else {"error": "x"})
    assert len(raced) == 1
    assert answer is not None and answer["status"] == "confirmed"
    assert answer["result"] == {"dialled": "112"}
    assert settled.calls == [(row["key"], "confirmed", None, "confirmed")]
    assert reporter.get(row["key"]) == answer


@pytest.mark.postgres
def test_postgres_instances_racing_fail_each_unconfirmed_command_once(
        pg_store: Store, client: VehicleCommandClient, car: FakeCarCommands,
        clock: Clock) -> None:
    settled = Settlements(hold_s=0.01)  # each settling transaction holds its rows a while
    build = queue_builder(pg_store, client, clock)
    car.mode = "up"
    sender = build(concurrency=20)
    for n in range(20):
        sender.enqueue(key=f"k{n}", command="flash_lights", vin=VIN, msisdn=None, params={})
    assert sender.run_once() == 20
    assert {r["status"] for r in sender.pending()} == {"sent"}
    clock.advance(CONFIRM_S + 1)
    workers = [build(on_settled=settled) for _ in range(3)]

    # rows another transaction has locked are skipped, not waited for
    holder = pg_store.engine.connect()
    try:
        with holder.begin():
            holder.execute(sa.select(vehicle_commands).with_for_update())
            started = time.monotonic()
            assert workers[0].run_once() == 0
            assert time.monotonic() - started < 1.5 and settled.calls == []
    finally:
        holder.close()

    together = threading.Barrier(len(workers), timeout=10.0)
    expired: list[int] = []
    lock = threading.Lock()

    def run(worker: CommandQueue) -> None:
        together.wait()
        n = worker.run_once()
        with lock:
            expired.append(n)

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(expired) == 20
    assert sorted(c[0] for c in settled.calls) == sorted(f"k{n}" for n in range(20))
    assert {c[1:] for c in settled.calls} == {("failed", UNCONFIRMED, "failed")}
    assert sender.pending() == [] and len(car.commands) == 20
    assert all(w.run_once() == 0 for w in workers) and len(settled.calls) == 20


# -- wiring ------------------------------------------------------------------------------


def test_the_app_builds_the_queue(make_app: Callable[..., Flask]) -> None:
    from gateway.app import Services

    services: Services = make_app().extensions["gateway"]
    assert isinstance(services.command_queue, CommandQueue)
    assert services.command_queue.thread is None  # started only with start_worker
    assert services.command_queue.confirm_window == dt.timedelta(minutes=5)  # the default


def test_the_app_takes_the_confirmation_window_from_the_settings(
        make_app: Callable[..., Flask], settings: Settings) -> None:
    from gateway.app import Services

    app = make_app(settings=settings.replace(command_confirm_s=45))
    services: Services = app.extensions["gateway"]
    assert services.command_queue.confirm_window == dt.timedelta(seconds=45)


# -- PostgreSQL --------------------------------------------------------------------------


@pytest.mark.postgres
def test_postgres_queue(pg_store: Store, car: FakeCarCommands, client: VehicleCommandClient,
                        clock: Clock) -> None:
    queue = CommandQueue(pg_store, client, clock=clock, lease_s=10.0)
    now = dt.datetime.fromtimestamp(clock(), tz=dt.UTC)
    with pg_store.begin() as conn:  # a duplicate does not abort the caller's transaction
        args: dict[str, Any] = {"command": "dial_emergency", "vin": VIN, "msisdn": None,
                                "params": HANDBACK, "now": now}
        assert enqueue_command(conn, key="handback:CA-held", **args) is True
        assert enqueue_command(conn, key="handback:CA-held", **args) is False
        conn.execute(sa.text("SELECT 1"))

    # a row locked by another transaction is skipped, not waited for
    holder = pg_store.engine.connect()
    try:
        with holder.begin():
            holder.execute(sa.select(vehicle_commands).with_for_update())
            started = time.monotonic()
            assert queue.run_once() == 0
            assert time.monotonic() - started < 1.5 and car.commands == []
    finally:
        holder.close()
    assert queue.run_once() == 1
    done = queue.get("handback:CA-held")
    assert done is not None and done["status"] == "confirmed"

    # concurrent workers claim disjoint rows
    for n in range(30):
        queue.enqueue(key=f"k{n}", command="flash_lights", vin=VIN, msisdn=None, params={})
    workers = [CommandQueue(pg_store, client, clock=clock, lease_s=10.0) for _ in range(3)]
    claimed: list[int] = []
    lock = threading.Lock()

    def claim(worker: CommandQueue) -> None:
        rows = worker.claim(30)
        with lock:
            claimed.extend(r["id"] for r in rows)

    threads = [threading.Thread(target=claim, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == 30 and len(set(claimed)) == 30
    sent_before = len(car.commands)
    clock.advance(400)  # leases and the 300 s budget have run out: expired, not sent
    assert queue.run_once() == 30
    assert len(car.commands) == sent_before and queue.pending() == []


# -- a request sends its own row: claim_key and send_now -------------------------------


def test_claim_key_leases_only_its_row(queue: CommandQueue, clock: Clock) -> None:
    mine = handback(queue, call_sid="CAmine")
    other = handback(queue, call_sid="CAother")
    clock.advance(5)
    claimed = queue.claim_key(mine["key"])
    assert claimed is not None and claimed["id"] == mine["id"]
    assert claimed["lease_token"] is not None and claimed["attempts"] == 1
    now = dt.datetime.fromtimestamp(clock(), tz=dt.UTC)
    assert claimed["updated_at"] == now == claimed["next_attempt_at"]
    assert claimed["lease_until"] == now + dt.timedelta(seconds=10)
    untouched = queue.get(other["key"])
    assert untouched is not None and untouched["lease_token"] is None
    assert untouched["attempts"] == 0 and untouched["updated_at"] == other["updated_at"]
    assert queue.claim_key(mine["key"]) is None  # leased: not twice
    clock.advance(10)
    assert queue.claim_key(mine["key"]) is None  # the lease ends after, not at, 10 s
    clock.advance(0.5)
    again = queue.claim_key(mine["key"])  # an expired lease is taken over
    assert again is not None and again["lease_token"] != claimed["lease_token"]


def test_send_now_waits_for_the_sender_holding_the_row(
        queue: CommandQueue, car: FakeCarCommands) -> None:
    row = handback(queue)
    held = queue.claim_key(row["key"])
    assert held is not None
    worker = threading.Timer(0.2, queue.handle, args=(held,))
    started = time.monotonic()
    worker.start()
    try:
        done = queue.send_now(row["key"], wait_s=5.0)
    finally:
        worker.join()
    assert time.monotonic() - started < 1.0  # polled, not slept past the outcome
    assert done is not None and done["status"] == "confirmed"
    assert len(car.commands) == 1  # the holder sent it; send_now did not


def test_send_now_gives_up_waiting_after_wait_s(queue: CommandQueue,
                                                car: FakeCarCommands) -> None:
    row = handback(queue)
    assert queue.claim_key(row["key"]) is not None  # a sender that never finishes
    started = time.monotonic()
    waited = queue.send_now(row["key"], wait_s=0.3)
    assert 0.3 <= time.monotonic() - started < 2.0
    assert waited is not None and waited["status"] == "pending" and car.commands == []
    assert queue.send_now("no-such-key", wait_s=0.3) is None


def test_recent_lists_one_cars_settled_commands_newest_first_within_the_window(
        any_store: Store, client: VehicleCommandClient, car: FakeCarCommands,
        clock: Clock) -> None:
    """What the agent API shows with a vehicle: settled rows only (confirmed, failed,
    cancelled), of that car, changed at or after ``since``, newest first, at most
    ``limit``."""
    queue = queue_builder(any_store, client, clock)()  # never run: rows stay pending

    def add(key: str, vin: str = VIN) -> None:
        queue.enqueue(key=key, command="flash_lights", vin=vin, msisdn=None, params={})

    add("old")
    queue.confirm(key="old", ok=True, result={})
    clock.advance(100)
    since = now_of(clock)
    add("confirmed")
    queue.confirm(key="confirmed", ok=True, result={})
    clock.advance(1)
    add("failed")
    queue.confirm(key="failed", ok=False, result={"error": "door open"})
    clock.advance(1)
    add("cancelled")
    assert queue.cancel("cancelled")
    clock.advance(1)
    add("pending")  # not settled: listed by pending(), not here
    add("other car", vin=OTHER_VIN)
    queue.confirm(key="other car", ok=True, result={})

    recent = queue.recent(VIN, since=since)
    assert [(r["key"], r["status"]) for r in recent] == [
        ("cancelled", "cancelled"), ("failed", "failed"), ("confirmed", "confirmed")]
    assert recent[1]["last_error"] == "car reported failure: door open"
    assert [r["key"] for r in queue.recent(VIN, since=since, limit=2)] == ["cancelled", "failed"]
    assert queue.recent(VIN, since=now_of(clock) + dt.timedelta(seconds=1)) == []
    assert [r["key"] for r in queue.recent(OTHER_VIN, since=since)] == ["other car"]


def test_each_settled_command_is_counted_once_after_its_commit(
        any_store: Store, client: VehicleCommandClient, car: FakeCarCommands,
        clock: Clock) -> None:
    """gateway_vehicle_commands_settled{command, outcome, how}: the service's answer
    (send), the car's result (report, a replay not again), a cancel, the send budget and
    the confirmation window running out; a settlement whose transaction rolled back is
    not counted."""
    metrics = Metrics()
    failing = {"on": False}

    def settle(conn: Any, row: Any) -> None:
        if failing["on"]:
            raise RuntimeError("the registry change failed")

    queue = queue_builder(any_store, client, clock)(metrics=metrics, on_settled=settle)

    def count(command: str, outcome: str, how: str) -> float:
        value = metrics.registry.get_sample_value(
            "gateway_vehicle_commands_settled_total",
            {"command": command, "outcome": outcome, "how": how})
        return value or 0.0

    def add(key: str, command: str) -> None:
        queue.enqueue(key=key, command=command, vin=VIN, msisdn=None, params={})

    car.mode = "confirm"
    add("a", "unlock")
    queue.run_once()
    car.mode = "reject"
    add("b", "unlock")
    queue.run_once()
    assert (count("unlock", "confirmed", "send"), count("unlock", "failed", "send")) == (1, 1)

    car.mode = "up"  # accepted: sent, the car reports later
    add("c", "immobilise")
    queue.run_once()
    assert queue.confirm(key="c", ok=True, result={"done": True})["status"] == "confirmed"
    queue.confirm(key="c", ok=True, result={"done": True})  # a replay
    assert count("immobilise", "confirmed", "report") == 1

    add("d", "flash_lights")
    assert queue.cancel("d") and not queue.cancel("d")
    assert count("flash_lights", "cancelled", "cancel") == 1

    car.mode = "503"  # unreachable: retried until the send budget runs out
    add("e", "reactivate")
    queue.run_once()
    clock.advance(QUEUE_SETTINGS["budget_s"] + 1)
    queue.run_once()
    assert count("reactivate", "failed", "expired_unsent") == 1

    car.mode = "up"
    add("f", "start_tracking")
    add("g", "stop_tracking")
    queue.run_once()
    clock.advance(CONFIRM_S + 1)
    failing["on"] = True  # the settling transaction rolls back: nothing counted
    with pytest.raises(RuntimeError):
        queue.run_once()
    assert count("start_tracking", "failed", "expired_unconfirmed") == 0
    failing["on"] = False
    queue.run_once()
    assert count("start_tracking", "failed", "expired_unconfirmed") == 1
    assert count("stop_tracking", "failed", "expired_unconfirmed") == 1
    total = sum(s.value for m in metrics.registry.collect()
                if m.name == "gateway_vehicle_commands_settled" for s in m.samples
                if s.name.endswith("_total"))
    assert total == 7  # a to g, each once


def test_a_backlog_of_unconfirmed_commands_fails_in_bounded_passes(
        any_store: Store, client: VehicleCommandClient, car: FakeCarCommands,
        clock: Clock) -> None:
    """After an upgrade every command long stuck in ``sent`` is overdue at once: each
    pass fails at most EXPIRE_BATCH of them (oldest first), in its own short transaction,
    so the queue goes on sending between passes; every row fails exactly once."""
    queue = queue_builder(any_store, client, clock)()
    total = EXPIRE_BATCH * 2 + 7
    for n in range(total):
        queue.enqueue(key=f"k{n:04d}", command="flash_lights", vin=VIN, msisdn=None, params={})
    with any_store.begin() as conn:  # taken by the service long ago; the cars never reported
        conn.execute(vehicle_commands.update().values(status="sent", updated_at=now_of(clock)))
    clock.advance(CONFIRM_S + 1)
    assert [queue._expire_unconfirmed() for _ in range(4)] == [
        EXPIRE_BATCH, EXPIRE_BATCH, 7, 0]
    assert queue.pending() == []
    with any_store.begin() as conn:
        failed = conn.execute(sa.select(vehicle_commands.c.key).where(
            vehicle_commands.c.status == "failed")).scalars().all()
    assert sorted(failed) == [f"k{n:04d}" for n in range(total)]


def test_a_claim_leases_at_most_its_limit(
        any_store: Store, client: VehicleCommandClient, clock: Clock) -> None:
    """On PostgreSQL the due rows are picked once (a CTE), not by a sub-select the
    planner may rescan: a LIMIT inside ``IN (SELECT ... FOR UPDATE SKIP LOCKED)`` is
    taken again on each rescan, and the rows this statement already locked are skipped,
    so a claim of 4 leased every due row (and sent them all at once)."""
    queue = queue_builder(any_store, client, clock)()
    for n in range(30):
        queue.enqueue(key=f"k{n:02d}", command="flash_lights", vin=VIN, msisdn=None, params={})
    claimed = queue.claim(4)
    assert [r["key"] for r in claimed] == ["k00", "k01", "k02", "k03"]
    assert len(queue.claim(100)) == 26


def test_a_backlog_of_unsent_commands_fails_in_bounded_passes(
        any_store: Store, client: VehicleCommandClient, clock: Clock) -> None:
    """The send budget's expiry is bounded the same way (pending rows past the budget)."""
    queue = queue_builder(any_store, client, clock)()
    total = EXPIRE_BATCH + 3
    for n in range(total):
        queue.enqueue(key=f"k{n:04d}", command="flash_lights", vin=VIN, msisdn=None, params={})
    clock.advance(QUEUE_SETTINGS["budget_s"] + 1)
    assert [queue._expire() for _ in range(3)] == [EXPIRE_BATCH, 3, 0]
    assert queue.pending() == []


def test_a_claim_takes_the_earliest_due_first(
        any_store: Store, client: VehicleCommandClient, clock: Clock) -> None:
    queue = queue_builder(any_store, client, clock)()
    for n in range(4):
        queue.enqueue(key=f"k{n}", command="flash_lights", vin=VIN, msisdn=None, params={})
    with any_store.begin() as conn:  # the newest rows became due first
        for n in range(4):
            conn.execute(vehicle_commands.update().where(vehicle_commands.c.key == f"k{n}")
                         .values(next_attempt_at=now_of(clock) - dt.timedelta(seconds=n)))
    assert [r["key"] for r in queue.claim(2)] == ["k2", "k3"]  # leased, listed by id


def test_recent_orders_by_when_a_command_was_settled(
        any_store: Store, client: VehicleCommandClient, clock: Clock) -> None:
    queue = queue_builder(any_store, client, clock)()
    since = now_of(clock)
    for key in ("first", "second"):
        queue.enqueue(key=key, command="flash_lights", vin=VIN, msisdn=None, params={})
    queue.confirm(key="second", ok=True, result={})
    clock.advance(1)
    queue.confirm(key="first", ok=True, result={})  # the older row, settled last
    assert [r["key"] for r in queue.recent(VIN, since=since)] == ["first", "second"]
    assert [r["key"] for r in queue.recent(VIN, since=since, limit=1)] == ["first"]
