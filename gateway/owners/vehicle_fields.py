"""What an operator gives for a vehicle, validated once for the admin API and the CSV import.

=====================  ==========================================================  =========
field                  rule (values are normalised as shown)                        required
=====================  ==========================================================  =========
``vin``                17 characters, digits and letters except I, O, Q; upper-cased  yes
``car_msisdn``         the car's SIM number: E.164 (``+46…``), or national form of    yes
                       the car's market; stored in E.164
``market``             ISO 3166-1 alpha-2 country code, upper-cased                 yes
``purchase_date``      ``YYYY-MM-DD``, from 1990-01-01 to tomorrow (UTC)             yes
``serviced_regularly`` JSON true/false; in a CSV ``true/false/yes/no/1/0`` (empty:     no (false)
                       false)
``owner_name``         1 to 200 characters, no control characters                   yes
``owner_phones``       1 to 5 numbers (JSON: a list; CSV: separated by ``;``), E.164  yes
                       or national form of the market; no number twice; the first
                       receives the theft messages
``language``           a tag such as ``sv-SE`` (IVR prompts); empty: the market's    no
=====================  ==========================================================  =========

A reason never repeats the value it refuses.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import phonenumbers

from gateway.errors import ValidationError

FIELDS = ("vin", "car_msisdn", "market", "purchase_date", "serviced_regularly",
          "owner_name", "owner_phones", "language")
REQUIRED = frozenset({"vin", "car_msisdn", "market", "purchase_date", "owner_name",
                      "owner_phones"})
#: what PATCH may change (the VIN identifies the vehicle)
EDITABLE = FIELDS[1:]
MAX_PHONES = 5
EARLIEST_PURCHASE = dt.date(1990, 1, 1)

VIN_RE = re.compile(r"[A-HJ-NPR-Z0-9]{17}", re.ASCII)
MARKET_RE = re.compile(r"[A-Z]{2}", re.ASCII)
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", re.ASCII)
LANGUAGE_RE = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*", re.ASCII)
_TRUE = frozenset({"true", "yes", "1"})
_FALSE = frozenset({"false", "no", "0", ""})


@dataclass(frozen=True)
class VehicleRecord:
    """A vehicle as the operator enrols it (no PIN: that has its own path)."""

    vin: str
    car_msisdn: str
    market: str
    purchase_date: dt.date
    serviced_regularly: bool
    owner_name: str
    owner_phones: tuple[str, ...]
    language: str | None

    def differences(self, other: VehicleRecord) -> list[str]:
        """The fields whose values differ, in :data:`FIELDS` order."""
        return [f for f in FIELDS if getattr(self, f) != getattr(other, f)]

    def replace(self, changes: Mapping[str, Any]) -> VehicleRecord:
        return dataclasses.replace(self, **changes)


class _Invalid(ValueError):
    """One field's reason; ``key`` names a part of the field (``owner_phones[1]``)."""

    def __init__(self, reason: str, key: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.key = key


def _string(value: object, text: bool) -> str:
    if not isinstance(value, str):
        raise _Invalid("must be a string")
    return value.strip()


def _vin(value: object, *, text: bool, market: str | None, today: dt.date) -> str:
    vin = _string(value, text).upper()
    if not VIN_RE.fullmatch(vin):
        raise _Invalid("must be 17 characters, digits and letters except I, O, Q")
    return vin


def _phone(raw: str, market: str | None) -> str:
    try:
        number = phonenumbers.parse(raw, market)
    except phonenumbers.NumberParseException:
        raise _Invalid("not a phone number: give it in E.164 (+46701740605) or the "
                       "national form of the car's market") from None
    if not phonenumbers.is_valid_number(number):
        raise _Invalid("not a valid phone number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _msisdn(value: object, *, text: bool, market: str | None, today: dt.date) -> str:
    raw = _string(value, text)
    if not raw:
        raise _Invalid("required")
    return _phone(raw, market)


def _market(value: object, *, text: bool, market: str | None, today: dt.date) -> str:
    code = _string(value, text).upper()
    if not MARKET_RE.fullmatch(code) or code not in phonenumbers.SUPPORTED_REGIONS:
        raise _Invalid("must be an ISO 3166-1 alpha-2 country code such as SE")
    return code


def _date(value: object, *, text: bool, market: str | None, today: dt.date) -> dt.date:
    raw = _string(value, text)
    try:
        if not _DATE_RE.fullmatch(raw):
            raise ValueError
        day = dt.date.fromisoformat(raw)
    except ValueError:
        raise _Invalid("must be a date as YYYY-MM-DD") from None
    if not EARLIEST_PURCHASE <= day <= today + dt.timedelta(days=1):
        raise _Invalid(f"must be between {EARLIEST_PURCHASE.isoformat()} and today")
    return day


def _flag(value: object, *, text: bool, market: str | None, today: dt.date) -> bool:
    if not text:
        if not isinstance(value, bool):
            raise _Invalid("must be true or false")
        return value
    word = _string(value, text).lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise _Invalid("must be true or false (yes/no, 1/0)")


def _name(value: object, *, text: bool, market: str | None, today: dt.date) -> str:
    name = _string(value, text)
    if not name:
        raise _Invalid("required")
    if len(name) > 200:
        raise _Invalid("at most 200 characters")
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        raise _Invalid("must not contain control characters")
    return name


def _phones(value: object, *, text: bool, market: str | None,
            today: dt.date) -> tuple[str, ...]:
    if text:
        items: list[object] = [p for p in _string(value, text).split(";") if p.strip()]
    elif isinstance(value, list):
        items = list(value)
    else:
        raise _Invalid("must be a list of phone numbers")
    if not items:
        raise _Invalid("at least one phone number is required")
    if len(items) > MAX_PHONES:
        raise _Invalid(f"at most {MAX_PHONES} phone numbers")
    found: list[str] = []
    for i, item in enumerate(items):
        key = f"owner_phones[{i}]"
        if not isinstance(item, str):
            raise _Invalid("must be a string", key)
        try:
            number = _phone(item.strip(), market)
        except _Invalid as exc:
            raise _Invalid(exc.reason, key) from None
        if number in found:
            raise _Invalid("the same number is listed twice", key)
        found.append(number)
    return tuple(found)


def _language(value: object, *, text: bool, market: str | None,
              today: dt.date) -> str | None:
    if value is None:
        return None
    tag = _string(value, text)
    if not tag:
        return None
    primary, *rest = tag.split("-")
    tag = "-".join([primary.lower()] + [p.upper() if len(p) == 2 else p for p in rest])
    if len(tag) > 16 or not LANGUAGE_RE.fullmatch(tag):
        raise _Invalid("must be a language tag such as sv-SE")
    return tag


_PARSERS: dict[str, Callable[..., Any]] = {
    "vin": _vin, "car_msisdn": _msisdn, "market": _market, "purchase_date": _date,
    "serviced_regularly": _flag, "owner_name": _name, "owner_phones": _phones,
    "language": _language,
}
_DEFAULTS: dict[str, Any] = {"serviced_regularly": False, "language": None}


def _missing(value: object, text: bool) -> bool:
    return value is None or (text and isinstance(value, str) and not value.strip())


def _parse(data: Mapping[str, object], names: tuple[str, ...], *, text: bool,
           market: str | None, today: dt.date, errors: dict[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if "market" in names and "market" in data and not _missing(data["market"], text):
        try:  # first: national phone numbers are read in the market's format
            market = _market(data["market"], text=text, market=None, today=today)
        except _Invalid:
            market = None
    for name in names:
        try:
            values[name] = _PARSERS[name](data[name], text=text, market=market, today=today)
        except _Invalid as exc:
            errors[exc.key or name] = exc.reason
    return values


def _unknown(data: Mapping[str, object], allowed: tuple[str, ...]) -> dict[str, str]:
    errors: dict[str, str] = {}
    for key in data:
        if key == "pin":
            errors[key] = ("not accepted here: set the PIN with "
                           "PUT /v1/admin/vehicles/<vin>/pin")
        elif key == "vin" and "vin" not in allowed:
            errors[key] = "cannot be changed: it identifies the vehicle"
        elif key not in allowed:
            errors[str(key)[:64]] = "unknown field"
    return errors


def _in_order(errors: dict[str, str]) -> dict[str, str]:
    """Field errors in :data:`FIELDS` order (``owner_phones[1]`` with its field), then
    the others (unknown fields) as given."""
    def position(key: str) -> int:
        name = key.split("[", 1)[0]
        return FIELDS.index(name) if name in FIELDS else len(FIELDS)
    return {key: errors[key] for key in sorted(errors, key=position)}


def parse_record(data: Mapping[str, object], *, text: bool, today: dt.date) -> VehicleRecord:
    """A whole record (create, import); ValidationError names every bad field.

    ``text``: every value is a string, as in a CSV cell (empty = not given)."""
    errors = _unknown(data, FIELDS)
    given = tuple(f for f in FIELDS if f in data and not _missing(data[f], text))
    errors.update({f: "required" for f in FIELDS if f in REQUIRED and f not in given})
    values = _parse(data, given, text=text, market=None, today=today, errors=errors)
    if errors:
        raise ValidationError(_in_order(errors))
    return VehicleRecord(**{**_DEFAULTS, **values})


def parse_changes(data: Mapping[str, object], *, text: bool, today: dt.date,
                  market: str | None) -> dict[str, Any]:
    """Some fields (PATCH); ``market``: the vehicle's, for national phone numbers."""
    errors = _unknown(data, EDITABLE)
    if not data:
        errors["body"] = "no field to change"
    for name in EDITABLE:
        if name in data and name in REQUIRED and _missing(data[name], text):
            errors[name] = "required: cannot be removed"
    given = tuple(f for f in EDITABLE if f in data and f not in errors)
    values = _parse(data, given, text=text, market=market, today=today, errors=errors)
    if errors:
        raise ValidationError(_in_order(errors))
    return values
