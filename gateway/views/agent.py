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
from gateway.app import services
from gateway.calls.call_plan import emergency_route
from gateway.delivery import address_of
from gateway.errors import (
    PermanentUpstreamError,
    StoreError,
    TransientUpstreamError,
    ValidationError,
)
from gateway.incidents import incident_answer, mark_incident
from gateway.owners import UnknownVehicleError
from gateway.owners.immobiliser import REJECTED_ANSWERS
from gateway.schemas import agent as schemas
from gateway.schemas.base import M, parse
from gateway.security import agent_role

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
    data = {k: getattr(vehicle, k) for k in (
        "vin", "market", "immobilised", "immobilised_by", "immobilised_reference",
        "reactivated_by", "tracking", "tracking_started_by", "tracking_police_reference")}
    for k in ("immobilised_at", "reactivated_at", "tracking_started_at", "updated_at"):
        value = getattr(vehicle, k)
        data[k] = value.isoformat() if value else None
    data["has_pin"] = vehicle.has_pin
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
    return jsonify(_vehicle_json(_vehicle_or_404(vin)))


def _command(vin: str, command: str, **params: Any) -> Any:
    """Send a vehicle command; an error answer (502/504) if the car cannot be reached."""
    commands = services().commands
    if commands is None:
        return _error(503, "no_command_service", "GATEWAY_VEHICLE_COMMAND_URL is not configured")
    try:
        answer = commands.send(vin, command, **params)
    except TransientUpstreamError as exc:
        return _error(504, "vehicle_unreachable", str(exc))
    except PermanentUpstreamError as exc:
        return _error(502, "vehicle_refused", str(exc))
    status = str(answer.get("status", "")).lower() if isinstance(answer, dict) else ""
    if status in REJECTED_ANSWERS:  # the car answered, but will not execute it
        return _error(502, "vehicle_refused",
                      f"the car rejected {command!r}: {str(answer.get('reason', status))[:100]}")
    return None


@bp.post("/vehicles/<vin>/immobilise")
@agent_role("immobilise")
def immobilise(vin: str) -> Any:
    body = _body(schemas.ImmobiliseIn)
    svc = services()
    vehicle = _vehicle_or_404(vin)
    # one key per immobilisation episode: a retry after a lost answer is deduplicated
    since = vehicle.reactivated_at.isoformat() if vehicle.reactivated_at else "first"
    failed = _command(vehicle.vin, "immobilise", authority_reference=body.authority_reference,
                      idempotency_key=f"immobilise:{vehicle.vin}:{since}")
    if failed is not None:
        return failed
    vehicle = svc.vehicles.immobilise(vin, actor=_actor(),
                                      authority_reference=body.authority_reference)
    return jsonify(_vehicle_json(vehicle))


@bp.post("/vehicles/<vin>/reactivate")
@agent_role("immobilise")
def reactivate(vin: str) -> Any:
    """Only with the owner's PIN (read to the agent by the owner), and only once the car
    acknowledges: an unreachable car answers 504 and the vehicle stays immobilised."""
    pin = _body(schemas.ReactivateIn).pin
    svc = services()
    vehicle = _vehicle_or_404(vin)
    commands = svc.commands
    if commands is None:
        return _error(503, "no_command_service", "GATEWAY_VEHICLE_COMMAND_URL is not configured")

    def send(key: str) -> Any:
        return commands.send(vehicle.vin, "reactivate", idempotency_key=key)

    try:
        result = svc.vehicles.reactivate(vehicle.vin, actor=_actor(), pin=pin, send=send)
    except TransientUpstreamError as exc:
        svc.metrics.pin_attempts.labels("ok").inc()
        return _error(504, "vehicle_unreachable",
                      "car unreachable: the vehicle stays immobilised; retry when the car "
                      f"is reachable ({exc})", immobilised=True)
    except PermanentUpstreamError as exc:
        svc.metrics.pin_attempts.labels("ok").inc()
        return _error(502, "vehicle_refused",
                      f"the car did not reactivate: the vehicle stays immobilised ({exc})",
                      immobilised=True)
    svc.metrics.pin_attempts.labels(result.check.outcome).inc()
    if not result.ok:
        status = 423 if result.check.locked_until or result.check.outcome == "locked" else 403
        return _error(status, f"pin_{result.check.outcome}", "the PIN was not accepted",
                      locked_until=result.check.locked_until.isoformat()
                      if result.check.locked_until else None)
    return jsonify(_vehicle_json(result.vehicle))


@bp.post("/vehicles/<vin>/tracking")
@agent_role("dispatch")
def start_tracking(vin: str) -> Any:
    """Unauthorised use confirmed: start tracking and notify the police through the centre.

    Everything is validated before the car gets a command.  A replay while tracking
    sends no command and no second police notification (one per tracking session).
    """
    reference = theft.check_police_reference(_body(schemas.TrackingIn).police_reference)
    svc = services()
    vehicle = _vehicle_or_404(vin)
    if not vehicle.tracking:
        failed = _command(vehicle.vin, "start_tracking")
        if failed is not None:
            return failed
    try:
        started = theft.start_tracking(svc.store, vin=vehicle.vin, actor=_actor(),
                                       police_reference=reference, now=_now())
    except UnknownVehicleError:
        abort(404, description="no such vehicle")
    if svc.worker is not None:
        svc.worker.wake.set()
    answer = _vehicle_json(_vehicle_or_404(vehicle.vin))
    answer["police_notification"] = {"id": started.notification_key,
                                     "police_reference": started.police_reference,
                                     "status": started.notification_status}
    return jsonify(answer)


@bp.post("/vehicles/<vin>/tracking/stop")
@agent_role("dispatch")
def stop_tracking(vin: str) -> Any:
    """Stop tracking (optional ``reason``); 409 if the vehicle is not being tracked."""
    reason = theft.stop_reason(_body(schemas.StopTrackingIn, optional=True).model_dump())
    svc = services()
    vehicle = _vehicle_or_404(vin)
    if not vehicle.tracking:
        return _error(409, "not_tracking", "the vehicle is not being tracked")
    failed = _command(vehicle.vin, "stop_tracking")
    if failed is not None:
        return failed
    try:
        theft.stop_tracking(svc.store, vin=vehicle.vin, actor=_actor(), reason=reason, now=_now())
    except UnknownVehicleError:
        abort(404, description="no such vehicle")
    except theft.NotTrackingError:
        return _error(409, "not_tracking", "the vehicle is not being tracked")
    return jsonify(_vehicle_json(_vehicle_or_404(vehicle.vin)))
