"""The agent API (``/v1/agent``): request bodies (validated here) and answers."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field

from gateway.schemas.base import Answer, RequestModel, refuse
from gateway.schemas.fields import nullable, stripped_text
from gateway.schemas.vehicle import EventType

_REQUIRED_TEXT = "required: a non-empty string"


class DispatchIn(RequestModel):
    """Emergency services were dispatched (the body may be empty)."""

    reasons: ClassVar[dict[str, str]] = {"note": "a string (the first 200 characters are kept)"}

    note: str | None = nullable("what was sent, for the audit (first 200 characters kept)")


class MisuseIn(RequestModel):
    reasons: ClassVar[dict[str, str]] = {"reason": _REQUIRED_TEXT}

    reason: Annotated[str, AfterValidator(stripped_text(None))] = Field(
        description="why the SOS was misuse (first 200 characters kept)",
        json_schema_extra={"minLength": 1})


class ImmobiliseIn(RequestModel):
    reasons: ClassVar[dict[str, str]] = {"authority_reference": _REQUIRED_TEXT}

    authority_reference: Annotated[str, AfterValidator(stripped_text(100))] = Field(
        description="the police or authority reference",
        json_schema_extra={"minLength": 1, "maxLength": 100})


class ReactivateIn(RequestModel):
    reasons: ClassVar[dict[str, str]] = {
        "pin": "required: the owner's PIN as a string of digits"}

    pin: str = Field(description="the owner's PIN, read out by the owner (4 to 8 digits; "
                                 "a wrong one counts towards the lockout)")


class TrackingIn(RequestModel):
    reasons: ClassVar[dict[str, str]] = {"police_reference": _REQUIRED_TEXT}

    police_reference: Annotated[str, AfterValidator(stripped_text(100))] = Field(
        description="the police report reference",
        json_schema_extra={"minLength": 1, "maxLength": 100})


def _at_most_200(value: str | None) -> str | None:
    if value is not None and len(value.strip()) > 200:
        raise refuse("a string of at most 200 characters")
    return value


class StopTrackingIn(RequestModel):
    """The body may be empty."""

    reasons: ClassVar[dict[str, str]] = {"reason": "a string of at most 200 characters"}

    reason: Annotated[str | None, AfterValidator(_at_most_200)] = nullable(
        "why tracking stops, for the audit (at most 200 characters)")


class Decision(Answer):
    call_sid: str
    step: str
    target: str = Field(description="centre, emergency, hand_back, callback, finish")
    number: str | None
    reason: str
    at: str = Field(json_schema_extra={"format": "date-time"})


class IncidentView(Answer):
    """The incident as the agent sees it, with every routing decision of its calls."""

    incident_id: str
    event_id: str
    type: EventType
    country: str | None
    route_country: str | None
    route_reason: str
    emergency_number: str
    fallback_dial: str | None
    call_number: str | None
    hand_back_after_s: int | None
    test_call: bool
    vin: str
    msisdn: str
    lat: float | None
    lon: float | None
    heading_deg: float | None
    accuracy_m: float | None
    trusted: bool | None
    crash: dict[str, Any] | None
    occupants: dict[str, Any] | None
    status: str = Field(description="open, dispatched, misuse")
    home_country: str | None
    occurred_at: str = Field(json_schema_extra={"format": "date-time"})
    address: dict[str, Any] | None = Field(
        None, description="reverse-geocoded address, when a geocoder is configured and "
                          "has answered (never on the routing path)")
    decisions: list[Decision]


class DispatchAnswer(Answer):
    incident_id: str
    status: Literal["dispatched"]
    country: str | None
    emergency_number: str
    fallback_dial: str | None
    why: str


class MisuseAnswer(Answer):
    incident_id: str
    status: Literal["misuse"]
    chargeable: bool


class AgentVehicle(Answer):
    """Immobiliser and tracking state, and who changed them."""

    vin: str
    market: str
    immobilised: bool
    immobilised_by: str | None
    immobilised_reference: str | None
    immobilised_at: str | None
    reactivated_by: str | None
    reactivated_at: str | None
    tracking: bool
    tracking_started_by: str | None
    tracking_police_reference: str | None
    tracking_started_at: str | None
    updated_at: str | None
    has_pin: bool


class PoliceNotification(Answer):
    id: str = Field(description="the outbox key of this tracking session's notification")
    police_reference: str
    status: str = Field(description="pending, delivered or failed")


class TrackingAnswer(AgentVehicle):
    police_notification: PoliceNotification


class PinRefused(Answer):
    """403 (wrong PIN) or 423 (locked)."""

    error: str = Field(description="pin_wrong, pin_malformed, pin_locked, ...")
    detail: str
    locked_until: str | None
