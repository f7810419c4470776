"""Roadside entitlement: 3 years included, then free only where serviced in a listed market."""

from __future__ import annotations

import datetime as dt

import pytest

from gateway.entitlement import (
    MarketRule,
    add_years,
    age_in_years,
    parse_market_rule,
    roadside_entitlement,
)
from gateway.errors import ConfigError

FREE = frozenset({"SE", "DE", "NO"})
D = dt.date


def ent(purchase: dt.date, today: dt.date, *, market: str = "SE", serviced: bool = False,
        years: int = 3) -> tuple[bool, str]:
    e = roadside_entitlement(
        purchase_date=purchase, today=today, market=market, serviced_regularly=serviced,
        free_after_warranty_markets=FREE, included_years=years,
    )
    return e.included, e.reason


def test_two_year_old_car_is_included_whatever_the_service() -> None:
    assert ent(D(2022, 5, 10), D(2024, 6, 1), market="US") == (
        True, "Included: car is 2 years old (3-year cover)"
    )


def test_four_year_old_serviced_in_a_listed_market_is_included() -> None:
    assert ent(D(2020, 5, 10), D(2024, 6, 1), market="SE", serviced=True) == (
        True, "Included: serviced regularly in market SE"
    )


def test_four_year_old_not_serviced_pays() -> None:
    assert ent(D(2020, 5, 10), D(2024, 6, 1), market="SE", serviced=False) == (
        False, "Costs apply: car is 4 years old and not serviced regularly"
    )


def test_four_year_old_serviced_in_an_unlisted_market_pays() -> None:
    included, reason = ent(D(2020, 5, 10), D(2024, 6, 1), market="FR", serviced=True)
    assert included is False
    assert reason.startswith("Costs apply: car is 4 years old")
    assert "FR" in reason


def test_market_code_is_compared_case_insensitively() -> None:
    assert ent(D(2020, 5, 10), D(2024, 6, 1), market="se", serviced=True)[0] is True


@pytest.mark.parametrize(
    ("today", "included", "age"),
    [
        (D(2024, 5, 9), True, 2),  # last covered day
        (D(2024, 5, 10), False, 3),  # exactly three years: the cover has run out
        (D(2024, 5, 11), False, 3),
    ],
)
def test_boundary_at_exactly_three_years(today: dt.date, included: bool, age: int) -> None:
    e = roadside_entitlement(
        purchase_date=D(2021, 5, 10), today=today, market="FR", serviced_regularly=False,
        free_after_warranty_markets=FREE,
    )
    assert (e.included, e.age_years) == (included, age)
    assert e.cover_until == D(2024, 5, 9)


def test_boundary_serviced_in_listed_market_stays_free_across_the_anniversary() -> None:
    for today in (D(2024, 5, 9), D(2024, 5, 10)):
        assert ent(D(2021, 5, 10), today, market="NO", serviced=True)[0] is True


@pytest.mark.parametrize(
    ("today", "included"),
    [
        (D(2023, 2, 27), True),
        (D(2023, 2, 28), True),  # last covered day in the common year 2023
        (D(2023, 3, 1), False),  # third anniversary of a 29 February purchase
    ],
)
def test_leap_day_purchase(today: dt.date, included: bool) -> None:
    e = roadside_entitlement(
        purchase_date=D(2020, 2, 29), today=today, market="FR", serviced_regularly=False,
        free_after_warranty_markets=FREE,
    )
    assert e.included is included
    assert e.cover_until == D(2023, 2, 28)


def test_leap_day_purchase_into_a_leap_year() -> None:
    # 4-year cover from 29 Feb 2020 ends on 28 Feb 2024; 29 Feb 2024 is the anniversary
    assert ent(D(2020, 2, 29), D(2024, 2, 28), market="FR", years=4)[0] is True
    assert ent(D(2020, 2, 29), D(2024, 2, 29), market="FR", years=4)[0] is False


def test_age_in_years() -> None:
    assert age_in_years(D(2020, 2, 29), D(2021, 2, 28)) == 0
    assert age_in_years(D(2020, 2, 29), D(2021, 3, 1)) == 1
    assert age_in_years(D(2020, 6, 1), D(2020, 5, 1)) == 0  # purchase date in the future
    assert add_years(D(2020, 2, 29), 1) == D(2021, 3, 1)
    assert add_years(D(2020, 2, 29), 4) == D(2024, 2, 29)


def test_one_year_old_reason_is_singular() -> None:
    assert ent(D(2023, 1, 1), D(2024, 6, 1))[1] == "Included: car is 1 year old (3-year cover)"


def test_market_rule_object_applies_the_same_policy() -> None:
    rule = MarketRule.from_env_value("SE, DE,NO")
    assert rule.free_after_warranty_markets == FREE
    e = rule.entitlement(purchase_date=D(2019, 1, 1), today=D(2024, 1, 1), market="DE",
                         serviced_regularly=True)
    assert e.included and e.reason == "Included: serviced regularly in market DE"
    assert not MarketRule().entitlement(
        purchase_date=D(2019, 1, 1), today=D(2024, 1, 1), market="DE", serviced_regularly=True
    ).included


@pytest.mark.parametrize(("value", "expected"), [
    ("SE,DE,NO", FREE), (" SE , DE ,NO ", FREE), ("", frozenset()), ("GB,", frozenset({"GB"})),
])
def test_parse_market_rule(value: str, expected: frozenset[str]) -> None:
    assert parse_market_rule(value) == expected


@pytest.mark.parametrize("value", ["se,DE", "SWE", "S1", "UK", "ZZ", "SE;DE", "SE DE"])
def test_parse_market_rule_rejects_bad_codes(value: str) -> None:
    with pytest.raises(ConfigError, match="GATEWAY_ROADSIDE_FREE_MARKETS"):
        parse_market_rule(value)
