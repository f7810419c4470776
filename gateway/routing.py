"""Where the car is (for a new incident), and the owners' IVR's choice of centre line.

Plain functions over plain data; no Flask, no database.  The emergency policy of a
car's call lives in :mod:`gateway.calls.call_plan`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

from gateway.calls.call_plan import MIN_RING_S, TWILIO_RING_SLACK_S
from gateway.calls.inbound import number_country
from gateway.config import VoicePolicy
from gateway.plan import Centre, NumberPlan

log = logging.getLogger(__name__)



class Locator(Protocol):
    def country_at(self, lat: float, lon: float) -> str | None: ...


@dataclass(frozen=True)
class CountryChoice:
    """The country whose emergency route applies, and why."""

    country: str | None
    location_country: str | None
    reason: str


def sim_country(msisdn: str | None) -> str | None:
    """The region of a SIM's number (E.164), or None if it has none."""
    return number_country(msisdn)


def choose_country(
    lat: float | None,
    lon: float | None,
    *,
    locator: Locator | None,
    last_known: Callable[[], str | None],
    msisdn: str | None,
) -> CountryChoice:
    """Where is the car, for emergency purposes?

    The car's position decides (territorial waters belong to the coastal
    country).  At sea, or if the lookup fails, fall back in order to the car's
    last known country, its SIM's country, and finally no country (the plan
    default, 112).
    """
    location_country: str | None = None
    why_not = "no position"
    if lat is not None and lon is not None and locator is not None:
        try:
            location_country = locator.country_at(lat, lon)
            why_not = "position is outside every country (at sea)"
        except Exception:  # the lookup must never stop a route being chosen
            log.exception("country lookup failed")
            why_not = "country lookup failed"
    if location_country:
        return CountryChoice(location_country, location_country, "location")
    try:
        last = last_known()
    except Exception:
        log.exception("last known country unavailable")
        last = None
    if last:
        return CountryChoice(last, None, f"last-known-country ({why_not})")
    sim = sim_country(msisdn)
    if sim:
        return CountryChoice(sim, None, f"sim-country ({why_not}, no last known country)")
    return CountryChoice(None, None, f"plan-default ({why_not}, no last known or SIM country)")


# -- the voice router -----------------------------------------------------------------


@dataclass(frozen=True)
class DialCentre:
    centre: Centre
    number: str
    attempt: int
    timeout_s: int
    reason: str


def next_centre_attempt(
    *,
    home_country: str | None,
    route_country: str | None,
    attempt: int,
    elapsed_s: float,
    policy: VoicePolicy,
    plan: NumberPlan | None,
    unreachable: Collection[str] = (),
    roadside: bool = False,
) -> DialCentre | str:
    """The next centre to ring, or the reason there is none.

    ``attempt`` is the 1-based number of the attempt being planned.  Centres
    serving the car's home country come first (they speak the driver's language
    and know the car), then those serving the country where it is.  Centres known
    unreachable are skipped.  No attempt starts that could ring past the budget.
    """
    if attempt > policy.dial_attempts:
        return f"{policy.dial_attempts} centre attempt(s) used"
    remaining = policy.budget_s - elapsed_s
    timeout = int(min(policy.ring_timeout_s, remaining - TWILIO_RING_SLACK_S))
    if timeout < MIN_RING_S:
        return f"time budget of {policy.budget_s}s exhausted after {elapsed_s:.0f}s"
    if plan is None:
        return "no number plan"
    candidates: list[Centre] = []
    for country in (home_country, route_country):
        if country:
            for centre in plan.centres_for(country):
                if centre not in candidates:
                    candidates.append(centre)
    if not candidates:
        return "no assistance centre serves the car's countries"
    reachable = [c for c in candidates if c.centre_id not in unreachable]
    if not reachable:
        names = ", ".join(c.centre_id for c in candidates)
        return f"every centre is known unreachable ({names})"
    centre = reachable[(attempt - 1) % len(reachable)]
    number = centre.roadside_number if roadside and centre.roadside_number else centre.number
    skipped = [c.centre_id for c in candidates if c.centre_id in unreachable]
    reason = f"centre attempt {attempt}/{policy.dial_attempts}, ring {timeout}s"
    if skipped:
        reason += f"; skipped unreachable {', '.join(skipped)}"
    return DialCentre(centre=centre, number=number, attempt=attempt, timeout_s=timeout, reason=reason)
