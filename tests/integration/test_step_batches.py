"""The step writer's batches and the steps a replay may read from memory.

Queued records are written together, one transaction per batch; a batch holding a
record that can never be written is written again one record at a time, so only that
record is dropped.  A step this process stored (or read) with its TwiML is known: a
``voice_lookup(..., replay_first=True)`` of it reads no database.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gateway.centre_health import CentreHealth, centre_health
from gateway.metrics import Metrics
from gateway.steps import StepRecord, StepWriter
from gateway.store import KnownSteps, Store, call_steps, routing_decisions
from tests.support.statements import count_statements

SINCE = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "postgres":
        yield request.getfixturevalue("pg_store")
        return
    store = Store.from_url(f"sqlite:///{tmp_path}/batches.sqlite3")
    store.create_schema()
    yield store
    store.dispose()


def record(n: int, *, call_sid: str = "CA1", **overrides: Any) -> StepRecord:
    values: dict[str, Any] = {
        "call_sid": call_sid, "step": f"dial-result:{n}", "incident_id": None,
        "twiml": f"<Response><Dial>{n}</Dial></Response>", "detail": {"n": n},
        "decision": {"target": "centre", "number": "+4610000000", "centre_id": "eu-primary",
                     "reason": f"attempt {n}"},
        "health": ("eu-primary", False, "dial no-answer")}
    values.update(overrides)
    return StepRecord(**values)


def writer_for(store: Store, **kwargs: Any) -> tuple[StepWriter, Metrics]:
    health = CentreHealth(store, centre_ids=["eu-primary"], failure_threshold=1000,
                          clock=time.time)
    metrics = Metrics()
    return StepWriter(store, health=health, metrics=metrics, autostart=False, **kwargs), metrics


def count(store: Store, table: sa.Table) -> int:
    with store.begin() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() or 0)


def failures(store: Store) -> int:
    with store.begin() as conn:
        return int(conn.execute(sa.select(centre_health.c.failures).where(
            centre_health.c.key == "eu-primary")).scalar() or 0)


def commits(store: Store) -> list[object]:
    seen: list[object] = []
    sa.event.listen(store.engine, "commit", seen.append)
    return seen


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_queued_records_are_written_in_one_transaction_per_batch(store: Store) -> None:
    writer, metrics = writer_for(store, batch_max=10)
    for n in range(25):
        writer.submit(record(n))
    writer.submit(record(3))  # a Twilio retry queued with the first: not new
    seen = commits(store)
    assert writer.flush(timeout=10)
    assert len(seen) == 3  # 10 + 10 + 6 records
    assert count(store, call_steps) == 25 and count(store, routing_decisions) == 25
    assert failures(store) == 25  # each new step fed the line once, the retry did not
    assert sample(metrics, "gateway_steps_written_total") == 25
    assert sample(metrics, "gateway_steps_replayed_total") == 1
    assert writer.depth == 0


def test_a_step_given_twice_in_one_batch_is_new_once_and_keeps_the_first_answer(
        store: Store) -> None:
    writer, metrics = writer_for(store, batch_max=10)
    writer.submit(record(1))
    writer.submit(record(1, twiml="<Response><Hangup/></Response>"))  # a retry, same batch
    writer.submit(record(2, decision={"target": "emergency", "number": "112",
                                      "reason": "no centre"}))
    assert writer.flush(timeout=10)
    assert count(store, call_steps) == 2 and count(store, routing_decisions) == 2
    stored = store.call_step("CA1", "dial-result:1")
    assert stored is not None and stored["twiml"] == "<Response><Dial>1</Dial></Response>"
    assert failures(store) == 2  # the repeat fed the line nothing
    assert sample(metrics, "gateway_steps_written_total") == 2
    assert sample(metrics, "gateway_steps_replayed_total") == 1
    with store.begin() as conn:
        decision = conn.execute(sa.select(routing_decisions).where(
            routing_decisions.c.step == "dial-result:2")).one()
    assert decision.number == "112" and decision.centre_id is None


def test_a_batch_costs_two_statements_not_two_per_step(store: Store) -> None:
    writer, _ = writer_for(store, batch_max=50)
    for n in range(40):
        writer.submit(record(n, health=None))
    statements: list[str] = []
    sa.event.listen(store.engine, "before_cursor_execute",
                    lambda conn, cursor, sql, *args: statements.append(sql))
    assert writer.flush(timeout=10)
    inserts = [sql for sql in statements if sql.lstrip().upper().startswith("INSERT")]
    assert len(inserts) == 2, inserts  # call_steps, then routing_decisions
    assert count(store, call_steps) == 40 and count(store, routing_decisions) == 40


def test_a_batch_with_an_unwritable_record_drops_only_that_record(store: Store) -> None:
    writer, metrics = writer_for(store, batch_max=10)
    writer.submit(record(1))
    writer.submit(record(2, decision={"target": "centre", "reason": None}))  # NOT NULL
    for n in range(3, 13):
        writer.submit(record(n))
    assert writer.flush(timeout=10)
    assert store.call_step("CA1", "dial-result:2") is None
    assert count(store, call_steps) == 11
    assert failures(store) == 11  # the failed batch fed nothing: it was rolled back
    assert sample(metrics, "gateway_steps_dropped_total", reason="unwritable") == 1
    assert sample(metrics, "gateway_steps_written_total") == 11


def test_a_stored_step_is_replayed_from_memory_only_when_asked(store: Store) -> None:
    writer, _ = writer_for(store)
    assert writer.write_now(record(1)) is True
    statements = count_statements(store)

    def lookup(**kwargs: Any) -> Any:
        return store.voice_lookup(call_sid="CA1", steps=("dial-result:1", "accept:1"),
                                  msisdn="+46701234567", since=SINCE, types=("crash",),
                                  timeout_s=2.0, **kwargs)

    known = lookup(replay_first=True)
    assert statements == []  # no round trip
    assert set(known.steps) == {"dial-result:1"}
    assert known.steps["dial-result:1"]["twiml"] == "<Response><Dial>1</Dial></Response>"
    assert known.steps["dial-result:1"]["detail"] == {"n": 1}
    assert known.incident is None
    read = lookup()  # the full read, as before
    assert len(statements) == 1
    assert read.steps["dial-result:1"]["twiml"] == known.steps["dial-result:1"]["twiml"]
    assert read.steps["dial-result:1"]["detail"] == known.steps["dial-result:1"]["detail"]


def test_a_step_read_from_the_database_is_known_and_a_claimed_one_is_not(
        store: Store) -> None:
    assert store.record_call_step(call_sid="CA2", step="voice", incident_id=None,
                                  twiml="<Response/>", detail={}) is True
    store.known_steps = KnownSteps()  # this process forgets what it wrote
    assert store.claim_step("CA2", "ivr:1") == (True, None)  # claimed: no TwiML yet
    found = store.voice_lookup(call_sid="CA2", steps=("voice", "ivr:1"), msisdn=None,
                               since=SINCE, types=(), timeout_s=2.0, replay_first=True)
    assert set(found.steps) == {"voice", "ivr:1"}
    assert store.known_steps.get("CA2", "voice") is not None
    assert store.known_steps.get("CA2", "ivr:1") is None


def test_known_steps_keep_the_first_answer_and_the_newest_entries() -> None:
    known = KnownSteps(size=2)
    known.put("CA1", {"step": "voice", "twiml": "<a/>"})
    known.put("CA1", {"step": "voice", "twiml": "<b/>"})  # never replaces the stored one
    known.put("CA1", {"step": "none", "twiml": None})  # no TwiML: not kept
    assert known.get("CA1", "voice") == {"step": "voice", "twiml": "<a/>"}
    assert known.get("CA1", "none") is None
    known.put("CA2", {"step": "voice", "twiml": "<c/>"})
    known.put("CA3", {"step": "voice", "twiml": "<d/>"})
    assert known.get("CA1", "voice") is None  # the oldest went first
    assert known.get("CA3", "voice") is not None
