"""The vehicle data API: the car's data message before its voice call."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from flask import Blueprint, jsonify, request

from gateway import theft
from gateway.errors import StoreError, ValidationError
from gateway.events import ALARM_TYPES, VehicleEvent, load_event_json, parse_event
from gateway.incidents import EventConflictError, incident_answer, record_event
from gateway.owners.car_commands import command_view
from gateway.schemas.base import parse
from gateway.schemas.vehicle import CommandResultIn
from gateway.security import vehicle_token
from gateway.views.context import services

log = logging.getLogger(__name__)

bp = Blueprint("vehicle", __name__, url_prefix="/v1")


def _error(status: int, error: str, detail: str, **extra: Any) -> Any:
    response = jsonify(error=error, detail=detail, **extra)
    response.status_code = status
    return response


@bp.post("/events")
@vehicle_token
def post_event() -> Any:
    """Store the event durably, then answer 201 (200 for a replay of the same event_id)."""
    svc = services()
    if not request.is_json:
        svc.metrics.event(None, "invalid")
        return _error(415, "unsupported_media_type", "send the event as application/json")
    body: Any = None
    try:
        # strict: no NaN/Infinity, bounded nesting and numbers (request.get_json is lenient)
        body = load_event_json(request.get_data())
        event = parse_event(body, now=dt.datetime.fromtimestamp(svc.clock(), tz=dt.UTC))
    except ValidationError as exc:
        svc.metrics.event(body.get("type") if isinstance(body, dict) else None, "invalid")
        return _error(422, "invalid_event", "the event has invalid fields", fields=exc.errors)
    if event.type in ALARM_TYPES:
        try:
            registered = svc.vehicles.get(event.vin) is not None
        except StoreError:
            registered = True  # let the store attempt below answer 503
        if not registered:
            svc.metrics.event(event.type, "invalid")
            return _error(422, "invalid_event", "the alarm event has invalid fields",
                          fields={"vin": "no registered vehicle with this VIN"})
    extra_rows = svc.outbox_rows if svc.outbox_rows is not None else None
    try:
        incident, created = record_event(
            event, store=svc.store, locator=svc.locator, plan=svc.plan, extra_rows=extra_rows,
            now=dt.datetime.fromtimestamp(svc.clock(), tz=dt.UTC),
            caller_ids=svc.settings.emergency_caller_ids,
        )
    except EventConflictError:
        svc.metrics.event(event.type, "conflict")
        return _error(409, "event_id_conflict",
                      "this event_id was already used for a different event",
                      fields={"event_id": "already used with a different body"})
    except StoreError:
        log.exception("event not stored")
        svc.metrics.event(event.type, "unavailable")
        response = _error(503, "unavailable", "the event was not stored; retry with the same event_id")
        response.headers["Retry-After"] = "1"
        return response
    if created and svc.on_incident is not None:
        svc.on_incident(incident)
    if event.type in ALARM_TYPES:
        # idempotent on event_id: a replay after a crash here completes the work
        try:
            theft_answer = _alarm(event, svc)
        except ValidationError as exc:
            svc.metrics.event(event.type, "invalid")
            return _error(422, "invalid_event", "the alarm event has invalid fields",
                          fields=exc.errors)
        except StoreError:
            log.exception("alarm not handled")
            svc.metrics.event(event.type, "unavailable")
            response = _error(503, "unavailable", "retry with the same event_id")
            response.headers["Retry-After"] = "1"
            return response
    body = incident_answer(incident, plan=svc.plan, policy=svc.settings.voice,
                           caller_ids=svc.settings.emergency_caller_ids)
    body["replayed"] = not created
    if event.type in ALARM_TYPES:
        body["notifications"] = theft_answer
    svc.metrics.event(event.type, "created" if created else "replayed")
    response = jsonify(body)
    response.status_code = 201 if created else 200
    return response


@bp.post("/vehicles/<vin>/command-results")
@vehicle_token
def post_command_result(vin: str) -> Any:
    """The car reports whether it executed a command: ``{key | command_id, ok, detail}``.

    ``ok`` confirms the command and applies what waited for the car (immobilised,
    reactivated, tracking on/off), once, audited; not ``ok`` fails it (the state stays).
    A replay changes nothing and answers the same 200; 404 for a command this car was
    not sent."""
    svc = services()
    if not request.is_json:
        return _error(415, "unsupported_media_type", "send the result as application/json")
    try:
        report = parse(CommandResultIn, request.get_data())
    except ValidationError as exc:
        return _error(422, "invalid_request", "the command result has invalid fields",
                      fields=exc.errors)
    try:
        row = svc.car_commands.command_result(vin, key=report.key,
                                              command_id=report.command_id, ok=report.ok,
                                              detail=report.detail)
    except StoreError:
        log.exception("command result not stored")
        response = _error(503, "unavailable", "the result was not stored; send it again")
        response.headers["Retry-After"] = "1"
        return response
    if row is None:
        field = "key" if report.key is not None else "command_id"
        return _error(404, "unknown_command", "this vehicle was sent no such command",
                      fields={field: "no command with this value for this vehicle"})
    return jsonify(command_view(row))


def _alarm(event: VehicleEvent, svc: Any) -> list[dict[str, Any]]:
    now = dt.datetime.fromtimestamp(svc.clock(), tz=dt.UTC)
    if event.type == "alarm_triggered":
        rows = theft.on_alarm_triggered(
            store=svc.store, vehicles=svc.vehicles, vin=event.vin, event_id=event.event_id,
            occurred_at=event.occurred_at, now=now,
            escalate_after=dt.timedelta(seconds=svc.settings.theft_escalation_s))
        if svc.notifier is not None:
            svc.notifier.wake.set()
    elif event.disarmed_by == "key":
        rows = theft.on_alarm_disarmed(store=svc.store, vin=event.vin, event_id=event.event_id,
                                       now=now, reason="alarm disarmed with the car's key")
    else:
        rows = []  # disarmed some other way: theft notification goes on
    return [theft.as_public(r) for r in rows]
