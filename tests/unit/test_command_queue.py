"""The vehicle command queue's edges: its settings, a row's limits, the backoff, the
lease and budget boundaries, which row a result settles, and the worker thread.

The car is ``FakeCarCommands`` on 127.0.0.1 behind the real
:class:`VehicleCommandClient`; time for backoff, budget and leases is a hand-driven
clock (the worker-thread tests run on real time).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gateway.adapters.vehicle_commands import VehicleCommandClient
from gateway.commands import CommandQueue, vehicle_commands
from gateway.errors import PermanentUpstreamError, TransientUpstreamError
from gateway.owners import vehicles
from gateway.store import Store, as_utc
from tests.conftest import Clock
from tests.support.commands import car_client, queue_builder, sqlite_store
from tests.support.fake_servers import FakeCarCommands

VIN = "WVWZZZ1JZXW000001"
OTHER_VIN = "WVWZZZ1JZXW000002"


@pytest.fixture
def store(tmp_path: Any) -> Iterator[Store]:
    with sqlite_store(tmp_path / "queue.sqlite3") as store:
        yield store


@pytest.fixture
def car() -> Iterator[FakeCarCommands]:
    with FakeCarCommands(mode="confirm", slow_s=30.0) as fake:
        yield fake


@pytest.fixture
def client(car: FakeCarCommands) -> Iterator[VehicleCommandClient]:
    with car_client(car.url, attempts=1) as c:
        yield c


@pytest.fixture
def make_queue(store: Store, client: VehicleCommandClient,
               clock: Clock) -> Callable[..., CommandQueue]:
    return queue_builder(store, client, clock)


@pytest.fixture
def queue(make_queue: Callable[..., CommandQueue]) -> CommandQueue:
    return make_queue()


def now_of(clock: Clock) -> dt.datetime:
    return dt.datetime.fromtimestamp(clock(), tz=dt.UTC)


def add(queue: CommandQueue, key: str, *, vin: str | None = VIN, msisdn: str | None = None,
        command: str = "flash_lights", params: Mapping[str, Any] | None = None
        ) -> dict[str, Any]:
    return queue.enqueue(key=key, command=command, vin=vin, msisdn=msisdn,
                         params=params or {})


def get(queue: CommandQueue, key: str) -> dict[str, Any]:
    row = queue.get(key)
    assert row is not None
    return row


def delay_s(row: Mapping[str, Any], clock: Clock) -> float:
    return float((as_utc(row["next_attempt_at"]) - now_of(clock)).total_seconds())


# -- settings ----------------------------------------------------------------------------


POSITIVE = r"^poll_s, budget_s, lease_s must be positive, concurrency >= 1$"
BACKOFF = r"^need 0 <= backoff_initial_s <= backoff_max_s$"


@pytest.mark.parametrize(("bad", "error"), [
    ({"poll_s": 0}, POSITIVE), ({"budget_s": 0}, POSITIVE), ({"lease_s": 0}, POSITIVE),
    ({"concurrency": 0}, POSITIVE), ({"backoff_initial_s": -0.1}, BACKOFF),
    ({"backoff_max_s": 0.5}, BACKOFF)])
def test_bad_settings_are_refused(make_queue: Callable[..., CommandQueue],
                                  bad: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        make_queue(**bad)


def test_the_defaults_the_app_relies_on(store: Store) -> None:
    queue = CommandQueue(store, None)  # the app sets only the clock and poll_s
    assert queue.poll_s == 1.0 and queue.budget == dt.timedelta(minutes=5)
    assert queue.backoff_initial_s == 0.5 and queue.backoff_max_s == 15.0
    assert queue.lease == dt.timedelta(seconds=30) and queue.concurrency == 4
    assert queue.confirm_window == dt.timedelta(minutes=5)  # GATEWAY_COMMAND_CONFIRM_S's default
    assert queue.on_settled is None and queue.thread is None
    before = time.time()
    assert before - 1 <= queue._now().timestamp() <= time.time() + 1  # the wall clock


@pytest.mark.parametrize("bad", [0, -1, -0.001])
def test_a_confirmation_window_that_is_not_positive_is_refused(
        make_queue: Callable[..., CommandQueue], bad: float) -> None:
    with pytest.raises(ValueError, match=r"^confirm_s must be positive$"):
        make_queue(confirm_s=bad)


def test_the_smallest_settings_are_accepted(make_queue: Callable[..., CommandQueue]) -> None:
    queue = make_queue(poll_s=0.01, budget_s=0.01, lease_s=1.5, concurrency=1,
                       backoff_initial_s=0.0, backoff_max_s=0.0, confirm_s=0.01)
    assert queue.concurrency == 1 and queue.lease == dt.timedelta(seconds=1.5)
    assert queue.confirm_window == dt.timedelta(seconds=0.01)
    assert queue.budget == dt.timedelta(seconds=0.01) and queue.poll_s == 0.01
    equal = make_queue(backoff_initial_s=2.0, backoff_max_s=2.0)
    assert equal.backoff_initial_s == 2.0 == equal.backoff_max_s
    assert make_queue(commands=None).commands is None  # no adapter: nothing to compare


def test_the_lease_must_outlast_one_send(make_queue: Callable[..., CommandQueue]) -> None:
    # the client's total_budget_s is 1.0
    with pytest.raises(ValueError, match=r"lease_s \(1\) must exceed the adapter's "
                                         r"total_budget_s \(1\)"):
        make_queue(lease_s=1.0)
    assert make_queue(lease_s=1.01).lease == dt.timedelta(seconds=1.01)


# -- a row's limits ----------------------------------------------------------------------


def test_the_longest_fields_fit(queue: CommandQueue) -> None:
    row = add(queue, "k" * 128, command="c" * 64, vin="V" * 17)
    assert row["key"] == "k" * 128 and row["command"] == "c" * 64 and row["vin"] == "V" * 17


@pytest.mark.parametrize(("bad", "error"), [
    ({"key": "k" * 129}, "^key must be 1 to 128 characters$"),
    ({"command": "c" * 65}, "^command must be 1 to 64 characters$"),
    ({"command": ""}, "^command must be 1 to 64 characters$"),
    ({"vin": "V" * 18}, "^vin is at most 17 characters$"),
    ({"vin": "", "msisdn": ""}, "^a command needs a vin or an msisdn to find the car$"),
    ({"params": {"command": 1, "idempotency_key": 2}},
     r"^params may not be named \['command', 'idempotency_key'\]$"),
])
def test_malformed_rows_are_refused(queue: CommandQueue, bad: dict[str, Any],
                                    error: str) -> None:
    args: dict[str, Any] = {"key": "k", "command": "flash_lights", "vin": VIN, "msisdn": None,
                            "params": {}}
    with pytest.raises(ValueError, match=error):
        queue.enqueue(**{**args, **bad})
    assert queue.get("k") is None


def test_empty_vin_or_msisdn_is_stored_as_none(queue: CommandQueue, clock: Clock) -> None:
    params = {"nested": {"a": [1, 2]}}
    row = add(queue, "k", vin="", msisdn="+4520000001", params=params)
    params["nested"]["a"].append(3)  # the caller's later change is not the row's
    assert row["vin"] is None and row["msisdn"] == "+4520000001"
    assert row["params"] == {"nested": {"a": [1, 2]}}
    assert row["status"] == "pending" and row["attempts"] == 0 and row["lease_token"] is None
    assert row["next_attempt_at"] == row["created_at"] == row["updated_at"] == now_of(clock)
    other = add(queue, "k2", vin=VIN, msisdn="")
    assert other["msisdn"] is None and other["vin"] == VIN


# -- backoff -----------------------------------------------------------------------------


def test_backoff_doubles_with_jitter_up_to_the_cap(make_queue: Callable[..., CommandQueue],
                                                  car: FakeCarCommands, clock: Clock) -> None:
    car.mode = "503"
    queue = make_queue(backoff_initial_s=1.0, backoff_max_s=4.0, concurrency=8)
    keys = [f"k{n}" for n in range(8)]
    for key in keys:
        add(queue, key)
    # initial * 2**(attempt-1) + U(0, initial), at most backoff_max_s
    bounds = [(1.0, 2.0), (2.0, 3.0), (4.0, 4.0), (4.0, 4.0)]
    for attempt, (low, high) in enumerate(bounds, start=1):
        assert queue.run_once() == 8
        rows = [get(queue, k) for k in keys]
        delays = [delay_s(r, clock) for r in rows]
        assert all(r["attempts"] == attempt and r["status"] == "pending" for r in rows)
        assert all(low <= d <= high for d in delays), (attempt, delays)
        if low != high:
            assert len(set(delays)) > 1  # jittered: the rows do not all come back at once
        assert all(r["last_error"].startswith("car unreachable: ") for r in rows)
        clock.advance(max(delays))


def test_backoff_of_many_attempts_stays_at_the_cap(
        make_queue: Callable[..., CommandQueue], store: Store, car: FakeCarCommands,
        clock: Clock) -> None:
    car.mode = "503"
    queue = make_queue(backoff_initial_s=0.5, backoff_max_s=3.0, budget_s=100_000.0)
    add(queue, "k")
    with store.begin() as conn:  # a row retried for a very long time
        conn.execute(vehicle_commands.update().values(attempts=5000))
    assert queue.run_once() == 1
    row = get(queue, "k")
    assert row["attempts"] == 5001 and row["status"] == "pending"
    assert delay_s(row, clock) == 3.0


def test_backoff_without_jitter_when_initial_is_zero(
        make_queue: Callable[..., CommandQueue], car: FakeCarCommands, clock: Clock) -> None:
    car.mode = "503"
    queue = make_queue(backoff_initial_s=0.0, backoff_max_s=0.0)
    add(queue, "k")
    assert queue.run_once() == 1
    row = get(queue, "k")
    assert row["status"] == "pending" and delay_s(row, clock) == 0.0
    assert queue.run_once() == 1 and get(queue, "k")["attempts"] == 2  # due again at once


def test_the_retry_is_not_later_than_the_budget(make_queue: Callable[..., CommandQueue],
                                                car: FakeCarCommands, clock: Clock) -> None:
    car.mode = "503"
    queue = make_queue(budget_s=60.0, backoff_initial_s=4.0, backoff_max_s=8.0)
    created = add(queue, "k")["created_at"]
    clock.advance(58.5)
    assert queue.run_once() == 1
    row = get(queue, "k")
    assert row["status"] == "pending"
    assert as_utc(row["next_attempt_at"]) == created + dt.timedelta(seconds=60)


def test_a_failure_exactly_at_the_budget_gives_up(make_queue: Callable[..., CommandQueue],
                                                  car: FakeCarCommands, clock: Clock) -> None:
    car.mode = "503"
    queue = make_queue(budget_s=60.0)
    add(queue, "k")
    clock.advance(60)  # created_at == now - budget: not expired, sent once more
    assert queue.run_once() == 1
    row = get(queue, "k")
    assert row["status"] == "failed" and row["lease_token"] is None
    assert row["last_error"].startswith("gave up after 1 attempt(s) in 60s: ")
    assert "HTTP 503" in row["last_error"] and len(car.commands) == 1


# -- what handle() sends and records -----------------------------------------------------


def test_private_params_are_not_sent(queue: CommandQueue, car: FakeCarCommands) -> None:
    add(queue, "k", params={"_asked_by": "owner", "duration_s": 10})
    assert queue.run_once() == 1
    [sent] = car.commands
    assert sent["body"] == {"command": "flash_lights", "duration_s": 10}
    assert get(queue, "k")["params"] == {"_asked_by": "owner", "duration_s": 10}


class Answers:
    """A vehicle command service stand-in answering each send from a list (an object
    the adapter would hand back, or an exception it would raise)."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.sent: list[tuple[str, str, dict[str, Any]]] = []

    def send(self, vin: str, command: str, **params: Any) -> Any:
        self.sent.append((vin, command, params))
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


@pytest.mark.parametrize(("answer", "status", "error"), [
    ({"status": "EXECUTED"}, "confirmed", None),
    ({"status": "completed"}, "confirmed", None),
    ({"status": "succeeded"}, "confirmed", None),
    ({"status": "success"}, "confirmed", None),
    ({"status": "failed"}, "failed", "car rejected 'flash_lights': failed"),
    ({"status": "Refused", "message": "doors open"}, "failed",
     "car rejected 'flash_lights': doors open"),
    ({"status": "error"}, "failed", "car rejected 'flash_lights': error"),
    ({"status": "rejected", "reason": "r" * 400}, "failed",
     ("car rejected 'flash_lights': " + "r" * 400)[:300]),
    (["not", "a", "dict"], "sent", None),
    ({"command_id": "c1"}, "sent", None),
    ({"status": "queued", "at": dt.datetime(2026, 1, 2, tzinfo=dt.UTC)}, "sent", None),
])
def test_the_cars_answer_decides_the_status(make_queue: Callable[..., CommandQueue],
                                            clock: Clock, answer: Any, status: str,
                                            error: str | None) -> None:
    settled: list[dict[str, Any]] = []

    def on_settled(conn: Connection, row: Mapping[str, Any]) -> None:
        inside = conn.execute(sa.select(vehicle_commands.c.status)
                              .where(vehicle_commands.c.key == row["key"])).scalar_one()
        settled.append({**row, "inside": inside})  # called in the transaction that settles

    queue = make_queue(commands=Answers(TransientUpstreamError("car unreachable"), answer),
                       on_settled=on_settled)
    add(queue, "k")
    assert queue.run_once() == 1 and get(queue, "k")["last_error"] == "car unreachable"
    clock.advance(5)
    [held] = queue.claim(1)
    clock.advance(1)  # the answer comes a second later
    assert queue.handle(held) == status
    row = get(queue, "k")
    assert row["status"] == status and row["last_error"] == error
    assert row["lease_token"] is None and row["lease_until"] is None
    assert row["updated_at"] == now_of(clock)
    assert (row["confirmed_at"] == now_of(clock)) is (status == "confirmed")
    if isinstance(answer, dict) and "at" in answer:
        assert row["result"]["at"] == "2026-01-02 00:00:00+00:00"  # stored as text
    if status == "sent":
        assert settled == []  # the car has not settled it yet
    else:
        assert [(r["key"], r["status"], r["inside"], r["vin"]) for r in settled] == [
            ("k", status, status, VIN)]
        assert settled[0]["lease_token"] is None and settled[0]["lease_until"] is None
        assert settled[0]["updated_at"] == now_of(clock) and settled[0]["attempts"] == 2


@pytest.mark.parametrize(("result", "reason"), [
    ({"error": "e", "reason": "r", "message": "m", "status": "s"}, "e"),
    ({"error": "", "reason": "r", "message": "m"}, "r"),
    ({"message": "m", "status": "s"}, "m"),
    ({"status": "s"}, "s"),
    ({"other": 1}, "no reason given"),
])
def test_the_reason_a_car_gives(queue: CommandQueue, car: FakeCarCommands,
                                result: dict[str, Any], reason: str) -> None:
    car.mode = "up"
    add(queue, "k")
    queue.run_once()
    failed = queue.confirm(key="k", ok=False, result=result)
    assert failed is not None and failed["last_error"] == f"car reported failure: {reason}"


def test_an_unexpected_error_is_retried(make_queue: Callable[..., CommandQueue],
                                        clock: Clock) -> None:
    commands = Answers(KeyError("status"), {"status": "ok"})
    queue = make_queue(commands=commands)
    add(queue, "k")
    assert queue.run_once() == 1
    row = get(queue, "k")
    assert row["status"] == "pending" and row["last_error"] == "KeyError: 'status'"
    assert 1.0 <= delay_s(row, clock) <= 2.0
    clock.advance(2)
    assert queue.run_once() == 1 and get(queue, "k")["status"] == "confirmed"
    assert [s[:2] for s in commands.sent] == [(VIN, "flash_lights")] * 2
    assert commands.sent[0][2] == {"idempotency_key": "k"}


def test_a_failure_keeps_the_rows_vin(make_queue: Callable[..., CommandQueue]) -> None:
    queue = make_queue(commands=None)
    add(queue, "k", vin=OTHER_VIN)
    assert queue.run_once() == 1
    row = get(queue, "k")
    assert row["status"] == "failed" and row["vin"] == OTHER_VIN
    assert row["last_error"] == ("vehicle command service is not configured "
                                 "(GATEWAY_VEHICLE_COMMAND_URL)")


def test_a_long_error_is_cut_to_300(make_queue: Callable[..., CommandQueue],
                                    car: FakeCarCommands) -> None:
    queue = make_queue(commands=Answers(RuntimeError("x" * 500),
                                        PermanentUpstreamError("y" * 500, 400)))
    add(queue, "k")
    queue.run_once()
    assert get(queue, "k")["last_error"] == ("RuntimeError: " + "x" * 500)[:300]
    add(queue, "p")
    queue.claim_key("p")
    assert queue.handle(get(queue, "p")) == "failed"
    assert get(queue, "p")["last_error"] == "y" * 300
    car.mode = "up"
    add(queue, "c", params={})
    sent = make_queue().send_now("c")
    assert sent is not None and sent["status"] == "sent"
    failed = queue.confirm(key="c", ok=False, result={"error": "z" * 400})
    assert failed is not None and failed["last_error"] == ("car reported failure: " + "z" * 400)[:300]


def test_the_resolved_vin_is_kept_on_retry_and_failure(
        make_queue: Callable[..., CommandQueue], store: Store, clock: Clock) -> None:
    with store.begin() as conn:
        conn.execute(vehicles.insert().values(
            vin=OTHER_VIN, car_msisdn="+4520000001", owner_name="Test Owner", market="DK",
            purchase_date=dt.date(2024, 1, 1), lookup_code=OTHER_VIN[-8:],
            updated_at=dt.datetime.now(dt.UTC)))
    commands = Answers(TransientUpstreamError("down"), PermanentUpstreamError("HTTP 404", 404),
                       TransientUpstreamError("still down"))
    queue = make_queue(commands=commands, budget_s=60.0)
    add(queue, "retried", vin=None, msisdn="+4520000001")
    [held] = queue.claim(1)
    assert queue.handle(held) == "pending"
    assert get(queue, "retried")["vin"] == OTHER_VIN
    add(queue, "refused", vin=None, msisdn="+4520000001")
    queue.claim_key("refused")
    assert queue.handle(get(queue, "refused")) == "failed"
    row = get(queue, "refused")
    assert row["vin"] == OTHER_VIN and row["last_error"] == "HTTP 404"
    add(queue, "late", vin=None, msisdn="+4520000001")
    clock.advance(60)  # its first attempt fails when the budget ends: given up
    queue.claim_key("late")
    assert queue.handle(get(queue, "late")) == "failed"
    late = get(queue, "late")
    assert late["vin"] == OTHER_VIN and late["last_error"].startswith("gave up after 1 attempt")
    assert [s[0] for s in commands.sent] == [OTHER_VIN] * 3


def test_a_failure_of_a_row_no_longer_held_is_lost(
        make_queue: Callable[..., CommandQueue]) -> None:
    queue = make_queue(commands=None)
    add(queue, "k")
    [held] = queue.claim(1)
    assert queue.cancel("k") is True
    assert queue.handle(held) == "lost" and get(queue, "k")["status"] == "cancelled"


# -- which row a result settles ----------------------------------------------------------


def test_a_result_settles_the_row_named_by_key_before_the_row_with_that_id(
        queue: CommandQueue, car: FakeCarCommands) -> None:
    car.mode = "up"
    first = add(queue, "handback:first")
    second = add(queue, str(first["id"]))  # a key that reads like the first row's id
    assert queue.run_once() == 2
    done = queue.confirm(key=str(first["id"]), ok=True, result={"n": 2})
    assert done is not None and done["id"] == second["id"] and done["status"] == "confirmed"
    assert get(queue, "handback:first")["status"] == "sent"
    by_id = queue.confirm(key=str(second["id"]), ok=True, result={"n": 1})
    assert by_id is not None and by_id["id"] == second["id"]  # its own key, not row 2
    assert queue.confirm(key="999", ok=True, result={}) is None


def test_a_result_for_a_failed_or_cancelled_row(make_queue: Callable[..., CommandQueue],
                                                clock: Clock) -> None:
    settled: list[tuple[str, str]] = []
    queue = make_queue(commands=Answers({"status": "rejected"}),
                       on_settled=lambda conn, row: settled.append((row["key"], row["status"])))
    add(queue, "k")
    queue.run_once()
    assert get(queue, "k")["status"] == "failed"
    assert queue.confirm(key="k", ok=False, result={"error": "again"}) == get(queue, "k")
    clock.advance(5)
    late = queue.confirm(key="k", ok=True, result={"done": True})  # it did it after all
    assert late is not None and late["status"] == "confirmed" and late["last_error"] is None
    assert late["confirmed_at"] == now_of(clock) == late["updated_at"]
    assert late["result"] == {"done": True}
    assert settled == [("k", "failed"), ("k", "confirmed")]

    add(queue, "c")
    assert queue.cancel("c") is True
    assert queue.confirm(key="c", ok=True, result={}) == get(queue, "c")
    assert get(queue, "c")["status"] == "cancelled" and settled[-1] == ("k", "confirmed")


def test_a_result_takes_the_row_from_its_sender(make_queue: Callable[..., CommandQueue],
                                                clock: Clock) -> None:
    queue = make_queue(commands=Answers({"status": "accepted"}))
    add(queue, "k")
    [held] = queue.claim(1)
    assert held["lease_token"] is not None
    done = queue.confirm(key="k", ok=False, result={"reason": "ignition on"})
    assert done is not None and done["status"] == "failed"
    assert done["lease_token"] is None and done["lease_until"] is None
    assert done["result"] == {"reason": "ignition on"} and done["confirmed_at"] is None


def test_a_result_is_recorded_with_the_settling_or_not_at_all(
        make_queue: Callable[..., CommandQueue], car: FakeCarCommands) -> None:
    car.mode = "up"
    seen: list[Any] = []

    def on_settled(conn: Connection, row: Mapping[str, Any]) -> None:
        inside = conn.execute(sa.select(vehicle_commands.c.status)
                              .where(vehicle_commands.c.key == row["key"])).scalar_one()
        seen.append((row["status"], inside))
        if row["result"] == {"boom": True}:
            raise RuntimeError("the registry's update failed")

    queue = make_queue(on_settled=on_settled)
    add(queue, "k")
    queue.run_once()
    with pytest.raises(RuntimeError):
        queue.confirm(key="k", ok=True, result={"boom": True})
    assert get(queue, "k")["status"] == "sent"  # rolled back with the settling
    done = queue.confirm(key="k", ok=False, result={"error": "no"})
    assert done is not None and done["status"] == "failed"
    assert seen == [("confirmed", "confirmed"), ("failed", "failed")]


# -- cancel, claim, pending, expire ------------------------------------------------------


def test_cancel_only_a_pending_row(queue: CommandQueue, car: FakeCarCommands,
                                   clock: Clock) -> None:
    add(queue, "p")
    [held] = queue.claim(1)
    clock.advance(3)
    assert queue.cancel("p") is True
    row = get(queue, "p")
    assert row["status"] == "cancelled" and row["lease_token"] is None
    assert row["lease_until"] is None and row["updated_at"] == now_of(clock)
    assert queue.cancel("p") is False and queue.cancel("nothing") is False
    assert queue.handle(held) == "lost" and get(queue, "p")["status"] == "cancelled"
    car.mode = "up"
    add(queue, "s")
    queue.run_once()
    assert queue.cancel("s") is False and get(queue, "s")["status"] == "sent"
    assert queue.claim(4) == [] and [r["key"] for r in queue.pending()] == ["s"]
    add(queue, "x")
    add(queue, "y")
    assert queue.cancel("x") is True
    assert get(queue, "x")["status"] == "cancelled" and get(queue, "y")["status"] == "pending"


def test_claim_key_and_send_now_leave_a_finished_row_alone(queue: CommandQueue,
                                                           car: FakeCarCommands) -> None:
    add(queue, "k")
    assert queue.run_once() == 1 and get(queue, "k")["status"] == "confirmed"
    assert queue.claim_key("k") is None
    assert get(queue, "k")["lease_token"] is None and get(queue, "k")["attempts"] == 1
    started = time.monotonic()
    again = queue.send_now("k")
    assert again is not None and again["status"] == "confirmed"
    assert time.monotonic() - started < 0.5 and len(car.commands) == 1


def test_claim_takes_the_due_rows_oldest_first_up_to_the_limit(
        queue: CommandQueue, store: Store, clock: Clock) -> None:
    for key in ("a", "b", "c", "d"):
        add(queue, key)
    now = now_of(clock)
    with store.begin() as conn:  # a is due last, d not yet
        conn.execute(vehicle_commands.update().where(vehicle_commands.c.key == "a")
                     .values(next_attempt_at=now - dt.timedelta(seconds=1)))
        conn.execute(vehicle_commands.update().where(vehicle_commands.c.key == "b")
                     .values(next_attempt_at=now - dt.timedelta(seconds=5)))
        conn.execute(vehicle_commands.update().where(vehicle_commands.c.key == "d")
                     .values(next_attempt_at=now + dt.timedelta(seconds=1)))
    first = queue.claim(2)
    assert [r["key"] for r in first] == ["a", "b"]  # by id, after choosing b and a
    assert all(r["lease_until"] == now + dt.timedelta(seconds=10) for r in first)
    assert all(r["attempts"] == 1 and r["updated_at"] == now for r in first)
    assert len({r["lease_token"] for r in first}) == 1
    [c] = queue.claim(4)  # c is due exactly now; d is not due yet
    assert c["key"] == "c" and c["lease_token"] != first[0]["lease_token"]
    assert get(queue, "d")["lease_token"] is None and get(queue, "d")["attempts"] == 0
    clock.advance(1)
    assert [r["key"] for r in queue.claim(4)] == ["d"]


def test_claim_takes_over_a_lease_only_after_it_ends(queue: CommandQueue,
                                                     clock: Clock) -> None:
    add(queue, "k")
    [first] = queue.claim(4)
    clock.advance(10)  # lease_s: the lease ends after, not at, 10 s
    assert queue.claim(4) == []
    clock.advance(0.5)
    [second] = queue.claim(4)
    assert second["attempts"] == 2 and second["lease_token"] != first["lease_token"]


def test_pending_lists_unfinished_rows_of_one_car(make_queue: Callable[..., CommandQueue],
                                                  ) -> None:
    queue = make_queue(commands=Answers({"status": "accepted"}, {"status": "done"}))
    add(queue, "sent")
    add(queue, "done", vin=OTHER_VIN)
    queue.run_once()
    add(queue, "new", vin=OTHER_VIN)
    add(queue, "mine")
    assert [r["key"] for r in queue.pending()] == ["sent", "new", "mine"]
    assert [r["key"] for r in queue.pending(VIN)] == ["sent", "mine"]
    assert [r["key"] for r in queue.pending(OTHER_VIN)] == ["new"]


def test_expiry_boundary_and_leased_rows(make_queue: Callable[..., CommandQueue],
                                         car: FakeCarCommands, clock: Clock) -> None:
    settled: list[tuple[str, str, str | None]] = []
    queue = make_queue(budget_s=60.0, lease_s=100.0,
                       on_settled=lambda c, r: settled.append(
                           (r["key"], r["status"], r["last_error"])))
    car.mode = "refuse"
    add(queue, "old")
    add(queue, "held")
    assert queue.claim_key("held") is not None  # a sender holds it past the budget
    clock.advance(1)
    add(queue, "young")
    clock.advance(59)
    assert queue._expire() == 0  # "old" is exactly 60 s old: not yet
    clock.advance(0.5)
    assert queue._expire() == 1
    assert settled == [("old", "failed", "not sent within 60s")]
    old = get(queue, "old")
    assert old["status"] == "failed" and old["updated_at"] == now_of(clock)
    assert get(queue, "held")["status"] == "pending"
    assert get(queue, "young")["status"] == "pending"


def test_nothing_but_the_cars_result_restarts_a_sent_rows_window(
        make_queue: Callable[..., CommandQueue], car: FakeCarCommands, clock: Clock) -> None:
    """The window counts from ``updated_at``, the moment the row became ``sent``: what
    else a request or a worker does with the row leaves it alone."""
    queue = make_queue(confirm_s=100.0)
    car.mode = "up"
    add(queue, "k")
    assert queue.run_once() == 1
    sent = get(queue, "k")
    assert sent["status"] == "sent" and sent["updated_at"] == now_of(clock)
    clock.advance(50)
    assert add(queue, "k") == sent  # a replayed enqueue
    assert queue.cancel("k") is False and queue.claim_key("k") is None
    assert queue.send_now("k", wait_s=0.1) == sent and queue.claim(4) == []
    assert queue.run_once() == 0 and get(queue, "k") == sent
    clock.advance(50)  # exactly 100 s after the send: not yet
    assert queue.run_once() == 0 and get(queue, "k") == sent
    clock.advance(0.001)
    assert queue.run_once() == 1
    failed = get(queue, "k")
    assert failed["status"] == "failed" and failed["attempts"] == 1
    assert failed["last_error"] == "not confirmed by the car within 100s"
    assert len(car.commands) == 1


def test_a_failing_settlement_leaves_the_sent_row_for_the_next_pass(
        make_queue: Callable[..., CommandQueue], car: FakeCarCommands, clock: Clock) -> None:
    failures = [RuntimeError("the registry's update failed")]
    settled: list[tuple[str, str]] = []

    def on_settled(conn: Connection, row: Mapping[str, Any]) -> None:
        if failures:
            raise failures.pop()
        settled.append((row["key"], row["status"]))

    queue = make_queue(confirm_s=10.0, on_settled=on_settled)
    car.mode = "up"
    add(queue, "k")
    queue.run_once()
    clock.advance(11)
    with pytest.raises(RuntimeError):
        queue.run_once()
    assert get(queue, "k")["status"] == "sent" and settled == []  # rolled back together
    assert queue.run_once() == 1
    assert get(queue, "k")["status"] == "failed" and settled == [("k", "failed")]


def test_an_expired_row_loses_its_stale_lease(make_queue: Callable[..., CommandQueue],
                                              clock: Clock) -> None:
    queue = make_queue(budget_s=60.0, lease_s=10.0)
    add(queue, "k")
    assert queue.claim(1)  # a worker that died holding it
    clock.advance(61)
    assert queue.run_once() == 1
    row = get(queue, "k")
    assert row["status"] == "failed" and row["lease_token"] is None
    assert row["lease_until"] is None and row["attempts"] == 1


# -- the worker thread -------------------------------------------------------------------


def test_rows_are_sent_in_parallel(make_queue: Callable[..., CommandQueue],
                                   car: FakeCarCommands) -> None:
    # generous timeouts: seven requests at once on a loaded 2-core CI machine took longer
    # than the 0.3 s client of the other tests (one row was left pending: a flaky failure)
    together = threading.Barrier(7, timeout=10.0)  # more than a default pool's 6 threads
    client = VehicleCommandClient(car.url, timeout_s=5.0, attempts=1, total_budget_s=6.0)

    class WaitsForTheOthers:
        total_budget_s = 6.0

        def send(self, vin: str, command: str, **params: Any) -> dict[str, Any]:
            together.wait()  # breaks unless the seven sends run at once
            return client.send(vin, command, **params)

    queue = make_queue(commands=WaitsForTheOthers(), concurrency=7)
    keys = [f"k{n}" for n in range(8)]
    for key in keys:
        add(queue, key)
    try:
        assert queue.run_once() == 7
    finally:
        client.close()
    assert [get(queue, k)["status"] for k in keys] == ["confirmed"] * 7 + ["pending"]


def wait_for(check: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def test_the_thread_wakes_for_a_new_row(store: Store, client: VehicleCommandClient,
                                        car: FakeCarCommands) -> None:
    queue = CommandQueue(store, client, poll_s=30.0, lease_s=5.0)
    queue.start_thread()
    try:
        assert queue.thread is not None and queue.thread.daemon
        assert queue.thread.name == "command-queue"
        time.sleep(0.2)  # the thread found nothing and waits up to poll_s
        add(queue, "k")
        assert wait_for(lambda: get(queue, "k")["status"] == "confirmed", timeout=2.0)
        time.sleep(0.2)
        add(queue, "k2")  # woken again: the wake-up was cleared after the first
        assert wait_for(lambda: get(queue, "k2")["status"] == "confirmed", timeout=2.0)
    finally:
        queue.stop(wait_s=5.0)
    assert not queue.thread.is_alive()


def test_stop_without_waiting_returns_at_once(store: Store,
                                              client: VehicleCommandClient) -> None:
    queue = CommandQueue(store, client, poll_s=30.0, lease_s=5.0)
    queue.stop(wait_s=5.0)  # no thread: nothing to join
    queue.stopping.clear()
    queue.start_thread()
    assert queue.thread is not None
    started = time.monotonic()
    queue.stop()
    assert queue.stopping.is_set() and queue.wake.is_set()
    queue.thread.join(5.0)
    assert not queue.thread.is_alive() and time.monotonic() - started < 5.0


class CountingClock:
    """The wall clock, counting how often the queue reads it (three times a pass)."""

    def __init__(self) -> None:
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return time.time()


def test_an_idle_thread_polls_every_poll_s(store: Store,
                                           client: VehicleCommandClient) -> None:
    clock = CountingClock()
    queue = CommandQueue(store, client, clock=clock, poll_s=0.2, lease_s=5.0)
    queue.start_thread()
    try:
        time.sleep(1.0)  # about five passes of two reads, not a busy loop
    finally:
        queue.stop(wait_s=5.0)
    assert 4 <= clock.reads <= 30


def test_the_thread_outlives_a_database_outage(tmp_path: Any, client: VehicleCommandClient,
                                               car: FakeCarCommands) -> None:
    store = Store.from_url(f"sqlite:///{tmp_path}/late.sqlite3")  # no tables yet
    clock = CountingClock()
    queue = CommandQueue(store, client, clock=clock, poll_s=0.1, lease_s=5.0)
    queue.start_thread()
    try:
        time.sleep(0.5)  # passes fail with StoreError, and wait poll_s between them
        assert queue.thread is not None and queue.thread.is_alive()
        assert 2 <= clock.reads <= 30
        store.create_schema()
        add(queue, "k")
        assert wait_for(lambda: get(queue, "k")["status"] == "confirmed")
    finally:
        queue.stop(wait_s=5.0)
        store.dispose()


def test_a_pass_failing_every_time_does_not_spin(store: Store,
                                                 client: VehicleCommandClient) -> None:
    def on_settled(conn: Connection, row: Mapping[str, Any]) -> None:
        raise RuntimeError("the registry's update failed")

    clock = CountingClock()
    queue = CommandQueue(store, client, clock=clock, poll_s=0.1, budget_s=0.01, lease_s=5.0,
                         on_settled=on_settled)
    add(queue, "k")  # expires at once, and each pass's expiry is rolled back
    time.sleep(0.05)
    queue.start_thread()
    try:
        time.sleep(0.5)
        assert queue.thread is not None and queue.thread.is_alive()
    finally:
        queue.stop(wait_s=5.0)
    assert 2 <= clock.reads <= 30 and get(queue, "k")["status"] == "pending"


def test_stop_waits_up_to_wait_s(make_queue: Callable[..., CommandQueue]) -> None:
    release = threading.Event()

    class SlowCar:
        total_budget_s = 1.0

        def send(self, vin: str, command: str, **params: Any) -> dict[str, Any]:
            release.wait(5.0)
            return {"status": "done"}

    queue = make_queue(commands=SlowCar(), poll_s=0.05)
    add(queue, "k")
    queue.start_thread()
    assert queue.thread is not None
    time.sleep(0.2)  # the thread is in the send
    started = time.monotonic()
    queue.stop(wait_s=0.3)  # the send does not end in time: stop returns anyway
    assert 0.25 <= time.monotonic() - started < 2.0 and queue.thread.is_alive()
    threading.Timer(0.2, release.set).start()
    queue.stop(wait_s=3.0)  # the send ends: stop returns when the thread has ended
    assert not queue.thread.is_alive() and get(queue, "k")["status"] == "confirmed"


def test_the_thread_outlives_a_failing_pass(store: Store, client: VehicleCommandClient,
                                            car: FakeCarCommands) -> None:
    failures = [RuntimeError("the registry's update failed")]

    def on_settled(conn: Connection, row: Mapping[str, Any]) -> None:
        if failures:
            raise failures.pop()

    queue = CommandQueue(store, client, poll_s=0.05, lease_s=1.5, on_settled=on_settled)
    add(queue, "k")
    queue.start_thread()
    try:  # the first outcome is rolled back; after the lease the row is sent again
        assert wait_for(lambda: get(queue, "k")["status"] == "confirmed", timeout=5.0)
    finally:
        queue.stop(wait_s=5.0)
    assert get(queue, "k")["attempts"] == 2 and car.requests_for("k") == 2


# -- PostgreSQL --------------------------------------------------------------------------


@pytest.mark.postgres
def test_postgres_a_result_settles_its_key_before_a_row_id(
        pg_store: Store, client: VehicleCommandClient, clock: Clock) -> None:
    queue = CommandQueue(pg_store, client, clock=clock, lease_s=10.0)
    first = add(queue, "handback:first")
    second = add(queue, str(first["id"]))  # a key that reads like the first row's id
    done = queue.confirm(key=str(first["id"]), ok=True, result={"n": 2})
    assert done is not None and done["id"] == second["id"] and done["status"] == "confirmed"
    assert get(queue, "handback:first")["status"] == "pending"
    assert queue.claim_key("handback:first") is not None
    assert queue.cancel(str(first["id"])) is False  # confirmed already
