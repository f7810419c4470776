"""The admin API: enrol vehicles, set PINs, clear lockouts (operators, not agents).

Bearer tokens of its own (``GATEWAY_ADMIN_API_TOKENS``); every change is audited with
the token's id (``admin:<12 hex>``).  A PIN arrives only in a JSON body, is hashed at
once and never appears in an answer, a log line or the audit.  Errors name each field:
``{"error": ..., "detail": ..., "fields": {field: reason}}``.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from flask import Blueprint, g, jsonify, request, url_for

from gateway.errors import StoreError, ValidationError
from gateway.owners import (
    LockoutState,
    UnknownVehicleError,
    Vehicle,
    VehicleConflictError,
    parse_changes,
    parse_record,
)
from gateway.schemas import admin as schemas
from gateway.schemas.base import M, read_json, validate
from gateway.security import admin_token
from gateway.views.context import services

log = logging.getLogger(__name__)

bp = Blueprint("admin", __name__, url_prefix="/v1/admin")


def _error(status: int, error: str, detail: str, **extra: Any) -> Any:
    response = jsonify(error=error, detail=detail, **extra)
    response.status_code = status
    return response


class _BodyError(Exception):
    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def _body() -> dict[str, Any]:
    """The JSON body, read strictly (no NaN/Infinity, bounded numbers and nesting)."""
    if not request.is_json:
        raise _BodyError(415, "unsupported_media_type", "send the body as application/json")
    body = read_json(request.get_data())
    if not isinstance(body, dict):
        raise ValidationError({"body": "must be a JSON object"})
    return body


def _validated(model: type[M]) -> M:
    return validate(model, _body())


def _actor() -> str:
    return f"admin:{g.admin}"


def _today() -> dt.date:
    return dt.datetime.fromtimestamp(services().clock(), tz=dt.UTC).date()


def _lockout_json(state: LockoutState) -> dict[str, Any]:
    return {"failures": state.failures, "max_failures": state.max_failures,
            "window_s": int(state.window.total_seconds()), "locked": state.locked,
            "locked_until": state.locked_until.isoformat() if state.locked_until else None}


def _vehicle_json(vehicle: Vehicle) -> dict[str, Any]:
    """Everything an operator needs; never the PIN hash."""
    return {
        "vin": vehicle.vin, "customer_number": vehicle.customer_number,
        "car_msisdn": vehicle.car_msisdn, "market": vehicle.market,
        "purchase_date": vehicle.purchase_date.isoformat(),
        "serviced_regularly": vehicle.serviced_regularly, "owner_name": vehicle.owner_name,
        "owner_phones": list(vehicle.owner_phones), "language": vehicle.language,
        "has_pin": vehicle.has_pin,
        "pin_lockout": _lockout_json(services().vehicles.lockout(vehicle.vin)),
        "immobilised": vehicle.immobilised, "tracking": vehicle.tracking,
        "updated_at": vehicle.updated_at.isoformat(),
    }


def _vehicle_or_404(vin: str) -> Vehicle:
    vehicle: Vehicle | None = services().vehicles.get(vin)
    if vehicle is None:
        raise UnknownVehicleError(vin)
    return vehicle


@bp.errorhandler(_BodyError)
def _bad_body(exc: _BodyError) -> Any:
    return _error(exc.status, exc.error, exc.detail)


@bp.errorhandler(ValidationError)
def _invalid(exc: ValidationError) -> Any:
    return _error(422, "invalid_request", "the request has invalid fields", fields=exc.errors)


@bp.errorhandler(VehicleConflictError)
def _conflict(exc: VehicleConflictError) -> Any:
    return _error(409, "conflict", "the request clashes with a registered vehicle",
                  fields=exc.errors)


@bp.errorhandler(UnknownVehicleError)
def _unknown(exc: UnknownVehicleError) -> Any:
    return _error(404, "not_found", "no vehicle is registered with this VIN",
                  fields={"vin": "not registered"})


@bp.errorhandler(StoreError)
def _unavailable(exc: StoreError) -> Any:
    response = _error(503, "unavailable", "the database is unavailable; retry")
    response.headers["Retry-After"] = "1"
    return response


@bp.post("/vehicles")
@admin_token
def create_vehicle() -> Any:
    """201 with the customer number; 200 for the same body again; 409 for another body."""
    record = parse_record(_body(), text=False, today=_today())
    vehicle, created = services().vehicles.enrol(record, actor=_actor())
    response = jsonify(_vehicle_json(vehicle))
    if created:
        log.info("%s enrolled vehicle %s", _actor(), vehicle.vin)
        response.status_code = 201
        response.headers["Location"] = url_for("admin.read_vehicle", vin=vehicle.vin)
    return response


@bp.get("/vehicles/<vin>")
@admin_token
def read_vehicle(vin: str) -> Any:
    return jsonify(_vehicle_json(_vehicle_or_404(vin)))


@bp.patch("/vehicles/<vin>")
@admin_token
def update_vehicle(vin: str) -> Any:
    """Change any of the enrolment fields but the VIN; answers with ``changed``."""
    body = _body()
    current = _vehicle_or_404(vin)
    changes = parse_changes(body, text=False, today=_today(), market=current.market)
    vehicle, changed = services().vehicles.change(current.vin, changes, actor=_actor())
    if changed:
        log.info("%s changed %s of vehicle %s", _actor(), ",".join(changed), vehicle.vin)
    return jsonify({**_vehicle_json(vehicle), "changed": changed})


@bp.put("/vehicles/<vin>/pin")
@admin_token
def set_pin(vin: str) -> Any:
    """Set or reset the owner's PIN (``{"pin": "4 to 8 digits"}``); clears any lockout."""
    pin = _validated(schemas.PinIn).pin
    vehicle = _vehicle_or_404(vin)
    services().vehicles.set_pin(vehicle.vin, pin, actor=_actor())  # hashed there, at once
    del pin
    log.info("%s set the PIN of vehicle %s", _actor(), vehicle.vin)
    return jsonify(_vehicle_json(_vehicle_or_404(vehicle.vin)))


@bp.post("/vehicles/<vin>/pin/unlock")
@admin_token
def unlock_pin(vin: str) -> Any:
    """Clear the PIN failures and any lock; ``reason`` (1-200 characters) is audited."""
    reason = _validated(schemas.UnlockIn).reason
    vehicle = _vehicle_or_404(vin)
    services().vehicles.unlock_pin(vehicle.vin, actor=_actor(), reason=reason)
    log.info("%s cleared the PIN lockout of vehicle %s", _actor(), vehicle.vin)
    return jsonify(_vehicle_json(_vehicle_or_404(vehicle.vin)))


@bp.get("/vehicles/<vin>/audit")
@admin_token
def read_audit(vin: str) -> Any:
    """The vehicle's audit trail, oldest first (at most 200 entries)."""
    vehicle = _vehicle_or_404(vin)
    entries = services().vehicles.audit_for(vehicle.vin)
    return jsonify(vin=vehicle.vin, entries=[
        {"at": e.at.isoformat(), "actor": e.actor, "action": e.action, "detail": e.detail}
        for e in entries])
