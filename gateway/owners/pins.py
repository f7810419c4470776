"""PINs: salted scrypt hashes, constant-time comparison, and the lockout tables.

PINs are 4 to 8 ASCII digits, gathered by DTMF.  Stored only as a salted scrypt
hash (:class:`PinHasher`), compared with :func:`hmac.compare_digest`.  No PIN
digit is ever logged, written to the database or put in an exception message.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Literal

import sqlalchemy as sa

from gateway.store import TS, metadata

pin_failures = sa.Table(
    "pin_failures",
    metadata,
    sa.Column("vin", sa.String(17), primary_key=True),
    sa.Column("failures", sa.Integer, nullable=False, default=0),
    sa.Column("locked_until", TS),
    sa.Column("updated_at", TS, nullable=False),
)

# -- hashing ---------------------------------------------------------------------------

_PIN_RE = re.compile(r"[0-9]{4,8}", re.ASCII)
#: deliberately free of digits, so it cannot echo a PIN even by accident
PIN_FORMAT_MESSAGE = "PIN must be four to eight ASCII digits"

_HASH_RE = re.compile(
    r"scrypt\$n=(?P<n>[0-9]+),r=(?P<r>[0-9]+),p=(?P<p>[0-9]+)"
    r"\$(?P<salt>[A-Za-z0-9+/]+={0,2})\$(?P<hash>[A-Za-z0-9+/]+={0,2})",
    re.ASCII,
)

#: upper bounds accepted from a stored hash, so a tampered row cannot make
#: verification eat the server (2**17 * r=16 is 256 MiB)
_MAX_N = 2**17
_MAX_R = 16
_MAX_P = 8


def is_valid_pin(pin: object) -> bool:
    """Whether ``pin`` is a string of 4 to 8 ASCII digits."""
    return isinstance(pin, str) and _PIN_RE.fullmatch(pin) is not None


def check_pin_format(pin: object) -> str:
    """Return ``pin`` if well formed; else ValueError whose message holds no digit."""
    if not is_valid_pin(pin):
        raise ValueError(PIN_FORMAT_MESSAGE)
    assert isinstance(pin, str)
    return pin


class PinHasher:
    """Salted scrypt hashes of PINs: ``scrypt$n=...,r=...,p=...$<salt b64>$<hash b64>``.

    The defaults (n=2**14, r=8, p=2: 16 MiB, about 65 ms per hash on the
    development machine) make each guess against a stolen hash cost real time;
    tests pass a smaller ``n``.  The parameters travel with each stored hash, so
    hashes made with other parameters still verify (see :meth:`needs_rehash`).
    """

    def __init__(
        self, *, n: int = 2**14, r: int = 8, p: int = 2, salt_bytes: int = 16, dklen: int = 32
    ) -> None:
        if n < 2 or n & (n - 1) or n > _MAX_N:
            raise ValueError("scrypt n must be a power of two between 2 and 2**17")
        if not 1 <= r <= _MAX_R or not 1 <= p <= _MAX_P:
            raise ValueError("scrypt r or p out of range")
        if not 16 <= salt_bytes <= 64 or not 16 <= dklen <= 64:
            raise ValueError("salt and key length must be between 16 and 64 bytes")
        self.n, self.r, self.p = n, r, p
        self.salt_bytes, self.dklen = salt_bytes, dklen

    @staticmethod
    def _derive(pin: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
        maxmem = 128 * r * (n + p + 2) + (1 << 20)
        return hashlib.scrypt(
            pin.encode("ascii"), salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=dklen
        )

    def hash(self, pin: str) -> str:
        """A new salted hash of ``pin``; ValueError if it is not 4 to 8 digits."""
        check_pin_format(pin)
        salt = secrets.token_bytes(self.salt_bytes)
        digest = self._derive(pin, salt, self.n, self.r, self.p, self.dklen)
        return "scrypt$n={},r={},p={}${}${}".format(
            self.n,
            self.r,
            self.p,
            base64.b64encode(salt).decode("ascii"),
            base64.b64encode(digest).decode("ascii"),
        )

    @staticmethod
    def _parse(stored: str) -> tuple[int, int, int, bytes, bytes]:
        match = _HASH_RE.fullmatch(stored) if isinstance(stored, str) else None
        if match is None:
            raise ValueError("stored PIN hash is malformed")
        n, r, p = int(match["n"]), int(match["r"]), int(match["p"])
        if n < 2 or n & (n - 1) or n > _MAX_N or not 1 <= r <= _MAX_R or not 1 <= p <= _MAX_P:
            raise ValueError("stored PIN hash has out-of-range parameters")
        salt = base64.b64decode(match["salt"], validate=True)
        digest = base64.b64decode(match["hash"], validate=True)
        if not 16 <= len(salt) <= 64 or not 16 <= len(digest) <= 64:
            raise ValueError("stored PIN hash has a bad salt or key length")
        return n, r, p, salt, digest

    def verify(self, pin: str, stored: str) -> bool:
        """Whether ``pin`` matches ``stored``, compared in constant time.

        A malformed ``pin`` simply does not match; a malformed ``stored`` hash
        raises ValueError (it means the database row is damaged).
        """
        n, r, p, salt, expected = self._parse(stored)
        if not is_valid_pin(pin):
            return False
        candidate = self._derive(pin, salt, n, r, p, len(expected))
        return hmac.compare_digest(candidate, expected)

    def needs_rehash(self, stored: str) -> bool:
        n, r, p, salt, digest = self._parse(stored)
        return (n, r, p, len(salt), len(digest)) != (
            self.n, self.r, self.p, self.salt_bytes, self.dklen
        )



PinOutcome = Literal["ok", "wrong", "locked", "not_set"]


@dataclass(frozen=True)
class PinCheck:
    """The result of one PIN attempt.

    ``outcome``: ``ok``; ``wrong`` (``locked_until`` is set when this attempt
    used up the last try); ``locked`` (refused without checking the PIN);
    ``not_set`` (the vehicle has no PIN; nothing is counted).
    """

    outcome: PinOutcome
    failures: int
    locked_until: dt.datetime | None

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

