"""The steps a replay may read from memory.

A step this process stored (or read) with its TwiML is known: a
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

from gateway.centre_health import CentreHealth
from gateway.metrics import Metrics
from gateway.steps import StepRecord, StepWriter
from gateway.store import KnownSteps, Store

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


def test_a_stored_step_is_replayed_from_memory_only_when_asked(store: Store) -> None:
    writer, _ = writer_for(store)
    assert writer.write_now(record(1)) is True
    statements: list[str] = []
    sa.event.listen(store.engine, "before_cursor_execute",
                    lambda _c, _cur, statement, *_: statements.append(statement))

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
