"""Accepting a vehicle's data message as a durable incident."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa

from gateway.calls.call_plan import emergency_route, hand_back_after_s
from gateway.config import VoicePolicy
from gateway.events import VehicleEvent
from gateway.ingest import insert_incident
from gateway.plan import NumberPlan
from gateway.routing import Locator, choose_country, sim_country
from gateway.store import Store, utcnow

#: Extra rows to commit with an incident (the outbox, in the delivery module).
ExtraRows = Callable[[Mapping[str, Any]], list[tuple[sa.Table, Mapping[str, Any]]]]


#: in the route reason of a test call's incident (an MSD's testCall flag)
TEST_CALL_REASON = "test call: answered and recorded, never dialled to emergency services"


def is_test_call(incident: Mapping[str, Any] | None) -> bool:
    """Whether an incident is an eCall test call: its call is answered by the centre and
    recorded, and no leg of it may dial an emergency number or hand back to the car."""
    return bool(incident is not None and incident.get("test_call"))


class EventConflictError(Exception):
    """The same event_id arrived again with a different body."""


def record_event(
    event: VehicleEvent,
    *,
    store: Store,
    locator: Locator | None,
    plan: NumberPlan | None,
    extra_rows: ExtraRows | None = None,
    now: dt.datetime | None = None,
    caller_ids: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], bool]:
    """Store the event as an incident; ``(incident, created)``.

    A replay of the same ``event_id`` with the same body returns the stored
    incident; with a different body it raises EventConflictError; neither writes
    anything.  The country is decided here, once, and stored with its reason.

    A new event costs one transaction (:func:`gateway.ingest.insert_incident`): the
    incident and its ``extra_rows`` are inserted unless the event_id is stored already,
    and only then is the stored incident read.
    """
    location = event.location  # None: an MSD whose position is unknown
    choice = choose_country(
        location.lat if location is not None else None,
        location.lon if location is not None else None,
        locator=locator,
        last_known=lambda: store.last_known_country(event.vin),
        msisdn=event.msisdn,
    )
    route = emergency_route(choice.country, plan, caller_ids or {})
    reason = choice.reason
    if event.test_call:
        reason += "; " + TEST_CALL_REASON
    if location is None:
        reason += "; the MSD's position is unknown"
    elif location.trusted is False:
        reason += "; position flagged untrusted by the car"
    row: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "event_id": event.event_id,
        "payload_sha256": event.payload_sha256,
        "type": event.type,
        "vin": event.vin,
        "msisdn": event.msisdn,
        "occurred_at": event.occurred_at,
        "received_at": now or utcnow(),
        "lat": location.lat if location is not None else None,
        "lon": location.lon if location is not None else None,
        "heading_deg": location.heading_deg if location is not None else None,
        "accuracy_m": location.accuracy_m if location is not None else None,
        "trusted": location.trusted if location is not None else None,
        "crash": event.crash,
        "occupants": event.occupants,
        "location_country": choice.location_country,
        "home_country": sim_country(event.msisdn),
        "route_country": choice.country,
        "route_reason": reason[:200],
        "emergency_number": route.emergency_number,
        "fallback_dial": route.fallback_dial or "",  # "" = the gateway hands back
        "status": "open",
        # the MSD as the car sent it (base64), and its testCall flag
        "msd": event.msd.base64() if event.msd is not None else None,
        "test_call": event.test_call,
    }
    extra = extra_rows(row) if extra_rows else []
    incident, created = insert_incident(store, row, extra=extra)
    if not created:  # a replay, or a concurrent request with the same event_id
        return _same_or_conflict(incident, event), False
    return incident, True


def _same_or_conflict(existing: dict[str, Any], event: VehicleEvent) -> dict[str, Any]:
    if existing["payload_sha256"] != event.payload_sha256:
        raise EventConflictError(event.event_id)
    return existing


def incident_answer(incident: Mapping[str, Any], *, plan: NumberPlan | None,
                    policy: VoicePolicy, caller_ids: Mapping[str, str]) -> dict[str, Any]:
    """What the car is told: the number to call for this event's service, and what to
    dial itself if no agent has taken the call after ``hand_back_after_s`` seconds (or
    if it cannot reach the gateway at all).  A test call (``test_call: true``) has no
    ``hand_back_after_s``: the car never dials an emergency number for it."""
    service = {"crash": "emergency", "sos": "emergency", "on_call": "roadside"}.get(
        str(incident["type"]))
    row = None
    if service is not None and plan is not None:  # the number for the car's home market
        row = plan.inbound_for(service, incident["home_country"] or incident["route_country"])
    call_number = row.number if row is not None else None
    route = emergency_route(incident["route_country"], plan, caller_ids)
    test_call = is_test_call(incident)
    return {
        "incident_id": incident["id"],
        "event_id": incident["event_id"],
        "type": incident["type"],
        "country": incident["location_country"],
        "route_country": incident["route_country"],
        "route_reason": incident["route_reason"],
        "emergency_number": incident["emergency_number"],
        "fallback_dial": incident["fallback_dial"] or None,
        "call_number": call_number,
        "hand_back_after_s": (hand_back_after_s(route, policy)
                              if service == "emergency" and not test_call else None),
        "test_call": test_call,
    }


def mark_incident(
    store: Store,
    incident: Mapping[str, Any],
    *,
    status: str,
    actor: str,
    action: str,
    detail: Mapping[str, Any],
    now: dt.datetime,
) -> None:
    """Change an incident's status and audit it in one transaction.

    The audit row is keyed by the incident's VIN whether or not the car is in the
    vehicle registry: a car that sent an SOS need not be registered.
    """
    from gateway.owners import write_audit
    from gateway.store import incidents

    with store.begin() as conn:
        conn.execute(incidents.update().where(incidents.c.id == incident["id"])
                     .values(status=status))
        write_audit(conn, vin=str(incident["vin"]), actor=actor, action=action, at=now,
                    detail={"incident_id": incident["id"], **detail})
