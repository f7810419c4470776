"""The admin API (``/v1/admin``): enrolment bodies, PIN bodies and the answers.

An enrolment record is validated by :func:`gateway.owners.parse_record` /
:func:`gateway.owners.parse_changes`, the same rules as the CSV import
(``vehicles import``).  :class:`VehicleIn` and :class:`VehicleChangesIn` mirror them for
the published schema (``tests/integration/test_openapi.py`` proves they agree; a body
valid here may still be refused for :data:`VehicleIn.server_checks`: a real phone number
of the market, a supported country, a real date in range).  The PIN and unlock bodies
are validated here.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from gateway.owners import PIN_FORMAT_MESSAGE
from gateway.owners.vehicle_fields import EARLIEST_PURCHASE, MAX_PHONES
from gateway.schemas.base import Answer, RequestModel
from gateway.schemas.fields import no_null, nullable, optional, stripped_text

#: patterns a caller's value must match; the gateway strips surrounding blanks first
#: and upper-cases the VIN and the market
VIN_PATTERN = r"^\s*[A-HJ-NPR-Za-hj-npr-z0-9]{17}\s*$"
MARKET_PATTERN = r"^\s*[A-Za-z]{2}\s*$"
DATE_PATTERN = r"^\s*[0-9]{4}-[0-9]{2}-[0-9]{2}\s*$"
NAME_PATTERN = r"^[^\u0000-\u001f\u007f-\u009f]*\S[^\u0000-\u001f\u007f-\u009f]*$"
LANGUAGE_PATTERN = r"^\s*([A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*)?\s*$"

_DESCRIPTIONS = {
    "vin": "17 characters, digits and letters except I, O, Q (upper-cased); the key",
    "car_msisdn": "the car's SIM: E.164, or the national form of the market; one car per SIM",
    "market": "ISO 3166-1 alpha-2 country code (SE)",
    "purchase_date": f"YYYY-MM-DD, from {EARLIEST_PURCHASE.isoformat()} to tomorrow (UTC)",
    "serviced_regularly": "roadside help stays free after 3 years in the free markets",
    "owner_name": "1 to 200 characters, no control characters",
    "owner_phones": f"1 to {MAX_PHONES} numbers (E.164 or national form of the market), "
                    "none twice; the first gets the theft SMS",
    "language": "a language tag such as sv-SE for the IVR and owner texts; empty or null: "
                "the market's",
}


def _null_is_missing(value: Any) -> Any:
    if value is None:
        raise PydanticCustomError("missing", "required")
    return value


_name_text = stripped_text(200, blank="required")


def _owner_name(value: str) -> str:
    name: str = _name_text(value)
    return name


_Required = BeforeValidator(_null_is_missing)
_Phones = Annotated[list[str], Field(min_length=1, max_length=MAX_PHONES,
                                     description=_DESCRIPTIONS["owner_phones"])]


class _VehicleFields(RequestModel):
    model_config = ConfigDict(extra="forbid")

    #: fields a body valid against this schema may still be refused for
    server_checks: ClassVar[frozenset[str]] = frozenset({
        "car_msisdn", "market", "purchase_date", "owner_phones", "language"})
    reasons: ClassVar[dict[str, str]] = {
        "vin": "must be 17 characters, digits and letters except I, O, Q",
        "car_msisdn": "must be a string",
        "market": "must be an ISO 3166-1 alpha-2 country code such as SE",
        "purchase_date": "must be a date as YYYY-MM-DD",
        "serviced_regularly": "must be true or false",
        "owner_name": "must be a string",
        "owner_phones": "must be a list of phone numbers",
        "owner_phones[]": "must be a string",
        "language": "must be a language tag such as sv-SE",
    }

    required_reason: ClassVar[str | None] = "required"
    extra_reasons: ClassVar[dict[str, str]] = {
        "pin": "not accepted here: set the PIN with PUT /v1/admin/vehicles/<vin>/pin",
        "vin": "cannot be changed: it identifies the vehicle"}


class VehicleIn(_VehicleFields):
    """A car, its owner and the owner's numbers (create: ``POST /v1/admin/vehicles``).
    Unknown fields are refused (a typo never passes silently); ``pin`` has its own path."""

    vin: Annotated[str, _Required] = Field(pattern=VIN_PATTERN,
                                           description=_DESCRIPTIONS["vin"])
    car_msisdn: Annotated[str, _Required] = Field(pattern=r"\S",
                                                  description=_DESCRIPTIONS["car_msisdn"])
    market: Annotated[str, _Required] = Field(pattern=MARKET_PATTERN,
                                              description=_DESCRIPTIONS["market"])
    purchase_date: Annotated[str, _Required] = Field(
        pattern=DATE_PATTERN, description=_DESCRIPTIONS["purchase_date"])
    serviced_regularly: bool | None = nullable(_DESCRIPTIONS["serviced_regularly"])
    owner_name: Annotated[str, _Required, AfterValidator(_owner_name)] = Field(
        pattern=NAME_PATTERN, description=_DESCRIPTIONS["owner_name"],
        json_schema_extra={"maxLength": 200})
    owner_phones: Annotated[_Phones, _Required]
    language: str | None = nullable(_DESCRIPTIONS["language"], pattern=LANGUAGE_PATTERN)


_Editable = BeforeValidator(no_null)


class VehicleChangesIn(_VehicleFields):
    """Some fields of a registered car (``PATCH``); the VIN cannot change, a required
    field cannot be removed (null), at least one field."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1})
    null_reason: ClassVar[str | None] = "required: cannot be removed"

    car_msisdn: Annotated[str | None, _Editable] = optional(_DESCRIPTIONS["car_msisdn"],
                                                            pattern=r"\S")
    market: Annotated[str | None, _Editable] = optional(_DESCRIPTIONS["market"],
                                                        pattern=MARKET_PATTERN)
    purchase_date: Annotated[str | None, _Editable] = optional(
        _DESCRIPTIONS["purchase_date"], pattern=DATE_PATTERN)
    serviced_regularly: Annotated[bool | None, _Editable] = optional(
        _DESCRIPTIONS["serviced_regularly"])
    owner_name: Annotated[str | None, _Editable,
                          AfterValidator(lambda v: v if v is None else _owner_name(v))] = (
        optional(_DESCRIPTIONS["owner_name"], pattern=NAME_PATTERN))
    owner_phones: Annotated[list[str] | None, _Editable] = optional(
        _DESCRIPTIONS["owner_phones"], min_length=1, max_length=MAX_PHONES)
    language: str | None = nullable(_DESCRIPTIONS["language"], pattern=LANGUAGE_PATTERN)

    @model_validator(mode="before")
    @classmethod
    def _something(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data:
            raise PydanticCustomError("gateway", "{reason}", {"reason": "no field to change"})
        return data


class PinIn(RequestModel):
    """Set or reset the owner's PIN (hashed at once, never echoed); clears a lockout."""

    model_config = ConfigDict(extra="forbid")
    reasons: ClassVar[dict[str, str]] = {"pin": PIN_FORMAT_MESSAGE + ", given as a JSON string"}
    required_reason: ClassVar[str | None] = "required"

    pin: Annotated[str, _Required] = Field(description="4 to 8 ASCII digits",
                                           json_schema_extra={"pattern": "^[0-9]{4,8}$"})


class UnlockIn(RequestModel):
    """Clear the PIN failures and any lock; the reason is audited."""

    model_config = ConfigDict(extra="forbid")
    reasons: ClassVar[dict[str, str]] = {"reason": "required"}
    required_reason: ClassVar[str | None] = "required"

    reason: Annotated[str, AfterValidator(stripped_text(200, blank="required"))] = Field(
        description="why the lockout is cleared (audited)",
        json_schema_extra={"minLength": 1, "maxLength": 200})


class PinLockout(Answer):
    failures: int = Field(description="wrong PINs counted in the window")
    max_failures: int
    window_s: int
    locked: bool
    locked_until: str | None


class AdminVehicle(Answer):
    """A registered car as an operator sees it; never the PIN or its hash."""

    vin: str
    customer_number: str = Field(description="the 8 digits the IVR asks for")
    car_msisdn: str | None
    market: str
    purchase_date: str = Field(json_schema_extra={"format": "date"})
    serviced_regularly: bool
    owner_name: str
    owner_phones: list[str]
    language: str | None
    has_pin: bool
    pin_lockout: PinLockout
    immobilised: bool
    tracking: bool
    updated_at: str = Field(json_schema_extra={"format": "date-time"})


class AdminVehicleChanged(AdminVehicle):
    changed: list[str] = Field(description="the fields this request changed")


class AuditEntry(Answer):
    at: str = Field(json_schema_extra={"format": "date-time"})
    actor: str
    action: str
    detail: dict[str, Any] | None


class AuditTrail(Answer):
    vin: str
    entries: list[AuditEntry]
