"""Parsing and validating the vehicle's data message (``POST /v1/events``).

Hand-written rather than a schema library: the rules are few, every error must
name its field (``location.lat``) with a reason a firmware engineer can act on,
and unknown fields are kept but ignored so that newer car firmware is never
refused in a crash.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import phonenumbers

from gateway.errors import ValidationError

EMERGENCY_TYPES = ("crash", "sos")
ALARM_TYPES = ("alarm_triggered", "alarm_disarmed")
EVENT_TYPES = ("crash", "sos", "on_call", *ALARM_TYPES)
#: how an alarm was disarmed; only the car's key interrupts theft notification
DISARM_METHODS = ("key", "app", "other")

_VIN = re.compile(r"^[A-HJ-NPR-Z0-9]{17}$")
_EVENT_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

#: crash detail fields and their types; others are kept as sent
_CRASH_FIELDS: dict[str, tuple[type, ...]] = {
    "airbag_deployed": (bool,),
    "belt_tensioner_fired": (bool,),
    "rollover": (bool,),
    "delta_v_kmh": (int, float),
    "impact": (str,),
    "severity": (str,),
}


@dataclass(frozen=True)
class Location:
    lat: float
    lon: float
    heading_deg: float | None = None
    accuracy_m: float | None = None
    trusted: bool | None = None


@dataclass(frozen=True)
class VehicleEvent:
    event_id: str
    type: str
    vin: str
    msisdn: str
    occurred_at: dt.datetime
    location: Location
    crash: dict[str, Any] | None
    occupants: dict[str, Any] | None
    payload_sha256: str
    disarmed_by: str | None = None


def parse_event(body: Any) -> VehicleEvent:
    """A validated event, or ValidationError naming every bad field."""
    errors: dict[str, str] = {}
    if not isinstance(body, dict):
        raise ValidationError({"body": "must be a JSON object"})

    event_id = body.get("event_id")
    if not isinstance(event_id, str) or not _EVENT_ID.match(event_id):
        errors["event_id"] = "required: 1-128 characters of letters, digits, '.', '_', ':', '-'"

    kind = body.get("type")
    if kind not in EVENT_TYPES:
        errors["type"] = f"required: one of {', '.join(EVENT_TYPES)}"

    vin = body.get("vin")
    if not isinstance(vin, str) or not _VIN.match(vin.upper()):
        errors["vin"] = "required: 17 characters, letters (no I, O, Q) and digits"

    msisdn = _msisdn(body.get("msisdn"), errors)
    occurred_at = _timestamp(body.get("occurred_at"), errors)
    location = _location(body.get("location"), errors)
    crash = _crash(body.get("crash"), errors)
    occupants = _occupants(body.get("occupants"), errors)

    disarmed_by = body.get("disarmed_by")
    if kind == "alarm_disarmed" and disarmed_by not in DISARM_METHODS:
        errors["disarmed_by"] = f"required for alarm_disarmed: one of {', '.join(DISARM_METHODS)}"
    if errors:
        raise ValidationError(errors)
    assert isinstance(event_id, str) and isinstance(kind, str) and isinstance(vin, str)
    assert msisdn is not None and occurred_at is not None and location is not None
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return VehicleEvent(
        event_id=event_id,
        type=kind,
        vin=vin.upper(),
        msisdn=msisdn,
        occurred_at=occurred_at,
        location=location,
        crash=crash,
        occupants=occupants,
        payload_sha256=digest,
        disarmed_by=disarmed_by if kind == "alarm_disarmed" else None,
    )


def _msisdn(value: Any, errors: dict[str, str]) -> str | None:
    if not isinstance(value, str) or not value.startswith("+"):
        errors["msisdn"] = "required: an E.164 number such as +46701234567"
        return None
    try:
        number = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException as exc:
        errors["msisdn"] = f"not a phone number: {exc}"
        return None
    if not phonenumbers.is_valid_number(number):
        errors["msisdn"] = "not a valid number for any country"
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _timestamp(value: Any, errors: dict[str, str]) -> dt.datetime | None:
    if not isinstance(value, str):
        errors["occurred_at"] = "required: an ISO 8601 timestamp with a time zone"
        return None
    try:
        stamp = dt.datetime.fromisoformat(value)
    except ValueError:
        errors["occurred_at"] = "not an ISO 8601 timestamp"
        return None
    if stamp.tzinfo is None:
        errors["occurred_at"] = "needs a time zone (e.g. 'Z' or '+01:00')"
        return None
    return stamp.astimezone(dt.UTC)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _location(value: Any, errors: dict[str, str]) -> Location | None:
    if not isinstance(value, dict):
        errors["location"] = "required: an object with lat and lon"
        return None
    lat = _number(value.get("lat"))
    lon = _number(value.get("lon"))
    if lat is None or not -90 <= lat <= 90:
        errors["location.lat"] = "required: a number from -90 to 90"
    if lon is None or not -180 <= lon <= 180:
        errors["location.lon"] = "required: a number from -180 to 180"
    heading = value.get("heading_deg")
    if heading is not None:
        heading = _number(heading)
        if heading is None or not 0 <= heading < 360:
            errors["location.heading_deg"] = "a number from 0 to below 360"
    accuracy = value.get("accuracy_m")
    if accuracy is not None:
        accuracy = _number(accuracy)
        if accuracy is None or accuracy < 0:
            errors["location.accuracy_m"] = "a number of metres, 0 or more"
    trusted = value.get("trusted")
    if trusted is not None and not isinstance(trusted, bool):
        errors["location.trusted"] = "true or false"
    if lat is None or lon is None or any(k.startswith("location") for k in errors):
        return None
    return Location(lat=lat, lon=lon, heading_deg=heading, accuracy_m=accuracy, trusted=trusted)


def _crash(value: Any, errors: dict[str, str]) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        errors["crash"] = "an object of crash details"
        return None
    for key, types in _CRASH_FIELDS.items():
        if key in value and (
            not isinstance(value[key], types) or (bool not in types and isinstance(value[key], bool))
        ):
            errors[f"crash.{key}"] = f"must be {' or '.join(t.__name__ for t in types)}"
    return dict(value)


def _occupants(value: Any, errors: dict[str, str]) -> dict[str, Any] | None:
    """An integer count, or an object with at least ``count``."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"count": value}
    if not isinstance(value, dict):
        errors["occupants"] = "a count (0-99) or an object with 'count'"
        return None
    count = value.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 99:
        errors["occupants.count"] = "required: a whole number from 0 to 99"
        return None
    return dict(value)
