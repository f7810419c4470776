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
