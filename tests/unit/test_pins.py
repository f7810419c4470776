"""PinHasher: salted scrypt, parameters in the stored string, constant-time compare."""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import re
from collections.abc import Callable
from typing import Any

import pytest

from gateway.owners import (
    PinHasher,
    check_pin_format,
    is_valid_pin,
    legacy_lookup_code_valid,
    lookup_check_digit,
    lookup_code_accepted,
    lookup_code_valid,
    new_lookup_code,
)

FAST = {"n": 2**8, "r": 8, "p": 1}
PIN = "738105"


@pytest.fixture
def hasher() -> PinHasher:
    return PinHasher(**FAST)


def test_stored_form_carries_parameters_salt_and_hash(hasher: PinHasher) -> None:
    stored = hasher.hash(PIN)
    match = re.fullmatch(r"scrypt\$n=256,r=8,p=1\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)", stored)
    assert match, stored
    salt, digest = (base64.b64decode(g) for g in match.groups())
    assert len(salt) == 16 and len(digest) == 32
    # it really is scrypt of the PIN with that salt and those parameters
    assert digest == hashlib.scrypt(PIN.encode(), salt=salt, n=256, r=8, p=1, dklen=32)
    assert PIN not in stored


def test_each_hash_has_a_fresh_salt(hasher: PinHasher) -> None:
    hashes = {hasher.hash(PIN) for _ in range(20)}
    salts = {h.split("$")[2] for h in hashes}
    assert len(hashes) == 20 and len(salts) == 20


def test_verify_accepts_the_pin_and_rejects_others(hasher: PinHasher) -> None:
    stored = hasher.hash(PIN)
    assert hasher.verify(PIN, stored) is True
    for other in ("738104", "7381050", "0738105", "1234", "", "73810", "738105 ", "abcdef"):
        assert hasher.verify(other, stored) is False, other


def test_verify_uses_the_parameters_stored_with_the_hash() -> None:
    old = PinHasher(n=2**6, r=4, p=1).hash(PIN)
    current = PinHasher(**FAST)
    assert current.verify(PIN, old) is True
    assert current.needs_rehash(old) is True
    assert current.needs_rehash(current.hash(PIN)) is False


def test_comparison_goes_through_hmac_compare_digest(
    hasher: PinHasher, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = hasher.hash(PIN)
    calls: list[tuple[Any, Any]] = []
    original = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert hasher.verify(PIN, stored) is True
    assert hasher.verify("111111", stored) is False
    assert len(calls) == 2
    assert all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in calls)


def test_default_cost_is_production_strength() -> None:
    hasher = PinHasher()
    assert hasher.n * hasher.r * hasher.p >= 2**14 * 8  # at least 16 MiB-equivalent work
    assert hasher.hash(PIN).startswith("scrypt$n=16384,r=8,p=2$")


@pytest.mark.parametrize(
    "bad", ["739", "7391057391", "73a9", "٧٣٨١", "１２３４", "7381 05", "", "+738105", "738105\n"]
)
def test_bad_format_raises_without_echoing_any_digit(hasher: PinHasher, bad: str) -> None:
    assert not is_valid_pin(bad)
    calls: list[Callable[[], object]] = [lambda: hasher.hash(bad), lambda: check_pin_format(bad)]
    for call in calls:
        with pytest.raises(ValueError) as info:
            call()
        text = str(info.value) + repr(info.value.args)
        assert not re.search(r"[0-9]", text), text
        assert info.value.__cause__ is None


def test_non_string_pin_is_rejected(hasher: PinHasher) -> None:
    with pytest.raises(ValueError):
        hasher.hash(738105)  # type: ignore[arg-type]


@pytest.mark.parametrize("pin", ["0000", "1234", "00001234", "99999999"])
def test_four_to_eight_digits_are_accepted(hasher: PinHasher, pin: str) -> None:
    assert hasher.verify(pin, hasher.hash(pin))


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "bcrypt$x",
        "scrypt$n=16384,r=8,p=1$c2FsdA==",
        "scrypt$n=1000,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAA==",  # not 2**k
        "scrypt$n=1073741824,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAA==",
        "scrypt$n=256,r=8,p=1$AAAA$AAAAAAAAAAAAAAAAAAAAAA==",  # salt too short
    ],
)
def test_damaged_stored_hash_is_an_error_not_a_match(hasher: PinHasher, stored: str) -> None:
    with pytest.raises(ValueError):
        hasher.verify(PIN, stored)


def test_cost_parameters_are_validated() -> None:
    with pytest.raises(ValueError):
        PinHasher(n=1000)
    with pytest.raises(ValueError):
        PinHasher(n=2**20)


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
    with pytest.raises(ValueError):
        lookup_check_digit("123456")
    with pytest.raises(ValueError):
        lookup_check_digit("12345６7")


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
