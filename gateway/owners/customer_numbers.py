"""Customer numbers: the 8-digit lookup code the IVR asks for, with its check digit.

Callers phoning from an unregistered number identify the car with its *lookup
code*: an 8-digit customer number (7 random digits and a Damm check digit, so a
mistyped digit or two swapped neighbours are rejected without a database query).
Numbers issued before Damm carry a Luhn digit and stay valid: they are stored and
printed, never re-derived.  It is an identifier, not a secret; the PIN is what
authenticates.
"""

from __future__ import annotations

import random
import secrets
from typing import TypeGuard

from stdnum import damm, luhn

LOOKUP_CODE_LENGTH = 8

_system_random = secrets.SystemRandom()


def _eight_digits(code: object) -> TypeGuard[str]:
    return (
        isinstance(code, str)
        and len(code) == LOOKUP_CODE_LENGTH
        and code.isascii()
        and code.isdigit()
    )


def lookup_check_digit(body: str) -> str:
    """The Damm check digit for the 7-digit ``body`` of a customer number."""
    if not (len(body) == LOOKUP_CODE_LENGTH - 1 and body.isascii() and body.isdigit()):
        raise ValueError("a lookup code body is 7 ASCII digits")
    return damm.calc_check_digit(body)


def new_lookup_code(rng: random.Random | None = None) -> str:
    """A random 8-digit customer number whose last digit is a Damm check digit.

    ``rng`` is for tests (a seeded :class:`random.Random`); codes are drawn from
    the operating system's generator otherwise.
    """
    draw = rng if rng is not None else _system_random
    body = "".join(draw.choice("0123456789") for _ in range(LOOKUP_CODE_LENGTH - 1))
    return body + lookup_check_digit(body)


def lookup_code_valid(code: object) -> bool:
    """Whether ``code`` is 8 ASCII digits ending in a correct Damm check digit.

    Damm catches every single mistyped digit and every swap of two adjacent
    digits (Luhn, used before, misses ``09`` <-> ``90``).
    """
    return _eight_digits(code) and damm.is_valid(code)


def legacy_lookup_code_valid(code: object) -> bool:
    """Whether ``code`` is 8 ASCII digits ending in a correct *Luhn* check digit.

    Customer numbers issued before the switch to Damm carry a Luhn digit and are
    printed on the owners' papers, so they stay valid for look-ups and imports.
    """
    return _eight_digits(code) and luhn.is_valid(code)


def lookup_code_accepted(code: object) -> bool:
    """Whether the registry takes ``code``: a Damm code, or a Luhn code issued before.

    A caller's typo of a Damm code slips through only if it happens to carry a
    valid Luhn digit; it then reaches the database and matches nothing unless it
    is exactly another car's old number (and the PIN still has to be right).
    """
    return lookup_code_valid(code) or legacy_lookup_code_valid(code)

