"""Voice steps written after the answer: exactly once, in order, through outages.

The outage tests put PostgreSQL (``GATEWAY_TEST_POSTGRES_URL``) behind
:class:`TcpProxy` and blackhole it: the writer keeps the records, retries, and writes
each one exactly once when the proxy forwards again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from gateway.centre_health import CentreHealth, centre_health
from gateway.metrics import Metrics
from gateway.steps import StepRecord, StepWriter
from gateway.store import Store, call_steps, routing_decisions
from tests.conftest import postgres_url
from tests.support.proxy import TcpProxy, proxied_url


def record(n: int, *, call_sid: str = "CA1", line: str | None = "eu-primary",
           ok: bool = False, **overrides: Any) -> StepRecord:
    values: dict[str, Any] = {
        "call_sid": call_sid, "step": f"dial-result:{n}", "incident_id": None,
        "twiml": f"<Response><Dial>{n}</Dial></Response>", "detail": {"n": n},
        "decision": {"target": "centre", "number": "+4610000000", "centre_id": line,
                     "reason": f"attempt {n}"},
        "health": (line, ok, "dial no-answer") if line else None}
    values.update(overrides)
    return StepRecord(**values)


def count(store: Store, table: sa.Table, **where: Any) -> int:
    query = sa.select(sa.func.count()).select_from(table)
    for name, value in where.items():
        query = query.where(table.c[name] == value)
    with store.begin() as conn:
        return int(conn.execute(query).scalar() or 0)


def failures(store: Store, key: str) -> int:
    with store.begin() as conn:
        value = conn.execute(sa.select(centre_health.c.failures)
                             .where(centre_health.c.key == key)).scalar()
    return int(value or 0)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "postgres":
        yield request.getfixturevalue("pg_store")
        return
    store = Store.from_url(f"sqlite:///{tmp_path}/steps.sqlite3")
    store.create_schema()
    yield store
    store.dispose()


def make_writer(store: Store, **kwargs: Any) -> tuple[StepWriter, CentreHealth, Metrics]:
    health = CentreHealth(store, centre_ids=["eu-primary", "eu-backup"], failure_threshold=3,
                          clock=time.time)
    metrics = Metrics()
    kwargs.setdefault("autostart", False)
    return StepWriter(store, health=health, metrics=metrics, **kwargs), health, metrics


# -- exactly once ---------------------------------------------------------------------------


def test_a_replayed_record_writes_nothing_and_feeds_health_once(store: Store) -> None:
    writer, _, metrics = make_writer(store)
    assert writer.write_now(record(1)) is True
    assert writer.write_now(record(1)) is False
    assert writer.write_now(record(1, twiml="<Response/>")) is False  # same step, other body
    assert count(store, call_steps) == 1
    assert count(store, routing_decisions) == 1
    assert failures(store, "eu-primary") == 1
    stored = store.call_step("CA1", "dial-result:1")
    assert stored is not None and stored["twiml"] == "<Response><Dial>1</Dial></Response>"
    assert sample(metrics, "gateway_steps_written_total") == 1
    assert sample(metrics, "gateway_steps_replayed_total") == 2


def test_health_feeds_open_a_line_and_success_closes_it(store: Store) -> None:
    writer, health, _ = make_writer(store)
    for n in range(1, 4):
        writer.submit(record(n))
    assert writer.flush(timeout=5)
    assert health.unreachable() == {"eu-primary"}
    writer.submit(record(4, ok=True))
    writer.submit(record(5, line=None, decision=None))  # no line: nothing fed
    assert writer.flush(timeout=5)
    assert health.unreachable() == set()
    assert count(store, call_steps) == 5 and count(store, routing_decisions) == 4


def test_a_full_queue_drops_and_counts_and_never_blocks(tmp_path: Path) -> None:
    store = Store.from_url(f"sqlite:///{tmp_path}/full.sqlite3")
    store.create_schema()
    writer, _, metrics = make_writer(store, max_queue=2)
    started = time.monotonic()
    for n in range(5):
        writer.submit(record(n))
    assert time.monotonic() - started < 0.05
    assert writer.depth == 2
    assert sample(metrics, "gateway_steps_dropped_total", reason="queue_full") == 3
    assert sample(metrics, "gateway_step_queue_depth") == 2
    assert writer.flush(timeout=5)
    assert count(store, call_steps) == 2
    assert sample(metrics, "gateway_step_queue_depth") == 0


def test_an_unwritable_record_is_dropped_and_does_not_wedge_the_queue(store: Store) -> None:
    writer, _, metrics = make_writer(store)
    writer.start_thread()
    try:
        bad = record(1, decision={"target": "centre", "reason": None})  # reason is NOT NULL
        writer.submit(bad)
        writer.submit(record(2))
        assert writer.flush(timeout=5)
    finally:
        writer.stop()
    assert store.call_step("CA1", "dial-result:1") is None  # one transaction: all or nothing
    assert store.call_step("CA1", "dial-result:2") is not None
    assert failures(store, "eu-primary") == 1
    assert sample(metrics, "gateway_steps_dropped_total", reason="unwritable") == 1


def test_a_command_is_queued_once_with_its_step(store: Store) -> None:
    commands = pytest.importorskip("gateway.commands")
    store.create_schema()  # the command table, if this module was imported late
    writer, _, _ = make_writer(store)
    command = {"key": "CA1:dial-result:1:unlock", "command": "flash_lights",
               "vin": "WVWZZZ1JZXW000001", "msisdn": None, "params": {"times": 3}}
    assert writer.write_now(record(1, command=command)) is True
    assert writer.write_now(record(1, command=command)) is False
    assert count(store, commands.vehicle_commands) == 1


# -- the app wiring -------------------------------------------------------------------------


def test_the_app_has_a_step_writer_that_starts_on_first_submit(
        make_app: Callable[..., Flask]) -> None:
    app = make_app()
    svc = app.extensions["gateway"]
    assert isinstance(svc.steps, StepWriter)
    svc.steps.submit(record(1, call_sid="CAapp"))
    assert svc.steps.flush(timeout=5)
    assert svc.store.call_step("CAapp", "dial-result:1") is not None
    assert b"gateway_steps_written_total 1.0" in app.test_client().get("/metrics").data
    svc.steps.stop()


# -- through a database outage ---------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("outage", ["blackhole", "refuse"])
def test_records_wait_out_an_outage_and_are_written_exactly_once(
        pg_store: Store, proxy: TcpProxy, outage: str) -> None:
    proxied = Store.from_url(proxied_url(postgres_url() or "", proxy), suspect_s=0.3)
    writer, _, metrics = make_writer(proxied, retry_max_s=0.2, write_timeout_s=0.5)
    writer.start_thread()
    try:
        writer.submit(record(0, call_sid="CAwarm"))
        assert writer.flush(timeout=5)
        proxy.mode = outage  # type: ignore[assignment]
        started = time.monotonic()
        for n in range(20):
            writer.submit(record(n, line=f"line-{n % 2}"))
        assert time.monotonic() - started < 0.1  # submit never waits on the database
        time.sleep(1.5)
        assert writer.depth == 20
        assert count(pg_store, call_steps, call_sid="CA1") == 0
        assert sample(metrics, "gateway_step_write_retries_total") >= 2
        assert not writer.flush(timeout=0.2)

        proxy.mode = "forward"
        assert writer.flush(timeout=10)
        assert count(pg_store, call_steps, call_sid="CA1") == 20
        assert count(pg_store, routing_decisions, call_sid="CA1") == 20
        assert failures(pg_store, "line-0") == 10 and failures(pg_store, "line-1") == 10

        for n in range(20):  # Twilio retried every step: nothing more is written or fed
            writer.submit(record(n, line=f"line-{n % 2}"))
        assert writer.flush(timeout=10)
        assert count(pg_store, call_steps, call_sid="CA1") == 20
        assert failures(pg_store, "line-0") == 10 and failures(pg_store, "line-1") == 10
        assert sample(metrics, "gateway_steps_written_total") == 21
        assert sample(metrics, "gateway_steps_replayed_total") >= 20
    finally:
        writer.stop()
        proxied.dispose()
