"""The OpenAPI 3.1 document served at ``/openapi.json``, built from the schema models.

Every JSON operation of the vehicle, agent and admin APIs is listed in :data:`OPERATIONS`
with its guard, body and answers; ``tests/integration/test_openapi.py`` checks that the
list and the app's routes are the same.  The Twilio webhooks (form-encoded, signed) are
read from the app's routes and documented with the signature header; they cannot be
called without the auth token, so schemathesis leaves them out (tag ``twilio``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from gateway.schemas import admin, agent, vehicle
from gateway.schemas.base import Answer

OPENAPI_VERSION = "3.1.0"
COMPONENTS = "#/components/schemas/"

#: blueprints whose routes are Twilio webhooks
TWILIO_BLUEPRINTS = ("voice", "ivr")


# -- answers every API shares ---------------------------------------------------------


class ErrorBody(Answer):
    """Every refusal: a code to switch on, and a sentence for a person."""

    error: str = Field(description="machine-readable: invalid_event, unauthorized, "
                                   "not_found, conflict, unavailable, ...")
    detail: str | None
    fields: dict[str, str] | None = Field(
        None, description="the fields concerned, by dotted path (location.lat, "
                          "owner_phones[1]), with the reason")


class InvalidBody(Answer):
    """422: each bad field named, by dotted path, with the reason."""

    error: str = Field(description="invalid_event (POST /v1/events) or invalid_request")
    detail: str
    fields: dict[str, str] = Field(json_schema_extra={"minProperties": 1})


class Health(Answer):
    status: str


class Readiness(Answer):
    status: Literal["ready", "not ready"]
    checks: dict[str, str]


class TwilioForm(BaseModel):
    """What Twilio posts (form-encoded); others of Twilio's parameters may be present."""

    model_config = ConfigDict(extra="allow")

    CallSid: str
    From: str | None = None
    To: str | None = None
    CallStatus: str | None = None
    Digits: str | None = None
    DialCallStatus: str | None = None
    SequenceNumber: str | None = None


# -- the operations --------------------------------------------------------------------

Security = Literal["vehicleBearer", "agentBearer", "adminBearer", "public"]


@dataclass(frozen=True)
class Reply:
    description: str
    model: type[BaseModel] | None = None
    headers: tuple[str, ...] = ()
    media: str = "application/json"


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    operation_id: str
    tag: str
    summary: str
    security: Security
    replies: Mapping[int, Reply]
    body: type[BaseModel] | None = None
    body_required: bool = True
    #: the role an agent token needs (documented in the description)
    role: str | None = None
    examples: Mapping[str, Any] = field(default_factory=dict)


_ERROR = ErrorBody
UNAUTHORIZED = Reply("no valid bearer token", _ERROR, ("WWW-Authenticate",))
FORBIDDEN_ROLE = Reply("the token lacks the role", _ERROR)
FORBIDDEN_ADMIN = Reply("a vehicle or agent token, not an admin token", _ERROR)
INVALID = Reply("invalid fields, each named", InvalidBody)
TOO_LARGE = Reply("body larger than 64 KiB", _ERROR)
UNSUPPORTED = Reply("not application/json", _ERROR)
UNAVAILABLE = Reply("the database did not answer; retry", _ERROR, ("Retry-After",))
NO_INCIDENT = Reply("no such incident", _ERROR)
NO_VEHICLE = Reply("no such vehicle", _ERROR)

#: the car's crash message and an eCall MSD-only message (README)
EVENT_EXAMPLES = {
    "crash": {"summary": "a crash with position and details", "value": {
        "event_id": "ivs-example-crash-1", "type": "crash", "vin": "YV1ZW72U5N1234567",
        "msisdn": "+46701234567", "occurred_at": "2026-11-25T10:15:00Z",
        "location": {"lat": 55.6761, "lon": 12.5683, "heading_deg": 90.0,
                     "accuracy_m": 8.0, "trusted": True},
        "crash": {"airbag_deployed": True, "belt_tensioner_fired": True, "delta_v_kmh": 38},
        "occupants": {"count": 2}}},
    "ecall_msd": {"summary": "an eCall MSD (EN 15722) with the SIM number", "value": {
        "event_id": "ivs-example-msd-1", "msisdn": "+46701234567",
        "msd": "AiUcBoDjClFDnilV1DgAgAg3+Ayf1wfwmpS90w5V4IAAAAH//+BA"}},
}

_AGENT_COMMON: dict[int, Reply] = {401: UNAUTHORIZED, 403: FORBIDDEN_ROLE, 503: UNAVAILABLE}
_AGENT_POST: dict[int, Reply] = {**_AGENT_COMMON, 413: TOO_LARGE, 422: INVALID}
_VEHICLE_COMMAND: dict[int, Reply] = {
    202: Reply("not confirmed by the car yet: the command is sent (awaiting the car's "
               "command_result) or pending (the car was unreachable; retried by the "
               "queue); the state is unchanged", agent.CommandAnswer),
    502: Reply("the car rejected the command, or the vehicle command service refused it; "
               "the state is unchanged (a new request sends it again)", _ERROR),
    503: Reply("the database did not answer, or no vehicle command service is "
               "configured (GATEWAY_VEHICLE_COMMAND_URL)", _ERROR),
}
NO_COMMAND = Reply("no such vehicle, or no command with this key or command_id for it",
                   _ERROR)
_ADMIN_COMMON: dict[int, Reply] = {401: UNAUTHORIZED, 403: FORBIDDEN_ADMIN, 503: UNAVAILABLE}
_ADMIN_WRITE: dict[int, Reply] = {**_ADMIN_COMMON, 413: TOO_LARGE, 415: UNSUPPORTED,
                                  422: INVALID}

OPERATIONS: tuple[Operation, ...] = (
    Operation("post", "/v1/events", "postEvent", "vehicle",
              "The car's data message, before its voice call", "vehicleBearer",
              {201: Reply("stored: the incident and what the car is to do",
                          vehicle.EventAnswer),
               200: Reply("a replay of a stored event_id (same body)", vehicle.EventAnswer),
               401: UNAUTHORIZED, 409: Reply("this event_id came with another body", _ERROR),
               413: TOO_LARGE, 415: UNSUPPORTED, 422: INVALID, 503: UNAVAILABLE},
              body=vehicle.EventIn, examples=EVENT_EXAMPLES),
    Operation("post", "/v1/vehicles/{vin}/command-results", "postCommandResult", "vehicle",
              "The car's report on a command: executed (ok) or not", "vehicleBearer",
              {200: Reply("the command as settled (a replay answers the same)",
                          vehicle.CommandResult),
               401: UNAUTHORIZED, 404: NO_COMMAND, 413: TOO_LARGE, 415: UNSUPPORTED,
               422: INVALID, 503: UNAVAILABLE},
              body=vehicle.CommandResultIn),
    Operation("get", "/v1/agent/incidents/{incident_id}", "readIncident", "agent",
              "The incident and every routing decision", "agentBearer",
              {200: Reply("the incident", agent.IncidentView), 404: NO_INCIDENT,
               **_AGENT_COMMON}, role="read"),
    Operation("post", "/v1/agent/incidents/{incident_id}/dispatch", "dispatchIncident",
              "agent", "Emergency services dispatched; answers the route for the place",
              "agentBearer",
              {200: Reply("recorded", agent.DispatchAnswer), 404: NO_INCIDENT, **_AGENT_POST},
              body=agent.DispatchIn, body_required=False, role="dispatch"),
    Operation("post", "/v1/agent/incidents/{incident_id}/misuse", "markMisuse", "agent",
              "Mark an SOS as misuse (chargeable)", "agentBearer",
              {200: Reply("recorded", agent.MisuseAnswer), 404: NO_INCIDENT,
               409: Reply("not an SOS incident", _ERROR), **_AGENT_POST},
              body=agent.MisuseIn, role="dispatch"),
    Operation("get", "/v1/agent/vehicles/{vin}", "readVehicleState", "agent",
              "Immobiliser and tracking state, who changed it, the customer number and "
              "the commands the car has not confirmed yet", "agentBearer",
              {200: Reply("the vehicle", agent.AgentVehicle), 404: NO_VEHICLE,
               **_AGENT_COMMON}, role="read"),
    Operation("post", "/v1/agent/vehicles/{vin}/immobilise", "immobilise", "agent",
              "Immobilise the car (needs an authority reference)", "agentBearer",
              {200: Reply("immobilised: the car confirmed it", agent.CommandAnswer),
               404: NO_VEHICLE,
               **_AGENT_POST, **_VEHICLE_COMMAND},
              body=agent.ImmobiliseIn, role="immobilise"),
    Operation("post", "/v1/agent/vehicles/{vin}/reactivate", "reactivate", "agent",
              "Reactivate the car with the owner's PIN", "agentBearer",
              {200: Reply("reactivated: the car confirmed it (or the car was not "
                          "immobilised: no command, no 'command' field)", agent.AgentVehicle),
               404: NO_VEHICLE, **_AGENT_POST, **_VEHICLE_COMMAND,
               403: Reply("the token lacks the role, or the PIN was wrong",
                          agent.PinRefused),
               423: Reply("the PIN is locked after too many wrong ones", agent.PinRefused)},
              body=agent.ReactivateIn, role="immobilise"),
    Operation("post", "/v1/agent/vehicles/{vin}/tracking", "startTracking", "agent",
              "Start tracking and notify the police through the centre", "agentBearer",
              {200: Reply("tracking (confirmed by the car, or already on); the police "
                          "notification", agent.TrackingAnswer),
               404: NO_VEHICLE, **_AGENT_POST, **_VEHICLE_COMMAND},
              body=agent.TrackingIn, role="dispatch"),
    Operation("post", "/v1/agent/vehicles/{vin}/tracking/stop", "stopTracking", "agent",
              "Stop tracking", "agentBearer",
              {200: Reply("stopped: the car confirmed it", agent.CommandAnswer),
               404: NO_VEHICLE,
               409: Reply("the vehicle is not being tracked", _ERROR),
               **_AGENT_POST, **_VEHICLE_COMMAND},
              body=agent.StopTrackingIn, body_required=False, role="dispatch"),
    Operation("post", "/v1/admin/vehicles", "enrolVehicle", "admin",
              "Enrol a car (idempotent on the VIN)", "adminBearer",
              {201: Reply("enrolled", admin.AdminVehicle, ("Location",)),
               200: Reply("already enrolled with this same body", admin.AdminVehicle),
               409: Reply("another body for the VIN, or a SIM of another car", _ERROR),
               **_ADMIN_WRITE},
              body=admin.VehicleIn),
    Operation("get", "/v1/admin/vehicles/{vin}", "readVehicle", "admin",
              "The car, its owner's numbers, customer number and PIN lockout",
              "adminBearer",
              {200: Reply("the vehicle", admin.AdminVehicle), 404: NO_VEHICLE,
               422: INVALID, **_ADMIN_COMMON}),
    Operation("patch", "/v1/admin/vehicles/{vin}", "changeVehicle", "admin",
              "Change any field but the VIN", "adminBearer",
              {200: Reply("changed (the fields in changed)", admin.AdminVehicleChanged),
               404: NO_VEHICLE, 409: Reply("a SIM of another car", _ERROR), **_ADMIN_WRITE},
              body=admin.VehicleChangesIn),
    Operation("put", "/v1/admin/vehicles/{vin}/pin", "setPin", "admin",
              "Set or reset the owner's PIN (clears a lockout)", "adminBearer",
              {200: Reply("set", admin.AdminVehicle), 404: NO_VEHICLE, **_ADMIN_WRITE},
              body=admin.PinIn),
    Operation("post", "/v1/admin/vehicles/{vin}/pin/unlock", "unlockPin", "admin",
              "Clear the PIN failures and any lock", "adminBearer",
              {200: Reply("cleared", admin.AdminVehicle), 404: NO_VEHICLE, **_ADMIN_WRITE},
              body=admin.UnlockIn),
    Operation("get", "/v1/admin/vehicles/{vin}/audit", "readAudit", "admin",
              "The car's audit trail (never a PIN)", "adminBearer",
              {200: Reply("oldest first, at most 200 entries", admin.AuditTrail),
               404: NO_VEHICLE, 422: INVALID, **_ADMIN_COMMON}),
    Operation("get", "/healthz", "healthz", "ops", "Alive", "public",
              {200: Reply("alive", Health)}),
    Operation("get", "/readyz", "readyz", "ops",
              "Ready: database, number plan and boundaries loaded", "public",
              {200: Reply("ready", Readiness), 503: Reply("not ready", Readiness)}),
    Operation("get", "/metrics", "metrics", "ops", "Prometheus text (no caller data)",
              "public", {200: Reply("metrics", media="text/plain")}),
    Operation("get", "/openapi.json", "openapi", "ops", "This document", "public",
              {200: Reply("OpenAPI 3.1")}),
)

_PATH_PARAMS = {
    "incident_id": {"description": "the incident id from the event answer (a UUID)",
                    "schema": {"type": "string", "minLength": 1, "maxLength": 64,
                               "pattern": "^[A-Za-z0-9-]+$"}},
    "vin": {"description": "the car's VIN",
            "schema": {"type": "string", "minLength": 1, "maxLength": 17,
                       "pattern": "^[A-Za-z0-9]+$"}},
}
_HEADERS = {
    "WWW-Authenticate": {"description": "Bearer realm=...", "schema": {"type": "string"}},
    "Retry-After": {"description": "seconds", "schema": {"type": "string"}},
    "Location": {"description": "the new vehicle's URL", "schema": {"type": "string"}},
}
_SECURITY_SCHEMES = {
    "vehicleBearer": {"type": "http", "scheme": "bearer",
                      "description": "one of GATEWAY_VEHICLE_API_TOKENS"},
    "agentBearer": {"type": "http", "scheme": "bearer",
                    "description": "one of GATEWAY_AGENT_API_TOKENS (roles read, dispatch, "
                                   "immobilise; supervisor may do everything)"},
    "adminBearer": {"type": "http", "scheme": "bearer",
                    "description": "one of GATEWAY_ADMIN_API_TOKENS"},
    "twilioSignature": {"type": "apiKey", "in": "header", "name": "X-Twilio-Signature",
                        "description": "HMAC of the public URL and the form, keyed with "
                                       "GATEWAY_TWILIO_AUTH_TOKEN"},
}

_NOT_SCHEMA_KEYS = ("example", "examples", "default", "const", "enum")
_SCHEMA_MAPS = ("properties", "$defs", "patternProperties", "dependentSchemas")


def _tidy(node: Any) -> Any:
    """Drop pydantic's generated titles (noise in a published schema)."""
    if isinstance(node, list):
        return [_tidy(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "title" and isinstance(value, str):
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _tidy(schema) for name, schema in value.items()}
        elif key in _NOT_SCHEMA_KEYS:
            out[key] = value
        else:
            out[key] = _tidy(value)
    return out


def _models() -> list[tuple[type[BaseModel], Literal["validation", "serialization"]]]:
    found: dict[type[BaseModel], Literal["validation", "serialization"]] = {}
    for op in OPERATIONS:
        if op.body is not None:
            found[op.body] = "validation"
        for reply in op.replies.values():
            if reply.model is not None:
                found.setdefault(reply.model, "serialization")
    found[TwilioForm] = "validation"
    found[ErrorBody] = "serialization"
    return list(found.items())


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": COMPONENTS + model.__name__}


def _operation(op: Operation) -> dict[str, Any]:
    doc: dict[str, Any] = {"operationId": op.operation_id, "tags": [op.tag],
                           "summary": op.summary}
    if op.role is not None:
        doc["description"] = (f"Needs an agent token with the role `{op.role}` "
                              "(or `supervisor`).")
    params = re.findall(r"{(\w+)}", op.path)
    if params:
        doc["parameters"] = [{"name": p, "in": "path", "required": True, **_PATH_PARAMS[p]}
                             for p in params]
    if op.body is not None:
        media: dict[str, Any] = {"schema": _ref(op.body)}
        if op.examples:
            media["examples"] = dict(op.examples)
        doc["requestBody"] = {"required": op.body_required,
                              "content": {"application/json": media}}
    doc["security"] = [] if op.security == "public" else [{op.security: []}]
    responses: dict[str, Any] = {}
    for status in sorted(op.replies):
        reply = op.replies[status]
        answer: dict[str, Any] = {"description": reply.description}
        if reply.media == "application/json":
            schema = _ref(reply.model) if reply.model is not None else {"type": "object"}
            answer["content"] = {"application/json": {"schema": schema}}
        else:
            answer["content"] = {reply.media: {"schema": {"type": "string"}}}
        if reply.headers:
            answer["headers"] = {h: _HEADERS[h] for h in reply.headers}
        responses[str(status)] = answer
    doc["responses"] = responses
    return doc


def _twilio_operation(path: str, endpoint: str) -> dict[str, Any]:
    return {
        "operationId": "twilio_" + endpoint.replace(".", "_"),
        "tags": ["twilio"],
        "summary": f"Twilio webhook ({endpoint}): answers TwiML",
        "security": [{"twilioSignature": []}],
        "requestBody": {"required": True, "content": {
            "application/x-www-form-urlencoded": {"schema": _ref(TwilioForm)}}},
        "responses": {
            "200": {"description": "TwiML", "content": {"text/xml": {"schema": {
                "type": "string"}}}},
            "403": {"description": "missing or invalid X-Twilio-Signature",
                    "content": {"text/plain": {"schema": {"type": "string"}}}},
        },
    }


@functools.lru_cache(maxsize=1)
def _api_document() -> dict[str, Any]:
    models = _models()
    _keys, top = models_json_schema(models, ref_template=COMPONENTS + "{model}")
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    return {
        "openapi": OPENAPI_VERSION,
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "info": {"title": "assist-gateway", "version": _version(),
                 "description": "Vehicle, agent and admin APIs of the connected-car "
                                "assistance gateway, and its Twilio webhooks. Errors: "
                                "{error, detail, fields}; fields names each bad field by "
                                "dotted path."},
        "tags": [{"name": "vehicle"}, {"name": "agent"}, {"name": "admin"}, {"name": "ops"},
                 {"name": "twilio", "description": "form-encoded, signed by Twilio"}],
        "paths": paths,
        "components": {"schemas": _tidy(top.get("$defs", {})),
                       "securitySchemes": _SECURITY_SCHEMES},
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("assist-gateway")
    except PackageNotFoundError:
        return "0"


def openapi_path(rule: str) -> str:
    """A Flask rule as an OpenAPI path: ``/v1/x/<vin>`` -> ``/v1/x/{vin}``."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def openapi_document(twilio_routes: Iterable[tuple[str, str]] = ()) -> dict[str, Any]:
    """The whole document; ``twilio_routes``: (Flask rule, endpoint) of every webhook."""
    doc = _api_document()
    paths = dict(doc["paths"])
    for rule, endpoint in sorted(twilio_routes):
        paths[openapi_path(rule)] = {"post": _twilio_operation(rule, endpoint)}
    return {**doc, "paths": paths}
