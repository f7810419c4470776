"""How a caller-leg step is read and answered: the one bounded read, the arrival, the
rendering of a call-plan step (and its queued record), and the failure wrappers.

:mod:`gateway.views.voice` holds the webhooks; this module is what they share.  Every
caller-leg answer goes through :func:`render`; every caller-leg view is wrapped by
:func:`caller_leg` (never fail closed) and every agent-leg view by :func:`agent_leg`.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, TypeVar, cast

from flask import Response, g, request

from gateway import logs, twiml
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
    TestCallEnd,
)
from gateway.calls.inbound import EMERGENCY, OWNER, ROADSIDE, classify, e164, number_country
from gateway.errors import StoreError
from gateway.events import EMERGENCY_TYPES
from gateway.logs import call_sid_var
from gateway.steps import StepRecord
from gateway.views.common import (
    action_url,
    encode_query,
    endpoint_url,
    twiml_response,
    unreachable_centres,
)
from gateway.views.context import services

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

#: the one database read a voice webhook may make waits at most this long
VOICE_READ_S = 0.3
#: a Fallback URL request for the first step comes this long after the call arrived
#: at most (Twilio's total webhook timeout)
TWILIO_WEBHOOK_TIMEOUT_S = 15


def clock_now() -> float:
    return services().clock()


def language_of(*countries: str | None) -> str | None:
    plan = services().plan
    for country in countries:
        entry = plan.get(country) if plan is not None and country else None
        if entry is not None:
            return entry.language
    return None


def read_once(steps: tuple[str, ...], *, caller: str | None = None,
            service: str = EMERGENCY) -> Any:
    """The one read: stored steps of this call (replays) and, for a new call, the
    caller's newest incident.  None when the database did not answer in time."""
    svc = services()
    since = dt.datetime.fromtimestamp(clock_now() - svc.settings.incident_window_s, tz=dt.UTC)
    types = (*EMERGENCY_TYPES, "on_call") if service == EMERGENCY else ("on_call",)
    try:
        return svc.store.voice_lookup(call_sid=request.form.get("CallSid", ""), steps=steps,
                                      msisdn=caller, since=since, types=types,
                                      timeout_s=VOICE_READ_S, replay_first=True)
    except StoreError as exc:
        log.warning("database read skipped: %s", exc)
        return None


def replayed(lookup: Any, step: str) -> Response | None:
    found = lookup.steps.get(step) if lookup is not None else None
    if found and found.get("twiml"):
        log.debug("replaying step %s", step)
        return twiml_response(str(found["twiml"]))
    return None


def plan_inputs() -> tuple[Any, Any, Mapping[str, str]]:
    svc = services()
    return svc.plan, svc.settings.voice, svc.settings.emergency_caller_ids


# -- arrival ------------------------------------------------------------------------------


def arrival_of(service: str, *, to_country: str | None, caller: str | None,
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
                   caller_sid=request.form.get("CallSid", ""), language=language_of(home, where),
                   down=unreachable_centres(), test_call=_recent_test_call(incident, now))


#: an eCall test call's data message marks the car's call as a test only this long: a
#: real emergency call soon after, without a new data message, is a real emergency
TEST_CALL_WINDOW_S = 300


def _recent_test_call(incident: Mapping[str, Any] | None, now: float) -> bool:
    if incident is None or not incident.get("test_call"):
        return False
    received = incident.get("received_at")
    if not isinstance(received, dt.datetime):
        return False
    if received.tzinfo is None:
        received = received.replace(tzinfo=dt.UTC)
    return 0 <= now - received.timestamp() <= TEST_CALL_WINDOW_S


def arrival_from_call(service: str, to_country: str | None, now: float) -> Arrival:
    """An arrival built from the call alone (the fail-safe and Fallback URL paths)."""
    caller = e164(request.form.get("From"))
    return arrival_of(service, to_country=to_country, caller=caller, incident=None,
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
        query = encode_query({**call.params(), "centre": centre})  # both URLs carry it
        response = twiml.ring_centre(
            step, action_url=f"{endpoint_url(result)}{query}",
            whisper_url=f"{endpoint_url('voice.whisper')}{query}",
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
    elif isinstance(step, TestCallEnd):
        response = twiml.say_and_hangup("test_call_end", language=call.language or None)
        decision = {"target": "test_end", "number": None}
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
    target = "finish" if isinstance(step, Finish) else str(decision["target"])
    g.webhook_outcome = target
    if svc.metrics is not None:
        svc.metrics.voice_step(target, name, hand_back=None if not isinstance(step, HandBack)
                               else "emergency_unanswered" if step.route.dials else "no_route")
    logs.bind(incident_id=call.incident)
    body = twiml.to_xml(response)
    call_sid = request.form.get("CallSid", "")
    if call_sid:
        svc.steps.submit(StepRecord(call_sid=call_sid, step=name,
                                    incident_id=call.incident or None, twiml=body,
                                    detail=dict(detail or {}), decision=decision,
                                    health=health, command=command, callback=callback))
    return twiml_response(body)


# -- never fail closed --------------------------------------------------------------------


def failsafe_step(reason: str) -> Step:
    """The next step from what the request itself says, touching no database: an
    emergency call goes straight to its emergency legs, a roadside call to a callback."""
    plan, policy, caller_ids = plan_inputs()
    call = CallPlan.from_params(request.args)
    service = service_of_request()
    if not call.t0:
        inbound = classify(request.form.get("To"), plan)
        arrival = arrival_from_call(service, inbound.country, clock_now())
        call = CallPlan(service=service, t0=int(arrival.now), home=arrival.home or "",
                        where=arrival.where or "", language=arrival.language or "",
                        caller=arrival.caller_sid)
    if service == ROADSIDE:
        return Callback(call, f"{reason}: callback")
    call = replace(call, service=EMERGENCY, k=len(call.lines))  # no more centre legs
    return call_plan.next_step(call, plan=plan, policy=policy, caller_ids=caller_ids,
                               now=clock_now(), why=reason)


def service_of_request() -> str:
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
                answer = view(*args, **kwargs)
                if g.get("webhook_outcome") is None:
                    # a caller-leg view answers without render() only with a replay (the
                    # stored TwiML) or, for an owner number, the IVR
                    g.webhook_outcome = "ivr" if g.get("service") == OWNER else "replay"
                return answer
            except Exception:
                log.exception("voice step failed; answering from the URL alone")
            try:
                step = failsafe_step("handler error")
                answer = render(step, name=f"failsafe:{request.path.rsplit('/', 1)[-1]}")
                g.webhook_outcome = "failsafe"
                _count_fallback("handler_error")
                return answer
            except Exception:
                log.exception("fail-safe answer failed; answering with the last resort")
            g.webhook_outcome = "last_resort"
            _count_fallback("last_resort")
            if request.args.get("x") == "1":  # a test call never reaches 112
                return twiml_response(twiml.say_and_hangup("test_call_end", language=None))
            if service_of_request() == ROADSIDE:  # never an emergency number
                submit_last_resort_callback()
                return twiml_response(twiml.say_and_hangup("callback", language=None))
            return twiml_response(twiml.LAST_RESORT)
        finally:
            call_sid_var.reset(token)

    return cast(F, wrapper)


def _count_fallback(reason: str) -> None:
    """For the wrappers: counting never stands in the way of the answer."""
    try:
        services().metrics.fallback(reason)
    except Exception:
        log.exception("fallback not counted")


def submit_last_resort_callback() -> None:
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
            g.webhook_outcome = "failsafe"
            _count_fallback("agent_leg_error")
            return twiml_response(twiml.AGENT_LEG_BRIDGE)
        finally:
            call_sid_var.reset(token)

    return cast(F, wrapper)
