"""Who is calling, and what the number they called is for: read from the call alone.

No database, no Flask: ``To`` says the service (``numbers/inbound.csv``), ``From`` says
the car's SIM.  Twilio sends ``From`` as E.164 (``+46701234567``), as a SIP URI
(``sip:+46701234567@trunk.example.com;user=phone``), as a ``client:`` identity, or
withheld (``anonymous``, ``+266696687``, ...): every form is read the same way here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import phonenumbers

from gateway.plan import WILDCARD, NumberPlan

#: what Twilio and carriers put in ``From`` when the caller's number is withheld
WITHHELD = frozenset({
    "anonymous", "restricted", "unknown", "private", "unavailable", "blocked",
    "+266696687", "266696687", "+7378742833", "+2562533", "+8656696",
})

EMERGENCY = "emergency"
ROADSIDE = "roadside"
OWNER = "owner"


@functools.lru_cache(maxsize=4096)
def e164(raw: str | None) -> str | None:
    """The E.164 form of a number as Twilio sends it (plain, ``tel:``, ``sip:``), or
    None when it is withheld, not international, or not a possible number."""
    if not raw:
        return None
    value = raw.strip()
    lower = value.lower()
    for scheme in ("sips:", "sip:", "tel:"):
        if lower.startswith(scheme):
            value = value[len(scheme):]
            break
    else:
        if ":" in value:  # client:alice and other identities carry no number
            return None
    value = value.split("@", 1)[0].split(";", 1)[0].strip()
    if value.lower() in WITHHELD or not value.startswith("+"):
        return None
    try:
        number = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return None
    formatted = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return None if formatted in WITHHELD else formatted


@functools.lru_cache(maxsize=4096)
def number_country(number: str | None) -> str | None:
    """The region of an E.164 number (a SIM's country), or None."""
    if not number:
        return None
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return None
    region = phonenumbers.region_code_for_number(parsed)
    return region if region and region != "001" else None


@dataclass(frozen=True)
class Inbound:
    """The service a call is for, from the number it called."""

    service: str
    #: the country the called number serves (None: any country, or an unknown number)
    country: str | None
    #: False when ``To`` is not one of the plan's numbers (treated as an emergency)
    known: bool


def classify(to: str | None, plan: NumberPlan | None) -> Inbound:
    """Which service a call to ``to`` is.  An unknown number is an emergency: a car that
    dials a number we do not know must still reach a person (documented behaviour)."""
    row = plan.inbound_number(e164(to)) if plan is not None else None
    if row is None:
        return Inbound(EMERGENCY, None, False)
    return Inbound(row.service, None if row.country == WILDCARD else row.country, True)
