"""Transactions on the request thread (``Store.begin``, ``Store.one_statement``) have a
hard deadline too, against a database that accepts TCP and never answers.

Found by trying: with PostgreSQL behind a proxy that stopped forwarding and a warm
pool, twelve event POSTs waited on their INSERT for ever; the eight serving threads
were all taken, and an incoming emergency call was not answered in 10 s.  Here each
transaction is run on a thread of the test's, so a hang fails the test instead of
hanging it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from gateway.errors import StoreError
from gateway.store import Store
from tests.integration.test_store_deadline import warm_pool
from tests.support.proxy import TcpProxy


def outcome_within(seconds: float, work: Callable[[], Any]) -> tuple[float, Any]:
    """(elapsed, result or exception) of ``work`` on a thread; fails if it is still
    running after ``seconds``."""
    box: dict[str, Any] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            box["value"] = work()
        except BaseException as exc:  # noqa: BLE001 -- reported to the test
            box["value"] = exc
        box["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting on the database after {seconds} s"
    return box["elapsed"], box["value"]


def select_one_in_a_transaction(store: Store, **kwargs: Any) -> Any:
    with store.begin(**kwargs) as conn:
        return conn.execute(sa.text("SELECT 1")).scalar()


@pytest.mark.postgres
def test_a_transaction_on_a_hung_database_fails_at_its_deadline(
        proxied: Store, proxy: TcpProxy) -> None:
    warm_pool(proxied)
    assert select_one_in_a_transaction(proxied) == 1
    proxy.mode = "blackhole"
    elapsed, result = outcome_within(6, lambda: select_one_in_a_transaction(proxied))
    assert isinstance(result, StoreError), result
    assert "did not answer within 2.00 s" in str(result)
    assert 1.9 < elapsed < 2.9


@pytest.mark.postgres
def test_a_shorter_deadline_is_kept(proxied: Store, proxy: TcpProxy) -> None:
    warm_pool(proxied)
    proxy.mode = "blackhole"
    elapsed, result = outcome_within(
        6, lambda: select_one_in_a_transaction(proxied, timeout_s=0.5))
    assert isinstance(result, StoreError), result
    assert 0.45 < elapsed < 1.2


@pytest.mark.postgres
def test_one_statement_on_a_hung_database_fails_at_its_deadline(
        proxied: Store, proxy: TcpProxy) -> None:
    """The event INSERT on PostgreSQL runs through one_statement (autocommit)."""
    warm_pool(proxied)
    proxy.mode = "blackhole"
    elapsed, result = outcome_within(
        6, lambda: proxied.one_statement(lambda conn: conn.execute(sa.text("SELECT 1")).scalar()))
    assert isinstance(result, StoreError), result
    assert 1.9 < elapsed < 2.9


@pytest.mark.postgres
def test_after_a_missed_deadline_transactions_fail_fast_then_one_probes(
        proxied: Store, proxy: TcpProxy) -> None:
    """The same suspect window as the deadline threads (``suspect_s`` 0.5 s here): a
    hung database costs one deadline per window, not one per request."""
    warm_pool(proxied)
    proxy.mode = "blackhole"
    outcome_within(6, lambda: select_one_in_a_transaction(proxied, timeout_s=0.5))
    assert proxied.deadline.suspect
    elapsed, result = outcome_within(2, lambda: select_one_in_a_transaction(proxied))
    assert isinstance(result, StoreError) and "suspect" in str(result), result
    assert elapsed < 0.05
    proxy.mode = "forward"
    time.sleep(0.55)
    elapsed, result = outcome_within(6, lambda: select_one_in_a_transaction(proxied))
    assert result == 1  # the probe: answered, and the suspicion is over
    assert not proxied.deadline.suspect


@pytest.mark.postgres
def test_the_connection_a_deadline_cut_is_not_handed_out_again(
        proxied: Store, proxy: TcpProxy) -> None:
    warm_pool(proxied, connections=1)
    proxy.mode = "blackhole"
    outcome_within(6, lambda: select_one_in_a_transaction(proxied, timeout_s=0.3))
    proxy.mode = "forward"
    time.sleep(0.55)  # the suspect window
    for _ in range(3):  # a shut-down socket back in the pool would fail these
        assert select_one_in_a_transaction(proxied) == 1


@pytest.mark.postgres
def test_a_transaction_that_finishes_in_time_is_never_cut(pg_store: Store) -> None:
    """The deadline covers the work, not the caller's whole life: finished work leaves
    its connection alone however long the caller goes on afterwards."""
    for _ in range(3):
        with pg_store.begin(timeout_s=0.3) as conn:
            conn.execute(sa.text("SELECT 1"))
        time.sleep(0.4)
    with pg_store.begin() as conn:
        assert conn.execute(sa.text("SELECT 2")).scalar() == 2
    assert pg_store.deadline.timeouts == 0


@pytest.mark.postgres
def test_an_error_in_time_is_the_callers_and_no_deadline_missed(pg_store: Store) -> None:
    """A database error that came before the deadline reaches the caller as it was
    (transaction(): a caller may want its IntegrityError), counts as no timeout and
    opens no suspect window; the finished work is no longer watched."""
    with pytest.raises(sa.exc.ProgrammingError), pg_store.transaction() as conn:
        conn.execute(sa.text("SELECT * FROM no_such_table"))
    with pytest.raises(StoreError, match="database error: ProgrammingError"), \
            pg_store.begin() as conn:
        conn.execute(sa.text("SELECT * FROM no_such_table"))
    assert pg_store.deadline.timeouts == 0 and not pg_store.deadline.suspect
    assert pg_store.watchdog._jobs == {}


@pytest.mark.postgres
def test_a_background_thread_that_misses_its_deadline_leaves_the_request_threads_alone(
        pg_store: Store) -> None:
    """A slow transaction of the outbox worker, the notifier or the command queue (here
    a statement that sleeps past a short deadline) makes the background slots suspect,
    never the request threads': a call's database work goes on."""
    from gateway.watchdog import background_thread

    outcome: dict[str, Any] = {}

    def slow_pass() -> None:
        try:
            with pg_store.begin(timeout_s=0.3) as conn:
                conn.execute(sa.text("SELECT pg_sleep(1)"))
        except StoreError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=background_thread(slow_pass), daemon=True)
    thread.start()
    thread.join(5)
    assert "did not answer within 0.30 s" in str(outcome["error"])
    assert pg_store.background.suspect
    assert not pg_store.deadline.suspect
    assert select_one_in_a_transaction(pg_store) == 1  # a request thread: not failing fast


@pytest.mark.postgres
def test_a_request_thread_that_misses_its_deadline_makes_the_request_threads_fail_fast(
        pg_store: Store) -> None:
    with (pytest.raises(StoreError, match="did not answer within 0.30 s"),
          pg_store.begin(timeout_s=0.3) as conn):
        conn.execute(sa.text("SELECT pg_sleep(1)"))
    assert pg_store.deadline.suspect
    assert not pg_store.background.suspect
    with pytest.raises(StoreError, match="suspect"):
        select_one_in_a_transaction(pg_store)


@pytest.mark.parametrize("name", ["worker", "notifier", "command_queue"])
def test_the_workers_threads_are_background_threads(make_app: Any, settings: Any,
                                                    name: str) -> None:
    """Each worker's thread is started through background_thread (its deadline misses
    count against the background slots)."""
    from gateway.delivery import build_worker
    from gateway.watchdog import on_background_thread

    app = make_app(settings=settings)
    services = app.extensions["gateway"]
    worker = (build_worker(settings.replace(assistance_url="http://127.0.0.1:9/incidents"),
                           services.store, None)  # run() is replaced: nothing is sent
              if name == "worker" else getattr(services, name))
    assert worker is not None
    seen: list[bool] = []
    worker.run = lambda: seen.append(on_background_thread())  # the thread's body, recorded
    thread = worker.start_thread() or worker.thread
    thread.join(5)
    assert seen == [True]


@pytest.mark.postgres
def test_the_agent_and_vehicle_apis_answer_503_in_time_on_a_hung_database(
        make_app: Any, settings: Any, proxied: Store, proxy: TcpProxy,
        vehicle_headers: dict[str, str]) -> None:
    """The agent's view of a car (its recent commands), a car's command report and an
    event, each against a database that stops answering: a 503 within the deadline, so
    the client retries and no serving thread is held."""
    import datetime as dt

    from gateway.owners import PinHasher, Vehicles
    from tests.support.events import crash_event

    vin = "WBA3A5C51CF256001"
    agent = "agent-token-0123456789abcdef"
    app = make_app(settings=settings.replace(agent_api_tokens={agent: frozenset({"read"})}),
                   store=proxied)
    Vehicles(proxied, PinHasher(n=2**8)).register(
        vin=vin, owner_name="Owner", market="DE", purchase_date=dt.date(2024, 1, 1),
        actor="test", pin="4711", owner_phone="+4915112349999")
    client = app.test_client()
    agent_headers = {"Authorization": f"Bearer {agent}"}
    assert client.get(f"/v1/agent/vehicles/{vin}", headers=agent_headers).status_code == 200
    warm_pool(proxied)
    proxy.mode = "blackhole"
    requests = [
        lambda: client.get(f"/v1/agent/vehicles/{vin}", headers=agent_headers),
        lambda: client.post(f"/v1/vehicles/{vin}/command-results", headers=vehicle_headers,
                            json={"command_id": "cmd-1", "ok": True}),
        lambda: client.post("/v1/events", json=crash_event(), headers=vehicle_headers),
    ]
    for request in requests:
        time.sleep(0.55)  # past the suspect window of the previous miss: each one waits
        elapsed, response = outcome_within(6, request)
        assert not isinstance(response, BaseException), response
        assert response.status_code == 503, response.get_data(as_text=True)
        assert elapsed < 2.9


@pytest.mark.postgres
def test_an_owner_entering_the_pin_on_a_hung_database_hears_an_answer_in_time(
        make_app: Any, proxied: Store, proxy: TcpProxy) -> None:
    """The IVR's PIN check is a transaction on the request thread.  On a database that
    stops answering, the signed PIN step is still answered with TwiML within the
    deadline, a malformed entry too, and no unlock is sent; once the database is back,
    Twilio's replay of the same signed request sends the unlock at most once."""
    import datetime as dt

    from gateway.owners import PinHasher, Vehicles
    from tests.conftest import Twilio
    from tests.support.fakes_adapters import RecordingVehicleCommands
    from tests.support.twilio import call_params, parse

    owner_number, owner_phone, pin = "+442079460902", "+4915112349999", "4711"
    commands = RecordingVehicleCommands()
    app = make_app(commands=commands, store=proxied)
    Vehicles(proxied, PinHasher(n=2**8)).register(
        vin="WBA3A5C51CF256001", owner_name="Owner", market="DE",
        purchase_date=dt.date(2024, 1, 1), actor="test", pin=pin, owner_phone=owner_phone)
    twilio = Twilio(app.test_client())

    def step(url: str, sid: str, **form: str) -> Any:
        return twilio.post(url, call_params(sid, owner_phone, to=owner_number, **form))

    def pin_url(sid: str) -> str:
        menu = parse(step("/twilio/voice", sid).data)
        ask = parse(step(menu.find("Gather").get("action"), sid, Digits="2").data)  # type: ignore[union-attr]
        return str(ask.find("Gather").get("action"))  # type: ignore[union-attr]

    urls = {sid: pin_url(sid) for sid in ("CAhungpin", "CAhungbad")}
    warm_pool(proxied)
    proxy.mode = "blackhole"
    for sid, digits in (("CAhungpin", pin), ("CAhungbad", "12a4#")):
        time.sleep(0.55)  # past the suspect window of the previous miss: each one waits
        elapsed, response = outcome_within(6, lambda: step(urls[sid], sid, Digits=digits))  # noqa: B023
        assert not isinstance(response, BaseException), response
        assert response.status_code == 200
        assert parse(response.data).find("Say") is not None  # a person hears something
        assert elapsed < 2.9
    assert commands.calls == []
    proxy.mode = "forward"
    time.sleep(0.55)  # the suspect window: then the database is probed and back
    replays = [step(urls["CAhungpin"], "CAhungpin", Digits=pin) for _ in range(3)]
    assert all(r.status_code == 200 for r in replays)
    assert replays[1].data == replays[0].data == replays[2].data
    assert len([c for c in commands.calls if c.args["command"] == "unlock"]) <= 1


def test_the_workers_pool_threads_are_background_threads_too(tmp_path: Any) -> None:
    """The command queue sends, and the outbox worker delivers, on pool threads started
    from its background thread: their transactions are background work as well (not the
    request threads' suspect window)."""
    from gateway.commands import CommandQueue
    from gateway.config import DeliveryPolicy
    from gateway.delivery import OutboxWorker, outbox_rows
    from gateway.events import parse_event
    from gateway.incidents import record_event
    from gateway.plan import load_plan
    from gateway.watchdog import background_thread, on_background_thread
    from tests.support.events import crash_event

    store = Store.from_url(f"sqlite:///{tmp_path}/pools.sqlite3")
    store.create_schema()
    seen: list[tuple[str, bool]] = []

    class Commands:
        def send(self, vin: str, command: str, **params: Any) -> dict[str, Any]:
            seen.append(("command", on_background_thread()))
            return {"status": "confirmed", "command_id": f"cmd-{len(seen)}"}

    class Sink:
        def send_incident(self, payload: Any, *, idempotency_key: str) -> int:
            seen.append(("incident", on_background_thread()))
            return 201

    try:
        queue = CommandQueue(store, Commands(), poll_s=0.05)
        for n in range(2):  # two rows: sent in parallel, on a pool
            queue.enqueue(key=f"k{n}", command="flash_lights", vin="WBA3A5C51CF256001",
                          msisdn=None, params={})
        plan = load_plan()
        for _ in range(2):
            record_event(parse_event(crash_event()), store=store, locator=None, plan=plan,
                         extra_rows=outbox_rows)
        worker = OutboxWorker(store, Sink(), policy=DeliveryPolicy())
        for body in (queue.run_once, worker.run_once):
            thread = threading.Thread(target=background_thread(body), daemon=True)
            thread.start()
            thread.join(10)
        assert sorted(seen) == [("command", True)] * 2 + [("incident", True)] * 2
    finally:
        store.dispose()


@pytest.mark.postgres
def test_a_command_queue_pass_on_a_hung_database_ends_at_its_deadline(
        proxied: Store, proxy: TcpProxy) -> None:
    """The queue's pass (expiry, claim, send) on its background thread, against a
    database that stops answering: it ends with DeadlineMissed within the deadline (the
    loop logs it and waits for the next pass), and only background work is suspect."""
    from gateway.commands import CommandQueue
    from gateway.watchdog import DeadlineMissed, background_thread
    from tests.support.fakes_adapters import RecordingVehicleCommands

    commands = RecordingVehicleCommands()
    queue = CommandQueue(proxied, commands, poll_s=0.05)
    queue.enqueue(key="k-hung", command="flash_lights", vin="WBA3A5C51CF256001",
                  msisdn=None, params={})
    warm_pool(proxied)
    proxy.mode = "blackhole"
    outcome: dict[str, Any] = {}

    def one_pass() -> None:
        try:
            outcome["handled"] = queue.run_once()
        except StoreError as exc:
            outcome["error"] = exc

    elapsed, _ = outcome_within(6, background_thread(one_pass))
    assert isinstance(outcome.get("error"), DeadlineMissed), outcome
    assert elapsed < 2.9
    assert commands.calls == []  # nothing sent that could not be recorded
    assert proxied.background.suspect and not proxied.deadline.suspect
