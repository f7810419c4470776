"""Customer numbers: a Damm check digit catches every single typo and adjacent swap."""

from __future__ import annotations

import random

import pytest

from gateway.owners import (
    legacy_lookup_code_valid,
    lookup_check_digit,
    lookup_code_accepted,
    lookup_code_valid,
    new_lookup_code,
)

#: fixed bodies: edge digits, the 0/9 pair Luhn cannot tell apart, and a spread
BODIES = ["0000000", "9999999", "0932202", "9032202", "1234567", "7654321", "5050505"] + [
    f"{n:07d}" for n in range(0, 10**7, 104_729)  # a prime stride: ~96 codes all over
]


def _single_digit_errors(code: str) -> list[str]:
    return [code[:i] + d + code[i + 1:] for i in range(len(code)) for d in "0123456789"
            if d != code[i]]


def _adjacent_transpositions(code: str) -> list[str]:
    return [code[:i] + code[i + 1] + code[i] + code[i + 2:] for i in range(len(code) - 1)
            if code[i] != code[i + 1]]


def test_generated_lookup_codes_carry_a_damm_check_digit() -> None:
    rng = random.Random(20261125)
    codes = [new_lookup_code(rng) for _ in range(500)]
    assert all(len(c) == 8 and c.isascii() and c.isdigit() and lookup_code_valid(c) for c in codes)
    again = random.Random(20261125)
    assert [new_lookup_code(again) for _ in range(500)] == codes  # reproducible
    assert len(set(codes)) == 500
    assert all(lookup_check_digit(c[:-1]) == c[-1] for c in codes)
    assert all(lookup_code_valid(new_lookup_code()) for _ in range(50))  # the system generator


@pytest.mark.parametrize("body", BODIES)
def test_every_single_digit_error_and_adjacent_swap_is_caught(body: str) -> None:
    code = body + lookup_check_digit(body)
    assert lookup_code_valid(code)
    typos = _single_digit_errors(code)
    swaps = _adjacent_transpositions(code)
    assert len(typos) == 72
    assert [t for t in typos if lookup_code_valid(t)] == []
    assert [s for s in swaps if lookup_code_valid(s)] == []


def test_damm_catches_the_09_90_swap_that_luhn_misses() -> None:
    # Luhn: both are valid, so a caller swapping the first two digits is not caught
    assert legacy_lookup_code_valid("09322025") and legacy_lookup_code_valid("90322025")
    code = "0932202" + lookup_check_digit("0932202")
    assert code == "09322027"
    assert lookup_code_valid(code) and not lookup_code_valid("90322027")
    assert not lookup_code_valid("09322025") and not lookup_code_valid("90322025")


def test_known_check_digits() -> None:
    # Damm's table (Wikipedia): 572 -> 4; our 8-digit codes
    assert lookup_code_valid("12345671") and not lookup_code_valid("12345674")
    assert lookup_check_digit("0000000") == "0"
    for body in ("123456", "12345678", "12345６7", "123a567"):
        with pytest.raises(ValueError, match="^a lookup code body is 7 ASCII digits$"):
            lookup_check_digit(body)


def test_numbers_issued_with_luhn_are_still_accepted() -> None:
    """Customer numbers are stored and printed, never re-derived: old ones keep working."""
    legacy = "12345674"  # Luhn-valid, issued before the switch
    assert legacy_lookup_code_valid(legacy) and not lookup_code_valid(legacy)
    assert lookup_code_accepted(legacy) and lookup_code_accepted("12345671")
    assert not lookup_code_accepted("12345675")  # neither Luhn nor Damm


@pytest.mark.parametrize(
    "code", ["1234567", "123456745", "1234567a", "１２３４５６７１", " 12345671", "", None, 12345671]
)
def test_malformed_lookup_codes_are_refused(code: object) -> None:
    assert not lookup_code_valid(code)
    assert not legacy_lookup_code_valid(code)
    assert not lookup_code_accepted(code)
