"""Addresses for agents: the delivery worker asks a (fake) self-hosted Nominatim over HTTP,
through geopy, after the incident is stored; the agent API and the delivered incident
show the address.  A Nominatim that fails (500, hangs, nonsense, refused) neither delays
nor breaks a delivery or a call."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask

from gateway.adapters.geocoder import ReverseGeocoder, address_of_place
from gateway.config import DeliveryPolicy, GeocoderPolicy, Settings
from gateway.delivery import OutboxWorker, build_worker
from tests.conftest import Twilio
from tests.support.events import SWEDISH_CAR, crash_event
from tests.support.fake_servers import (
    NOMINATIM_COPENHAGEN,
    FakeAssistanceCentre,
    FakeNominatim,
)
from tests.support.twilio import call_params, dialled_number, parse

AGENT = {"Authorization": "Bearer agent-token-0123456789abcdef"}
FAST = DeliveryPolicy(timeout_s=1.0, backoff_initial_s=0.05, backoff_max_s=0.2, budget_s=0.3,
                      poll_s=0.05)
TIMEOUT_S = 0.5
#: what the geocoder may add to a delivery at most: its timeout, plus slack for a busy
#: machine (geopy's default two retries would take 3 timeouts, a hung server 5 s)
BOUND_S = TIMEOUT_S + 0.7
COPENHAGEN = {"lat": 55.6761, "lon": 12.5683, "heading_deg": 90.0, "accuracy_m": 8.0,
              "trusted": True}


@pytest.fixture
def centre() -> Iterator[FakeAssistanceCentre]:
    with FakeAssistanceCentre() as fake:
        yield fake


@pytest.fixture
def nominatim() -> Iterator[FakeNominatim]:
    with FakeNominatim(slow_s=5.0) as fake:
        yield fake


def geocoding_settings(settings: Settings, centre: FakeAssistanceCentre,
                       nominatim: FakeNominatim, backoff_s: float = 30.0) -> Settings:
    return settings.replace(
        assistance_url=centre.url, delivery=FAST, geocoder_url=nominatim.url,
        geocoder=GeocoderPolicy(timeout_s=TIMEOUT_S, backoff_s=backoff_s))


@pytest.fixture
def app(make_app: Callable[..., Flask], settings: Settings, centre: FakeAssistanceCentre,
        nominatim: FakeNominatim) -> Flask:
    return make_app(settings=geocoding_settings(settings, centre, nominatim))


def worker_of(app: Flask) -> OutboxWorker:
    svc = app.extensions["gateway"]
    worker = build_worker(svc.settings, svc.store, svc.centre_health, svc.clock)
    assert worker is not None and worker.geocoder is not None
    return worker


def post(app: Flask, headers: dict[str, str], **overrides: Any) -> str:
    body = crash_event(**overrides)
    response = app.test_client().post("/v1/events", json=body, headers=headers)
    assert response.status_code == 201, response.json
    return str(response.json["incident_id"])  # type: ignore[index]


def agent_view(app: Flask, incident_id: str) -> dict[str, Any]:
    response = app.test_client().get(f"/v1/agent/incidents/{incident_id}", headers=AGENT)
    assert response.status_code == 200, response.json
    return response.json  # type: ignore[return-value]


def deliver_all(worker: OutboxWorker) -> tuple[list[str], float]:
    started = time.monotonic()
    results = [worker.deliver(row) for row in worker.claim(20)]
    return results, time.monotonic() - started


def test_the_address_reaches_the_centre_and_the_agent_api(
    app: Flask, centre: FakeAssistanceCentre, nominatim: FakeNominatim,
    vehicle_headers: dict[str, str],
) -> None:
    incident_id = post(app, vehicle_headers)
    assert agent_view(app, incident_id)["address"] is None  # not looked up yet
    assert nominatim.requests == []  # storing the incident asked nobody

    results, _ = deliver_all(worker_of(app))

    assert results == ["delivered"]
    delivered = centre.incidents[incident_id]["address"]
    assert delivered == {
        "text": NOMINATIM_COPENHAGEN["display_name"], "road": "Rådhuspladsen",
        "house_number": None, "postcode": "1550", "city": "København",
        "state": "Region Hovedstaden", "country": "Danmark", "country_code": "DK",
        "source": "nominatim"}
    assert agent_view(app, incident_id)["address"] == delivered
    (asked,) = nominatim.reverse_requests()
    assert (asked.query["lat"], asked.query["lon"]) == ("55.6761", "12.5683")
    assert asked.query["format"] == "json" and asked.query["addressdetails"] == "1"
    assert (asked.header("User-Agent") or "").startswith("assist-gateway/")


def test_one_lookup_per_rounded_coordinate(
    app: Flask, centre: FakeAssistanceCentre, nominatim: FakeNominatim,
    vehicle_headers: dict[str, str],
) -> None:
    worker = worker_of(app)
    # two crashes 3 m apart (the same 4-decimal point), then one 1 km away
    first = post(app, vehicle_headers, location={**COPENHAGEN, "lat": 55.67612})
    second = post(app, vehicle_headers, location={**COPENHAGEN, "lat": 55.67609})
    far = post(app, vehicle_headers, location={**COPENHAGEN, "lat": 55.6851})
    assert deliver_all(worker)[0] == ["delivered"] * 3
    assert len(nominatim.reverse_requests()) == 2
    assert centre.incidents[first]["address"] == centre.incidents[second]["address"]
    assert centre.incidents[far]["address"]["road"] == "Testvej"
    assert worker.geocoder.stats["hit"] == 1  # type: ignore[union-attr]


def test_no_address_at_sea_is_remembered_and_the_incident_delivered(
    app: Flask, centre: FakeAssistanceCentre, nominatim: FakeNominatim,
    vehicle_headers: dict[str, str],
) -> None:
    at_sea = {**COPENHAGEN, "lat": 55.5, "lon": 11.2}
    nominatim.sea.add((55.5, 11.2))
    worker = worker_of(app)
    ids = [post(app, vehicle_headers, location=at_sea) for _ in range(2)]
    assert deliver_all(worker)[0] == ["delivered", "delivered"]
    assert all("address" not in centre.incidents[i] for i in ids)
    assert agent_view(app, ids[0])["address"] is None
    assert len(nominatim.reverse_requests()) == 1  # "Unable to geocode" is cached too


@pytest.mark.parametrize("mode", ["500", "hang", "nonsense", "wrong-json", "refuse",
                                  "blackhole"])
def test_a_failing_geocoder_neither_delays_nor_breaks_a_delivery(
    mode: str, app: Flask, centre: FakeAssistanceCentre, nominatim: FakeNominatim,
    vehicle_headers: dict[str, str],
) -> None:
    nominatim.mode = mode
    worker = worker_of(app)
    first = post(app, vehicle_headers)

    results, took = deliver_all(worker)

    assert results == ["delivered"] and took < BOUND_S, took
    assert "address" not in centre.incidents[first]
    assert agent_view(app, first)["address"] is None
    # after a failure the geocoder is left alone: the next deliveries do not wait at all
    later = [post(app, vehicle_headers, location={**COPENHAGEN, "lat": 55.6 + i / 100})
             for i in range(3)]
    asked = len(nominatim.requests)
    results, took = deliver_all(worker)
    assert results == ["delivered"] * 3 and took < BOUND_S, took
    assert all("address" not in centre.incidents[i] for i in later)
    assert len(nominatim.requests) == asked  # not asked: nothing to wait for
    assert worker.geocoder.stats["failed"] == 1  # type: ignore[union-attr]
    assert worker.geocoder.stats["skipped"] == 3  # type: ignore[union-attr]


def test_after_the_backoff_the_geocoder_is_asked_again(
    make_app: Callable[..., Flask], settings: Settings, centre: FakeAssistanceCentre,
    nominatim: FakeNominatim, vehicle_headers: dict[str, str],
) -> None:
    app = make_app(settings=geocoding_settings(settings, centre, nominatim, backoff_s=0.2))
    worker = worker_of(app)
    nominatim.mode = "500"
    failed = post(app, vehicle_headers)
    assert deliver_all(worker)[0] == ["delivered"]
    nominatim.mode = "up"
    time.sleep(0.25)
    recovered = post(app, vehicle_headers)
    assert deliver_all(worker)[0] == ["delivered"]
    assert "address" not in centre.incidents[failed]
    assert centre.incidents[recovered]["address"]["city"] == "København"
    assert agent_view(app, recovered)["address"]["road"] == "Rådhuspladsen"


def test_a_retried_delivery_keeps_the_address_it_found(
    app: Flask, centre: FakeAssistanceCentre, nominatim: FakeNominatim,
    vehicle_headers: dict[str, str], clock: Any,
) -> None:
    incident_id = post(app, vehicle_headers)
    worker = worker_of(app)
    centre.mode = "refuse"
    assert deliver_all(worker)[0] == ["rescheduled"]
    assert agent_view(app, incident_id)["address"]["road"] == "Rådhuspladsen"
    nominatim.mode = "500"  # down now: the stored address is used, Nominatim not asked
    centre.mode = "up"
    clock.advance(60)
    assert deliver_all(worker)[0] == ["delivered"]
    assert centre.incidents[incident_id]["address"]["road"] == "Rådhuspladsen"
    assert len(nominatim.reverse_requests()) == 1


def test_calls_and_events_never_wait_for_a_hung_geocoder(
    make_app: Callable[..., Flask], settings: Settings, centre: FakeAssistanceCentre,
    nominatim: FakeNominatim, vehicle_headers: dict[str, str], plan: Any,
) -> None:
    app = make_app(settings=geocoding_settings(settings, centre, nominatim).replace(
        geocoder=GeocoderPolicy(timeout_s=5.0)))  # the worker will wait 5 s for its answer
    nominatim.mode = "hang"
    post(app, vehicle_headers)
    worker = worker_of(app)
    busy = threading.Thread(target=deliver_all, args=(worker,))
    busy.start()
    assert nominatim.wait_until(lambda: len(nominatim.requests) == 1)  # the worker waits...
    started = time.monotonic()
    incident_id = post(app, vehicle_headers, event_id="evt-while-hung")  # ...a car does not
    root = parse(Twilio(app.test_client()).post(
        "/twilio/voice", call_params("CAgeohang", SWEDISH_CAR["msisdn"])).data)
    view = agent_view(app, incident_id)
    took = time.monotonic() - started
    still_waiting = busy.is_alive()
    nominatim.close()  # the hung answer ends: the worker delivers without an address
    busy.join(timeout=5)
    assert still_waiting and took < 2.0, took
    assert dialled_number(root) == plan.centres_for("SE")[0].number
    assert view["address"] is None
    assert len(nominatim.requests) == 1  # only the worker ever asked
    assert centre.wait_until(lambda: len(centre.incidents) == 1)


# -- the cache, on its own ---------------------------------------------------------------


class _Place:
    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw


class _Geolocator:
    def __init__(self) -> None:
        self.asked: list[tuple[float, float]] = []

    def reverse(self, query: tuple[float, float], **_: Any) -> _Place:
        self.asked.append(query)
        return _Place({**NOMINATIM_COPENHAGEN, "display_name": f"at {query}"})


def test_the_cache_is_bounded_and_expires() -> None:
    now = [0.0]
    geolocator = _Geolocator()
    geocoder = ReverseGeocoder(geolocator, clock=lambda: now[0],
                               policy=GeocoderPolicy(cache_size=2, cache_ttl_s=100))
    for lat in (1.0, 2.0, 1.0, 3.0):  # 1.0 used again: 2.0 is the least recently used
        geocoder.lookup(lat, 0.0)
    assert len(geocoder) == 2 and geolocator.asked == [(1.0, 0.0), (2.0, 0.0), (3.0, 0.0)]
    geocoder.lookup(2.0, 0.0)  # evicted: asked again
    assert geolocator.asked[-1] == (2.0, 0.0)
    now[0] = 101.0  # expired
    geocoder.lookup(2.0, 0.0)
    assert len(geolocator.asked) == 5


@pytest.mark.parametrize("raw", [None, [], "London", {"lat": "1"},
                                 {"display_name": 12}, {"display_name": "x", "address": []},
                                 {"display_name": "x", "address": {"road": {"a": 1}}}])
def test_a_place_that_is_no_place_is_refused(raw: Any) -> None:
    with pytest.raises(ValueError):
        address_of_place(raw)
