"""Reading a call from its own fields: ``From`` in every form Twilio sends, ``To`` -> service.

Pure functions, no Flask, no database.  A car whose number we cannot read still reaches a
person (the catch-all centre, then the emergency route): these tests pin down which
forms are read as a number and which are withheld.
"""

from __future__ import annotations

import pytest

from gateway.calls.inbound import (
    EMERGENCY,
    OWNER,
    ROADSIDE,
    WITHHELD,
    Inbound,
    classify,
    e164,
    number_country,
)
from gateway.plan import InboundNumber, NumberPlan

SE_MOBILE = "+46701234567"


@pytest.mark.parametrize(("raw", "expected"), [
    (SE_MOBILE, SE_MOBILE),
    (f"  {SE_MOBILE}\t", SE_MOBILE),  # surrounding whitespace
    ("+46 70 123 45 67", SE_MOBILE),  # formatted: normalised to E.164
    ("tel:+1-202-555-0123", "+12025550123"),
    ("TEL:+12025550123", "+12025550123"),  # the scheme is case-insensitive
    (f"sip:{SE_MOBILE}@trunk.example.com;user=phone", SE_MOBILE),
    (f"SIP:{SE_MOBILE}@trunk.example.com", SE_MOBILE),
    (f"sips:{SE_MOBILE}@trunk.example.com", SE_MOBILE),  # not read as "s:+46..."
    (f"Sips:{SE_MOBILE}", SE_MOBILE),
    (f"sip:{SE_MOBILE};user=phone", SE_MOBILE),  # parameters without a host
    (f"{SE_MOBILE};ext=12", SE_MOBILE),
    (f"{SE_MOBILE}@gw.example.com", SE_MOBILE),
    (f"sip: {SE_MOBILE} @trunk", SE_MOBILE),  # spaces around the user part
    (f"sip:{SE_MOBILE};user=phone;isub=1", SE_MOBILE),  # the number ends at the first ';'
    (f"sip:{SE_MOBILE}@proxy@trunk.example.com", SE_MOBILE),  # ... and at the first '@'
    ("+80012345678", "+80012345678"),  # international freephone: a number, no country
])
def test_e164_reads_every_form_twilio_sends(raw: str, expected: str) -> None:
    assert e164(raw) == expected


@pytest.mark.parametrize("raw", [
    None, "", "   ",
    "client:alice", "client:+46701234567",  # an identity, even one that looks like a number
    "anonymous", "Anonymous", "RESTRICTED", "unknown", "private", "unavailable", "blocked",
    "sip:anonymous@trunk.example.com", "sip:Restricted@x",
    "+266696687", "266696687", "+7378742833", "+2562533", "+8656696",  # carriers' markers
    "+266 696 687", "+7 378 742 833",
    "+86 566 96",  # a marker formatted (and a possible number): caught after normalising
    "tel:+266696687",
    "46701234567",  # national or missing '+': not international
    "(+46) 70 123 45 67", "\uff0b46701234567",  # international means a leading ASCII '+'
    f"{SE_MOBILE} ext:1",  # a ':' outside sip:/tel: is an identity, not a number
    "0701234567",
    "+abc", "+", "+46",  # not a number / too short to be possible
    "+461", "+4670123456789012",
    "sip:@trunk", "tel:",
])
def test_e164_refuses_what_is_not_a_readable_number(raw: str | None) -> None:
    assert e164(raw) is None


def test_withheld_markers_are_never_read_as_a_car() -> None:
    for marker in WITHHELD:
        assert e164(marker) is None, marker
        assert e164(f"sip:{marker}@trunk.example.com") is None, marker


@pytest.mark.parametrize(("number", "country"), [
    (SE_MOBILE, "SE"),
    ("+4915112345678", "DE"),
    ("+12025550123", "US"),
    ("+442079460123", "GB"),
    ("+80012345678", None),  # non-geographic ("001"): no country
    (None, None),
    ("", None),
    ("not a number", None),
    ("+999999", None),  # no region at all
])
def test_number_country(number: str | None, country: str | None) -> None:
    assert number_country(number) == country


def test_classify_reads_the_service_and_country_from_the_number_called(plan: NumberPlan) -> None:
    assert classify("+442079460900", plan) == Inbound(EMERGENCY, None, True)  # any country
    assert classify("+442079460901", plan) == Inbound(ROADSIDE, None, True)
    assert classify("+442079460902", plan) == Inbound(OWNER, None, True)
    assert classify("+12025550150", plan) == Inbound(EMERGENCY, "US", True)
    assert classify("+12025550151", plan) == Inbound(ROADSIDE, "US", True)
    # the forms of From are the forms of To: a SIP URI to our own number is that number
    assert classify("sip:+442079460901@trunk.example.com", plan) == Inbound(ROADSIDE, None, True)
    assert classify("+44 20 7946 0901", plan) == Inbound(ROADSIDE, None, True)


@pytest.mark.parametrize("to", [None, "", "+15005550006", "client:alice", "anonymous"])
def test_an_unknown_number_called_is_an_emergency(plan: NumberPlan, to: str | None) -> None:
    assert classify(to, plan) == Inbound(EMERGENCY, None, False)


def test_without_a_plan_every_call_is_an_emergency() -> None:
    assert classify("+442079460901", None) == Inbound(EMERGENCY, None, False)


def test_a_country_number_keeps_its_country_and_the_wildcard_is_none() -> None:
    plan = NumberPlan("test", {}, (), inbound=(
        InboundNumber("+442079460950", ROADSIDE, "GB", "test"),
        InboundNumber("+442079460951", OWNER, "*", "test"),
    ))
    assert classify("+442079460950", plan) == Inbound(ROADSIDE, "GB", True)
    assert classify("+442079460951", plan) == Inbound(OWNER, None, True)
