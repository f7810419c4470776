"""Parsing and validating the vehicle's data message (``POST /v1/events``).

Hand-written rather than a schema library: the rules are few, every error must
name its field (``location.lat``) with a reason a firmware engineer can act on,
and unknown fields are kept but ignored so that newer car firmware is never
refused in a crash.

A car that speaks the eCall Minimum Set of Data (EN 15722) may send it as ``msd`` (base64
of the UPER bytes, decoded by :mod:`gateway.msd`) instead of, or beside, the JSON fields:
``vin``, ``type``, ``occurred_at``, ``location`` and ``occupants`` come from the MSD when
they are not given, and a given one that disagrees with the MSD is refused with its name.
``event_id`` and ``msisdn`` are always required (an MSD has no phone number).

Only what can be carried to the end is accepted: the body is read with
:func:`load_event_json` (no ``NaN``/``Infinity``, at most :data:`MAX_JSON_DEPTH`
levels, numbers that fit in 64 bits and a double, no lone surrogates) and the
free-form ``crash`` and ``occupants`` objects that are stored and delivered are
bounded in size and depth.  Whatever is stored can be written as strict JSON
(``allow_nan=False``) and spoken in the whisper.
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
from gateway.msd import Msd, MsdError, decode_base64

EMERGENCY_TYPES = ("crash", "sos")
ALARM_TYPES = ("alarm_triggered", "alarm_disarmed")
EVENT_TYPES = ("crash", "sos", "on_call", *ALARM_TYPES)
#: how an alarm was disarmed; only the car's key interrupts theft notification
DISARM_METHODS = ("key", "app", "other")

#: nesting allowed in a body (objects and arrays); deeper is refused before parsing
MAX_JSON_DEPTH = 32
#: the free-form objects stored with an incident and sent to the centre
MAX_STORED_OBJECT_BYTES = 4096
MAX_STORED_OBJECT_DEPTH = 3
#: integers anywhere in a body: what a 64-bit field holds (signed or unsigned)
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
#: plausible change of speed in a crash, km/h
DELTA_V_RANGE_KMH = (0.0, 500.0)
#: occurred_at: not before this, not more than this ahead of the gateway's clock
EARLIEST_EVENT = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
MAX_CLOCK_AHEAD = dt.timedelta(days=1)
#: at most this many problems are listed for one body
_MAX_REPORTED = 20
#: an MSD and the JSON fields beside it describe one fix: positions further apart than
#: this (degrees; about 110 m of latitude), headings further apart than this, and times
#: further apart than this disagree
MSD_POSITION_TOLERANCE_DEG = 0.001
MSD_HEADING_TOLERANCE_DEG = 2.0
MSD_TIME_TOLERANCE = dt.timedelta(seconds=1)
#: occupants.count accepted in JSON (an MSD's numberOfPassengers above it is not stored)
MAX_OCCUPANTS = 99

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
    #: None only for an MSD whose position is unknown and no JSON location beside it
    location: Location | None
    crash: dict[str, Any] | None
    occupants: dict[str, Any] | None
    payload_sha256: str
    disarmed_by: str | None = None
    #: the decoded MSD the event carried, with its bytes as received
    msd: Msd | None = None

    @property
    def test_call(self) -> bool:
        """The MSD's testCall flag: the call is to be answered and recorded, and never
        dialled to emergency services (stored on the incident for the call path)."""
        return self.msd is not None and self.msd.test_call


# -- reading the body -----------------------------------------------------------------

#: what the nesting scan looks at: brackets, quotes and backslashes
_JSON_SPECIAL = re.compile(r'[\[\]{}"\\]')
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class _Unrepresentable:
    """Stands in for a number literal that has no faithful value (reported with its path)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"<unrepresentable: {self.reason}>"


def _parse_constant(name: str) -> _Unrepresentable:
    return _Unrepresentable(f"{name} is not a JSON number")


def _parse_float(text: str) -> float | _Unrepresentable:
    number = float(text)
    if not math.isfinite(number):
        return _Unrepresentable("a number too large to carry")
    return number


def _parse_int(text: str) -> int | _Unrepresentable:
    # 21 characters hold every 64-bit value; longer is refused without converting
    # (int() of thousands of digits is slow, and past 4300 a ValueError)
    if len(text) > 21:
        return _Unrepresentable("an integer too large to carry")
    number = int(text)
    if not _INT_MIN <= number <= _INT_MAX:
        return _Unrepresentable("an integer too large to carry")
    return number


def _nesting_depth(text: str, limit: int) -> int:
    """The deepest nesting of ``[``/``{`` outside strings, counted up to ``limit + 1``.

    One pass over the special characters (linear even for hostile input such as
    thousands of unterminated strings); malformed JSON is left to the parser.
    """
    depth = deepest = 0
    in_string = False
    escaped_at = -1
    for match in _JSON_SPECIAL.finditer(text):
        at = match.start()
        if at == escaped_at:
            continue
        char = match.group()
        if in_string:
            if char == "\\":
                escaped_at = at + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        elif char in "]}":
            depth -= 1
    return deepest


def load_event_json(raw: bytes) -> Any:
    """The body of a vehicle event, read strictly; ValidationError (field ``body``) if unreadable.

    Unlike ``json.loads`` this refuses nesting deeper than :data:`MAX_JSON_DEPTH`
    before parsing (no RecursionError), and never yields ``NaN``, ``Infinity`` or
    a number that does not fit: such literals come back as markers that
    :func:`parse_event` reports with their path.
    """
    try:
        text = raw.decode(json.detect_encoding(raw))
    except (UnicodeDecodeError, LookupError):
        raise ValidationError({"body": "not JSON: the bytes are not valid UTF-8 text"}) from None
    if _nesting_depth(text, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise ValidationError(
            {"body": f"nested more than {MAX_JSON_DEPTH} levels deep"}
        )
    try:
        return json.loads(text, parse_constant=_parse_constant, parse_float=_parse_float,
                          parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        raise ValidationError(
            {"body": f"not JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"}
        ) from None
    except (ValueError, RecursionError):
        raise ValidationError({"body": "not JSON"}) from None


def _path_key(key: str) -> str:
    shown = key if len(key) <= 40 else key[:40] + "..."
    return shown.encode("utf-8", "backslashreplace").decode("utf-8")


def _uncarriable(body: Any, errors: dict[str, str]) -> None:
    """Name every value in ``body`` that cannot be stored and sent as strict JSON.

    Iterative, so a deep structure built in Python cannot exhaust the stack.
    """
    stack: list[tuple[str, Any, int]] = [("", body, 0)]
    while stack and len(errors) < _MAX_REPORTED:
        path, value, depth = stack.pop()
        where = path or "body"
        if isinstance(value, _Unrepresentable):
            errors[where] = value.reason
        elif isinstance(value, bool) or value is None:
            pass
        elif isinstance(value, float):
            if not math.isfinite(value):
                errors[where] = "NaN and Infinity are not JSON numbers"
        elif isinstance(value, int):
            if not _INT_MIN <= value <= _INT_MAX:
                errors[where] = "an integer too large to carry"
        elif isinstance(value, str):
            if _LONE_SURROGATE.search(value):
                errors[where] = "text with an unpaired surrogate (not Unicode)"
        elif isinstance(value, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                errors[where] = f"nested more than {MAX_JSON_DEPTH} levels deep"
                continue
            if isinstance(value, dict):
                items = []
                for key, item in value.items():
                    if not isinstance(key, str):
                        errors[where] = "object keys must be text"
                        break
                    shown = _path_key(key)
                    if _LONE_SURROGATE.search(key):
                        errors[f"{path}.{shown}" if path else shown] = (
                            "a name with an unpaired surrogate (not Unicode)"
                        )
                        continue
                    items.append((f"{path}.{shown}" if path else shown, item, depth + 1))
            else:
                items = [(f"{path}[{i}]", item, depth + 1) for i, item in enumerate(value)]
            stack.extend(reversed(items))
        else:
            errors[where] = f"not a JSON value ({type(value).__name__})"


# -- the event ------------------------------------------------------------------------


def parse_event(body: Any, *, now: dt.datetime | None = None) -> VehicleEvent:
    """A validated event, or ValidationError naming every bad field.

    ``now`` is the gateway's clock, for refusing an ``occurred_at`` in the future.
    """
    errors: dict[str, str] = {}
    if not isinstance(body, dict):
        raise ValidationError({"body": "must be a JSON object"})
    _uncarriable(body, errors)
    if errors:
        raise ValidationError(errors)
    now = now if now is not None else dt.datetime.now(dt.UTC)

    event_id = body.get("event_id")
    if not isinstance(event_id, str) or not _EVENT_ID.fullmatch(event_id):
        errors["event_id"] = "required: 1-128 characters of letters, digits, '.', '_', ':', '-'"

    # an MSD given (even one that does not decode) stands in for the fields it carries
    msd_given = body.get("msd") is not None
    msd: Msd | None = None
    if msd_given:
        try:
            msd = decode_base64(body["msd"])
        except MsdError as exc:
            errors["msd"] = str(exc)

    kind = body.get("type")
    if kind is None and msd_given:
        kind = msd.event_type if msd is not None else None
    elif kind not in EVENT_TYPES:
        errors["type"] = f"required: one of {', '.join(EVENT_TYPES)}"
    elif msd is not None and kind != msd.event_type:
        activation = "automatic" if msd.automatic_activation else "manual"
        errors["type"] = (f"disagrees with the MSD: its {activation} activation "
                          f"means {msd.event_type}")

    vin = body.get("vin")
    if vin is None and msd_given:
        vin = msd.vin if msd is not None else None
    elif not isinstance(vin, str) or not _VIN.fullmatch(vin.upper()):
        errors["vin"] = "required: 17 characters, letters (no I, O, Q) and digits"
    elif msd is not None and vin.upper() != msd.vin:
        errors["vin"] = f"disagrees with the MSD's VIN {msd.vin}"

    msisdn = _msisdn(body.get("msisdn"), errors)
    occurred_at: dt.datetime | None
    if body.get("occurred_at") is None and msd_given:
        occurred_at = (_msd_time(msd, now) or now) if msd is not None else None
    else:
        occurred_at = _timestamp(body.get("occurred_at"), errors, now=now)
        msd_time = _msd_time(msd, now) if msd is not None else None
        if occurred_at is not None and msd_time is not None and (
                abs(occurred_at - msd_time) > MSD_TIME_TOLERANCE):
            errors["occurred_at"] = (f"disagrees with the MSD's timestamp "
                                     f"{msd_time.isoformat().replace('+00:00', 'Z')}")
    location: Location | None
    if body.get("location") is None and msd_given:
        location = _msd_location(msd) if msd is not None else None
    else:
        location = _location(body.get("location"), errors)
        if location is not None and msd is not None:
            location = _beside_msd(location, msd, errors)
    crash = _crash(body.get("crash"), errors)
    occupants: dict[str, Any] | None
    if body.get("occupants") is None and msd_given:
        occupants = _msd_occupants(msd)
    else:
        occupants = _occupants(body.get("occupants"), errors)
        if (occupants is not None and msd is not None and msd.passengers is not None
                and occupants["count"] != msd.passengers):
            errors["occupants.count"] = (f"disagrees with the MSD's numberOfPassengers "
                                         f"{msd.passengers}")

    disarmed_by = body.get("disarmed_by")
    if kind == "alarm_disarmed" and disarmed_by not in DISARM_METHODS:
        errors["disarmed_by"] = f"required for alarm_disarmed: one of {', '.join(DISARM_METHODS)}"
    if errors:
        raise ValidationError(errors)
    assert isinstance(event_id, str) and isinstance(kind, str) and isinstance(vin, str)
    assert msisdn is not None and occurred_at is not None
    assert location is not None or msd is not None
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
        msd=msd,
    )


# -- the MSD beside the JSON fields -----------------------------------------------------


def _msd_time(msd: Msd, now: dt.datetime) -> dt.datetime | None:
    """The MSD's timestamp if usable: in the range ``occurred_at`` accepts.

    A vehicle without time (0, or a clock never set) still gets its crash through: the
    event then counts from the gateway's clock, and the MSD forwarded to the centre keeps
    the timestamp as sent."""
    stamp = msd.occurred_at()
    if not EARLIEST_EVENT <= stamp <= now.astimezone(dt.UTC) + MAX_CLOCK_AHEAD:
        return None
    return stamp


def _msd_location(msd: Msd) -> Location | None:
    """The MSD's position, or None when it is unknown (routing then falls back)."""
    if msd.lat is None or msd.lon is None:
        return None
    return Location(lat=msd.lat, lon=msd.lon, heading_deg=msd.heading_deg,
                    trusted=msd.position_can_be_trusted)


def _beside_msd(location: Location, msd: Msd, errors: dict[str, str]) -> Location:
    """The JSON location checked against the MSD's, completed with its heading and trust."""
    if msd.lat is not None and msd.lon is not None:
        for field, given, sent in (("lat", location.lat, msd.lat), ("lon", location.lon, msd.lon)):
            if abs(given - sent) > MSD_POSITION_TOLERANCE_DEG:
                errors[f"location.{field}"] = (
                    f"disagrees with the MSD's position {sent:.6f} (more than "
                    f"{MSD_POSITION_TOLERANCE_DEG:g} degrees apart)")
    if location.trusted is not None and location.trusted != msd.position_can_be_trusted:
        errors["location.trusted"] = (f"disagrees with the MSD's positionCanBeTrusted "
                                      f"({str(msd.position_can_be_trusted).lower()})")
    heading = location.heading_deg
    if heading is not None and msd.heading_deg is not None:
        apart = abs(heading - msd.heading_deg) % 360
        if min(apart, 360 - apart) > MSD_HEADING_TOLERANCE_DEG:
            errors["location.heading_deg"] = (
                f"disagrees with the MSD's direction {msd.heading_deg:g} degrees")
    return Location(
        lat=location.lat, lon=location.lon,
        heading_deg=heading if heading is not None else msd.heading_deg,
        accuracy_m=location.accuracy_m,
        # the car's own doubt about its position is never dropped
        trusted=location.trusted if location.trusted is not None else msd.position_can_be_trusted,
    )


def _msd_occupants(msd: Msd | None) -> dict[str, Any] | None:
    if msd is None or msd.passengers is None or msd.passengers > MAX_OCCUPANTS:
        return None
    return {"count": msd.passengers}


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


def _timestamp(value: Any, errors: dict[str, str], *, now: dt.datetime) -> dt.datetime | None:
    if not isinstance(value, str):
        errors["occurred_at"] = "required: an ISO 8601 timestamp with a time zone"
        return None
    if len(value) > 64:
        errors["occurred_at"] = "not an ISO 8601 timestamp"
        return None
    try:
        stamp = dt.datetime.fromisoformat(value)
    except ValueError:
        errors["occurred_at"] = "not an ISO 8601 timestamp"
        return None
    if stamp.tzinfo is None:
        errors["occurred_at"] = "needs a time zone (e.g. 'Z' or '+01:00')"
        return None
    latest = now.astimezone(dt.UTC) + MAX_CLOCK_AHEAD
    try:
        utc: dt.datetime | None = stamp.astimezone(dt.UTC)  # 0001-01-01T00:00+01:00: year 0
    except (OverflowError, ValueError):
        utc = None
    if utc is None or not EARLIEST_EVENT <= utc <= latest:
        errors["occurred_at"] = (
            f"out of range: from {EARLIEST_EVENT:%Y-%m-%d} to one day after the gateway's clock"
        )
        return None
    return utc


def _number(value: Any) -> float | None:
    """A finite float from a JSON number (not a boolean), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond a double's range
        return None
    return number if math.isfinite(number) else None


def _stored_object(value: dict[str, Any], field: str, errors: dict[str, str]) -> bool:
    """Whether a free-form object is small and shallow enough to store and deliver."""
    depth = _object_depth(value)
    if depth > MAX_STORED_OBJECT_DEPTH:
        errors[field] = f"nested at most {MAX_STORED_OBJECT_DEPTH} levels deep"
        return False
    try:
        size = len(json.dumps(value, allow_nan=False, ensure_ascii=False,
                              separators=(",", ":")).encode("utf-8"))
    except (ValueError, TypeError, UnicodeEncodeError):
        errors[field] = "holds a value that cannot be written as JSON"
        return False
    if size > MAX_STORED_OBJECT_BYTES:
        errors[field] = f"at most {MAX_STORED_OBJECT_BYTES} bytes as JSON"
        return False
    return True


def _object_depth(value: Any) -> int:
    """Levels of objects and arrays: ``{}`` is 1, ``{"a": []}`` is 2 (bounded by the loader)."""
    if isinstance(value, dict):
        return 1 + max((_object_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_object_depth(v) for v in value), default=0)
    return 0


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
    before = len(errors)
    for key, types in _CRASH_FIELDS.items():
        if key in value and (
            not isinstance(value[key], types) or (bool not in types and isinstance(value[key], bool))
        ):
            errors[f"crash.{key}"] = f"must be {' or '.join(t.__name__ for t in types)}"
    if "delta_v_kmh" in value and "crash.delta_v_kmh" not in errors:
        low, high = DELTA_V_RANGE_KMH
        delta_v = _number(value["delta_v_kmh"])
        if delta_v is None or not low <= delta_v <= high:
            errors["crash.delta_v_kmh"] = f"a number of km/h from {low:g} to {high:g}"
    if not _stored_object(value, "crash", errors) or len(errors) > before:
        return None
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
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_OCCUPANTS:
        errors["occupants.count"] = f"required: a whole number from 0 to {MAX_OCCUPANTS}"
        return None
    if not _stored_object(value, "occupants", errors):
        return None
    return dict(value)
