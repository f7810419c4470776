"""``POST /v1/events``: the car's data message and the gateway's answer.

The request is validated by the hand-written :func:`gateway.events.parse_event` (every
error named with a reason a firmware engineer can act on, the eCall MSD filling in and
cross-checking fields).  :class:`EventIn` mirrors it for the published schema, and
``tests/integration/test_openapi.py`` proves the two agree: a body the gateway accepts is
valid here, a body refused here is refused by the gateway naming the same fields, and a
body valid here that the gateway refuses is refused only for a rule a schema cannot say
(:data:`EventIn.server_checks`: a real phone number, a time near the gateway's clock, the
size of the stored objects, what the MSD says).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_core import ValidationError as CoreValidationError

from gateway.events import (
    DELTA_V_RANGE_KMH,
    DISARM_METHODS,
    EVENT_TYPES,
    MAX_JSON_DEPTH,
    MAX_OCCUPANTS,
    MAX_STORED_OBJECT_BYTES,
    MAX_STORED_OBJECT_DEPTH,
)
from gateway.schemas.base import REASON, Answer, RequestModel
from gateway.schemas.fields import no_default, no_null, nullable, optional

EventType = Literal["crash", "sos", "on_call", "alarm_triggered", "alarm_disarmed"]
DisarmMethod = Literal["key", "app", "other"]
assert set(EventType.__args__) == set(EVENT_TYPES)  # type: ignore[attr-defined]
assert set(DisarmMethod.__args__) == set(DISARM_METHODS)  # type: ignore[attr-defined]

EVENT_ID_PATTERN = r"^[A-Za-z0-9._:\-]{1,128}$"
#: a VIN as the car may send it (the gateway upper-cases it)
VIN_PATTERN = r"^[A-HJ-NPR-Za-hj-npr-z0-9]{17}$"

_STORED = (f"Kept as sent and delivered to the centre: at most {MAX_STORED_OBJECT_BYTES} "
           f"bytes as JSON, nested at most {MAX_STORED_OBJECT_DEPTH} levels.")


class LocationIn(RequestModel):
    """Where the car is (WGS84).  Other properties are ignored."""

    lat: float = Field(ge=-90, le=90, description="degrees north")
    lon: float = Field(ge=-180, le=180, description="degrees east")
    heading_deg: float | None = nullable("direction of travel, degrees from north",
                                         ge=0, lt=360)
    accuracy_m: float | None = nullable("radius of the fix, metres", ge=0)
    trusted: bool | None = nullable(
        "false if the car doubts its own position (flagged to the agent)")


_Flag = Annotated[bool | None, BeforeValidator(no_null)]
_Text = Annotated[str | None, BeforeValidator(no_null)]
_Number = Annotated[float | None, BeforeValidator(no_null)]


class CrashIn(RequestModel):
    """Crash details; the properties listed are checked, any other is kept as sent."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"description": _STORED})

    airbag_deployed: _Flag = optional("an airbag fired")
    belt_tensioner_fired: _Flag = optional("a belt tensioner fired")
    rollover: _Flag = optional("the car rolled over")
    delta_v_kmh: _Number = optional("change of speed in the crash, km/h",
                                    ge=DELTA_V_RANGE_KMH[0], le=DELTA_V_RANGE_KMH[1])
    impact: _Text = optional("where the car was hit (front, side, rear, ...)")
    severity: _Text = optional("the car's own severity estimate")


class OccupantsIn(RequestModel):
    """People aboard; other properties are kept as sent."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"description": _STORED})

    count: int = Field(ge=0, le=MAX_OCCUPANTS, description="people aboard")


def _count_as_object(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return {"count": value}
    return value


def _count_or_object(schema: dict[str, Any]) -> None:
    schema.pop("default", None)
    schema["anyOf"] = [{"type": "integer", "minimum": 0, "maximum": MAX_OCCUPANTS},
                       *schema.get("anyOf", [])]


def _error(path: tuple[str, ...], reason: str, value: Any) -> InitErrorDetails:
    return {"type": PydanticCustomError(REASON, "{reason}", {"reason": reason}),
            "loc": path, "input": value}


class EventIn(RequestModel):
    """The car's data message.  Unknown properties are ignored (newer firmware is never
    refused).  With an eCall ``msd``, ``type``, ``vin``, ``occurred_at``, ``location``
    and ``occupants`` may be left out (they come from the MSD), and a given one must agree
    with it.  The body is read strictly: no ``NaN``/``Infinity``, integers within 64 bits,
    nesting at most 32 levels."""

    model_config = ConfigDict(json_schema_extra={
        "anyOf": [
            {"required": ["msd"], "properties": {"msd": {"type": "string"}}},
            {"required": ["type", "vin", "occurred_at", "location"],
             "properties": {"type": {"type": "string"}, "vin": {"type": "string"},
                            "occurred_at": {"type": "string"},
                            "location": {"type": "object"}}},
        ],
        "if": {"required": ["type"], "properties": {"type": {"const": "alarm_disarmed"}}},
        "then": {"required": ["disarmed_by"],
                 "properties": {"disarmed_by": {"enum": list(DISARM_METHODS)}}},
        "x-max-nesting": MAX_JSON_DEPTH,
    })

    #: fields a body valid against this schema may still be refused for (see the module)
    server_checks: ClassVar[frozenset[str]] = frozenset({
        "msisdn", "occurred_at", "crash", "occupants", "msd",
        # disagreeing with the MSD
        "type", "vin", "location",
    })
    reasons: ClassVar[dict[str, str]] = {
        "event_id": "required: 1-128 characters of letters, digits, '.', '_', ':', '-'",
        "type": f"required: one of {', '.join(EVENT_TYPES)}",
        "vin": "required: 17 characters, letters (no I, O, Q) and digits",
        "msisdn": "required: an E.164 number such as +46701234567",
        "occurred_at": "required: an ISO 8601 timestamp with a time zone",
        "location": "required: an object with lat and lon",
        "location.lat": "required: a number from -90 to 90",
        "location.lon": "required: a number from -180 to 180",
        "location.heading_deg": "a number from 0 to below 360",
        "location.accuracy_m": "a number of metres, 0 or more",
        "location.trusted": "true or false",
        "crash": "an object of crash details",
        "crash.airbag_deployed": "must be bool",
        "crash.belt_tensioner_fired": "must be bool",
        "crash.rollover": "must be bool",
        "crash.delta_v_kmh": "a number of km/h from 0 to 500",
        "crash.impact": "must be str",
        "crash.severity": "must be str",
        "occupants": "a count (0-99) or an object with 'count'",
        "occupants.count": f"required: a whole number from 0 to {MAX_OCCUPANTS}",
        "msd": "base64 of the MSD's UPER bytes",
        "disarmed_by": f"required for alarm_disarmed: one of {', '.join(DISARM_METHODS)}",
    }

    event_id: str = Field(pattern=EVENT_ID_PATTERN,
                          description="the car's id of this message; a replay of the same "
                                      "body answers 200, another body 409")
    type: EventType | None = nullable("crash, sos (emergency), on_call (roadside), "
                                      "alarm_triggered / alarm_disarmed (theft alarm)")
    vin: str | None = nullable("the car's VIN (upper-cased by the gateway)",
                               pattern=VIN_PATTERN)
    msisdn: str = Field(pattern=r"^\+",
                        description="the car's SIM number, E.164 (a number valid for "
                                    "its country)")
    # not format date-time (RFC 3339): the gateway reads any ISO 8601 form Python reads
    occurred_at: str | None = nullable(
        "ISO 8601 with a time zone (2026-11-25T10:15:00Z); from 2000-01-01 to one day "
        "after the gateway's clock", max_length=64)
    location: LocationIn | None = nullable("the car's position")
    crash: CrashIn | None = nullable("crash details (crash events)")
    occupants: Annotated[OccupantsIn | None, BeforeValidator(_count_as_object)] = Field(
        None, description="a count, or an object with at least count",
        json_schema_extra=_count_or_object)
    disarmed_by: Any = Field(None, description="alarm_disarmed only: key, app or other; "
                                               "only the car's key cancels the theft "
                                               "notification")
    msd: str | None = nullable("eCall Minimum Set of Data (EN 15722): base64 of the UPER "
                               "bytes, at most 140; versions 1 to 3")

    @model_validator(mode="after")
    def _without_msd(self) -> EventIn:
        errors: list[InitErrorDetails] = []
        if self.msd is None:
            for name in ("type", "vin", "occurred_at", "location"):
                if getattr(self, name) is None:
                    errors.append(_error((name,), self.reasons[name], None))
        if self.type == "alarm_disarmed" and self.disarmed_by not in DISARM_METHODS:
            errors.append(_error(("disarmed_by",), self.reasons["disarmed_by"],
                                 self.disarmed_by))
        if errors:
            raise CoreValidationError.from_exception_data("EventIn", errors)
        return self


class Notification(Answer):
    """One owner message or the escalation of a theft alarm."""

    id: int
    vin: str
    kind: str = Field(description="sms, push or escalation")
    target: str
    body: str
    title: str | None
    language: str | None
    status: str = Field(description="pending, sent, delivered, failed, cancelled, expired, ...")
    created_at: str
    due_at: str
    deadline_at: str | None
    in_doubt: bool
    sent_at: str | None
    cancelled_at: str | None
    cancel_reason: str | None
    given_up_at: str | None
    attempts: int
    last_error: str | None
    last_status: int | None
    provider_ref: str | None
    idempotency_key: str
    alarm_event_id: str


class EventAnswer(Answer):
    """The incident the event opened (or the one a replay found)."""

    incident_id: str = Field(description="the gateway's id of the incident (UUID)")
    event_id: str
    type: EventType
    country: str | None = Field(description="where the car is (ISO code); null: unknown")
    route_country: str | None = Field(description="whose emergency route applies")
    route_reason: str
    emergency_number: str = Field(description="what the car dials itself on a hand-back")
    fallback_dial: str | None = Field(description="what the gateway dials; null: the "
                                                  "gateway hands the call back to the car")
    call_number: str | None = Field(description="the gateway number to call for this "
                                                "service and market; null: no call")
    hand_back_after_s: int | None = Field(description="dial emergency_number yourself if "
                                                      "no agent took the call by then")
    test_call: bool = Field(description="an eCall test call: never an emergency leg")
    replayed: bool = Field(description="true: this event_id was already stored")
    notifications: list[Notification] | None = Field(
        None, description="alarm events only: the owner messages and the escalation",
        json_schema_extra=no_default)


# -- the car's report on a command it was sent -----------------------------------------

COMMAND_KEY_PATTERN = r"^[\x21-\x7e]{1,128}$"


class CommandResultIn(RequestModel):
    """The car's report on a command it was sent (``POST /v1/vehicles/{vin}/command-results``):
    which command -- its ``key`` (the ``Idempotency-Key`` it was sent with) or the
    ``command_id`` the vehicle command service gave it -- and whether the car executed
    it.  A replay of the same report changes nothing and gets the same answer."""

    model_config = ConfigDict(json_schema_extra={
        "anyOf": [{"required": ["key"]}, {"required": ["command_id"]}]})

    reasons: ClassVar[dict[str, str]] = {
        "key": "the command's Idempotency-Key: 1-128 printable ASCII characters",
        "command_id": "the vehicle command service's id: 1-128 printable ASCII characters",
        "ok": "required: true (the car executed the command) or false (it did not)",
        "detail": "a string of at most 300 characters",
    }

    key: Annotated[str | None, BeforeValidator(no_null)] = optional(
        "the command's idempotency key (the Idempotency-Key header it came with)",
        pattern=COMMAND_KEY_PATTERN)
    command_id: Annotated[str | None, BeforeValidator(no_null)] = optional(
        "the id the vehicle command service answered when it took the command",
        pattern=COMMAND_KEY_PATTERN)
    ok: bool = Field(description="true: executed; false: not executed (the command fails)")
    detail: str | None = nullable("what the car did, or why it did not", max_length=300)

    @model_validator(mode="after")
    def _one_id(self) -> CommandResultIn:
        if self.key is None and self.command_id is None:
            raise CoreValidationError.from_exception_data("CommandResultIn", [
                _error(("key",), "required: the command's key (or its command_id)", None)])
        return self


class CommandResult(Answer):
    """The command as the gateway has it after the report."""

    id: int
    key: str
    command: str
    status: str = Field(description="confirmed (ok), failed (not ok); a report on a "
                                    "command already settled leaves it as it was")
    attempts: int
    last_error: str | None
    created_at: str | None = Field(json_schema_extra={"format": "date-time"})
    updated_at: str | None = Field(json_schema_extra={"format": "date-time"})
    next_attempt_at: str | None
    command_id: str | None
