"""The policy of a car's call, in one place: plan the legs at arrival, then advance.

A call to an emergency number gets these legs, decided once when it arrives:

1. the assistance-centre lines serving the car's home country, then those serving the
   country where the car is, the catch-all centres last; each line at most once, lines
   known down (their own dial outcomes) left out;
2. the emergency route of the country where the car is: the operator's PSAP/TPS long
   number first, then the local short number where Twilio can place emergency calls
   from a caller ID of that country (``numbers/twilio_emergency.csv``);
3. the hand-back: the car is told to dial the local emergency number itself.

Time is counted as the caller lives it, from arrival.  A centre leg costs its prompt
(speech at :data:`SPEECH_WORDS_PER_S`), its ring time plus Twilio's slack, and, when an
ACD or voicemail picks up, the whisper and the agent's accept window.  A centre leg
starts only if that worst case ends by ``t0 + emergency_deadline_s``, so the first
emergency leg starts by then whatever the centre does.  Every emergency ``<Dial>`` has
an explicit ring timeout.

A call to a roadside number rings the same lines' roadside numbers and ends in a
callback: it never dials an emergency number.

The plan travels in the signed action URLs (:meth:`CallPlan.params`); each webhook is
``advance(plan, outcome) -> step``.  Nothing here reads the database or Flask.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

from gateway import prompts
from gateway.calls.inbound import EMERGENCY, ROADSIDE
from gateway.config import VoicePolicy
from gateway.plan import DEFAULT_EMERGENCY, Centre, NumberPlan
from gateway.whisper import WHISPER_MAX_WORDS

#: how fast <Say> speaks, for the time budget
SPEECH_WORDS_PER_S = 2.5
#: Twilio lets a <Dial> ring about this much longer than its timeout
TWILIO_RING_SLACK_S = 5
#: Twilio's shortest <Dial> timeout
MIN_RING_S = 5

_CODE = re.compile(r"[A-Z]{2}")
_CENTRE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_LANGUAGE = re.compile(r"[a-z]{2,3}(?:-[A-Za-z0-9]{2,8}){0,2}")
_SID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def speech_s(text: str) -> float:
    """Seconds <Say> takes for ``text``."""
    return len(text.split()) / SPEECH_WORDS_PER_S


def prompt_s(key: str, language: str | None, **values: str) -> float:
    return speech_s(prompts.say(key, language, **values)[0])


def whisper_s(policy: VoicePolicy) -> float:
    """Worst case of the whisper on the agent's leg: the headline, then the accept window."""
    return WHISPER_MAX_WORDS / SPEECH_WORDS_PER_S + policy.whisper_accept_timeout_s


# -- the plan, as it travels in the action URLs -----------------------------------------


@dataclass(frozen=True)
class CallPlan:
    """Everything a later step of the call needs; compact enough for a URL."""

    service: str = EMERGENCY
    t0: int = 0  # arrival, epoch seconds
    home: str = ""  # the car's home country (centres that know the car come first)
    where: str = ""  # the country whose emergency route applies
    lines: tuple[str, ...] = ()  # centre lines to ring, in order
    incident: str = ""
    language: str = ""  # <Say> language of the caller
    k: int = 0  # centre legs started
    e: int = 0  # emergency legs started
    caller: str = ""  # the caller's CallSid (requests on the agent's leg carry the agent's)
    test: bool = False  # an eCall test call: the centre, never the emergency services

    def params(self) -> dict[str, str]:
        values = {"s": "r" if self.service == ROADSIDE else "e", "t0": str(self.t0),
                  "h": self.home, "w": self.where, "L": ",".join(self.lines),
                  "i": self.incident, "lg": self.language, "k": str(self.k), "e": str(self.e),
                  "p": self.caller, "x": "1" if self.test else ""}
        return {k: v for k, v in values.items() if v not in ("", "0")}

    @classmethod
    def from_params(cls, args: Mapping[str, str]) -> CallPlan:
        """Lenient: a missing or garbled value takes its default (URLs are signed, but a
        plan from an older release must still route)."""

        def text(name: str, pattern: re.Pattern[str]) -> str:
            raw = args.get(name, "")
            return raw if pattern.fullmatch(raw) else ""

        def number(name: str) -> int:
            raw = args.get(name, "")
            return int(raw) if raw.isdigit() and len(raw) <= 12 else 0

        lines = tuple(x for x in args.get("L", "").split(",") if _CENTRE_ID.fullmatch(x))
        return cls(service=ROADSIDE if args.get("s") == "r" else EMERGENCY, t0=number("t0"),
                   home=text("h", _CODE), where=text("w", _CODE), lines=lines[:16],
                   incident=text("i", _SID), language=text("lg", _LANGUAGE),
                   k=number("k"), e=number("e"), caller=text("p", _SID),
                   test=args.get("x") == "1")


# -- where the emergency route goes -------------------------------------------------------


@dataclass(frozen=True)
class EmergencyRoute:
    """How the gateway can reach the emergency services of a country, and if not, why."""

    country: str | None
    #: the number the car (or a person) dials there
    emergency_number: str
    #: ``(number, caller ID)`` the gateway can dial, in order: the operator's PSAP/TPS
    #: number first, then the local short number through Twilio
    dials: tuple[tuple[str, str | None], ...]
    why: str

    @property
    def completable(self) -> bool:
        return bool(self.dials)

    @property
    def fallback_dial(self) -> str | None:
        """The first number the gateway dials on fallback; None when it hands back."""
        return self.dials[0][0] if self.dials else None


def emergency_route(country: str | None, plan: NumberPlan | None,
                    caller_ids: Mapping[str, str]) -> EmergencyRoute:
    """The emergency route of ``country`` given the configured emergency caller IDs
    (country -> E.164 Twilio number with a registered emergency address)."""
    entry = plan.get(country) if plan is not None and country else None
    number = entry.emergency_number if entry is not None else DEFAULT_EMERGENCY
    dials: list[tuple[str, str | None]] = []
    notes: list[str] = []
    if entry is not None and entry.psap_number:
        dials.append((entry.psap_number, entry.psap_caller_id or None))
        notes.append(f"PSAP/TPS number {entry.psap_number}")
    twilio = plan.twilio_emergency(country) if plan is not None and country else None
    if country is None:
        notes.append("country unknown")
    elif twilio is None:
        notes.append(f"Twilio places no emergency calls in {country}")
    elif country not in caller_ids:
        notes.append(f"no emergency caller ID of {country} configured")
    else:
        short = number if number in twilio.numbers else twilio.numbers[0]
        dials.append((short, caller_ids[country]))
        notes.append(f"{short} through Twilio from {caller_ids[country]}")
    return EmergencyRoute(country, number, tuple(dials), "; ".join(notes))


def hand_back_after_s(route: EmergencyRoute, policy: VoicePolicy,
                      language: str | None = None) -> int:
    """Seconds after arrival by which the gateway has handed the call back to the car
    (or ended it) if no person took it: the car dials the emergency number itself then."""
    total = float(policy.emergency_deadline_s)
    if route.completable:
        per_leg = (prompt_s("emergency_retry", language) + policy.emergency_ring_s
                   + TWILIO_RING_SLACK_S)
        total += policy.emergency_attempts * per_leg
    total += prompt_s("hand_back", language, number=prompts.spoken_digits(route.emergency_number))
    return int(total) + 1


# -- the legs ---------------------------------------------------------------------------


def centre_lines(home: str | None, where: str | None, plan: NumberPlan | None,
                 down: frozenset[str] = frozenset()) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(lines to ring, lines left out as known down)``: the home country's centres,
    then the location country's, the catch-all centres last; each line once."""
    if plan is None:
        return (), ()
    ordered: list[Centre] = []
    for country in (home, where):
        if country:
            ordered += [c for c in plan.centres_for(country) if not c.is_catch_all]
    ordered += sorted((c for c in plan.centres if c.is_catch_all),
                      key=lambda c: (c.priority, c.centre_id))
    lines: list[str] = []
    skipped: list[str] = []
    for centre in ordered:
        if centre.centre_id in lines or centre.centre_id in skipped:
            continue
        (skipped if centre.centre_id in down else lines).append(centre.centre_id)
    return tuple(lines), tuple(skipped)


@dataclass(frozen=True)
class RingCentre:
    plan: CallPlan  # with this leg counted
    centre: Centre
    number: str
    ring_s: int
    announce: str
    reason: str


@dataclass(frozen=True)
class DialEmergency:
    plan: CallPlan
    number: str
    caller_id: str | None
    ring_s: int
    announce: str
    reason: str


@dataclass(frozen=True)
class HandBack:
    """No route completes (or every emergency leg failed): the car dials itself."""

    plan: CallPlan
    route: EmergencyRoute
    reason: str


@dataclass(frozen=True)
class Callback:
    """A roadside call no line took: the centre calls back.  Never an emergency number."""

    plan: CallPlan
    reason: str


@dataclass(frozen=True)
class TestCallEnd:
    """A test call no centre line took: say it was received and hang up (a test call is
    never put through to the emergency services)."""

    plan: CallPlan
    reason: str


@dataclass(frozen=True)
class Finish:
    """A person took the call: hang up when the bridge ends."""

    plan: CallPlan
    reason: str


Step = RingCentre | DialEmergency | HandBack | Callback | TestCallEnd | Finish


@dataclass(frozen=True)
class Arrival:
    """What the call itself (and at most one database read) says when it arrives."""

    service: str
    now: float
    home: str | None
    where: str | None
    where_reason: str
    incident_id: str | None = None
    caller_sid: str = ""
    language: str | None = None
    down: frozenset[str] = frozenset()
    test_call: bool = False


def start(arrival: Arrival, *, plan: NumberPlan | None, policy: VoicePolicy,
          caller_ids: Mapping[str, str], now: float | None = None) -> Step:
    """The first step of a new call, at ``now`` (default: its arrival; later when the
    first answer failed and Twilio asked the Fallback URL)."""
    lines, skipped = centre_lines(arrival.home, arrival.where, plan, arrival.down)
    call = CallPlan(service=arrival.service, t0=int(arrival.now), home=arrival.home or "",
                    where=arrival.where or "", lines=lines, incident=arrival.incident_id or "",
                    language=arrival.language or "", caller=arrival.caller_sid,
                    test=arrival.test_call)
    why = f"{'test ' if arrival.test_call else ''}{arrival.service} call; route country {arrival.where or 'unknown'} ({arrival.where_reason})"
    if skipped:
        why += f"; known down: {', '.join(skipped)}"
    return next_step(call, plan=plan, policy=policy, caller_ids=caller_ids,
                     now=arrival.now if now is None else now, why=why)


def centre_answered(dial_status: str, dial_bridged: str | None, accepted: bool | None) -> bool:
    """Did a person at the centre take the call?

    ``completed``/``answered`` count only when the agent was bridged: ``DialBridged``
    says so when Twilio sends it; otherwise the agent's accept record decides (a
    voicemail never presses the key).  With neither (no database answer) a completed
    dial counts as answered: re-dialling a call a person already took is the worse error.
    """
    if dial_status not in ("completed", "answered"):
        return False
    if dial_bridged is not None and dial_bridged.lower() in ("true", "false"):
        return dial_bridged.lower() == "true"
    return accepted is not False


def emergency_answered(dial_status: str) -> bool:
    """An emergency leg that connected is done, however it ended."""
    return dial_status in ("completed", "answered")


def advance(call: CallPlan, *, answered: bool, outcome: str, plan: NumberPlan | None,
            policy: VoicePolicy, caller_ids: Mapping[str, str], now: float) -> Step:
    """The step after a leg ended: done if a person took it, else the next leg."""
    if answered:
        return Finish(call, f"{outcome}: answered")
    return next_step(call, plan=plan, policy=policy, caller_ids=caller_ids, now=now, why=outcome)


def next_step(call: CallPlan, *, plan: NumberPlan | None, policy: VoicePolicy,
              caller_ids: Mapping[str, str], now: float, why: str) -> Step:
    """The next leg of ``call`` at ``now``."""
    if call.service == ROADSIDE:
        return _next_roadside(call, plan=plan, policy=policy, now=now, why=why)
    if call.e == 0:  # no emergency leg yet: a centre line if one still fits
        ring = _next_centre(call, plan=plan, policy=policy, now=now, why=why)
        if ring is not None:
            return ring
    if call.test:
        return TestCallEnd(call, f"{why}; test call: never put through to emergency services")
    route = emergency_route(call.where or None, plan, caller_ids)
    if call.e < policy.emergency_attempts and route.dials:
        number, caller_id = route.dials[call.e % len(route.dials)]
        return DialEmergency(
            replace(call, e=call.e + 1), number, caller_id, policy.emergency_ring_s,
            "emergency_retry" if call.e else "connecting_emergency",
            f"{why}; emergency leg {call.e + 1}/{policy.emergency_attempts} of "
            f"{route.country or 'unknown country'}: {route.why}")
    reason = (f"{why}; {policy.emergency_attempts} emergency leg(s) used" if route.dials
              else f"{why}; no route completes ({route.why})")
    return HandBack(call, route, f"{reason}; hand back: the car dials {route.emergency_number}")


def _next_centre(call: CallPlan, *, plan: NumberPlan | None, policy: VoicePolicy,
                 now: float, why: str) -> RingCentre | None:
    if plan is None:
        return None
    announce = "connecting_centre" if call.k == 0 else "trying_again"
    fixed = prompt_s(announce, call.language or None) + TWILIO_RING_SLACK_S + whisper_s(policy)
    ring = int(min(policy.ring_timeout_s, call.t0 + policy.emergency_deadline_s - now - fixed))
    if ring < MIN_RING_S:
        return None  # later legs only start later
    for k in range(call.k, min(len(call.lines), policy.dial_attempts)):
        centre = plan.centre(call.lines[k])
        if centre is not None:
            return RingCentre(replace(call, k=k + 1), centre, centre.number, ring, announce,
                              f"{why}; centre leg {k + 1}: {centre.centre_id}, ring {ring}s")
    return None


def _next_roadside(call: CallPlan, *, plan: NumberPlan | None, policy: VoicePolicy,
                   now: float, why: str) -> RingCentre | Callback:
    announce = "connecting_centre" if call.k == 0 else "trying_again"
    if plan is not None and now - call.t0 <= policy.budget_s:
        for k in range(call.k, min(len(call.lines), policy.dial_attempts)):
            centre = plan.centre(call.lines[k])
            if centre is not None:
                return RingCentre(replace(call, k=k + 1), centre, centre.roadside_number,
                                  policy.ring_timeout_s, announce,
                                  f"{why}; roadside leg {k + 1}: {centre.centre_id}")
    return Callback(call, f"{why}; no roadside line took the call: callback")
