"""Time as the caller lives it: the worst case to the first emergency leg, from the TwiML.

The clock here is derived from what the caller hears and waits for, read off the TwiML
the gateway returns: every <Say> before a <Dial> at 2.5 words a second, every ring
timeout plus Twilio's 5 s of slack, and, when an ACD or voicemail picks up at the last
moment, the whole whisper and the agent's accept window.  The constants are written
here on purpose, not imported: the test must not move when the code's constants do.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from gateway.config import Settings
from tests.conftest import Clock, Twilio
from tests.support.events import SWEDISH_CAR, crash_event
from tests.support.twilio import call_params, dial_of, parse

WORDS_PER_S = 2.5
RING_SLACK_S = 5


def speech_s(elements: Any) -> float:
    return sum(len((e.text or "").split()) for e in elements) / WORDS_PER_S


def first_emergency_leg_s(twilio: Twilio, clock: Clock, sid: str, path: tuple[str, ...]) -> float:
    """Seconds from arrival until the call's first emergency leg (or hand-back) starts,
    with each centre leg ending the worst way ``path`` names."""
    t0 = clock.now
    elapsed = 0.0
    root = parse(twilio.post("/twilio/voice", call_params(sid, SWEDISH_CAR["msisdn"])).data)
    for outcome in itertools.chain(path, itertools.repeat("no-answer")):
        dial = root.find("Dial")
        if dial is None or "/dial-result" not in dial.get("action", ""):
            return elapsed
        elapsed += speech_s(root.findall("Say")) + int(dial.get("timeout", "30")) + RING_SLACK_S
        form = {"DialCallStatus": "no-answer"}
        if outcome == "acd":  # picked up at the last moment; nobody presses 1
            whisper_url = dial.find("Number").get("url")  # type: ignore[union-attr]
            whisper = parse(twilio.post(whisper_url, {"CallSid": f"{sid}-agent",
                                                      "ParentCallSid": sid}).data)
            gather = whisper.find("Gather")
            assert gather is not None
            elapsed += speech_s(gather.findall("Say")) + int(gather.get("timeout", "5"))
            form = {"DialCallStatus": "completed"}
        clock.now = t0 + elapsed
        root = parse(twilio.post(dial.get("action", ""),
                                 call_params(sid, SWEDISH_CAR["msisdn"], **form)).data)
    raise AssertionError("unreachable")


PATHS = list(itertools.product(("no-answer", "acd"), repeat=3))


@pytest.mark.parametrize(("deadline", "ring"), [
    (40, 15), (40, 10), (40, 30), (30, 8), (45, 12), (60, 20), (90, 10),
])
def test_worst_case_to_the_first_emergency_leg_holds_the_budget(
    make_app: Callable[..., Flask], settings: Settings, clock: Clock,
    vehicle_headers: dict[str, str], deadline: int, ring: int,
) -> None:
    voice = dataclasses.replace(settings.voice, emergency_deadline_s=deadline,
                                ring_timeout_s=ring)
    app = make_app(settings=settings.replace(voice=voice))
    twilio = Twilio(app.test_client())
    worst = 0.0
    legs_rung = 0
    for n, path in enumerate(PATHS):
        event = crash_event(event_id=f"budget-{deadline}-{ring}-{n}")
        assert app.test_client().post("/v1/events", json=event,
                                      headers=vehicle_headers).status_code == 201
        spent = first_emergency_leg_s(twilio, clock, f"CAb{deadline}-{ring}-{n}", path)
        worst = max(worst, spent)
        legs_rung += spent > 0
        clock.advance(600)  # the next call is new
    assert worst <= deadline, f"first emergency leg after {worst:.1f}s, budget {deadline}s"
    assert legs_rung == len(PATHS)  # not vacuous: every path rang the centre first


def test_default_budget_is_forty_seconds_and_one_line_fits(
    app: Flask, twilio: Twilio, clock: Clock, client: Any, vehicle_headers: dict[str, str]
) -> None:
    assert app.extensions["gateway"].settings.voice.emergency_deadline_s == 40
    client.post("/v1/events", json=crash_event(), headers=vehicle_headers)
    spent = first_emergency_leg_s(twilio, clock, "CAdefault", ("no-answer",))
    assert 20 <= spent <= 40


def test_centre_known_down_means_the_emergency_leg_at_once(
    app: Flask, twilio: Twilio, clock: Clock, client: Any, vehicle_headers: dict[str, str],
    plan: Any,
) -> None:
    services = app.extensions["gateway"]
    for centre in plan.centres:
        for _ in range(services.settings.delivery.breaker_failures):
            services.centre_health.record(centre.centre_id, ok=False, reason="test: busy")
    services.line_health.refresh()
    client.post("/v1/events", json=crash_event(), headers=vehicle_headers)
    assert first_emergency_leg_s(twilio, clock, "CAdown", ()) == 0.0


def test_an_open_incident_api_breaker_does_not_skip_staffed_lines(
    app: Flask, twilio: Twilio, plan: Any,
) -> None:
    services = app.extensions["gateway"]
    for _ in range(services.settings.delivery.breaker_failures + 2):
        services.centre_health.record("api", ok=False, reason="test: incident API 503")
    services.line_health.refresh()
    root = parse(twilio.post("/twilio/voice", call_params("CAapi", "+46701234567")).data)
    assert dial_of(root).find("Number").text == plan.centres_for("SE")[0].number  # type: ignore[union-attr]
