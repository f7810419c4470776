"""The owners' IVR: roadside help, remote unlock, theft report, reactivation, an agent.

Calls to an ``owner`` number of the plan's ``inbound.csv`` land here (the number called
says the service: the car's SOS and crash calls go to an emergency number).  The vehicle is found by
the caller's registered number, or by the customer number typed on the keypad.  PINs
arrive as ``Digits`` in the request body: they are passed to the registry and never
written to a URL, a log line, the TwiML or the database.  Any failure here puts the
caller through to an agent; never to the emergency number (that is the SOS button's).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar, cast

from flask import Blueprint, Response, request
from twilio.twiml.voice_response import VoiceResponse

from gateway import prompts, twiml
from gateway.errors import StoreError
from gateway.logs import call_sid_var
from gateway.owners.car_commands import CommandRequest, CommandServiceMissingError
from gateway.routing import DialCentre, next_centre_attempt, sim_country
from gateway.security import twilio_signed
from gateway.views.common import (
    UrlState,
    action_url,
    dial_outcome,
    entitlement_of,
    record_callback_safely,
    twiml_response,
    unreachable_centres,
)
from gateway.views.context import services

log = logging.getLogger(__name__)

bp = Blueprint("ivr", __name__, url_prefix="/twilio/ivr")

F = TypeVar("F", bound=Callable[..., Any])

MENU = {"1": "roadside", "2": "unlock", "3": "theft", "4": "reactivate", "0": "agent"}
MAX_REPLAYS = 2
TOPICS = {
    "roadside": "Roadside assistance request",
    "theft": "Owner reports the car stolen",
    "agent": "Owner asked for an agent",
    "unlock": "Owner wants the car unlocked; the remote unlock did not complete",
    "reactivate": "Owner wants the immobilised car reactivated",
    "pin-locked": "PIN entry locked after repeated wrong PINs",
    "error": "The automated menu failed; the owner needs help",
}


@dataclass(frozen=True)
class IvrState(UrlState):
    v: str = ""  # VIN, once known
    lang: str = ""  # <Say> language
    h: str = ""  # country whose centre takes the call
    want: str = ""  # what the caller chose (MENU value)
    r: int = 0  # replays / retries of the current prompt
    n: int = 0  # agent attempts made (the whisper-accept handler keys on it)
    p: str = ""  # the caller's CallSid
    topic: str = ""  # what the agent is told


def _state() -> IvrState:
    return IvrState.parse(request.args)


def _language_for(country: str | None, vehicle: Any = None) -> str:
    if vehicle is not None and vehicle.language:
        return str(vehicle.language)
    plan = services().plan
    entry = plan.get(country) if plan is not None and country else None
    return entry.language if entry is not None else prompts.FALLBACK_LANGUAGE


def fail_to_agent(view: F) -> F:
    """Any exception: put the caller through to an agent (or say how to get help)."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        call_sid_var.set(request.form.get("CallSid"))
        try:
            return view(*args, **kwargs)
        except Exception:
            log.exception("IVR step failed; putting the caller through to an agent")
        try:
            state = replace(_state(), topic="error")
            return connect_agent(state, topic="error", record=False)
        except Exception:
            log.exception("IVR fallback failed")
            response = VoiceResponse()
            response.say("Sorry, we cannot take your call right now. In an emergency, "
                          "hang up and dial 1 1 2.", language=prompts.FALLBACK_LANGUAGE)
            response.hangup()
            return twiml_response(response)

    return cast(F, wrapper)


#: how long a replay waits for the first request of the same step to answer
REPLAY_WAIT_S = 4.0


def replay_safe(view: F) -> F:
    """Each IVR step happens once per call: the step (``CallSid`` + endpoint + its URL
    state) is claimed before anything is done; a replay (Twilio's retry, or a captured
    request sent again) gets the stored TwiML and sends nothing, feeds nothing again."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        store = services().store
        call_sid = request.form.get("CallSid", "")
        digest = hashlib.sha256(request.query_string).hexdigest()[:16]
        step = f"ivr:{request.endpoint}:{digest}"
        try:
            first, stored = store.claim_step(call_sid, step)
        except StoreError:
            log.warning("IVR step %s not claimed (database); answering without replay guard",
                        step)
            return view(*args, **kwargs)
        deadline = time.monotonic() + REPLAY_WAIT_S
        while not first and stored is None and time.monotonic() < deadline:
            time.sleep(0.2)  # the first request of this step is still at work
            try:
                stored = (store.call_step(call_sid, step) or {}).get("twiml")
            except StoreError:
                break
        if not first:
            log.info("replayed IVR step %s", request.endpoint)
            if stored is not None:
                return twiml_response(stored)
            response = VoiceResponse()  # still at work: come back for its answer
            response.pause(length=1)
            response.redirect(services().settings.public_url + request.full_path.rstrip("?"),
                              method="POST")
            return twiml_response(response)
        answer = view(*args, **kwargs)
        try:
            store.finish_step(call_sid, step, answer.get_data(as_text=True))
        except StoreError:
            log.error("IVR step %s answered but not stored", request.endpoint)
        return answer

    return cast(F, wrapper)


def _vehicle(vin: str) -> Any:
    return services().vehicles.get(vin) if vin else None


def menu(state: IvrState, *, notice: str | None = None) -> Response:
    keys = ((notice,) if notice else ()) + ("ivr_menu",)
    return twiml_response(twiml.gather(keys, action_url=action_url("ivr.choose", state), language=state.lang,
                             no_input_url=action_url("ivr.replay", state)))


def start(*, call_sid: str, caller: str | None) -> Response:
    """The first answer to an owner's call (called from the Voice URL handler)."""
    svc = services()
    vehicle = None
    if caller:
        try:
            owned = svc.vehicles.by_owner_phone(caller)
        except StoreError:
            owned = []
        vehicle = owned[0] if len(owned) == 1 else None
    country = vehicle.market if vehicle is not None else sim_country(caller)
    state = IvrState(v=vehicle.vin if vehicle else "", lang=_language_for(country, vehicle),
                     h=country or "", p=call_sid)
    return menu(state)


@bp.post("/replay")
@twilio_signed
@replay_safe
@fail_to_agent
def replay() -> Response:
    """No key pressed: say the menu again, then hand over to an agent."""
    state = _state()
    if state.r >= MAX_REPLAYS:
        return connect_agent(state, topic="agent")
    return menu(replace(state, r=state.r + 1))


@bp.post("/choose")
@twilio_signed
@replay_safe
@fail_to_agent
def choose() -> Response:
    state = replace(_state(), r=0)
    want = MENU.get(request.form.get("Digits", ""))
    if want is None:
        return menu(state, notice="ivr_invalid")
    state = replace(state, want=want)
    if want in ("theft", "agent"):
        if want == "theft" and state.v:
            services().vehicles.record(state.v, actor=_actor(), action="theft_reported",
                                       detail={"channel": "ivr"})
        return connect_agent(state, topic=want)
    if not state.v:
        return _ask_customer_number(state)
    return _continue(state)


def _ask_customer_number(state: IvrState) -> Response:
    return twiml_response(twiml.gather(("ivr_identify",), action_url=action_url("ivr.identify", state),
                             language=state.lang, num_digits=8,
                             no_input_url=action_url("ivr.replay", state)))


@bp.post("/identify")
@twilio_signed
@replay_safe
@fail_to_agent
def identify() -> Response:
    state = _state()
    vehicle = services().vehicles.by_lookup_code(request.form.get("Digits", ""))
    if vehicle is None:
        if state.r + 1 >= 3:
            return connect_agent(state, topic=state.want or "agent")
        retry = replace(state, r=state.r + 1)
        return twiml_response(twiml.gather(("ivr_unknown_vehicle", "ivr_identify"),
                                 action_url=action_url("ivr.identify", retry), language=state.lang,
                                 num_digits=8, no_input_url=action_url("ivr.replay", retry)))
    state = replace(state, v=vehicle.vin, r=0, h=vehicle.market,
                    lang=_language_for(vehicle.market, vehicle))
    return _continue(state)


def _continue(state: IvrState) -> Response:
    if state.want == "roadside":
        return roadside(state)
    return _ask_pin(state)


def _ask_pin(state: IvrState, *, notice: str | None = None) -> Response:
    keys = ((notice,) if notice else ()) + ("ivr_pin",)
    return twiml_response(twiml.gather(keys, action_url=action_url("ivr.pin", state), language=state.lang,
                             num_digits=None, finish_on_key="#", timeout_s=10,
                             no_input_url=action_url("ivr.replay", state)))


def _actor() -> str:
    return f"ivr:{request.form.get('CallSid', 'unknown')}"


@bp.post("/pin")
@twilio_signed
@replay_safe
@fail_to_agent
def pin() -> Response:
    """Check the PIN, then unlock or reactivate.  The digits go nowhere else.

    Both commands go through :class:`~gateway.owners.car_commands.CarCommands`: the
    caller hears "done" only for the car's confirmation, "sent" when the vehicle
    command service took it, and is put through to an agent otherwise."""
    svc = services()
    state = _state()
    digits = request.form.get("Digits", "")
    reactivation = None
    try:
        if state.want == "reactivate":
            reactivation = svc.car_commands.reactivate(state.v, actor=_actor(), pin=digits)
            check = reactivation.check
        else:
            if svc.car_commands.queue.commands is None:
                raise CommandServiceMissingError("GATEWAY_VEHICLE_COMMAND_URL is not set")
            check = svc.vehicles.verify_pin(state.v, digits, actor=_actor())
    except CommandServiceMissingError:
        log.error("no vehicle command service configured (GATEWAY_VEHICLE_COMMAND_URL)")
        return connect_agent(state, topic=state.want, notice="ivr_car_unreachable")
    finally:
        del digits
    svc.metrics.pin_attempts.labels(check.outcome).inc()
    if check.outcome == "wrong" and check.locked_until is None:
        return _ask_pin(replace(state, r=state.r + 1), notice="ivr_pin_wrong")
    if check.outcome in ("wrong", "locked"):
        return connect_agent(state, topic="pin-locked", notice="ivr_pin_locked", announce=None)
    if check.outcome == "not_set":
        return connect_agent(state, topic=state.want)
    if reactivation is not None:
        if reactivation.request is None:
            return twiml_response(twiml.say_and_hangup("ivr_not_immobilised", language=state.lang))
        return _after_command(state, reactivation.request, done_key="ivr_reactivated",
                              sent_key="ivr_reactivation_sent")
    relock = svc.settings.unlock_relock_s
    sent = svc.car_commands.unlock(state.v, actor=_actor(), call=request.form.get("CallSid", ""),
                                   relock_after_s=relock)
    return _after_command(state, sent, done_key="ivr_unlocked", sent_key="ivr_unlock_sent",
                          values={"seconds": str(relock)})


def _after_command(state: IvrState, sent: CommandRequest, *, done_key: str, sent_key: str,
                   values: dict[str, str] | None = None) -> Response:
    """Confirmed by the car: ``done_key``; taken by the command service: ``sent_key``;
    otherwise (unreachable, rejected, cancelled) an agent takes over."""
    if sent.status == "confirmed":
        return _done(state, done_key, values)
    if sent.status == "sent":
        return _done(state, sent_key, values)
    log.warning("vehicle command %s not taken by the car: %s (%s)", sent.row["command"],
                sent.status, sent.row["last_error"])
    return connect_agent(state, topic=state.want, notice="ivr_car_unreachable")


def _done(state: IvrState, done_key: str, values: dict[str, str] | None = None) -> Response:
    """What became of the command: say it twice, then goodbye."""
    response = VoiceResponse()
    text, lang = prompts.say(done_key, state.lang, **(values or {}))
    response.say(text, language=lang)
    response.pause(length=1)
    response.say(text, language=lang)
    bye, lang = prompts.say("goodbye", state.lang)
    response.say(bye, language=lang)
    response.hangup()
    return twiml_response(response)


def roadside(state: IvrState) -> Response:
    vehicle = _vehicle(state.v)
    notices: tuple[str, ...] = ()
    if vehicle is not None and not entitlement_of(vehicle).included:
        notices = ("ivr_costs_apply",)
    return connect_agent(state, topic="roadside", notices=notices, announce=None)


def connect_agent(state: IvrState, *, topic: str, notice: str | None = None,
                  notices: tuple[str, ...] = (), announce: str | None = "ivr_agent",
                  record: bool = True) -> Response:
    """Ring the centre (roadside line for roadside); a callback if none can be reached."""
    svc = services()
    attempt = state.n + 1
    choice = next_centre_attempt(
        home_country=state.h or None, route_country=None, attempt=attempt, elapsed_s=0.0,
        policy=svc.settings.voice, plan=svc.plan, unreachable=unreachable_centres(),
        roadside=topic == "roadside")
    if not isinstance(choice, DialCentre):
        return callback(state, reason=f"{topic}: {choice}", record=record)
    next_state = replace(state, n=attempt, topic=topic,
                         p=state.p or request.form.get("CallSid", ""))
    centre = choice.centre.centre_id
    response = twiml.dial_centre(
        choice,
        action_url=action_url("ivr.agent_result", next_state, centre=centre),
        whisper_url=action_url("ivr.whisper", next_state, centre=centre),
        status_url=action_url("voice.status", None, centre=centre),
        caller_id=None, language=state.lang, first=attempt == 1,
        notices=((notice,) if notice else ()) + notices,
        announce=announce if attempt == 1 else None)
    return twiml_response(response)


def callback(state: IvrState, *, reason: str, record: bool = True) -> Response:
    """No agent can be reached: record a callback and say so (never the emergency number)."""
    if record:
        record_callback_safely(call_sid=state.p, vin=state.v or None, incident_id=None,
                               reason=reason)
    return twiml_response(twiml.say_and_hangup("callback", language=state.lang))


@bp.post("/agent-result")
@twilio_signed
@replay_safe
@fail_to_agent
def agent_result() -> Response:
    state = _state()
    answered, _ = dial_outcome(state.n, kind="ivr")
    if answered:
        return twiml_response(twiml.hangup())
    return connect_agent(state, topic=state.topic or "agent", announce=None)


@bp.post("/whisper")
@twilio_signed
@replay_safe
@fail_to_agent
def whisper() -> Response:
    state = _state()
    parts = [TOPICS.get(state.topic, "Owner call") + "."]
    vehicle = _vehicle(state.v)
    if vehicle is not None:
        parts.append(f"Vehicle ending {' '.join(vehicle.vin[-6:])}, owner {vehicle.owner_name}, "
                     f"market {vehicle.market}.")
        if state.topic == "roadside":
            parts.append(entitlement_of(vehicle).reason)
        if vehicle.immobilised:
            parts.append("The car is immobilised.")
    else:
        parts.append("The caller's vehicle is not identified.")
    return twiml_response(twiml.whisper(" ".join(parts),
                              accept_url=action_url("voice.whisper_accept", state,
                                              centre=request.args.get("centre", "")),
                              timeout_s=services().settings.voice.whisper_accept_timeout_s))

