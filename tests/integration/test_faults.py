"""Injected faults: whatever breaks, an SOS or crash call still reaches a person."""

from __future__ import annotations

import sys
import threading
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from gateway import twiml
from gateway.app import _UNSET
from gateway.errors import PlanEntryMissingError
from gateway.plan import NumberPlan
from gateway.store import Store
from tests.conftest import DE_CALLER_ID, PUBLIC_URL, Twilio
from tests.support.events import SWEDISH_CAR, crash_event
from tests.support.fakes import RaisingLocator
from tests.support.twilio import call_params, dial_of, dialled_number, parse, signature

ROADSIDE_NUMBER = "+442079460901"

SOS = {"type": "sos"}


def reaches_a_person(xml: bytes, plan: NumberPlan | None = None) -> str:
    """The TwiML dials a number: a centre or an emergency route. Returns it."""
    root = parse(xml)
    number = dialled_number(root)
    assert number.startswith("+") or number.isdigit()
    return number


def broken_store() -> Store:
    """PostgreSQL on a port where nothing listens: every query fails at once."""
    return Store.from_url("postgresql://gateway@127.0.0.1:9/none")


class PlanWithout:
    """The real plan with some countries' entries missing (a half-edited plan)."""

    def __init__(self, plan: NumberPlan, *missing: str) -> None:
        self.plan, self.missing, self.source = plan, set(missing), plan.source

    def get(self, country: str) -> Any:
        return None if country.upper() in self.missing else self.plan.get(country)

    def entry(self, country: str) -> Any:
        if country.upper() in self.missing:
            raise PlanEntryMissingError(country)
        return self.plan.entry(country)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.plan, name)

    def __len__(self) -> int:
        return len(self.plan) - len(self.missing)


def test_database_down_sos_call_still_dials_a_person(make_app: Any, clock: Any) -> None:
    app = make_app(store=broken_store())
    twilio = Twilio(app.test_client())
    german = "+4915112345678"
    root = parse(twilio.post("/twilio/voice", call_params("CA1", german)).data)
    assert reaches_a_person(ET.tostring(root)) == "+442079460100"  # eu-primary
    clock.advance(25)  # ... and the centre not answering still leads to the emergency leg
    root = parse(twilio.post(dial_of(root).get("action", ""),
                             call_params("CA1", german, DialCallStatus="no-answer")).data)
    assert dialled_number(root) == "112" and dial_of(root).get("callerId") == DE_CALLER_ID


def test_database_down_event_is_refused_not_lost(make_app: Any,
                                                 vehicle_headers: dict[str, str]) -> None:
    app = make_app(store=broken_store())
    response = app.test_client().post("/v1/events", json=crash_event(), headers=vehicle_headers)
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    assert app.test_client().get("/readyz").status_code == 503


def test_database_lost_between_event_and_call(app: Flask, client: FlaskClient,
                                              vehicle_headers: dict[str, str], plan: NumberPlan) -> None:
    assert client.post("/v1/events", json=crash_event(**SOS), headers=vehicle_headers).status_code == 201
    app.extensions["gateway"].store = broken_store()
    response = Twilio(client).post("/twilio/voice", call_params("CA2", SWEDISH_CAR["msisdn"]))
    assert reaches_a_person(response.data) == plan.centres_for("SE")[0].number


def test_lookup_raising_still_routes(make_app: Any, vehicle_headers: dict[str, str],
                                     plan: NumberPlan) -> None:
    app = make_app(locator=RaisingLocator())
    client = app.test_client()
    body = client.post("/v1/events", json=crash_event(**SOS), headers=vehicle_headers).json
    assert body["route_country"] == "SE"
    assert "lookup failed" in body["route_reason"]
    response = Twilio(client).post("/twilio/voice", call_params("CA3", SWEDISH_CAR["msisdn"]))
    assert reaches_a_person(response.data) == plan.centres_for("SE")[0].number


def test_missing_boundary_data_still_routes(make_app: Any, vehicle_headers: dict[str, str]) -> None:
    app = make_app(locator=None)
    client = app.test_client()
    body = client.post("/v1/events", json=crash_event(), headers=vehicle_headers).json
    assert body["route_country"] == "SE" and body["emergency_number"] == "112"
    assert client.get("/readyz").status_code == 503


def test_a_lookup_module_that_cannot_be_imported_still_routes(
        make_app: Any, vehicle_headers: dict[str, str], plan: NumberPlan,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken install (the boundary lookup's module cannot be imported) is a failed
    boundary load: recorded for /readyz, and the emergency path still serves."""
    monkeypatch.setitem(sys.modules, "gateway.geo", None)  # importing it raises ImportError
    app = make_app(locator=_UNSET)  # the factory loads the boundary data itself
    client = app.test_client()
    assert "gateway.geo" in app.extensions["gateway"].problems["boundaries"]
    assert client.get("/readyz").status_code == 503
    body = client.post("/v1/events", json=crash_event(), headers=vehicle_headers).json
    assert body["route_country"] == "SE" and body["emergency_number"] == "112"
    response = Twilio(client).post("/twilio/voice", call_params("CA6", SWEDISH_CAR["msisdn"]))
    assert reaches_a_person(response.data) == plan.centres_for("SE")[0].number


def test_plan_entry_missing_hands_back_with_the_default_emergency_number(
    make_app: Any, plan: NumberPlan, vehicle_headers: dict[str, str], clock: Any
) -> None:
    app = make_app(plan=PlanWithout(plan, "DK", "SE"))
    client = app.test_client()
    body = client.post("/v1/events", json=crash_event(), headers=vehicle_headers).json
    assert body["emergency_number"] == "112"
    twilio = Twilio(client)
    root = parse(twilio.post("/twilio/voice", call_params("CA4", SWEDISH_CAR["msisdn"])).data)
    reaches_a_person(ET.tostring(root))  # the centres still serve the car
    clock.advance(3600)  # the centre never answers; the budget is gone
    root = parse(twilio.post(dial_of(root).get("action", ""),
                             call_params("CA4", SWEDISH_CAR["msisdn"], DialCallStatus="busy")).data)
    assert root.find("Dial") is None and "1 1 2" in said(root)


def test_plan_not_loaded_at_all_hands_back(make_app: Any) -> None:
    app = make_app(plan=None)
    response = Twilio(app.test_client()).post("/twilio/voice", call_params("CA5", "+4930901820"))
    root = parse(response.data)
    assert root.find("Dial") is None and "1 1 2" in said(root)


class ExplodingPlan:
    """A plan whose every method raises: a bug anywhere in routing."""

    source = "exploding"

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"bug in plan.{name}")

    def __len__(self) -> int:
        return 0


class RoutingBug:
    """The real plan, except that centre lookups raise: a bug after the call is classified."""

    def __init__(self, plan: NumberPlan) -> None:
        self.plan = plan

    def __getattr__(self, name: str) -> Any:
        if name in ("centres_for", "centres", "centre"):
            raise RuntimeError(f"bug in plan.{name}")
        return getattr(self.plan, name)

    def __len__(self) -> int:
        return len(self.plan)


@pytest.mark.parametrize("path", ["/twilio/voice", "/twilio/voice/dial-result?w=DK&k=1&t0=5",
                                  "/twilio/voice/emergency-result?w=DK&e=1&t0=5",
                                  "/twilio/voice/fallback"])
def test_a_bug_in_a_handler_still_dials_emergency(make_app: Any, path: str) -> None:
    app = make_app(plan=ExplodingPlan())
    params = call_params("CA6", SWEDISH_CAR["msisdn"], DialCallStatus="failed")
    response = Twilio(app.test_client()).post(PUBLIC_URL + path, params)
    assert response.status_code == 200
    assert reaches_a_person(response.data) == "112"


def test_last_resort_twiml_dials_112_then_says_what_to_dial() -> None:
    root = parse(twiml.LAST_RESORT)
    assert dialled_number(root) == "112"
    assert dial_of(root).get("answerOnBridge") == "true" and dial_of(root).get("timeout")
    assert "1 1 2" in said(root) and root.find("Hangup") is not None


@pytest.mark.parametrize("path", ["/twilio/voice/whisper?i=x&k=1",
                                  "/twilio/voice/whisper/accept?i=x&k=1"])
def test_a_bug_on_the_agents_leg_never_dials_anything(make_app: Any, path: str) -> None:
    app = make_app(plan=ExplodingPlan())
    response = Twilio(app.test_client()).post(PUBLIC_URL + path, {
        "CallSid": "CAagent", "ParentCallSid": "CA7", "Digits": "1"})
    assert response.status_code == 200
    root = parse(response.data)
    assert root.find("Dial") is None and not list(root.iter("Number"))


def test_a_bug_on_the_roadside_path_records_a_callback_never_an_emergency_dial(
    make_app: Any, plan: NumberPlan
) -> None:
    app = make_app(plan=RoutingBug(plan))
    twilio = Twilio(app.test_client())
    root = parse(twilio.post("/twilio/voice", call_params("CAoc", SWEDISH_CAR["msisdn"],
                                                          to=ROADSIDE_NUMBER)).data)
    assert root.find("Dial") is None and root.find("Hangup") is not None
    assert "S O S" in said(root)
    callbacks = app.extensions["gateway"].store.callbacks()
    assert [c["call_sid"] for c in callbacks] == ["CAoc"]


@pytest.mark.parametrize("error_url", [
    "https://gateway.example.com/twilio/voice",
    "https://gateway.example.com/twilio/voice/roadside-result?s=r&t0=1&h=SE&w=DK&k=1",
])
def test_fallback_url_never_dials_emergency_for_a_roadside_call(
    make_app: Any, plan: NumberPlan, error_url: str
) -> None:
    app = make_app()
    root = parse(Twilio(app.test_client()).post("/twilio/voice/fallback", call_params(
        "CAocfb", SWEDISH_CAR["msisdn"], to=ROADSIDE_NUMBER, ErrorCode="11200",
        ErrorUrl=error_url)).data)
    emergency = {plan.entry(c).emergency_number for c in ("SE", "DK")} | {"112"}
    numbers = {n.text for n in root.iter("Number")}
    assert not numbers & emergency, numbers
    if "roadside-result" in error_url:  # the call's budget (from t0=1) is long gone
        assert root.find("Dial") is None and root.find("Hangup") is not None
    else:
        assert numbers == {plan.centres_for("SE")[0].roadside_number}


class WatchedStore(Store):
    """A real store that notes which threads reach the database."""

    def __init__(self, url: str) -> None:
        super().__init__(Store.from_url(url).engine)
        self.threads: list[str] = []
        reads = self.sqlite_reads  # a SQLite file's voice read, on the request thread
        assert reads is not None
        fetch = reads.fetch

        def watched_fetch(*args: Any, **kwargs: Any) -> Any:
            self.threads.append(threading.current_thread().name)
            return fetch(*args, **kwargs)

        reads.fetch = watched_fetch

    def within(self, fn: Any, *, timeout_s: float, **kwargs: Any) -> Any:
        self.threads.append(threading.current_thread().name)
        return super().within(fn, timeout_s=timeout_s, **kwargs)

    def begin(self) -> Any:
        self.threads.append(threading.current_thread().name)
        return super().begin()


@pytest.mark.parametrize("error_url", [
    "https://gateway.example.com/twilio/voice",
    "https://gateway.example.com/twilio/voice/dial-result?t0=5&h=DE&w=DE&L=eu-primary&k=1",
    "https://gateway.example.com/twilio/voice/emergency-result?t0=5&w=DE&e=1",
])
def test_the_fallback_url_never_touches_the_database(make_app: Any, tmp_path: Any,
                                                     error_url: str) -> None:
    store = WatchedStore(f"sqlite:///{tmp_path}/watched.sqlite3")
    store.create_schema()
    app = make_app(store=store)
    store.threads.clear()
    client = app.test_client()
    url = PUBLIC_URL + "/twilio/voice/fallback"
    params = call_params("CAfb", "+4915112345678", ErrorCode="11205", ErrorUrl=error_url,
                         DialCallStatus="no-answer")
    response = client.post("/twilio/voice/fallback", data=params,
                           headers={"X-Twilio-Signature": signature(url, params)})
    assert threading.current_thread().name not in store.threads
    root = parse(response.data)
    assert dialled_number(root) == "112" and dial_of(root).get("callerId") == DE_CALLER_ID


def said(root: ET.Element) -> str:
    return " ".join(s.text or "" for s in root.iter("Say"))
