"""POST /v1/events under arbitrary JSON: never a 5xx, and what is stored can be carried.

Derandomized (the same examples on every run) and without an example database,
so the suite stays deterministic and writes nothing into the checkout.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.delivery import incident_payload
from gateway.errors import ValidationError
from gateway.events import load_event_json, parse_event
from gateway.store import incidents
from gateway.whisper import whisper_summary
from tests.support.events import crash_event

ALLOWED = {200, 201, 400, 409, 415, 422}
FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

_ids = itertools.count(1)

#: numbers at and past every edge: 64 bits, a double's range, NaN and the infinities
edge_ints = st.sampled_from([0, -1, 99, 100, 500, 501, 2**53, 2**63 - 1, 2**63, 2**64 - 1,
                             2**64, -(2**63), -(2**63) - 1, 10**400, -(10**400)])
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | edge_ints
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from(["", "\ud800", "x" * 5000, "2026-11-25T10:15:00Z",
                       "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4),
    max_leaves=25,
)


#: the fields the gateway reads, with values from plausible to absurd
FIELDS = {
    "type": st.sampled_from(["crash", "sos", "on_call", "alarm_triggered", "alarm_disarmed"])
    | values,
    "vin": st.just("YV1ZW72U5N1234567") | values,
    "msisdn": st.just("+46701234567") | values,
    "occurred_at": st.sampled_from(["2026-11-25T10:15:00Z", "2000-01-01T00:00:00Z",
                                    "1999-12-31T23:59:59Z", "0001-01-01T00:00:00+01:00",
                                    "9999-12-31T23:59:59Z"]) | values,
    "location": st.fixed_dictionaries(
        {"lat": st.floats(-100, 100) | values, "lon": st.floats(-200, 200) | values},
        optional={"heading_deg": values, "accuracy_m": values, "trusted": values},
    ) | values,
    "crash": st.fixed_dictionaries(
        {},
        optional={"airbag_deployed": st.booleans() | values,
                  "delta_v_kmh": st.floats(-10, 600) | edge_ints | values,
                  "impact": st.text(max_size=20) | values, "extra": values},
    ) | values,
    "occupants": st.fixed_dictionaries({"count": st.integers(-5, 200) | values},
                                       optional={"extra": values}) | values,
    "disarmed_by": st.sampled_from(["key", "app", "other"]) | values,
    "firmware": values,  # an unknown field: kept but ignored
}


@st.composite
def events(draw: st.DrawFn) -> Any:
    """A valid crash event with some fields replaced or dropped, or arbitrary JSON."""
    if draw(st.integers(0, 9)) == 0:
        return draw(values)
    event: dict[str, Any] = crash_event(event_id=f"fuzz-{next(_ids)}")
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=3, unique=True)):
        if draw(st.booleans()) and name in event:
            del event[name]
        else:
            event[name] = draw(FIELDS[name])
    return event


#: mostly none; now and then an array nested around and past the 32-level limit (it is
#: spliced into the JSON text, as a deep Python value would trip json and repr first)
depths = st.integers(0, 9).flatmap(lambda k: st.integers(25, 5000) if k == 0 else st.none())


def encode(body: Any, deep: int | None = None) -> bytes:
    # allow_nan=True (the default): NaN, Infinity and -Infinity go out as bare literals;
    # ensure_ascii=True: lone surrogates go out as \\udxxx escapes
    text = json.dumps(body)
    if deep is not None and isinstance(body, dict):
        nested = "[" * deep + "1" + "]" * deep
        text = '{"deep": ' + nested + ("}" if text == "{}" else ", " + text[1:])
    return text.encode("ascii")


def count_incidents(app: Flask) -> int:
    with app.extensions["gateway"].store.engine.begin() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(incidents)).scalar_one())


def check_carriable(app: Flask, incident: dict[str, Any]) -> None:
    gateway = app.extensions["gateway"]
    json.dumps(incident_payload(incident), allow_nan=False)  # what delivery sends
    json.dumps(incident_payload(incident), allow_nan=False, ensure_ascii=False).encode("utf-8")
    whisper_summary(incident, plan=gateway.plan, sim_country="SE")  # what the agent hears


@FUZZ
@given(body=events(), deep=depths)
def test_posting_arbitrary_json_never_fails_the_server(
    app: Flask, client: FlaskClient, vehicle_headers: dict[str, str], body: Any, deep: int | None
) -> None:
    before = count_incidents(app)
    response = client.post("/v1/events", data=encode(body, deep),
                           headers={**vehicle_headers, "Content-Type": "application/json"})
    assert response.status_code in ALLOWED, (response.status_code, response.get_data()[:300])
    answer = response.get_json()
    if response.status_code in (200, 201):
        stored = app.extensions["gateway"].store.incident_by_event(answer["event_id"])
        assert stored is not None
        check_carriable(app, stored)
        assert count_incidents(app) == before + (response.status_code == 201)
        return
    assert count_incidents(app) == before
    if response.status_code == 422:
        assert answer["error"] == "invalid_event" and isinstance(answer["detail"], str)
        assert isinstance(answer["fields"], dict) and answer["fields"]


@FUZZ
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(lambda t: t.encode()))
def test_posting_arbitrary_bytes_never_fails_the_server(
    app: Flask, client: FlaskClient, vehicle_headers: dict[str, str], raw: bytes
) -> None:
    response = client.post("/v1/events", data=raw,
                           headers={**vehicle_headers, "Content-Type": "application/json"})
    assert response.status_code == 422  # no byte string of this size is a whole event
    answer = response.get_json()
    assert answer["error"] == "invalid_event" and answer["fields"]
    assert count_incidents(app) == 0


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(body=events(), deep=depths)
def test_a_parsed_event_is_strict_json(body: Any, deep: int | None) -> None:
    """The loader and parser alone: an accepted event's stored parts are strict JSON."""
    try:
        event = parse_event(load_event_json(encode(body, deep)))
    except ValidationError as exc:
        assert exc.errors and all(isinstance(k, str) and isinstance(v, str)
                                  for k, v in exc.errors.items())
        return
    for part in (event.crash, event.occupants):
        text = json.dumps(part, allow_nan=False, ensure_ascii=False)
        assert len(text.encode("utf-8")) <= 4096
    assert event.occurred_at.utcoffset() is not None
