"""The agent API: what the assistance centre's agents do through the gateway.

Bearer tokens with roles (``GATEWAY_AGENT_API_TOKENS``): ``read``, ``dispatch``,
``immobilise``; ``supervisor`` may do everything.  Every change is audited with the
agent's (hashed) token id.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from flask import Blueprint, abort, g, jsonify, request

from gateway import theft
from gateway.calls.call_plan import emergency_route
from gateway.delivery import address_of
from gateway.errors import StoreError, ValidationError
from gateway.incidents import incident_answer, mark_incident
from gateway.owners import UnknownVehicleError
from gateway.owners.car_commands import (
    AlreadyTrackingError,
    CommandRequest,
    CommandServiceMissingError,
    command_view,
)
from gateway.schemas import agent as schemas
from gateway.schemas.base import M, parse
from gateway.security import agent_role
from gateway.views.context import services

log = logging.getLogger(__name__)

bp = Blueprint("agent", __name__, url_prefix="/v1/agent")


def _error(status: int, error: str, detail: str, **extra: Any) -> Any:
    response = jsonify(error=error, detail=detail, **extra)
    response.status_code = status
    return response


def _body(model: type[M], *, optional: bool = False) -> M:
    """The body read strictly (no NaN, bounded nesting) and validated by ``model``;
    ``optional``: an empty body counts as ``{}``."""
    return parse(model, request.get_data(), empty={} if optional else None)


def _actor() -> str:
    return f"agent:{g.agent}"


def _incident_or_404(incident_id: str) -> dict[str, Any]:
    incident = services().store.incident(incident_id)
    if incident is None:
        abort(404, description="no such incident")
    return incident


def _vehicle_or_404(vin: str) -> Any:
    vehicle = services().vehicles.get(vin)
    if vehicle is None:
        abort(404, description="no such vehicle")
    return vehicle


def _now() -> dt.datetime:
    return dt.datetime.fromtimestamp(services().clock(), tz=dt.UTC)


def _vehicle_json(vehicle: Any) -> dict[str, Any]:
    """The vehicle's state, its customer number, the commands the car has not settled
    yet (pending, sent) and those settled in the last day (confirmed, failed, cancelled)."""
    data = {k: getattr(vehicle, k) for k in (
        "vin", "market", "customer_number", "immobilised", "immobilised_by", "immobilised_reference",
        "reactivated_by", "tracking", "tracking_started_by", "tracking_police_reference")}
    for k in ("immobilised_at", "reactivated_at", "tracking_started_at", "updated_at"):
        value = getattr(vehicle, k)
        data[k] = value.isoformat() if value else None
    data["has_pin"] = vehicle.has_pin
    data["commands"] = services().car_commands.unfinished(vehicle.vin)
    data["recent_commands"] = services().car_commands.recent(vehicle.vin, now=_now())
    return data


@bp.errorhandler(ValidationError)
def _invalid(exc: ValidationError) -> Any:
    return _error(422, "invalid_request", "the request has invalid fields", fields=exc.errors)


@bp.errorhandler(StoreError)
def _unavailable(exc: StoreError) -> Any:
    response = _error(503, "unavailable", "the database is unavailable; retry")
    response.headers["Retry-After"] = "1"
    return response


@bp.get("/incidents/<incident_id>")
@agent_role("read")
def read_incident(incident_id: str) -> Any:
    incident = _incident_or_404(incident_id)
    svc = services()
    body = incident_answer(incident, plan=svc.plan, policy=svc.settings.voice,
                           caller_ids=svc.settings.emergency_caller_ids)
    body.update({k: incident[k] for k in ("vin", "msisdn", "lat", "lon", "heading_deg",
                                          "accuracy_m", "trusted", "crash", "occupants",
                                          "status", "home_country")})
    body["occurred_at"] = incident["occurred_at"].isoformat()
    # found by the delivery worker after the incident was stored (GATEWAY_GEOCODER_URL)
    body["address"] = address_of(svc.store, incident_id)
    body["decisions"] = [
        {"call_sid": d["call_sid"], "step": d["step"], "target": d["target"],
         "number": d["number"], "reason": d["reason"], "at": d["created_at"].isoformat()}
        for d in services().store.decisions_for(incident_id=incident_id)]
    return jsonify(body)


@bp.post("/incidents/<incident_id>/dispatch")
@agent_role("dispatch")
def dispatch(incident_id: str) -> Any:
    """Record that emergency services were dispatched; answer the route for the place."""
    svc = services()
    incident = _incident_or_404(incident_id)
    body = _body(schemas.DispatchIn, optional=True)
    route = emergency_route(incident["route_country"], svc.plan,
                            svc.settings.emergency_caller_ids)
    mark_incident(svc.store, incident, status="dispatched", actor=_actor(),
                  action="emergency_dispatched", now=_now(),
                  detail={"note": (body.note or "")[:200], "route_country": route.country})
    return jsonify(incident_id=incident_id, status="dispatched", country=route.country,
                   emergency_number=route.emergency_number, fallback_dial=route.fallback_dial,
                   why=route.why)


@bp.post("/incidents/<incident_id>/misuse")
@agent_role("dispatch")
def misuse(incident_id: str) -> Any:
    """Mark an SOS as misuse (may be charged to the owner)."""
    svc = services()
    incident = _incident_or_404(incident_id)
    if incident["type"] != "sos":
        return _error(409, "not_sos", "only an SOS incident can be marked as misuse")
    body = _body(schemas.MisuseIn)
    mark_incident(svc.store, incident, status="misuse", actor=_actor(), action="sos_misuse",
                  now=_now(), detail={"reason": body.reason[:200], "chargeable": True})
    return jsonify(incident_id=incident_id, status="misuse", chargeable=True)


@bp.get("/vehicles/<vin>")
@agent_role("read")
def read_vehicle(vin: str) -> Any:
    """The immobiliser and tracking state, the customer number the IVR asks the owner
    for, and the commands the car has not confirmed yet (``commands``)."""
    return jsonify(_vehicle_json(_vehicle_or_404(vin)))


def _command_answer(sent: CommandRequest, *, done: str) -> Any:
    """200 once the car confirmed the command; 202 while it is sent or pending (the
    state unchanged); 502 when the car rejected it or the service refused it."""
    body = _vehicle_json(sent.vehicle)
    command = command_view(sent.row)
    error = str(sent.row["last_error"] or "")[:200]
    if sent.status == "confirmed":
        return jsonify({**body, "command": command, "detail": done})
    if sent.status == "sent":
        window = services().command_queue.confirm_window.total_seconds()
        detail = ("the vehicle command service took the command; the state changes when "
                  f"the car reports that it executed it (failed if it has not reported "
                  f"{window:g}s after it was sent)")
    elif sent.status == "pending":
        budget = services().command_queue.budget.total_seconds()
        detail = (f"car unreachable: the state is unchanged; the command is retried for up "
                  f"to {budget:g}s after the request ({error})")
    else:
        return _error(502, "vehicle_refused",
                      f"the car did not take {sent.row['command']!r}: the state is unchanged "
                      f"({error})", command=command,
                      **{k: body[k] for k in ("immobilised", "tracking")})
    response = jsonify({**body, "command": command, "detail": detail})
    response.status_code = 202
    return response


def _no_service() -> Any:
    return _error(503, "no_command_service", "GATEWAY_VEHICLE_COMMAND_URL is not configured")


@bp.post("/vehicles/<vin>/immobilise")
@agent_role("immobilise")
def immobilise(vin: str) -> Any:
    """Immobilise the car: the registry says immobilised once the car confirms it (200);
    202 with the command while it is sent or pending (retried by the queue); one
    idempotency key per immobilisation, so a repeated request sends nothing twice."""
    body = _body(schemas.ImmobiliseIn)
    try:
        sent = services().car_commands.immobilise(
            vin, actor=_actor(), authority_reference=body.authority_reference)
    except UnknownVehicleError:
        abort(404, description="no such vehicle")
    except CommandServiceMissingError:
        return _no_service()
    return _command_answer(sent, done="immobilised: the car confirmed it")


@bp.post("/vehicles/<vin>/reactivate")
@agent_role("immobilise")
def reactivate(vin: str) -> Any:
    """Only with the owner's PIN (read to the agent by the owner), and only once the car
    confirms: 200 reactivated; 202 with the command while it is sent or pending (an
    unreachable car stays immobilised; the queue retries, a repeated request sends the
    pending command again at once, with the same idempotency key); 502 rejected."""
    pin = _body(schemas.ReactivateIn).pin
    svc = services()
    try:
        result = svc.car_commands.reactivate(vin, actor=_actor(), pin=pin)
    except UnknownVehicleError:
        abort(404, description="no such vehicle")
    except CommandServiceMissingError:
        return _no_service()
    svc.metrics.pin_attempts.labels(result.check.outcome).inc()
    if not result.ok:
        status = 423 if result.check.locked_until or result.check.outcome == "locked" else 403
        return _error(status, f"pin_{result.check.outcome}", "the PIN was not accepted",
                      locked_until=result.check.locked_until.isoformat()
                      if result.check.locked_until else None)
    if result.request is None:  # not immobilised: nothing to send
        return jsonify(_vehicle_json(result.vehicle))
    return _command_answer(result.request, done="reactivated: the car confirmed it")


@bp.post("/vehicles/<vin>/tracking")
@agent_role("dispatch")
def start_tracking(vin: str) -> Any:
    """Unauthorised use confirmed: start tracking and notify the police through the centre.

    Everything is validated before the car gets a command.  Tracking (and the police
    notification) starts when the car confirms ``start_tracking`` (200); 202 with the
    command while it is sent or pending.  A replay while tracking sends no command and
    no second police notification (one per tracking session).
    """
    reference = theft.check_police_reference(_body(schemas.TrackingIn).police_reference)
    svc = services()
    vehicle = _vehicle_or_404(vin)
    command = None
    if not vehicle.tracking:
        try:
            sent = svc.car_commands.start_tracking(vehicle.vin, actor=_actor(),
                                                   police_reference=reference)
        except CommandServiceMissingError:
            return _no_service()
        except AlreadyTrackingError:
            sent = None
        if sent is not None and sent.status != "confirmed":
            return _command_answer(sent, done="")
        command = None if sent is None else command_view(sent.row)
    try:
        if command is None:  # already tracking: audited, the session's notification
            started = theft.start_tracking(svc.store, vin=vehicle.vin, actor=_actor(),
                                           police_reference=reference, now=_now())
        else:
            started = theft.session_notification(svc.store, vin=vehicle.vin)
    except UnknownVehicleError:
        abort(404, description="no such vehicle")
    if svc.worker is not None:
        svc.worker.wake.set()
    answer = _vehicle_json(_vehicle_or_404(vehicle.vin))
    answer["police_notification"] = {"id": started.notification_key,
                                     "police_reference": started.police_reference,
                                     "status": started.notification_status}
    answer["command"] = command
    return jsonify(answer)


@bp.post("/vehicles/<vin>/tracking/stop")
@agent_role("dispatch")
def stop_tracking(vin: str) -> Any:
    """Stop tracking (optional ``reason``) once the car confirms ``stop_tracking`` (200;
    202 while it is sent or pending); 409 if the vehicle is not being tracked."""
    reason = theft.stop_reason(_body(schemas.StopTrackingIn, optional=True).model_dump())
    try:
        sent = services().car_commands.stop_tracking(vin, actor=_actor(), reason=reason)
    except UnknownVehicleError:
        abort(404, description="no such vehicle")
    except CommandServiceMissingError:
        return _no_service()
    except theft.NotTrackingError:
        return _error(409, "not_tracking", "the vehicle is not being tracked")
    return _command_answer(sent, done="tracking stopped: the car confirmed it")
