"""Twilio Programmable Voice webhooks for calls from cars (SOS, crash, ON CALL).

Thin: each view reads the signed form, makes at most one database read under a hard
deadline (the caller's incident and the stored step, in one query), asks
:mod:`gateway.calls.call_plan` for the next step, renders it with :mod:`gateway.twiml`,
queues the step record for the background writer and answers.  The number called says
what the call is (:mod:`gateway.calls.inbound`): an emergency number is always routed
as an emergency, a roadside number never dials an emergency number.

Failures: every caller-leg view is wrapped by :func:`caller_leg`, which answers any
exception with the next emergency leg taken from the URL alone (never the database),
and :data:`gateway.twiml.LAST_RESORT` if even that fails; a roadside call gets a
callback instead.  The agent's leg (whisper, accept) has its own wrapper that bridges
or hangs up that leg and never dials an emergency number.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, TypeVar, cast
from urllib.parse import parse_qs, urlsplit

from flask import Blueprint, Response, g, request

from gateway import twiml
from gateway.app import services
from gateway.calls import call_plan
from gateway.calls.call_plan import (
    Arrival,
    Callback,
    CallPlan,
    DialEmergency,
    Finish,
    HandBack,
    RingCentre,
    Step,
)
from gateway.calls.inbound import EMERGENCY, OWNER, ROADSIDE, classify, e164, number_country
from gateway.errors import StoreError
from gateway.events import EMERGENCY_TYPES
from gateway.logs import call_sid_var
from gateway.security import twilio_signed
from gateway.steps import StepRecord
from gateway.views.common import (
    action_url,
    roadside_entitlement,
    twiml_response,
    unreachable_centres,
)
from gateway.whisper import ACCEPT_DIGIT, whisper_headline, whisper_summary

log = logging.getLogger(__name__)

bp = Blueprint("voice", __name__, url_prefix="/twilio/voice")

F = TypeVar("F", bound=Callable[..., Any])

#: the one database read a voice webhook may make waits at most this long
VOICE_READ_S = 0.3
#: a Fallback URL request for the first step comes this long after the call arrived
#: at most (Twilio's total webhook timeout)
TWILIO_WEBHOOK_TIMEOUT_S = 15


def _now() -> float:
    return services().clock()


def _language(*countries: str | None) -> str | None:
    plan = services().plan
    for country in countries:
        entry = plan.get(country) if plan is not None and country else None
        if entry is not None:
            return entry.language
    return None


def _lookup(steps: tuple[str, ...], *, caller: str | None = None,
            service: str = EMERGENCY) -> Any:
    """The one read: stored steps of this call (replays) and, for a new call, the
    caller's newest incident.  None when the database did not answer in time."""
    svc = services()
    since = dt.datetime.fromtimestamp(_now() - svc.settings.incident_window_s, tz=dt.UTC)
    types = (*EMERGENCY_TYPES, "on_call") if service == EMERGENCY else ("on_call",)
    try:
        return svc.store.voice_lookup(call_sid=request.form.get("CallSid", ""), steps=steps,
                                      msisdn=caller, since=since, types=types,
                                      timeout_s=VOICE_READ_S)
    except StoreError as exc:
        log.warning("database read skipped: %s", exc)
        return None


def _replayed(lookup: Any, step: str) -> Response | None:
    found = lookup.steps.get(step) if lookup is not None else None
    if found and found.get("twiml"):
        log.info("replaying step %s", step)
        return twiml_response(str(found["twiml"]))
    return None


def _policy() -> tuple[Any, Any, Mapping[str, str]]:
    svc = services()
    return svc.plan, svc.settings.voice, svc.settings.emergency_caller_ids


# -- arrival ------------------------------------------------------------------------------


def _arrival(service: str, *, to_country: str | None, caller: str | None,
             incident: Mapping[str, Any] | None, db_answered: bool, now: float) -> Arrival:
    """Where the car is and whose centres know it: the incident (whatever its status),
    else the called number's country, else the SIM's."""
    sim = number_country(caller)
    if incident is not None:
        home = incident.get("home_country") or sim
        where = incident.get("route_country") or to_country or sim
        reason = f"{incident['type']} incident, {incident['route_reason']}"
    else:
        home = sim
        where = to_country or sim
        reason = ("called number's country" if to_country
                  else "SIM country" if sim else "no country known")
        reason += "" if db_answered else " (database did not answer)"
    return Arrival(service=service, now=now, home=home, where=where, where_reason=reason,
                   incident_id=str(incident["id"]) if incident is not None else None,
                   caller_sid=request.form.get("CallSid", ""), language=_language(home, where),
                   down=unreachable_centres())


def _arrival_from_call(service: str, to_country: str | None, now: float) -> Arrival:
    """An arrival built from the call alone (the fail-safe and Fallback URL paths)."""
    caller = e164(request.form.get("From"))
    return _arrival(service, to_country=to_country, caller=caller, incident=None,
                    db_answered=False, now=now)


# -- rendering a step ---------------------------------------------------------------------


def render(step: Step, *, name: str,
           health: tuple[str, bool, str] | None = None,
           detail: Mapping[str, Any] | None = None, notices: tuple[str, ...] = ()) -> Response:
    """TwiML for ``step``; its record is queued for the background writer."""
    svc = services()
    call = step.plan
    status_url = action_url("voice.status", {"i": call.incident} if call.incident else None)
    command = callback = None
    decision: dict[str, Any]
    if isinstance(step, RingCentre):
        result = "voice.roadside_result" if call.service == ROADSIDE else "voice.dial_result"
        centre = step.centre.centre_id
        response = twiml.ring_centre(
            step, action_url=action_url(result, call.params(), centre=centre),
            whisper_url=action_url("voice.whisper", call.params(), centre=centre),
            status_url=status_url, notices=notices)
        decision = {"target": "centre", "number": step.number, "centre_id": centre}
    elif isinstance(step, DialEmergency):
        response = twiml.emergency_leg(
            step, action_url=action_url("voice.emergency_result", call.params()),
            status_url=status_url)
        decision = {"target": "emergency", "number": step.number}
    elif isinstance(step, HandBack):
        caller = e164(request.form.get("From"))
        response = twiml.hand_back(step, car_known=caller is not None)
        decision = {"target": "hand_back", "number": step.route.emergency_number}
        if caller is not None:
            command = {"key": f"handback:{call.caller or request.form.get('CallSid', '')}",
                       "command": "dial_emergency", "vin": None, "msisdn": caller,
                       "params": {"number": step.route.emergency_number,
                                  "country": step.route.country}}
    elif isinstance(step, Callback):
        response = twiml.say_and_hangup("callback", language=call.language or None)
        decision = {"target": "callback", "number": None}
        callback = {"call_sid": call.caller or request.form.get("CallSid", ""),
                    "number": e164(request.form.get("From")), "vin": None,
                    "incident_id": call.incident or None, "reason": step.reason[:300]}
    else:
        assert isinstance(step, Finish)
        response = twiml.hangup()
        decision = {"target": "none", "number": None}
    decision["reason"] = step.reason[:1000]
    body = str(response)
    call_sid = request.form.get("CallSid", "")
    if call_sid:
        svc.steps.submit(StepRecord(call_sid=call_sid, step=name,
                                    incident_id=call.incident or None, twiml=body,
                                    detail=dict(detail or {}), decision=decision,
                                    health=health, command=command, callback=callback))
    return twiml_response(body)


# -- never fail closed --------------------------------------------------------------------


def _failsafe_step(reason: str) -> Step:
    """The next step from what the request itself says, touching no database: an
    emergency call goes straight to its emergency legs, a roadside call to a callback."""
    plan, policy, caller_ids = _policy()
    call = CallPlan.from_params(request.args)
    service = _service_of_request()
    if not call.t0:
        inbound = classify(request.form.get("To"), plan)
        arrival = _arrival_from_call(service, inbound.country, _now())
        call = CallPlan(service=service, t0=int(arrival.now), home=arrival.home or "",
                        where=arrival.where or "", language=arrival.language or "",
                        caller=arrival.caller_sid)
    if service == ROADSIDE:
        return Callback(call, f"{reason}: callback")
    call = replace(call, service=EMERGENCY, k=len(call.lines))  # no more centre legs
    return call_plan.next_step(call, plan=plan, policy=policy, caller_ids=caller_ids,
                               now=_now(), why=reason)


def _service_of_request() -> str:
    """The call's service as far as this request has shown it: the number called (once
    classified), else the plan in the URL.  Unknown: an emergency (fail open)."""
    known = g.get("service")
    if known is not None:
        return ROADSIDE if known in (ROADSIDE, OWNER) else EMERGENCY
    return ROADSIDE if request.args.get("s") == "r" else EMERGENCY


def caller_leg(view: F) -> F:
    """Any exception on the caller's leg still answers with a route to a person."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        token = call_sid_var.set(request.form.get("CallSid"))
        try:
            try:
                return view(*args, **kwargs)
            except Exception:
                log.exception("voice step failed; answering from the URL alone")
            try:
                step = _failsafe_step("handler error")
                return render(step, name=f"failsafe:{request.path.rsplit('/', 1)[-1]}")
            except Exception:
                log.exception("fail-safe answer failed; answering with the last resort")
            if _service_of_request() == ROADSIDE:  # never an emergency number
                _submit_last_resort_callback()
                return twiml_response(twiml.say_and_hangup("callback", language=None))
            return twiml_response(twiml.LAST_RESORT)
        finally:
            call_sid_var.reset(token)

    return cast(F, wrapper)


def _submit_last_resort_callback() -> None:
    call_sid = request.form.get("CallSid", "")
    try:
        services().steps.submit(StepRecord(
            call_sid=call_sid, step="last-resort", incident_id=None, twiml="", detail={},
            callback={"call_sid": call_sid, "number": e164(request.form.get("From")),
                      "vin": None, "incident_id": None, "reason": "handler error"}))
    except Exception:
        log.exception("could not queue the callback")


def agent_leg(view: F) -> F:
    """The agent's leg: on error bridge a person who pressed the key (or who is being
    whispered to), never dial anything from it."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        token = call_sid_var.set(request.form.get("CallSid"))
        try:
            return view(*args, **kwargs)
        except Exception:
            log.exception("agent-leg step failed; bridging the agent")
            return twiml_response(twiml.AGENT_LEG_BRIDGE)
        finally:
            call_sid_var.reset(token)

    return cast(F, wrapper)


# -- the caller's leg ---------------------------------------------------------------------


@bp.post("")
@twilio_signed
@caller_leg
def incoming() -> Response:
    """The Voice URL of every gateway number: the number called says what the call is."""
    plan, policy, caller_ids = _policy()
    inbound = classify(request.form.get("To"), plan)
    g.service = inbound.service
    caller = e164(request.form.get("From"))
    if inbound.service == OWNER:
        from gateway.views import ivr

        return ivr.start(call_sid=request.form.get("CallSid", ""), caller=caller)
    lookup = _lookup(("voice",), caller=caller, service=inbound.service)
    replay = _replayed(lookup, "voice")
    if replay is not None:
        return replay
    arrival = _arrival(inbound.service, to_country=inbound.country, caller=caller,
                       incident=lookup.incident if lookup is not None else None,
                       db_answered=lookup is not None, now=_now())
    step = call_plan.start(arrival, plan=plan, policy=policy, caller_ids=caller_ids)
    notices: tuple[str, ...] = ()
    if inbound.service == ROADSIDE and lookup is not None and lookup.incident is not None:
        entitlement = roadside_entitlement(lookup.incident.get("vin"), timeout_s=VOICE_READ_S)
        if entitlement is not None and not entitlement.included:
            notices = ("ivr_costs_apply",)
    return render(step, name="voice", notices=notices,
                  detail={"to_known": inbound.known, "notices": list(notices)})


def _centre_result(*, roadside: bool) -> Response:
    plan, policy, caller_ids = _policy()
    call = CallPlan.from_params(request.args)
    name = f"{'roadside' if roadside else 'dial'}-result:{call.k}"
    accept = f"accept:{call.k}"
    lookup = _lookup((name, accept))
    replay = _replayed(lookup, name)
    if replay is not None:
        return replay
    status = request.form.get("DialCallStatus", "")
    accepted = None if lookup is None else accept in lookup.steps
    answered = call_plan.centre_answered(status, request.form.get("DialBridged"), accepted)
    outcome = f"centre leg {call.k}: {status or 'no status'}"
    if status in ("completed", "answered") and not answered:
        outcome += " but no agent accepted (voicemail or no key pressed)"
    centre = request.args.get("centre", "")
    health = None
    if centre and (answered or status in ("busy", "no-answer", "failed", "completed",
                                          "answered")):
        health = (centre, answered, outcome)
    step = call_plan.advance(call, answered=answered, outcome=outcome, plan=plan,
                             policy=policy, caller_ids=caller_ids, now=_now())
    return render(step, name=name, health=health, detail={"dial_status": status})


@bp.post("/dial-result")
@twilio_signed
@caller_leg
def dial_result() -> Response:
    """A centre leg ended: done if an agent took the call, else the plan's next leg."""
    return _centre_result(roadside=False)


@bp.post("/roadside-result")
@twilio_signed
@caller_leg
def roadside_result() -> Response:
    """A roadside leg ended: done, the next roadside line, or a callback."""
    return _centre_result(roadside=True)


@bp.post("/emergency-result")
@twilio_signed
@caller_leg
def emergency_result() -> Response:
    """An emergency leg ended: done if it connected, else the next leg or the hand-back."""
    plan, policy, caller_ids = _policy()
    call = CallPlan.from_params(request.args)
    name = f"emergency-result:{call.e}"
    replay = _replayed(_lookup((name,)), name)
    if replay is not None:
        return replay
    status = request.form.get("DialCallStatus", "")
    step = call_plan.advance(call, answered=call_plan.emergency_answered(status),
                             outcome=f"emergency leg {call.e}: {status or 'no status'}",
                             plan=plan, policy=policy, caller_ids=caller_ids, now=_now())
    return render(step, name=name, detail={"dial_status": status})


@bp.post("/fallback")
@twilio_signed
@caller_leg
def fallback() -> Response:
    """Twilio's Fallback URL: our answer failed.  Decided from the request alone (the
    failed step's URL carries the plan); never touches the database."""
    plan, policy, caller_ids = _policy()
    error_url = urlsplit(request.form.get("ErrorUrl", ""))
    call = CallPlan.from_params({k: v[0] for k, v in parse_qs(error_url.query).items()})
    code = request.form.get("ErrorCode", "") or "?"
    log.warning("fallback URL requested (ErrorCode %s)", code)
    inbound = classify(request.form.get("To"), plan)
    g.service = ROADSIDE if call.t0 and call.service == ROADSIDE else inbound.service
    name = f"fallback:{error_url.path.rsplit('/', 1)[-1]}:{call.k}:{call.e}"
    why = f"Twilio fallback (error {code})"
    if not call.t0:  # the first step failed: Twilio waited up to its whole timeout
        service = ROADSIDE if inbound.service in (ROADSIDE, OWNER) else EMERGENCY
        now = _now()
        arrival = replace(_arrival_from_call(service, inbound.country, now),
                          now=now - TWILIO_WEBHOOK_TIMEOUT_S)
        return render(call_plan.start(arrival, plan=plan, policy=policy, caller_ids=caller_ids,
                                      now=now), name=name, detail={"why": why})
    status = request.form.get("DialCallStatus", "")
    if error_url.path.endswith("/emergency-result"):
        answered = call_plan.emergency_answered(status)
    else:
        answered = call_plan.centre_answered(status, request.form.get("DialBridged"), None)
    step = call_plan.advance(call, answered=answered, outcome=f"{why}; {status or 'no status'}",
                             plan=plan, policy=policy, caller_ids=caller_ids, now=_now())
    return render(step, name=name, detail={"why": why})


# -- the agent's leg ----------------------------------------------------------------------


def _incident(incident_id: str) -> Mapping[str, Any] | None:
    if not incident_id:
        return None
    try:
        found: Mapping[str, Any] | None = services().store.incident(
            incident_id, timeout_s=VOICE_READ_S)
        return found
    except StoreError:
        log.warning("incident unavailable for the whisper")
        return None


@bp.post("/whisper")
@twilio_signed
@agent_leg
def whisper() -> Response:
    """Played to the agent before the bridge: the headline, then press 1 to accept."""
    svc = services()
    call = CallPlan.from_params(request.args)
    incident = _incident(call.incident)
    headline = whisper_headline(incident, service=call.service, plan=svc.plan,
                                sim_country=call.home or None)
    if call.service == ROADSIDE and incident is not None:  # not on the emergency clock
        entitlement = roadside_entitlement(incident.get("vin"), timeout_s=VOICE_READ_S)
        if entitlement is not None:
            headline += " " + entitlement.reason
    response = twiml.whisper(
        headline,
        accept_url=action_url("voice.whisper_accept", call.params(),
                              centre=request.args.get("centre", "")),
        timeout_s=svc.settings.voice.whisper_accept_timeout_s,
    )
    return twiml_response(response)


@bp.post("/whisper/accept")
@twilio_signed
@agent_leg
def whisper_accept() -> Response:
    """The agent's key: 1 records the acceptance, says the details and bridges."""
    svc = services()
    call = CallPlan.from_params(request.args)
    if request.form.get("Digits", "") != ACCEPT_DIGIT:
        return twiml_response(twiml.whisper_result(False))
    parent = call.caller or request.form.get("ParentCallSid", "")
    leg = call.k or int(request.args.get("n", "0") or 0)  # the IVR counts its legs in n
    if parent:
        svc.steps.submit(StepRecord(
            call_sid=parent, step=f"accept:{leg}", incident_id=call.incident or None,
            twiml="", detail={"agent_call_sid": request.form.get("CallSid", ""),
                              "centre": request.args.get("centre", "")}))
    incident = _incident(call.incident)
    details = whisper_summary(incident, plan=svc.plan, sim_country=call.home or None)
    return twiml_response(twiml.whisper_result(True, details=details))


@bp.post("/status")
@twilio_signed
@agent_leg
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
        }, timeout_s=1.0)
    except StoreError:
        log.error("could not record a status callback")
        return Response("database unavailable\n", status=503, mimetype="text/plain")
    return twiml_response(twiml.empty())
