"""The call plan as a table: pure functions, no Flask, no database."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.calls.call_plan import (
    Arrival,
    Callback,
    CallPlan,
    DialEmergency,
    Finish,
    HandBack,
    RingCentre,
    advance,
    centre_answered,
    centre_lines,
    emergency_answered,
    emergency_route,
    hand_back_after_s,
    start,
)
from gateway.calls.inbound import EMERGENCY, ROADSIDE
from gateway.config import VoicePolicy
from gateway.plan import CountryEntry, NumberPlan

POLICY = VoicePolicy()
GB_ID = {"GB": "+442079460555"}
T0 = 1_700_000_000.0


def arrival(home: str | None, where: str | None, *, service: str = EMERGENCY,
            down: frozenset[str] = frozenset(), now: float = T0) -> Arrival:
    return Arrival(service=service, now=now, home=home, where=where, where_reason="test",
                   caller_sid="CA1", down=down)


def with_psap(plan: NumberPlan, country: str, number: str) -> NumberPlan:
    """The shipped plan with a PSAP long number for one country."""
    entries = {c: plan.entry(c) for c in plan.countries()}
    entries[country] = replace(entries[country], psap_number=number)
    twilio = {c: t for c in plan.countries() if (t := plan.twilio_emergency(c)) is not None}
    return NumberPlan(plan.source, entries, plan.centres, plan.inbound, twilio)


@pytest.mark.parametrize(("home", "where", "expected"), [
    ("US", "DE", ("na-primary", "eu-primary", "eu-backup", "global")),  # US car in Berlin
    ("SE", "DK", ("eu-primary", "eu-backup", "global")),
    ("DE", "US", ("eu-primary", "eu-backup", "na-primary", "global")),
    (None, None, ("global",)),  # nothing known: the catch-all still rings
    ("JP", "JP", ("global",)),
])
def test_lines_home_then_location_then_catch_all_each_once(plan: NumberPlan, home: str | None,
                                                           where: str | None,
                                                           expected: tuple[str, ...]) -> None:
    lines, skipped = centre_lines(home, where, plan)
    assert lines == expected and skipped == ()


def test_lines_known_down_are_left_out_and_named(plan: NumberPlan) -> None:
    lines, skipped = centre_lines("US", "DE", plan, frozenset({"na-primary"}))
    assert lines == ("eu-primary", "eu-backup", "global")
    assert skipped == ("na-primary",)


def test_us_car_in_berlin_with_na_down_rings_eu_primary_first(plan: NumberPlan) -> None:
    step = start(arrival("US", "DE", down=frozenset({"na-primary"})), plan=plan,
                 policy=POLICY, caller_ids={})
    assert isinstance(step, RingCentre) and step.centre.centre_id == "eu-primary"
    assert step.plan.lines == ("eu-primary", "eu-backup", "global")


def test_every_line_down_goes_to_the_emergency_route_at_once(plan: NumberPlan) -> None:
    down = frozenset(c.centre_id for c in plan.centres)
    step = start(arrival("GB", "GB", down=down), plan=plan, policy=POLICY, caller_ids=GB_ID)
    assert isinstance(step, DialEmergency)
    assert step.number == "999" and step.caller_id == GB_ID["GB"]
    assert step.ring_s == POLICY.emergency_ring_s


def test_no_completable_route_hands_back_with_the_local_number(plan: NumberPlan) -> None:
    down = frozenset(c.centre_id for c in plan.centres)
    step = start(arrival("SE", "DK", down=down), plan=plan, policy=POLICY, caller_ids=GB_ID)
    assert isinstance(step, HandBack)
    assert step.route.emergency_number == "112" and step.route.country == "DK"
    assert "no route completes" in step.reason


def test_short_number_needs_a_caller_id_of_that_country(plan: NumberPlan) -> None:
    assert not emergency_route("GB", plan, {}).completable
    assert not emergency_route("GB", plan, {"DE": "+4930901820"}).completable
    route = emergency_route("GB", plan, GB_ID)
    assert route.dials == (("999", GB_ID["GB"]),)
    # AU's own number is 000, but Twilio dials 112 there
    au = emergency_route("AU", plan, {"AU": "+61255500199"})
    assert au.emergency_number == "000" and au.dials == (("112", "+61255500199"),)
    # no Twilio emergency calling in Denmark: whatever caller ID exists
    assert not emergency_route("DK", plan, {"DK": "+4520123456"}).completable
    assert emergency_route("DK", plan, {}).fallback_dial is None


def test_psap_number_comes_before_the_local_number_and_retries_cycle(plan: NumberPlan) -> None:
    psap_plan = with_psap(plan, "GB", "+442079460777")
    route = emergency_route("GB", psap_plan, GB_ID)
    assert [n for n, _ in route.dials] == ["+442079460777", "999"]
    down = frozenset(c.centre_id for c in plan.centres)
    first = start(arrival("GB", "GB", down=down), plan=psap_plan, policy=POLICY,
                  caller_ids=GB_ID)
    assert isinstance(first, DialEmergency) and first.number == "+442079460777"
    assert first.announce == "connecting_emergency"
    second = advance(first.plan, answered=False, outcome="busy", plan=psap_plan, policy=POLICY,
                     caller_ids=GB_ID, now=T0 + 40)
    assert isinstance(second, DialEmergency) and second.number == "999"
    assert second.announce == "emergency_retry"
    third = advance(second.plan, answered=False, outcome="failed", plan=psap_plan,
                    policy=POLICY, caller_ids=GB_ID, now=T0 + 80)
    assert isinstance(third, HandBack)  # emergency_attempts (2) used


@pytest.mark.parametrize("status", ["answered", "completed"])
def test_a_connected_emergency_leg_is_never_dialled_again(plan: NumberPlan, status: str) -> None:
    call = CallPlan(t0=int(T0), where="GB", e=1)
    step = advance(call, answered=emergency_answered(status), outcome=status, plan=plan,
                   policy=POLICY, caller_ids=GB_ID, now=T0 + 100)
    assert isinstance(step, Finish)


@pytest.mark.parametrize("status", ["busy", "no-answer", "failed", "canceled", "", "weird"])
def test_an_emergency_leg_that_did_not_connect_moves_on(status: str) -> None:
    assert not emergency_answered(status)


@pytest.mark.parametrize(("status", "bridged", "accepted", "answered"), [
    ("completed", "true", None, True),
    ("completed", "false", True, False),  # DialBridged wins
    ("completed", None, False, False),  # voicemail: nobody pressed the key
    ("completed", None, True, True),
    ("completed", None, None, True),  # no database answer: never re-dial a taken call
    ("answered", None, None, True),
    ("busy", "true", True, False),
    ("no-answer", None, None, False),
])
def test_centre_answered(status: str, bridged: str | None, accepted: bool | None,
                         answered: bool) -> None:
    assert centre_answered(status, bridged, accepted) is answered


def test_after_an_emergency_leg_no_centre_is_rung_again(plan: NumberPlan) -> None:
    call = CallPlan(t0=int(T0), home="GB", where="GB", lines=("eu-primary", "eu-backup"), k=0,
                    e=1)
    step = advance(call, answered=False, outcome="busy", plan=plan, policy=POLICY,
                   caller_ids=GB_ID, now=T0 + 1)
    assert isinstance(step, DialEmergency)


def test_a_centre_leg_starts_only_if_it_ends_by_the_deadline(plan: NumberPlan) -> None:
    first = start(arrival("SE", "SE"), plan=plan, policy=POLICY, caller_ids={})
    assert isinstance(first, RingCentre) and first.ring_s == POLICY.ring_timeout_s
    # 25 s later the second line no longer fits in the 40 s budget: hand back at once
    step = advance(first.plan, answered=False, outcome="no-answer", plan=plan, policy=POLICY,
                   caller_ids={}, now=T0 + 25)
    assert isinstance(step, HandBack)
    # with a longer deadline the second line (eu-backup) rings, with a shorter timeout
    roomy = replace(POLICY, emergency_deadline_s=60)
    step = advance(first.plan, answered=False, outcome="no-answer", plan=plan, policy=roomy,
                   caller_ids={}, now=T0 + 25)
    assert isinstance(step, RingCentre) and step.centre.centre_id == "eu-backup"
    assert step.announce == "trying_again" and step.ring_s < POLICY.ring_timeout_s + 1


def test_roadside_never_dials_an_emergency_number(plan: NumberPlan) -> None:
    step = start(arrival("SE", "SE", service=ROADSIDE), plan=plan, policy=POLICY,
                 caller_ids={"SE": "+46701234567"})
    numbers = []
    for minute in range(1, 10):
        if not isinstance(step, RingCentre):
            break
        numbers.append(step.number)
        step = advance(step.plan, answered=False, outcome="busy", plan=plan, policy=POLICY,
                       caller_ids={}, now=T0 + minute)
    assert isinstance(step, Callback)
    roadside = {c.roadside_number for c in plan.centres}
    assert numbers and set(numbers) <= roadside


def test_plan_round_trips_through_url_params() -> None:
    call = CallPlan(service=ROADSIDE, t0=int(T0), home="US", where="DE",
                    lines=("na-primary", "eu.primary-2"), incident="abc-123", language="de-DE",
                    k=1, e=0, caller="CA123")
    assert CallPlan.from_params(call.params()) == call


@pytest.mark.parametrize("params", [
    {"t0": "-5", "k": "x", "h": "de", "w": "DEU", "L": "a b,,<x>", "lg": "<script>"},
    {"t0": "9" * 40, "s": "emergency", "p": "CA'1"},
])
def test_garbled_params_take_defaults(params: dict[str, str]) -> None:
    call = CallPlan.from_params(params)
    assert call.t0 == 0 and call.k == 0 and call.home == "" and call.where == ""
    assert call.language == "" and call.caller == "" and call.service == EMERGENCY
    assert all(" " not in line and "<" not in line for line in call.lines)


def test_hand_back_after_covers_the_emergency_legs(plan: NumberPlan) -> None:
    hand_back_only = hand_back_after_s(emergency_route("DK", plan, {}), POLICY)
    with_legs = hand_back_after_s(emergency_route("GB", plan, GB_ID), POLICY)
    assert POLICY.emergency_deadline_s < hand_back_only < POLICY.emergency_deadline_s + 15
    assert with_legs >= hand_back_only + POLICY.emergency_attempts * (
        POLICY.emergency_ring_s + 5)


def test_unknown_plan_entry_is_not_a_guess(plan: NumberPlan) -> None:
    entries: dict[str, CountryEntry] = {}
    empty = NumberPlan("empty", entries, plan.centres)
    route = emergency_route("GB", empty, GB_ID)
    assert route.emergency_number == "112" and not route.completable


# -- the clock, derived here from literals (not the module's constants) ----------------------
#
# <Say> at 2.5 words a second; Twilio rings 5 s past a <Dial> timeout; the whisper is at
# most 16 words, then the accept window.  English prompts: connecting_centre 11 words,
# trying_again 8, emergency_retry 8, hand_back 19 + the spoken digits.

WORDS_PER_S = 2.5
RING_SLACK_S = 5
WHISPER_S = 16 / WORDS_PER_S + POLICY.whisper_accept_timeout_s  # 11.4


def test_speech_and_whisper_time() -> None:
    from gateway.calls.call_plan import prompt_s, speech_s, whisper_s

    assert speech_s("") == 0
    assert speech_s("one two  three\tfour five") == 5 / WORDS_PER_S
    assert prompt_s("connecting_centre", None) == 11 / WORDS_PER_S
    assert prompt_s("emergency_retry", "en-US") == 8 / WORDS_PER_S
    assert prompt_s("emergency_retry", "sv-SE") == 6 / WORDS_PER_S  # the caller's language
    assert prompt_s("hand_back", None, number="1 1 2") == 22 / WORDS_PER_S
    assert whisper_s(POLICY) == WHISPER_S
    assert whisper_s(replace(POLICY, whisper_accept_timeout_s=9)) == 16 / WORDS_PER_S + 9


def test_hand_back_after_is_the_deadline_plus_every_emergency_leg_plus_the_hand_back(
    plan: NumberPlan
) -> None:
    retry, hand_back = 8 / WORDS_PER_S, 22 / WORDS_PER_S
    gb = emergency_route("GB", plan, GB_ID)
    legs = POLICY.emergency_attempts * (retry + POLICY.emergency_ring_s + RING_SLACK_S)
    assert hand_back_after_s(gb, POLICY) == int(40 + legs + hand_back) + 1 == 126
    # no completable route: the deadline and the hand-back only
    assert hand_back_after_s(emergency_route("DK", plan, {}), POLICY) == int(40 + hand_back) + 1
    # in the caller's language (Swedish: 6 words to retry, 15 to hand back)
    assert hand_back_after_s(gb, POLICY, "sv-SE") == int(
        40 + 2 * (6 / WORDS_PER_S + 30 + RING_SLACK_S) + 15 / WORDS_PER_S) + 1 == 121
    three = replace(POLICY, emergency_attempts=3, emergency_ring_s=20, emergency_deadline_s=30)
    assert hand_back_after_s(gb, three) == int(
        30 + 3 * (retry + 20 + RING_SLACK_S) + hand_back) + 1


def test_a_centre_leg_rings_for_what_is_left_of_the_budget(plan: NumberPlan) -> None:
    """ring = min(ring timeout, deadline - elapsed - prompt - slack - whisper), whole seconds."""
    roomy = replace(POLICY, emergency_deadline_s=60)
    first = start(arrival("SE", "SE"), plan=plan, policy=roomy, caller_ids={})
    assert isinstance(first, RingCentre) and first.ring_s == 15  # capped by ring_timeout_s
    assert first.announce == "connecting_centre" and first.number == first.centre.number
    for elapsed, expected in [(20.0, 60 - 20 - 3.2 - RING_SLACK_S - WHISPER_S),  # 20.4
                              (31.0, 60 - 31 - 3.2 - RING_SLACK_S - WHISPER_S)]:  # 9.4
        step = advance(first.plan, answered=False, outcome="no-answer", plan=plan,
                       policy=roomy, caller_ids={}, now=T0 + elapsed)
        assert isinstance(step, RingCentre) and step.announce == "trying_again"
        assert step.ring_s == min(15, int(expected)) and isinstance(step.ring_s, int)
        assert step.number == step.centre.number == "+441614960100"  # eu-backup


def test_a_centre_leg_needs_twilios_shortest_ring_time_of_five_seconds(plan: NumberPlan) -> None:
    first = start(arrival("SE", "SE"), plan=plan, policy=POLICY, caller_ids={})
    assert isinstance(first, RingCentre)
    # second leg: 40 - elapsed - 3.2 - 5 - 11.4 = 20.4 - elapsed
    fits = advance(first.plan, answered=False, outcome="busy", plan=plan, policy=POLICY,
                   caller_ids={}, now=T0 + 15.1)  # 5.3 s left: rings 5 s
    assert isinstance(fits, RingCentre) and fits.ring_s == 5
    late = advance(first.plan, answered=False, outcome="busy", plan=plan, policy=POLICY,
                   caller_ids={}, now=T0 + 15.6)  # 4.8 s left: the emergency route now
    assert isinstance(late, HandBack)  # SE: no completable route
    # the first leg is budgeted the same way: a Fallback URL start 20 s late
    late_start = start(arrival("SE", "SE"), plan=plan, policy=POLICY, caller_ids={},
                       now=T0 + 14.0)  # 40 - 14 - 4.4 - 5 - 11.4 = 5.2
    assert isinstance(late_start, RingCentre) and late_start.ring_s == 5
    assert late_start.plan.t0 == int(T0)  # the clock still runs from arrival
    too_late = start(arrival("GB", "GB"), plan=plan, policy=POLICY, caller_ids=GB_ID,
                     now=T0 + 14.5)
    assert isinstance(too_late, DialEmergency) and too_late.number == "999"


def test_the_ring_slack_is_in_the_budget(plan: NumberPlan) -> None:
    """Without Twilio's 5 s of slack the second line would start at 12 s left."""
    first = start(arrival("SE", "SE"), plan=plan, policy=POLICY, caller_ids={})
    assert isinstance(first, RingCentre)
    # 40 - 12 - 3.2 - 11.4 = 13.4 without the slack (it would ring); 8.4 with it
    step = advance(first.plan, answered=False, outcome="busy", plan=plan, policy=POLICY,
                   caller_ids={}, now=T0 + 12)
    assert isinstance(step, RingCentre) and step.ring_s == 8
    step = advance(first.plan, answered=False, outcome="busy", plan=plan, policy=POLICY,
                   caller_ids={}, now=T0 + 17)  # 3.4 s with the slack: no centre leg
    assert isinstance(step, HandBack)


# -- the plan in the URL ------------------------------------------------------------------------


def test_params_leave_out_defaults() -> None:
    assert CallPlan().params() == {"s": "e"}
    assert CallPlan(service=ROADSIDE).params() == {"s": "r"}
    call = CallPlan(t0=5, home="SE", where="DK", lines=("eu-primary", "global"), incident="i1",
                    language="sv-SE", k=1, e=2, caller="CA1")
    assert call.params() == {"s": "e", "t0": "5", "h": "SE", "w": "DK",
                             "L": "eu-primary,global", "i": "i1", "lg": "sv-SE", "k": "1",
                             "e": "2", "p": "CA1"}


def test_from_params_reads_every_field_and_bounds_them() -> None:
    assert CallPlan.from_params({}) == CallPlan()
    assert CallPlan.from_params({"s": "r"}).service == ROADSIDE
    assert CallPlan.from_params({"s": "R"}).service == EMERGENCY  # anything else: emergency
    assert CallPlan.from_params({"t0": "9" * 12}).t0 == 999_999_999_999  # twelve digits
    assert CallPlan.from_params({"t0": "1" * 13}).t0 == 0
    assert CallPlan.from_params({"e": "1", "k": "2"}) == CallPlan(k=2, e=1)
    many = [f"line{n}" for n in range(20)]
    assert CallPlan.from_params({"L": ",".join(many)}).lines == tuple(many[:16])
    longest = "a" * 64
    assert CallPlan.from_params({"L": f"{longest},{'b' * 65},_x,.y,ok"}).lines == (longest, "ok")
    assert CallPlan.from_params({"L": ""}).lines == ()
    assert CallPlan.from_params({"p": "C" * 64}).caller == "C" * 64
    assert CallPlan.from_params({"p": "C" * 65, "i": ""}).caller == ""
    assert CallPlan.from_params({"lg": "sv"}).language == "sv"
    assert CallPlan.from_params({"lg": "zh-Hant-TW"}).language == "zh-Hant-TW"
    assert CallPlan.from_params({"lg": "SV"}).language == ""
    assert CallPlan.from_params({"h": "SE", "w": "SEX"}) == CallPlan(home="SE")


# -- the emergency route ----------------------------------------------------------------------


def test_route_explains_itself(plan: NumberPlan) -> None:
    gb = emergency_route("GB", plan, GB_ID)
    assert gb.why == "999 through Twilio from +442079460555"
    assert gb.completable and gb.fallback_dial == "999" and gb.country == "GB"
    us = emergency_route("US", plan, {"US": "+12025550199"})
    assert us.dials == (("911", "+12025550199"),) and us.emergency_number == "911"
    unknown = emergency_route(None, plan, GB_ID)
    assert unknown == type(unknown)(None, "112", (), "country unknown")
    dk = emergency_route("DK", plan, {})
    assert dk.why == "Twilio places no emergency calls in DK" and dk.fallback_dial is None
    fr = emergency_route("FR", plan, GB_ID)
    assert fr.why == "no emergency caller ID of FR configured" and not fr.completable


def test_route_without_a_plan_still_names_112() -> None:
    route = emergency_route("GB", None, GB_ID)
    assert route.emergency_number == "112" and route.dials == () and route.country == "GB"
    assert route.why == "Twilio places no emergency calls in GB"
    assert emergency_route(None, None, GB_ID).why == "country unknown"


def test_psap_number_with_and_without_its_own_caller_id(plan: NumberPlan) -> None:
    psap_plan = with_psap(plan, "GB", "+442079460777")
    route = emergency_route("GB", psap_plan, GB_ID)
    assert route.dials == (("+442079460777", None), ("999", GB_ID["GB"]))  # car's own number
    assert route.fallback_dial == "+442079460777"
    assert route.why == ("PSAP/TPS number +442079460777; "
                         "999 through Twilio from +442079460555")
    entries = {c: psap_plan.entry(c) for c in psap_plan.countries()}
    entries["DK"] = replace(entries["DK"], psap_number="+4533123456",
                            psap_caller_id="+4570101010")
    dk_plan = NumberPlan(plan.source, entries, plan.centres, plan.inbound, {})
    dk = emergency_route("DK", dk_plan, {})
    assert dk.dials == (("+4533123456", "+4570101010"),) and dk.completable
    assert dk.why == "PSAP/TPS number +4533123456; Twilio places no emergency calls in DK"


def test_emergency_legs_cycle_through_the_route(plan: NumberPlan) -> None:
    psap_plan = with_psap(plan, "GB", "+442079460777")
    three = replace(POLICY, emergency_attempts=3)
    call = CallPlan(t0=int(T0), where="GB", lines=())
    numbers, caller_ids, announces = [], [], []
    step = advance(call, answered=False, outcome="no line", plan=psap_plan, policy=three,
                   caller_ids=GB_ID, now=T0)
    while isinstance(step, DialEmergency):
        numbers.append(step.number)
        caller_ids.append(step.caller_id)
        announces.append(step.announce)
        assert step.ring_s == three.emergency_ring_s
        step = advance(step.plan, answered=False, outcome="busy", plan=psap_plan, policy=three,
                       caller_ids=GB_ID, now=T0 + 60)
    assert numbers == ["+442079460777", "999", "+442079460777"]
    assert caller_ids == [None, GB_ID["GB"], None]
    assert announces == ["connecting_emergency", "emergency_retry", "emergency_retry"]
    assert isinstance(step, HandBack) and step.plan.e == 3
    assert step.reason == ("busy; 3 emergency leg(s) used; hand back: the car dials 999")


def test_emergency_step_reasons(plan: NumberPlan) -> None:
    call = CallPlan(t0=int(T0), where="GB")
    step = advance(call, answered=False, outcome="centre leg 1: busy", plan=plan, policy=POLICY,
                   caller_ids=GB_ID, now=T0 + 30)
    assert isinstance(step, DialEmergency) and step.plan == replace(call, e=1)
    assert step.reason == ("centre leg 1: busy; emergency leg 1/2 of GB: "
                           "999 through Twilio from +442079460555")
    nowhere = advance(CallPlan(t0=int(T0)), answered=False, outcome="x", plan=plan,
                      policy=POLICY, caller_ids=GB_ID, now=T0)
    assert isinstance(nowhere, HandBack) and nowhere.route.country is None
    assert nowhere.reason == "x; no route completes (country unknown); hand back: the car dials 112"
    done = advance(call, answered=True, outcome="emergency leg 1: completed", plan=plan,
                   policy=POLICY, caller_ids=GB_ID, now=T0)
    assert done == Finish(call, "emergency leg 1: completed: answered")


# -- the centre legs ---------------------------------------------------------------------------


def test_start_carries_the_arrival_into_the_plan(plan: NumberPlan) -> None:
    a = Arrival(service=EMERGENCY, now=T0 + 0.9, home="US", where="DE", where_reason="gps",
                incident_id="inc-1", caller_sid="CA9", language="de-DE",
                down=frozenset({"na-primary", "eu-backup"}))
    step = start(a, plan=plan, policy=POLICY, caller_ids={})
    assert isinstance(step, RingCentre) and step.centre.centre_id == "eu-primary"
    assert step.plan == CallPlan(service=EMERGENCY, t0=int(T0), home="US", where="DE",
                                 lines=("eu-primary", "global"), incident="inc-1",
                                 language="de-DE", k=1, e=0, caller="CA9")
    assert step.reason == ("emergency call; route country DE (gps); "
                           "known down: na-primary, eu-backup; centre leg 1: eu-primary, ring 15s")
    bare = start(Arrival(EMERGENCY, T0, None, None, "no fix"), plan=plan, policy=POLICY,
                 caller_ids={})
    assert isinstance(bare, RingCentre) and bare.plan.lines == ("global",)
    assert bare.plan == CallPlan(t0=int(T0), lines=("global",), k=1)  # nothing made up
    assert bare.reason.startswith("emergency call; route country unknown (no fix); centre leg")


def test_known_down_lines_are_named_once(plan: NumberPlan) -> None:
    lines, skipped = centre_lines("SE", "DK", plan, frozenset({"eu-primary", "global"}))
    assert lines == ("eu-backup",) and skipped == ("eu-primary", "global")
    assert centre_lines("SE", "SE", None) == ((), ())


def test_catch_all_centres_ring_last_by_priority_then_id(plan: NumberPlan) -> None:
    from gateway.plan import Centre

    def centre(cid: str, countries: str, priority: int) -> Centre:
        return Centre(cid, cid, frozenset(countries.split()), priority, "+442079460100",
                      "+442079460101", "en-GB")

    centres = [centre("z-any", "*", 1), centre("b-any", "*", 2), centre("a-any", "*", 2),
               centre("se", "SE", 5)]
    custom = NumberPlan("test", {}, centres)
    assert centre_lines("SE", None, custom) == (("se", "z-any", "a-any", "b-any"), ())
    assert centre_lines(None, "", custom) == (("z-any", "a-any", "b-any"), ())


def test_dial_attempts_bound_the_centre_legs_and_unknown_lines_are_skipped(
    plan: NumberPlan
) -> None:
    roomy = replace(POLICY, emergency_deadline_s=120)
    call = CallPlan(t0=int(T0), where="GB", lines=("gone", "eu-backup", "global"))
    step = advance(call, answered=False, outcome="start", plan=plan, policy=roomy,
                   caller_ids=GB_ID, now=T0)
    assert isinstance(step, RingCentre) and step.centre.centre_id == "eu-backup"
    assert step.plan.k == 2 and step.announce == "connecting_centre"
    assert step.reason == "start; centre leg 2: eu-backup, ring 15s"
    one = replace(roomy, dial_attempts=1)
    first = start(arrival("SE", "SE"), plan=plan, policy=one, caller_ids=GB_ID)
    assert isinstance(first, RingCentre)
    after = advance(first.plan, answered=False, outcome="busy", plan=plan, policy=one,
                    caller_ids={"SE": "+46701234567"}, now=T0 + 20)
    assert isinstance(after, HandBack)  # one attempt used: no second line, however roomy
    assert isinstance(advance(call, answered=False, outcome="x", plan=None, policy=roomy,
                              caller_ids=GB_ID, now=T0), HandBack)


# -- roadside ---------------------------------------------------------------------------------


def test_roadside_legs_until_the_budget_then_a_callback(plan: NumberPlan) -> None:
    first = start(arrival("SE", "SE", service=ROADSIDE), plan=plan, policy=POLICY,
                  caller_ids={})
    assert isinstance(first, RingCentre)
    assert first.number == "+442079460101" and first.ring_s == POLICY.ring_timeout_s
    assert first.announce == "connecting_centre" and first.plan.k == 1
    assert first.reason == ("roadside call; route country SE (test); "
                            "roadside leg 1: eu-primary")
    on_time = advance(first.plan, answered=False, outcome="busy", plan=plan, policy=POLICY,
                      caller_ids={}, now=T0 + POLICY.budget_s)  # the last moment
    assert isinstance(on_time, RingCentre) and on_time.number == "+441614960101"
    assert on_time.announce == "trying_again" and on_time.plan.k == 2
    late = advance(first.plan, answered=False, outcome="busy", plan=plan, policy=POLICY,
                   caller_ids={}, now=T0 + POLICY.budget_s + 1)
    assert late == Callback(first.plan, "busy; no roadside line took the call: callback")
    one = replace(POLICY, dial_attempts=1)
    assert isinstance(advance(first.plan, answered=False, outcome="busy", plan=plan,
                              policy=one, caller_ids={}, now=T0 + 1), Callback)
    skip = CallPlan(service=ROADSIDE, t0=int(T0), lines=("gone", "global"))
    step = advance(skip, answered=False, outcome="x", plan=plan, policy=POLICY, caller_ids={},
                   now=T0)
    assert isinstance(step, RingCentre) and step.plan.k == 2
    assert step.number == "+61255500101"
    assert isinstance(advance(skip, answered=False, outcome="x", plan=None, policy=POLICY,
                              caller_ids={}, now=T0), Callback)


@pytest.mark.parametrize(("bridged", "accepted", "answered"), [
    ("TRUE", False, True),  # DialBridged is read case-insensitively
    ("False", True, False),
    ("yes", False, False),  # not a DialBridged value: the accept record decides
    ("yes", None, True),
    ("", True, True),
])
def test_centre_answered_reads_dial_bridged_loosely(bridged: str, accepted: bool | None,
                                                    answered: bool) -> None:
    assert centre_answered("completed", bridged, accepted) is answered
    assert centre_answered("answered", bridged, accepted) is answered
    assert centre_answered("in-progress", bridged, accepted) is False


def test_the_budget_counts_the_prompt_in_the_callers_language(plan: NumberPlan) -> None:
    """Swedish says 'trying again' in 6 words, English in 8: 0.8 s more ring time."""
    roomy = replace(POLICY, emergency_deadline_s=60)
    rings = {}
    for language in ("sv-SE", "en-GB"):
        first = start(replace(arrival("SE", "SE"), language=language), plan=plan,
                      policy=roomy, caller_ids={})
        assert isinstance(first, RingCentre)
        step = advance(first.plan, answered=False, outcome="busy", plan=plan, policy=roomy,
                       caller_ids={}, now=T0 + 31)
        assert isinstance(step, RingCentre)
        rings[language] = step.ring_s
    # 60 - 31 - 5 - 11.4 = 12.6, less 2.4 s (sv) or 3.2 s (en)
    assert rings == {"sv-SE": 10, "en-GB": 9}


def test_the_countrys_own_number_is_dialled_when_twilio_can_dial_it(plan: NumberPlan) -> None:
    from gateway.plan import TwilioEmergency

    entries = {c: plan.entry(c) for c in plan.countries()}
    twilio = {"GB": TwilioEmergency("GB", ("112", "999"), True, "test"),
              "AU": TwilioEmergency("AU", ("112", "911"), False, "test")}
    custom = NumberPlan("test", entries, plan.centres, plan.inbound, twilio)
    assert emergency_route("GB", custom, GB_ID).dials == (("999", GB_ID["GB"]),)
    au = emergency_route("AU", custom, {"AU": "+61255500199"})  # 000: not Twilio's
    assert au.dials == (("112", "+61255500199"),)


def test_a_test_call_rings_the_centre_and_never_an_emergency_number(plan: NumberPlan) -> None:
    from gateway.calls.call_plan import TestCallEnd

    test = replace(arrival("GB", "GB"), test_call=True)
    first = start(test, plan=plan, policy=POLICY, caller_ids=GB_ID)
    assert isinstance(first, RingCentre) and first.plan.test
    assert first.reason.startswith("test emergency call; route country GB (test)")
    assert CallPlan.from_params(first.plan.params()) == first.plan
    assert first.plan.params()["x"] == "1" and "x" not in replace(first.plan, test=False).params()
    end = advance(first.plan, answered=False, outcome="no-answer", plan=plan, policy=POLICY,
                  caller_ids=GB_ID, now=T0 + 30)
    assert end == TestCallEnd(first.plan, "no-answer; test call: never put through to "
                                          "emergency services")
    down = frozenset(c.centre_id for c in plan.centres)
    assert isinstance(start(replace(test, down=down), plan=plan, policy=POLICY,
                            caller_ids=GB_ID), TestCallEnd)
    assert CallPlan.from_params({"x": "yes"}).test is False
    # the same call without the flag goes on to 999
    real = advance(replace(first.plan, test=False), answered=False, outcome="no-answer",
                   plan=plan, policy=POLICY, caller_ids=GB_ID, now=T0 + 30)
    assert isinstance(real, DialEmergency) and real.number == "999"
