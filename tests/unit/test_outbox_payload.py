"""What the centre receives for an incident, and the outbox row committed with it."""

from __future__ import annotations

import datetime as dt
from typing import Any

from gateway.delivery import incident_payload, outbox, outbox_rows

OCCURRED = dt.datetime(2026, 11, 25, 10, 15, tzinfo=dt.UTC)
RECEIVED = dt.datetime(2026, 11, 25, 10, 15, 2, 500000, tzinfo=dt.UTC)

INCIDENT: dict[str, Any] = {
    "id": "0b7c1f5e-4a57-4d0b-9a55-1f7b8e0c2d11",
    "event_id": "evt-1",
    "payload_sha256": "ab" * 32,
    "type": "crash",
    "vin": "YV1ZW72U5N1234567",
    "msisdn": "+46701234567",
    "occurred_at": OCCURRED,
    "received_at": RECEIVED,
    "lat": 55.6761,
    "lon": 12.5683,
    "heading_deg": 90.0,
    "accuracy_m": 8.0,
    "trusted": True,
    "crash": {"airbag_deployed": True, "delta_v_kmh": 38},
    "occupants": {"count": 2},
    "location_country": "DK",
    "home_country": "SE",
    "route_country": "DK",
    "route_reason": "location",
    "emergency_number": "112",
    "fallback_dial": "112",
    "status": "open",
    "msd": "AQID",
    "test_call": False,
}

PAYLOAD = {
    "incident_id": "0b7c1f5e-4a57-4d0b-9a55-1f7b8e0c2d11",
    "event_id": "evt-1",
    "type": "crash",
    "vin": "YV1ZW72U5N1234567",
    "msisdn": "+46701234567",
    "occurred_at": "2026-11-25T10:15:00+00:00",
    "received_at": "2026-11-25T10:15:02.500000+00:00",
    "location": {"lat": 55.6761, "lon": 12.5683, "heading_deg": 90.0, "accuracy_m": 8.0,
                 "trusted": True, "country": "DK"},
    "route": {"country": "DK", "reason": "location", "emergency_number": "112",
              "fallback_dial": "112"},
    "home_country": "SE",
    "crash": {"airbag_deployed": True, "delta_v_kmh": 38},
    "occupants": {"count": 2},
    "msd": "AQID",
    "test_call": False,
}


def test_the_payload_carries_the_whole_incident_and_nothing_internal() -> None:
    assert incident_payload(INCIDENT) == PAYLOAD


def test_times_already_text_are_passed_as_they_are() -> None:
    given = {**INCIDENT, "occurred_at": "2026-11-25T10:15:00Z", "received_at": None}
    payload = incident_payload(given)
    assert (payload["occurred_at"], payload["received_at"]) == ("2026-11-25T10:15:00Z", None)


def test_without_an_msd_or_a_test_call_flag() -> None:
    given = {k: v for k, v in INCIDENT.items() if k not in ("msd", "test_call")}
    payload = incident_payload(given)
    assert payload["msd"] is None and payload["test_call"] is False
    assert incident_payload({**INCIDENT, "test_call": None})["test_call"] is False
    assert incident_payload({**INCIDENT, "test_call": 1})["test_call"] is True


def test_the_outbox_row_is_pending_and_due_when_the_incident_was_received() -> None:
    [(table, row)] = outbox_rows(INCIDENT)
    assert table is outbox
    assert row == {"incident_id": INCIDENT["id"], "payload": PAYLOAD, "status": "pending",
                   "created_at": RECEIVED, "next_attempt_at": RECEIVED, "attempts": 0}
