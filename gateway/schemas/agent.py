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


class VehicleCommand(Answer):
    """A command sent to the car through the durable queue (``vehicle_commands``)."""

    id: int = Field(description="the gateway's id of the command")
    key: str = Field(description="its idempotency key (sent as Idempotency-Key); one per "
                                 "logical request, e.g. per immobilisation")
    command: str = Field(description="immobilise, reactivate, unlock, start_tracking, "
                                     "stop_tracking, ...")
    status: Literal["pending", "sent", "confirmed", "failed", "cancelled"] = Field(
        description="pending: not taken yet (the car was unreachable), retried by the "
                    "queue; sent: taken by the vehicle command service, awaiting the "
                    "car's command_result; confirmed: executed by the car; failed: "
                    "rejected, refused or out of time; cancelled: not to be sent")
    attempts: int = Field(description="sends so far")
    last_error: str | None = Field(description="why the last send did not succeed")
    created_at: str | None = Field(json_schema_extra={"format": "date-time"})
    updated_at: str | None = Field(json_schema_extra={"format": "date-time"})
    next_attempt_at: str | None = Field(
        description="pending only: when the queue sends it next",
        json_schema_extra={"format": "date-time"})
    command_id: str | None = Field(
        description="the vehicle command service's id, once it took the command")


class AgentVehicle(Answer):
    """Immobiliser and tracking state, and who changed them."""

    vin: str
    market: str
    customer_number: str = Field(description="the 8-digit number the IVR asks the owner for")
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
    commands: list[VehicleCommand] = Field(
        description="the commands the car has not settled yet (pending or sent), oldest "
                    "first: the registry changes when the car confirms them")
    recent_commands: list[VehicleCommand] = Field(
        description="the commands settled in the last 24 hours (confirmed, failed with "
                    "last_error saying why, e.g. not confirmed by the car in time, or "
                    "cancelled), newest first, at most 10")


class CommandAnswer(AgentVehicle):
    """The vehicle after a command request, and the command.

    200: the car confirmed the command (the state shown includes its change).  202: not
    yet: ``command.status`` is ``sent`` (the vehicle command service took it; the state
    changes when the car reports its ``command_result``) or ``pending`` (the car was
    unreachable; the queue retries it until its budget runs out); the state shown is
    unchanged.  A repeated request of the same episode sends nothing new for a ``sent``
    command and sends a ``pending`` one again at once (same idempotency key)."""

    command: VehicleCommand
    detail: str = Field(description="what happened, for the agent")


class PoliceNotification(Answer):
    id: str = Field(description="the outbox key of this tracking session's notification")
    police_reference: str
    status: str = Field(description="pending, delivered or failed")


class TrackingAnswer(AgentVehicle):
    """Tracking is on (confirmed by the car, or it was already on)."""

    police_notification: PoliceNotification
    command: VehicleCommand | None = Field(
        None, description="the start_tracking command (none when tracking was already on)")


class PinRefused(Answer):
    """403 (wrong PIN) or 423 (locked)."""

    error: str = Field(description="pin_wrong, pin_malformed, pin_locked, ...")
    detail: str
    locked_until: str | None
