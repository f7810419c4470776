"""The number plan as data: the rows of its CSV files and :class:`NumberPlan`.

Nothing here reads files; :mod:`gateway.plan.loader` builds these from ``numbers/``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.errors import PlanEntryMissingError

DEFAULT_EMERGENCY = "112"
"""Dialled when nothing better is known: every 3GPP handset treats 112 as an emergency number."""

#: "every country", in ``centres.csv`` and ``inbound.csv``
WILDCARD = "*"

#: what a call to one of the gateway's own numbers is
SERVICES = ("emergency", "roadside", "owner")


@dataclass(frozen=True)
class CountryEntry:
    """One row of ``countries.csv``."""

    country: str
    name: str
    emergency_number: str
    #: a PSAP or TPS long number (E.164) that takes forwarded emergency calls, or ""
    psap_number: str
    #: the caller ID to present to ``psap_number`` ("" = pass the car's number through)
    psap_caller_id: str
    language: str
    source: str
    exception: str


@dataclass(frozen=True)
class Centre:
    """One row of ``centres.csv``."""

    centre_id: str
    name: str
    countries: frozenset[str]
    priority: int
    number: str
    roadside_number: str
    language: str

    @property
    def is_catch_all(self) -> bool:
        """True if the centre serves every country (``*``)."""
        return WILDCARD in self.countries

    def serves(self, country: str) -> bool:
        """True if the centre serves ``country`` (case-insensitive); ``*`` serves all."""
        return self.is_catch_all or country.strip().upper() in self.countries


@dataclass(frozen=True)
class InboundNumber:
    """One row of ``inbound.csv``: a number cars or owners call, and what it is for."""

    number: str
    service: str
    #: the country whose cars call it, or ``*``
    country: str
    source: str


@dataclass(frozen=True)
class TwilioEmergency:
    """One row of ``twilio_emergency.csv``: where Twilio itself can dial emergency numbers."""

    country: str
    numbers: tuple[str, ...]
    #: the caller ID needs a registered emergency address (routing follows that address)
    address_required: bool
    source: str


class NumberPlan:
    """A loaded, validated number plan."""

    def __init__(
        self,
        source: str,
        entries: Mapping[str, CountryEntry],
        centres: Sequence[Centre],
        inbound: Sequence[InboundNumber] = (),
        twilio_emergency: Mapping[str, TwilioEmergency] | None = None,
    ) -> None:
        self.source = source
        self._entries: dict[str, CountryEntry] = dict(entries)
        self._centres: tuple[Centre, ...] = tuple(centres)
        self.inbound: tuple[InboundNumber, ...] = tuple(inbound)
        self._inbound = {n.number: n for n in self.inbound}
        self._twilio: dict[str, TwilioEmergency] = dict(twilio_emergency or {})

    def inbound_number(self, number: str | None) -> InboundNumber | None:
        """The row of one of the gateway's own numbers (E.164), or None."""
        return self._inbound.get(number or "")

    def inbound_for(self, service: str, country: str | None) -> InboundNumber | None:
        """The number to call for ``service`` from a car of ``country``: one for that
        country first, else one for any country (``*``)."""
        rows = [n for n in self.inbound if n.service == service]
        for row in rows:
            if country and row.country == country.upper():
                return row
        return next((row for row in rows if row.country == WILDCARD), None)

    def twilio_emergency(self, country: str | None) -> TwilioEmergency | None:
        """Whether (and which numbers) Twilio dials as emergency calls in ``country``."""
        return self._twilio.get((country or "").upper())

    def twilio_emergency_countries(self) -> list[str]:
        """The countries where Twilio places emergency calls, sorted."""
        return sorted(self._twilio)

    def entry(self, country: str) -> CountryEntry:
        """The entry for ``country`` (case-insensitive); raises PlanEntryMissingError."""
        found = self.get(country)
        if found is None:
            raise PlanEntryMissingError(country)
        return found

    def get(self, country: str) -> CountryEntry | None:
        """The entry for ``country`` (case-insensitive), or None."""
        return self._entries.get(country.strip().upper())

    def centre(self, centre_id: str) -> Centre | None:
        """The centre with this id, or None."""
        return next((c for c in self._centres if c.centre_id == centre_id), None)

    def centres_for(self, country: str) -> list[Centre]:
        """Every centre serving ``country``, primary first.

        Ordered by priority, then specific centres before ``*`` centres at the
        same priority, then by centre_id.
        """
        return sorted(
            (c for c in self._centres if c.serves(country)),
            key=lambda c: (c.priority, c.is_catch_all, c.centre_id),
        )

    @property
    def centres(self) -> list[Centre]:
        """All centres, in file order."""
        return list(self._centres)

    def countries(self) -> list[str]:
        """The country codes in the plan, sorted."""
        return sorted(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, country: object) -> bool:
        return isinstance(country, str) and self.get(country) is not None

    def __repr__(self) -> str:
        return (
            f"NumberPlan(source={self.source!r}, countries={len(self._entries)}, "
            f"centres={len(self._centres)})"
        )
