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

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qs, urlsplit

from flask import Blueprint, Response, g, request

from gateway import twiml
from gateway.calls import call_plan
from gateway.calls.call_plan import (
    CallPlan,
)
from gateway.calls.inbound import EMERGENCY, OWNER, ROADSIDE, classify, e164
from gateway.errors import StoreError
from gateway.security import twilio_signed
from gateway.steps import StepRecord
from gateway.views.call_steps import (
    TWILIO_WEBHOOK_TIMEOUT_S,
    VOICE_READ_S,
    agent_leg,
    arrival_from_call,
    arrival_of,
    caller_leg,
    clock_now,
    plan_inputs,
    read_once,
    render,
    replayed,
)
from gateway.views.common import (
    action_url,
    roadside_entitlement,
    twiml_response,
)
from gateway.views.context import services
from gateway.whisper import ACCEPT_DIGIT, whisper_headline, whisper_summary

log = logging.getLogger(__name__)

bp = Blueprint("voice", __name__, url_prefix="/twilio/voice")

# -- the caller's leg ---------------------------------------------------------------------


@bp.post("")
@twilio_signed
@caller_leg
def incoming() -> Response:
    """The Voice URL of every gateway number: the number called says what the call is."""
    plan, policy, caller_ids = plan_inputs()
    inbound = classify(request.form.get("To"), plan)
    g.service = inbound.service
    caller = e164(request.form.get("From"))
    if inbound.service == OWNER:
        from gateway.views import ivr

        return ivr.start(call_sid=request.form.get("CallSid", ""), caller=caller)
    lookup = read_once(("voice",), caller=caller, service=inbound.service)
    replay = replayed(lookup, "voice")
    if replay is not None:
        return replay
    arrival = arrival_of(inbound.service, to_country=inbound.country, caller=caller,
                       incident=lookup.incident if lookup is not None else None,
                       db_answered=lookup is not None, now=clock_now())
    step = call_plan.start(arrival, plan=plan, policy=policy, caller_ids=caller_ids)
    notices: tuple[str, ...] = ()
    if inbound.service == ROADSIDE and lookup is not None and lookup.incident is not None:
        entitlement = roadside_entitlement(lookup.incident.get("vin"), timeout_s=VOICE_READ_S)
        if entitlement is not None and not entitlement.included:
            notices = ("ivr_costs_apply",)
    return render(step, name="voice", notices=notices,
                  detail={"to_known": inbound.known, "notices": list(notices)})


def _centre_result(*, roadside: bool) -> Response:
    plan, policy, caller_ids = plan_inputs()
    call = CallPlan.from_params(request.args)
    name = f"{'roadside' if roadside else 'dial'}-result:{call.k}"
    accept = f"accept:{call.k}"
    lookup = read_once((name, accept))
    replay = replayed(lookup, name)
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
                             policy=policy, caller_ids=caller_ids, now=clock_now())
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
    plan, policy, caller_ids = plan_inputs()
    call = CallPlan.from_params(request.args)
    name = f"emergency-result:{call.e}"
    replay = replayed(read_once((name,)), name)
    if replay is not None:
        return replay
    status = request.form.get("DialCallStatus", "")
    step = call_plan.advance(call, answered=call_plan.emergency_answered(status),
                             outcome=f"emergency leg {call.e}: {status or 'no status'}",
                             plan=plan, policy=policy, caller_ids=caller_ids, now=clock_now())
    return render(step, name=name, detail={"dial_status": status})


@bp.post("/fallback")
@twilio_signed
@caller_leg
def fallback() -> Response:
    """Twilio's Fallback URL: our answer failed.  Decided from the request alone (the
    failed step's URL carries the plan); never touches the database."""
    plan, policy, caller_ids = plan_inputs()
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
        now = clock_now()
        arrival = replace(arrival_from_call(service, inbound.country, now),
                          now=now - TWILIO_WEBHOOK_TIMEOUT_S)
        return render(call_plan.start(arrival, plan=plan, policy=policy, caller_ids=caller_ids,
                                      now=now), name=name, detail={"why": why})
    status = request.form.get("DialCallStatus", "")
    if error_url.path.endswith("/emergency-result"):
        answered = call_plan.emergency_answered(status)
    else:
        answered = call_plan.centre_answered(status, request.form.get("DialBridged"), None)
    step = call_plan.advance(call, answered=answered, outcome=f"{why}; {status or 'no status'}",
                             plan=plan, policy=policy, caller_ids=caller_ids, now=clock_now())
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
