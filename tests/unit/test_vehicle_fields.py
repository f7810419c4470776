"""Enrolment fields: one validator for JSON (admin API) and CSV cells (bulk import)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from gateway.errors import ValidationError
from gateway.owners import VehicleRecord, parse_changes, parse_record

TODAY = dt.date(2026, 11, 25)
JSON: dict[str, Any] = {
    "vin": "YV1ZW72U5N1234567", "car_msisdn": "+46701740606", "market": "SE",
    "purchase_date": "2024-03-01", "serviced_regularly": True, "owner_name": "Anna Lind",
    "owner_phones": ["+46701740605"], "language": "sv-SE",
}
CSV = {**JSON, "serviced_regularly": "yes", "owner_phones": "+46701740605"}


def errors(data: dict[str, Any], *, text: bool = False) -> dict[str, str]:
    with pytest.raises(ValidationError) as info:
        parse_record(data, text=text, today=TODAY)
    return info.value.errors


def test_a_record_from_json_and_from_csv_cells_is_the_same() -> None:
    expected = VehicleRecord("YV1ZW72U5N1234567", "+46701740606", "SE", dt.date(2024, 3, 1),
                             True, "Anna Lind", ("+46701740605",), "sv-SE")
    assert parse_record(JSON, text=False, today=TODAY) == expected
    assert parse_record(CSV, text=True, today=TODAY) == expected


@pytest.mark.parametrize(("cell", "value"), [
    ("true", True), ("TRUE", True), ("yes", True), ("1", True), (" Yes ", True),
    ("false", False), ("no", False), ("0", False), ("", False),
])
def test_serviced_regularly_words_in_a_csv(cell: str, value: bool) -> None:
    record = parse_record({**CSV, "serviced_regularly": cell}, text=True, today=TODAY)
    assert record.serviced_regularly is value


@pytest.mark.parametrize("cell", ["y", "ja", "2", "true-ish"])
def test_other_words_are_refused(cell: str) -> None:
    assert list(errors({**CSV, "serviced_regularly": cell}, text=True)) == ["serviced_regularly"]


def test_json_wants_real_booleans_and_lists() -> None:
    assert list(errors({**JSON, "serviced_regularly": "true"})) == ["serviced_regularly"]
    assert list(errors({**JSON, "owner_phones": "+46701740605"})) == ["owner_phones"]


def test_csv_phones_are_separated_by_semicolons_and_read_in_the_market() -> None:
    record = parse_record({**CSV, "owner_phones": " 070-174 06 05 ; +49 151 12349001 ;"},
                          text=True, today=TODAY)
    assert record.owner_phones == ("+46701740605", "+4915112349001")
    assert errors({**CSV, "owner_phones": " ; "}, text=True) == {
        "owner_phones": "at least one phone number is required"}
    assert errors({**CSV, "owner_phones": "  "}, text=True) == {"owner_phones": "required"}


def test_phones_limits() -> None:
    five = [f"+4670174060{i}" for i in range(5)]
    assert parse_record({**JSON, "owner_phones": five}, text=False, today=TODAY).owner_phones \
        == tuple(five)
    assert errors({**JSON, "owner_phones": [*five, "+46701740599"]}) == {
        "owner_phones": "at most 5 phone numbers"}
    assert errors({**JSON, "owner_phones": []}) == {
        "owner_phones": "at least one phone number is required"}


def test_national_numbers_need_a_valid_market() -> None:
    found = errors({**JSON, "market": "XX", "car_msisdn": "070-174 06 06"})
    assert set(found) == {"car_msisdn", "market"}


@pytest.mark.parametrize(("day", "ok"), [
    ("1990-01-01", True), ("1989-12-31", False), ("2026-11-26", True), ("2026-11-27", False),
    ("2024-02-29", True), ("2023-02-29", False), ("2024-3-1", False), ("٢٠٢٤-٠٣-٠١", False),
])
def test_purchase_date_bounds(day: str, ok: bool) -> None:
    data = {**JSON, "purchase_date": day}
    if ok:
        assert parse_record(data, text=False, today=TODAY).purchase_date.isoformat() == day
    else:
        assert list(errors(data)) == ["purchase_date"]


@pytest.mark.parametrize(("tag", "normal"), [
    ("sv-SE", "sv-SE"), ("SV-se", "sv-SE"), ("de", "de"), ("zh-Hant-TW", "zh-Hant-TW"),
    ("", None), (None, None),
])
def test_language_tags_are_normalised(tag: str | None, normal: str | None) -> None:
    assert parse_record({**JSON, "language": tag}, text=False, today=TODAY).language == normal


@pytest.mark.parametrize("tag", ["Swedish", "sv_SE", "s", "sv-SE-extraordinarily-long"])
def test_bad_language_tags(tag: str) -> None:
    assert list(errors({**JSON, "language": tag})) == ["language"]


def test_errors_come_in_field_order_and_name_unknown_fields_last() -> None:
    found = errors({"zz": 1, "language": "x", "vin": "bad", "owner_phones": ["+4670", "x"]})
    assert list(found) == ["vin", "car_msisdn", "market", "purchase_date", "owner_name",
                           "owner_phones[0]", "language", "zz"]


def test_no_reason_repeats_the_value() -> None:
    secret = "73810592"
    found = errors({**JSON, "owner_name": "\x00" + secret, "car_msisdn": secret,
                    "purchase_date": secret, "pin": secret, secret: secret})
    assert all(secret not in reason for reason in found.values())


def test_changes_take_some_fields_and_refuse_the_vin_and_removals() -> None:
    assert parse_changes({"serviced_regularly": False, "language": None}, text=False,
                         today=TODAY, market="SE") == {"serviced_regularly": False,
                                                       "language": None}
    assert parse_changes({"owner_phones": ["0151 12349001"]}, text=False, today=TODAY,
                         market="DE") == {"owner_phones": ("+4915112349001",)}
    with pytest.raises(ValidationError) as info:
        parse_changes({"vin": "YV1ZW72U5N7654321", "owner_name": None, "x": 1}, text=False,
                      today=TODAY, market="SE")
    assert info.value.errors == {"owner_name": "required: cannot be removed",
                                 "vin": "cannot be changed: it identifies the vehicle",
                                 "x": "unknown field"}
    with pytest.raises(ValidationError) as info:
        parse_changes({}, text=False, today=TODAY, market="SE")
    assert info.value.errors == {"body": "no field to change"}


def test_differences_follow_the_field_order() -> None:
    a = parse_record(JSON, text=False, today=TODAY)
    b = a.replace({"language": None, "vin": "YV1ZW72U5N7654321", "owner_phones": ("+46701740699",)})
    assert b.differences(a) == ["vin", "owner_phones", "language"]
    assert a.differences(a) == []
