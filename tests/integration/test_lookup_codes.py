"""Customer numbers in the registry: new ones carry a Damm digit, stored Luhn ones keep working."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.errors import ValidationError
from gateway.owners import (
    PinHasher,
    Vehicle,
    Vehicles,
    legacy_lookup_code_valid,
    lookup_code_valid,
)
from gateway.store import Store
from tests.conftest import Clock

OLD_CAR = "YV1ZW72U5N1234567"
NEW_CAR = "YV1ZW72U5N7654321"
LUHN_CODE = "09322025"  # issued before the switch: valid Luhn, not valid Damm


@pytest.fixture
def registry(tmp_path: Path, clock: Clock) -> Iterator[Vehicles]:
    store = Store.from_url(f"sqlite:///{tmp_path}/codes.sqlite3")
    store.create_schema()
    yield Vehicles(store, PinHasher(n=2**8, r=8, p=1), clock=clock)
    store.dispose()


def register(registry: Vehicles, vin: str, lookup_code: str | None) -> Vehicle:
    return registry.register(vin=vin, owner_name="Anna Lind", market="SE",
                             purchase_date=dt.date(2022, 3, 1), actor="import:dms",
                             lookup_code=lookup_code)


def test_a_stored_luhn_number_still_finds_its_car(registry: Vehicles) -> None:
    assert legacy_lookup_code_valid(LUHN_CODE) and not lookup_code_valid(LUHN_CODE)
    old = register(registry, OLD_CAR, LUHN_CODE)
    assert old.lookup_code == LUHN_CODE  # stored as issued, never re-derived
    assert registry.by_lookup_code(LUHN_CODE) == old
    assert registry.by_lookup_code(f" {LUHN_CODE} ") == old


def test_new_numbers_are_damm_and_typos_of_them_find_nothing(registry: Vehicles) -> None:
    new = register(registry, NEW_CAR, None)
    code = new.lookup_code
    assert lookup_code_valid(code)
    assert registry.by_lookup_code(code) == new
    for i in range(8):
        for d in "0123456789":
            typo = code[:i] + d + code[i + 1:]
            if typo != code:
                assert registry.by_lookup_code(typo) is None, typo
    for i in range(7):
        swapped = code[:i] + code[i + 1] + code[i] + code[i + 2:]
        if swapped != code:
            assert registry.by_lookup_code(swapped) is None, swapped


def test_a_number_with_no_valid_check_digit_is_refused(registry: Vehicles) -> None:
    with pytest.raises(ValidationError) as info:
        register(registry, OLD_CAR, "12345675")  # neither Luhn nor Damm
    assert set(info.value.errors) == {"lookup_code"}
    assert registry.by_lookup_code("12345675") is None
