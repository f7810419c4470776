"""Twilio Programmable Voice webhooks for calls from cars (SOS, crash).

The emergency path never fails closed: every view here is wrapped by
:func:`fail_safe`, which answers any exception with TwiML that dials the
emergency route, and :data:`gateway.twiml.LAST_RESORT` if even that fails.
The routing state of a call travels in the (signed) action URLs, so a step can
be decided with the database down; the database records each step and makes a
retried step answer exactly as the first time.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Self, TypeVar, cast
from urllib.parse import parse_qs, urlsplit

import phonenumbers
from flask import Blueprint, Response, request, url_for
from twilio.twiml.voice_response import VoiceResponse

from gateway import twiml
from gateway.app import services
from gateway.errors import StoreError
from gateway.events import EMERGENCY_TYPES
from gateway.logs import call_sid_var
from gateway.routing import (
    DialCentre,
    DialEmergency,
    centre_answered,
    emergency_route,
    next_centre_attempt,
    next_emergency_attempt,
    sim_country,
)
from gateway.security import twilio_signed
from gateway.whisper import whisper_summary

log = logging.getLogger(__name__)

bp = Blueprint("voice", __name__, url_prefix="/twilio/voice")

F = TypeVar("F", bound=Callable[..., Any])


# -- call state carried in action URLs -------------------------------------------------


S = TypeVar("S", bound="UrlState")


@dataclass(frozen=True)
class UrlState:
    """State carried in a Twilio action URL (Twilio signs the URL with the request)."""

    @classmethod
    def parse(cls, args: Mapping[str, str]) -> Self:
        """Lenient: a missing or garbled value falls back to its default."""
        values: dict[str, Any] = {}
        for name, default in asdict(cls()).items():
            raw = args.get(name)
            if raw is None:
                continue
            if isinstance(default, int):
                try:
                    values[name] = max(0, int(raw))
                except ValueError:
                    continue
            else:
                values[name] = raw[:64]
        return cls(**values)

    def params(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items() if v not in ("", 0)}


@dataclass(frozen=True)
class CallState(UrlState):
    """What a later step of a car's call needs to know."""

    i: str = ""  # incident id ("" when the car sent no data message)
    t0: int = 0  # call arrival, epoch seconds
    h: str = ""  # home country: the centre that serves it is tried first
    c: str = ""  # route country: whose emergency route is the fallback
    n: int = 0  # centre attempts made so far
    e: int = 0  # emergency attempts made so far
    p: str = ""  # the caller's CallSid (whisper requests come on the agent's leg)


def action_url(endpoint: str, state: UrlState | None = None, **extra: str) -> str:
    params: dict[str, Any] = state.params() if state else {}
    params.update(extra)
    return services().settings.public_url + url_for(endpoint, **params)


def twiml_response(response: VoiceResponse | str) -> Response:
    return Response(str(response), status=200, mimetype="text/xml")


def _now() -> float:
    return services().clock()


def _incident_of_caller(msisdn: str | None, now: float) -> tuple[dict[str, Any] | None, bool]:
    """``(incident, database answered)``: the caller's open crash or SOS incident, else
    its open ON CALL incident (an emergency always wins), within the incident window."""
    if not msisdn:
        return None, True
    since = dt.datetime.fromtimestamp(now - services().settings.incident_window_s, tz=dt.UTC)
    try:
        found = services().store.open_incidents_for(
            msisdn, since=since, types=(*EMERGENCY_TYPES, "on_call"))
    except StoreError:
        return None, False
    emergencies = [i for i in found if i["type"] in EMERGENCY_TYPES]
    chosen = emergencies or found
    return (chosen[0] if chosen else None), True


def _caller_language(state: CallState) -> str | None:
    plan = services().plan
    for country in (state.h, state.c):
        if country and plan is not None:
            entry = plan.get(country)
            if entry is not None:
                return entry.language
    return None


# -- never fail closed -----------------------------------------------------------------


def emergency_step(state: CallState, *, reason: str, step: str | None,
                   detail: Mapping[str, Any] | None = None, retry: bool = False) -> Response:
    """Dial the next number of the emergency route of ``state.c`` (or tell the caller
    what to dial when every attempt is used).  Recorded as ``step`` unless it is None
    (the fail-safe path, which touches nothing it does not need)."""
    svc = services()
    route = emergency_route(state.c or None, svc.plan)
    decision = next_emergency_attempt(route, attempt=state.e + 1, policy=svc.settings.voice,
                                      reason=reason)
    record: dict[str, Any]
    if isinstance(decision, DialEmergency):
        state = replace(state, e=decision.attempt)
        response = _dial_emergency(decision, state, retry=retry)
        record = {"target": "emergency", "number": decision.number,
                  "reason": f"{reason}; route of {route.country or 'unknown country'} "
                            f"({route.source})"}
    else:
        response = twiml.give_up(decision, language=_caller_language(state))
        record = {"target": "none", "number": None, "reason": decision.reason}
    if step is None:
        return twiml_response(response)
    return _answer(response, step=step, state=state, detail=detail or {}, decision=record)


def emergency_answer(state: CallState, *, reason: str) -> Response:
    """TwiML that dials the emergency route of the best country we know."""
    country = state.c or sim_country(e164_or_none(request.form.get("From"))) or ""
    return emergency_step(replace(state, c=country), reason=reason, step=None)


def fail_safe(view: F) -> F:
    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        call_sid_var.set(request.form.get("CallSid"))
        try:
            return view(*args, **kwargs)
        except Exception:
            log.exception("voice step failed; answering with the emergency route")
        try:
            return emergency_answer(CallState.parse(request.args), reason="handler error")
        except Exception:
            log.exception("emergency answer failed; answering with the last-resort TwiML")
            return twiml_response(twiml.LAST_RESORT)

    return cast(F, wrapper)


# -- recording steps ---------------------------------------------------------------------


def _replay(call_sid: str, step: str) -> Response | None:
    """A step Twilio retried: answer as the first time."""
    if not call_sid:
        return None
    try:
        found = services().store.call_step(call_sid, step)
    except StoreError:
        return None
    if found and found.get("twiml"):
        log.info("replaying step %s", step)
        return twiml_response(str(found["twiml"]))
    return None


def _answer(
    response: VoiceResponse,
    *,
    step: str,
    state: CallState,
    detail: Mapping[str, Any],
    decision: Mapping[str, Any] | None = None,
) -> Response:
    """Record the step (best effort: the caller is never kept waiting on it)."""
    call_sid = request.form.get("CallSid", "")
    body = str(response)
    if call_sid:
        try:
            services().store.record_call_step(
                call_sid=call_sid,
                step=step,
                incident_id=state.i or None,
                twiml=body,
                detail=dict(detail),
                decision=decision,
            )
        except StoreError:
            log.error("could not record step %s; answering anyway", step)
    return twiml_response(body)


def e164_or_none(raw: str | None) -> str | None:
    if not raw or not raw.startswith("+"):
        return None
    try:
        number = phonenumbers.parse(raw, None)
    except phonenumbers.NumberParseException:
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


# -- routing ------------------------------------------------------------------------------


def _dial_emergency(decision: DialEmergency, state: CallState, *, retry: bool = False) -> VoiceResponse:
    return twiml.dial_emergency(
        decision,
        action_url=action_url("voice.emergency_result", state),
        status_url=action_url("voice.status", None, **({"i": state.i} if state.i else {})),
        caller_id=services().settings.emergency_caller_id,
        language=_caller_language(state),
        announce="emergency_retry" if retry else "connecting_emergency",
    )


def route_call(state: CallState, *, step: str, why: str, unreachable: frozenset[str]) -> Response:
    """Ring the next centre, or fall back to the emergency route."""
    svc = services()
    attempt = state.n + 1
    choice = next_centre_attempt(
        home_country=state.h or None,
        route_country=state.c or None,
        attempt=attempt,
        elapsed_s=max(0.0, _now() - state.t0),
        policy=svc.settings.voice,
        plan=svc.plan,
        unreachable=unreachable,
    )
    if isinstance(choice, DialCentre):
        next_state = replace(state, n=attempt)
        centre = choice.centre.centre_id
        response = twiml.dial_centre(
            choice,
            action_url=action_url("voice.dial_result", next_state, centre=centre),
            whisper_url=action_url("voice.whisper", next_state, centre=centre),
            status_url=action_url("voice.status", None, centre=centre, **({"i": state.i} if state.i else {})),
            caller_id=None,  # Twilio passes the car's number through to the agent
            language=_caller_language(state),
            first=attempt == 1,
        )
        decision = {"target": "centre", "number": choice.number, "centre_id": centre,
                    "reason": f"{why}; {choice.reason}"}
        return _answer(response, step=step, state=next_state, detail={"why": why},
                       decision=decision)

    return emergency_step(state, reason=f"{why}; {choice}", step=step, detail={"why": why})


def unreachable_centres() -> frozenset[str]:
    """Centres the breaker knows are down (empty if it cannot tell)."""
    health = services().centre_health
    if health is None:
        return frozenset()
    try:
        return frozenset(health.unreachable())
    except Exception:
        log.exception("centre health unavailable; trying every centre")
        return frozenset()


# -- the webhooks ------------------------------------------------------------------------


@bp.post("")
@twilio_signed
@fail_safe
def incoming() -> Response:
    """The number's Voice URL: a car calls after (or without) its data message."""
    svc = services()
    call_sid = request.form.get("CallSid", "")
    replay = _replay(call_sid, "voice")
    if replay:
        return replay
    msisdn = e164_or_none(request.form.get("From"))
    now = _now()
    incident = None
    why = "no data message from this car"
    incident, db_ok = _incident_of_caller(msisdn, now)
    if not db_ok:
        why = "database unavailable: routing from the SIM's country"
    if incident is not None and incident["type"] == "on_call":
        state = CallState(i=incident["id"], t0=int(now), h=incident["home_country"] or "",
                          c=incident["route_country"] or "", p=call_sid)
        return roadside_call(state, step="voice")
    if incident is None and e164_or_none(request.form.get("To")) in svc.settings.ivr_numbers:
        from gateway.views import ivr

        return ivr.start(call_sid=call_sid, caller=msisdn)
    if incident is not None:
        state = CallState(i=incident["id"], t0=int(now), h=incident["home_country"] or "",
                          c=incident["route_country"] or "", p=call_sid)
        why = f"{incident['type']} incident; route country by {incident['route_reason']}"
    else:
        country = sim_country(msisdn) or ""
        state = CallState(t0=int(now), h=country, c=country, p=call_sid)
    return route_call(state, step="voice", why=why, unreachable=unreachable_centres())


def dial_outcome(attempt: int, *, kind: str) -> tuple[bool, str]:
    """``(answered, DialCallStatus)`` of a centre <Dial action>; feeds the line's health."""
    svc = services()
    status = request.form.get("DialCallStatus", "")
    accepted: bool | None
    try:
        accepted = svc.store.call_step(request.form.get("CallSid", ""),
                                       f"accept:{attempt}") is not None
    except StoreError:
        accepted = None
    answered = centre_answered(status, request.form.get("DialBridged"), accepted)
    centre = request.args.get("centre", "")
    if svc.centre_health is not None and (answered or status in ("busy", "no-answer", "failed")):
        svc.centre_health.record_safely(centre, ok=answered, reason=f"{kind} dial {status}")
    return answered, status


def _costs_apply(*, incident_id: str = "", vin: str = "") -> tuple[bool, str | None]:
    """(costs apply?, the entitlement sentence) for the car of an incident (give the VIN
    when the incident is already loaded); an unknown car gets no notice."""
    from gateway.views.ivr import entitlement_of

    svc = services()
    try:
        if not vin and incident_id:
            incident = svc.store.incident(incident_id)
            vin = incident["vin"] if incident else ""
        vehicle = svc.vehicles.get(vin) if vin else None
    except StoreError:
        return False, None
    if vehicle is None:
        return False, None
    entitlement = entitlement_of(vehicle)
    return not entitlement.included, entitlement.reason


def record_callback_safely(*, call_sid: str, vin: str | None, incident_id: str | None,
                           reason: str) -> None:
    """A callback the centre owes this caller (best effort: the caller is told anyway)."""
    try:
        services().store.record_callback({
            "call_sid": call_sid or request.form.get("CallSid", ""),
            "number": e164_or_none(request.form.get("From")), "vin": vin,
            "incident_id": incident_id, "reason": reason[:300]})
    except StoreError:
        log.error("could not record the callback request")


def _roadside_callback(state: CallState, *, step: str, reason: str) -> Response:
    record_callback_safely(call_sid=state.p, vin=None, incident_id=state.i or None,
                           reason=f"on_call: {reason}")
    return _answer(twiml.say_and_hangup("callback", language=_caller_language(state)),
                   step=step, state=state, detail={"why": reason},
                   decision={"target": "callback", "number": None, "reason": reason})


def roadside_call(state: CallState, *, step: str) -> Response:
    """ON CALL: the centre's roadside line; a callback if it cannot be reached.

    Never the emergency number, not even on a bug here: the caller is told to use SOS
    in an emergency."""
    try:
        return _roadside_call(state, step=step)
    except Exception:
        log.exception("roadside step failed; recording a callback")
    try:
        return _roadside_callback(state, step=step, reason="handler error")
    except Exception:
        log.exception("callback answer failed")
        return twiml_response(twiml.say_and_hangup("callback", language=None))


def _roadside_call(state: CallState, *, step: str) -> Response:
    svc = services()
    attempt = state.n + 1
    choice = next_centre_attempt(
        home_country=state.h or None, route_country=state.c or None, attempt=attempt,
        elapsed_s=max(0.0, _now() - state.t0), policy=svc.settings.voice, plan=svc.plan,
        unreachable=unreachable_centres(), roadside=True)
    if not isinstance(choice, DialCentre):
        return _roadside_callback(state, step=step, reason=choice)
    costs, _ = _costs_apply(incident_id=state.i) if attempt == 1 else (False, None)
    next_state = replace(state, n=attempt)
    centre = choice.centre.centre_id
    response = twiml.dial_centre(
        choice,
        action_url=action_url("voice.roadside_result", next_state, centre=centre),
        whisper_url=action_url("voice.whisper", next_state, centre=centre),
        status_url=action_url("voice.status", None, centre=centre, **({"i": state.i} if state.i else {})),
        caller_id=None, language=_caller_language(state), first=attempt == 1,
        notices=("ivr_costs_apply",) if costs else ())
    return _answer(response, step=step, state=next_state, detail={"costs_apply": costs},
                   decision={"target": "centre", "number": choice.number, "centre_id": centre,
                             "reason": f"on_call roadside; {choice.reason}"})


@bp.post("/roadside-result")
@twilio_signed
@fail_safe
def roadside_result() -> Response:
    """The roadside <Dial action>: done, the next roadside line, or a callback."""
    state = CallState.parse(request.args)
    call_sid = request.form.get("CallSid", "")
    step = f"roadside-result:{state.n}"
    replay = _replay(call_sid, step)
    if replay:
        return replay
    answered, _ = dial_outcome(state.n, kind="roadside")
    if answered:
        return _answer(twiml.hangup(), step=step, state=state, detail={"outcome": "answered"})
    return roadside_call(state, step=step)


@bp.post("/dial-result")
@twilio_signed
@fail_safe
def dial_result() -> Response:
    """The centre ``<Dial action>``: done if an agent took the call, else the next try."""
    state = CallState.parse(request.args)
    call_sid = request.form.get("CallSid", "")
    step = f"dial-result:{state.n}"
    replay = _replay(call_sid, step)
    if replay:
        return replay
    answered, status = dial_outcome(state.n, kind="centre")
    if answered:
        return _answer(twiml.hangup(), step=step, state=state,
                       detail={"dial_status": status, "outcome": "answered"})
    why = f"centre attempt {state.n}: {status or 'no status'}"
    if status in ("completed", "answered"):
        why += " but no agent accepted (voicemail or no key pressed)"
    return route_call(state, step=step, why=why, unreachable=unreachable_centres())


@bp.post("/emergency-result")
@twilio_signed
@fail_safe
def emergency_result() -> Response:
    """The emergency ``<Dial action>``: retry the emergency route until it connects."""
    state = CallState.parse(request.args)
    call_sid = request.form.get("CallSid", "")
    step = f"emergency-result:{state.e}"
    replay = _replay(call_sid, step)
    if replay:
        return replay
    status = request.form.get("DialCallStatus", "")
    if status in ("completed", "answered"):
        return _answer(twiml.hangup(), step=step, state=state,
                       detail={"dial_status": status, "outcome": "answered"})
    return emergency_step(state, reason=f"emergency attempt {state.e}: {status or 'no status'}",
                          step=step, detail={"dial_status": status}, retry=True)


@bp.post("/whisper")
@twilio_signed
@fail_safe
def whisper() -> Response:
    """Played to the agent before the bridge: what happened, press 1 to accept."""
    svc = services()
    state = CallState.parse(request.args)
    incident = None
    if state.i:
        try:
            incident = svc.store.incident(state.i)
        except StoreError:
            log.error("incident unavailable for the whisper")
    summary = whisper_summary(incident, plan=svc.plan, sim_country=state.h or None)
    if incident is not None and incident["type"] == "on_call":
        _, entitlement = _costs_apply(vin=incident["vin"])
        if entitlement:
            summary += " " + entitlement
    response = twiml.whisper(
        summary,
        accept_url=action_url("voice.whisper_accept", state, centre=request.args.get("centre", "")),
        timeout_s=svc.settings.voice.whisper_accept_timeout_s,
    )
    return twiml_response(response)


@bp.post("/whisper/accept")
@twilio_signed
@fail_safe
def whisper_accept() -> Response:
    """The agent's key: 1 bridges the call; anything else hangs up the agent leg."""
    svc = services()
    state = CallState.parse(request.args)
    accepted = request.form.get("Digits", "") == twiml.ACCEPT_DIGIT
    parent = state.p or request.form.get("ParentCallSid", "")
    if accepted and parent:
        try:
            svc.store.record_call_step(
                call_sid=parent,
                step=f"accept:{state.n}",
                incident_id=state.i or None,
                twiml="",
                detail={"agent_call_sid": request.form.get("CallSid", ""),
                        "centre": request.args.get("centre", "")},
            )
        except StoreError:
            log.error("could not record the agent's acceptance; bridging anyway")
    return twiml_response(twiml.whisper_result(accepted))


@bp.post("/status")
@twilio_signed
@fail_safe
def status() -> Response:
    """Status callbacks: stored by SequenceNumber (they arrive out of order)."""
    svc = services()
    form = request.form
    try:
        sequence = int(form.get("SequenceNumber", "0"))
    except ValueError:
        sequence = 0
    payload = {k: form[k] for k in (
        "CallStatus", "Duration", "CallDuration", "SipResponseCode", "Timestamp",
        "CallbackSource", "SequenceNumber", "To", "Direction", "AnsweredBy",
    ) if k in form}
    try:
        svc.store.record_status({
            "call_sid": form.get("CallSid", ""),
            "parent_call_sid": form.get("ParentCallSid"),
            "callback_source": form.get("CallbackSource", "call-progress-events"),
            "sequence_number": sequence,
            "status": form.get("CallStatus", "unknown"),
            "incident_id": request.args.get("i") or None,
            "payload": payload,
        })
    except StoreError:
        log.error("could not record a status callback")
        return Response("database unavailable\n", status=503, mimetype="text/plain")
    return twiml_response(twiml.empty())


@bp.post("/fallback")
@twilio_signed
@fail_safe
def fallback() -> Response:
    """Twilio's Fallback URL: our handler failed, so dial the emergency route now
    (an ON CALL call gets the roadside line or a callback instead)."""
    error_url = urlsplit(request.form.get("ErrorUrl", ""))
    state = CallState.parse({k: v[0] for k, v in parse_qs(error_url.query).items()})
    state = replace(state, t0=state.t0 or int(_now()))
    if error_url.path.endswith("/roadside-result"):
        return roadside_call(replace(state, p=request.form.get("CallSid", "")), step="fallback")
    if not state.c:
        msisdn = e164_or_none(request.form.get("From"))
        incident, _ = _incident_of_caller(msisdn, _now())
        if incident is not None:
            state = replace(state, i=incident["id"], c=incident["route_country"] or "",
                            h=incident["home_country"] or "", p=request.form.get("CallSid", ""))
            if incident["type"] == "on_call":  # never the emergency number for ON CALL
                return roadside_call(state, step="fallback")
        else:
            state = replace(state, c=sim_country(msisdn) or "")
    log.warning("fallback URL requested (ErrorCode %s)", request.form.get("ErrorCode", "?"))
    step = f"fallback:{request.form.get('ErrorCode', '')}:{state.e}"
    error_code = request.form.get("ErrorCode", "")
    return emergency_step(state, reason=f"Twilio fallback (error {error_code or '?'})", step=step,
                          detail={"error_code": error_code})
