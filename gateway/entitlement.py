"""Roadside-assistance entitlement: free, or costs apply (told to caller and agent).

Roadside assistance is included for ``included_years`` (3) years after
purchase.  The cover runs up to and including the day before the third
anniversary of the purchase date; for a car bought on 29 February the
anniversary in a common year is 1 March, so the cover ends on 28 February.
After that it stays free in the markets where the car is serviced regularly
(``GATEWAY_ROADSIDE_FREE_MARKETS``, e.g. ``SE,DE,NO``); otherwise costs apply.

Everything here is pure: no clock, no database.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

import phonenumbers

from gateway.errors import ConfigError

ENV_FREE_MARKETS = "GATEWAY_ROADSIDE_FREE_MARKETS"

_ALPHA2 = re.compile(r"[A-Z]{2}", re.ASCII)


@dataclass(frozen=True)
class Entitlement:
    included: bool
    #: one short sentence for the agent whisper
    reason: str
    #: whole years since purchase (0 for a car bought less than a year ago)
    age_years: int
    #: last day covered by the included years
    cover_until: dt.date


def add_years(day: dt.date, years: int) -> dt.date:
    """``day`` moved by whole years; 29 February becomes 1 March in a common year."""
    try:
        return day.replace(year=day.year + years)
    except ValueError:  # 29 February -> a common year
        return dt.date(day.year + years, 3, 1)


def age_in_years(purchase_date: dt.date, today: dt.date) -> int:
    """Completed years from ``purchase_date`` to ``today`` (0 if not yet a year, or future)."""
    if today < purchase_date:
        return 0
    years = today.year - purchase_date.year
    if add_years(purchase_date, years) > today:
        years -= 1
    return years


def _years(n: int) -> str:
    return f"{n} year old" if n == 1 else f"{n} years old"


def roadside_entitlement(
    *,
    purchase_date: dt.date,
    today: dt.date,
    market: str,
    serviced_regularly: bool,
    free_after_warranty_markets: frozenset[str],
    included_years: int = 3,
) -> Entitlement:
    """Whether roadside assistance is free for this car today, and why."""
    if included_years < 0:
        raise ValueError("included_years must not be negative")
    if isinstance(purchase_date, dt.datetime) or isinstance(today, dt.datetime):
        raise TypeError("purchase_date and today must be dates, not datetimes")
    market = market.strip().upper()
    age = age_in_years(purchase_date, today)
    cover_until = add_years(purchase_date, included_years) - dt.timedelta(days=1)
    if today <= cover_until:
        return Entitlement(
            True,
            f"Included: car is {_years(age)} ({included_years}-year cover)",
            age,
            cover_until,
        )
    if serviced_regularly and market in free_after_warranty_markets:
        return Entitlement(
            True, f"Included: serviced regularly in market {market}", age, cover_until
        )
    if serviced_regularly:
        reason = (
            f"Costs apply: car is {_years(age)}; "
            f"no free cover after {included_years} years in market {market}"
        )
    else:
        reason = f"Costs apply: car is {_years(age)} and not serviced regularly"
    return Entitlement(False, reason, age, cover_until)


def parse_market_rule(env_value: str, *, name: str = ENV_FREE_MARKETS) -> frozenset[str]:
    """``"SE,DE,NO"`` -> ``frozenset({"SE", "DE", "NO"})``; ConfigError names the bad entry.

    Entries must be upper-case ISO 3166-1 alpha-2 codes of real countries
    (``UK`` is rejected: the code is ``GB``).  Empty means no market.
    """
    markets: set[str] = set()
    for raw in env_value.split(","):
        code = raw.strip()
        if not code:  # "", or a stray comma: like the other list settings
            continue
        if not _ALPHA2.fullmatch(code):
            raise ConfigError(f"{name}: {code!r} is not an upper-case ISO 3166-1 alpha-2 code")
        if code not in phonenumbers.SUPPORTED_REGIONS:
            raise ConfigError(f"{name}: {code!r} is not a known country code")
        markets.add(code)
    return frozenset(markets)


@dataclass(frozen=True)
class MarketRule:
    """The configured roadside policy: which markets keep cover free after the included years."""

    free_after_warranty_markets: frozenset[str] = frozenset()
    included_years: int = 3

    @classmethod
    def from_env_value(cls, env_value: str, *, included_years: int = 3) -> MarketRule:
        return cls(parse_market_rule(env_value), included_years)

    def entitlement(
        self, *, purchase_date: dt.date, today: dt.date, market: str, serviced_regularly: bool
    ) -> Entitlement:
        return roadside_entitlement(
            purchase_date=purchase_date,
            today=today,
            market=market,
            serviced_regularly=serviced_regularly,
            free_after_warranty_markets=self.free_after_warranty_markets,
            included_years=self.included_years,
        )
