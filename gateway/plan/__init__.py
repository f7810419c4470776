"""The number plan: per-country emergency routes, the assistance centres and the
gateway's own numbers.

The plan is data, kept in a directory of four CSV files (see ``numbers/README.md``):

``countries.csv``
    one row per ISO 3166-1 alpha-2 code: the emergency number the car dials, the
    operator's PSAP/TPS long number and the caller ID to present there (both optional),
    the ``<Say>`` language, the source of the number and, if libphonenumber does not
    know the number, why it was chosen anyway.
``centres.csv``
    the assistance centres, each serving a list of countries (or ``*``) at a
    priority (1 = primary).
``inbound.csv``
    the gateway's own Twilio numbers: the service each answers (emergency, roadside,
    owner) and the country whose cars call it (or ``*``).
``twilio_emergency.csv``
    the countries where Twilio itself places emergency calls, the short numbers it
    dials there, and whether the caller ID needs a registered address.

:func:`load_plan` reads and validates the files; any problem raises
:class:`~gateway.errors.PlanError` naming the file, the line and the reason.
Nothing is read at import time.

The data classes and :class:`NumberPlan` live in :mod:`gateway.plan.model`, the CSV
reading in :mod:`gateway.plan.loader`; import both from here.
"""

from __future__ import annotations

from gateway.plan.loader import (
    CENTRE_COLUMNS,
    CENTRES_FILE,
    COUNTRIES_FILE,
    COUNTRY_COLUMNS,
    INBOUND_COLUMNS,
    INBOUND_FILE,
    TWILIO_EMERGENCY_COLUMNS,
    TWILIO_EMERGENCY_FILE,
    load_plan,
    load_plan_or_none,
    plan_dir_default,
)
from gateway.plan.model import (
    DEFAULT_EMERGENCY,
    SERVICES,
    WILDCARD,
    Centre,
    CountryEntry,
    InboundNumber,
    NumberPlan,
    TwilioEmergency,
)

__all__ = [
    "CENTRES_FILE",
    "CENTRE_COLUMNS",
    "COUNTRIES_FILE",
    "COUNTRY_COLUMNS",
    "DEFAULT_EMERGENCY",
    "INBOUND_COLUMNS",
    "INBOUND_FILE",
    "SERVICES",
    "TWILIO_EMERGENCY_COLUMNS",
    "TWILIO_EMERGENCY_FILE",
    "WILDCARD",
    "Centre",
    "CountryEntry",
    "InboundNumber",
    "NumberPlan",
    "TwilioEmergency",
    "load_plan",
    "load_plan_or_none",
    "plan_dir_default",
]
