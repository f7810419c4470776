"""PINs: salted scrypt hashes, constant-time comparison, and the lockout rule.

PINs
    4 to 8 ASCII digits, gathered by DTMF.  Stored only as a salted scrypt hash
    (:class:`PinHasher`), compared with :func:`hmac.compare_digest`.  No PIN
    digit is ever logged, written to the database or put in an exception
    message; the audit records *that* an attempt happened and its outcome.
    Input that is not 4 to 8 ASCII digits (full-width or Arabic-Indic digits,
    ``*``, letters, nothing, nine digits or more) is *malformed*: it is refused
    before any hash is read or computed.  From the IVR or the agent API it counts
    as a wrong attempt (the caller entered something that is not the PIN; the
    IVR treats it like any other wrong PIN), audited with ``malformed: true``.

Lockout rule
    ``max_failures`` wrong attempts within ``window`` lock the vehicle's PIN for
    ``lockout`` (defaults: 3 failures within 15 minutes lock for 15 minutes).
    A failure is forgotten once it is ``window`` old (at 15:00 exactly it no
    longer counts), and a lock that has run out forgets the failures that set
    it, so the next wrong PIN counts 1.  A correct PIN, a new PIN and an
    operator's unlock clear everything.

    Kept in the database (``pin_failures``: one row per vehicle with the count
    and ``locked_until``; ``pin_failure_times``: one row per failure that still
    counts), so it holds across calls and gateway processes.  An attempt is
    *charged* before the slow hash is checked, in one transaction that creates
    the vehicle's ``pin_failures`` row if it is missing (``INSERT … ON CONFLICT
    DO NOTHING``), takes it with a conditional ``UPDATE`` (only while it is not
    locked; on PostgreSQL the row lock queues concurrent attempts, on SQLite the
    write lock does), then forgets failures older than the window, records this
    one, counts, and sets ``locked_until`` when the count reaches the limit.  So however many calls guess at the same time, at
    most ``max_failures`` guesses are checked per window, and a process that
    dies mid-check leaves a charge that ages out rather than a stuck state.
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
from sqlalchemy.engine import Connection

from gateway.store import TS, Store, as_utc, insert_ignore, metadata

pin_failures = sa.Table(
    "pin_failures",
    metadata,
    sa.Column("vin", sa.String(17), primary_key=True),
    #: failures counted at the last attempt (the live count is in pin_failure_times)
    sa.Column("failures", sa.Integer, nullable=False, default=0),
    sa.Column("locked_until", TS),
    sa.Column("updated_at", TS, nullable=False),
)

#: one row per charged attempt that has not been forgotten or cleared
pin_failure_times = sa.Table(
    "pin_failure_times",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("vin", sa.String(17), nullable=False, index=True),
    sa.Column("at", TS, nullable=False),
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
            pin.encode(), salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=dklen
        )

    def hash(self, pin: str) -> str:
        """A new salted hash of ``pin``; ValueError if it is not 4 to 8 digits."""
        check_pin_format(pin)
        salt = secrets.token_bytes(self.salt_bytes)
        digest = self._derive(pin, salt, self.n, self.r, self.p, self.dklen)
        salt_b64, digest_b64 = (base64.b64encode(b).decode() for b in (salt, digest))
        return f"scrypt$n={self.n},r={self.r},p={self.p}${salt_b64}${digest_b64}"

    @staticmethod
    def _parse(stored: str) -> tuple[int, int, int, bytes, bytes]:
        match = _HASH_RE.fullmatch(stored) if isinstance(stored, str) else None
        if match is None:
            raise ValueError("stored PIN hash is malformed")
        n, r, p = int(match["n"]), int(match["r"]), int(match["p"])
        if n < 2 or n & (n - 1) or n > _MAX_N or not 1 <= r <= _MAX_R or not 1 <= p <= _MAX_P:
            raise ValueError("stored PIN hash has out-of-range parameters")
        # the pattern admits only the base64 alphabet: nothing for b64decode to skip
        salt = base64.b64decode(match["salt"])
        digest = base64.b64decode(match["hash"])
        if not 16 <= len(salt) <= 64 or not 16 <= len(digest) <= 64:
            raise ValueError("stored PIN hash has a bad salt or key length")
        return n, r, p, salt, digest

    def verify(self, pin: str, stored: str) -> bool:
        """Whether ``pin`` matches ``stored``, compared in constant time.

        A malformed ``pin`` (not 4 to 8 ASCII digits: ``'１２３４'``, ``'12a4'``, ``''``)
        does not match, and is refused before the stored hash is read or scrypt runs;
        a malformed ``stored`` hash raises ValueError (the database row is damaged).
        """
        if not is_valid_pin(pin):
            return False
        n, r, p, salt, expected = self._parse(stored)
        candidate = self._derive(pin, salt, n, r, p, len(expected))
        return hmac.compare_digest(candidate, expected)

    def needs_rehash(self, stored: str) -> bool:
        n, r, p, salt, digest = self._parse(stored)
        return (n, r, p, len(salt), len(digest)) != (
            self.n, self.r, self.p, self.salt_bytes, self.dklen
        )


# -- lockout ---------------------------------------------------------------------------

PinOutcome = Literal["ok", "wrong", "locked", "not_set"]


@dataclass(frozen=True)
class PinCheck:
    """The result of one PIN attempt.

    ``outcome``: ``ok``; ``wrong`` (``locked_until`` is set when this attempt
    used up the last try; ``malformed`` when the entry was not 4 to 8 ASCII
    digits); ``locked`` (refused without checking the PIN); ``not_set`` (the
    vehicle has no PIN; nothing is counted).
    """

    outcome: PinOutcome
    failures: int
    locked_until: dt.datetime | None
    malformed: bool = False

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


@dataclass(frozen=True)
class LockoutPolicy:
    """``max_failures`` failures within ``window`` lock the PIN for ``lockout``."""

    max_failures: int = 3
    window: dt.timedelta = dt.timedelta(minutes=15)
    lockout: dt.timedelta = dt.timedelta(minutes=15)

    def __post_init__(self) -> None:
        if self.max_failures < 1:
            raise ValueError("max_failures must be at least 1")
        if self.window <= dt.timedelta(0):
            raise ValueError("window must be positive")
        if self.lockout <= dt.timedelta(0):
            raise ValueError("lockout must be positive")


@dataclass(frozen=True)
class Charge:
    """One attempt's charge: ``charged`` False means the PIN is locked (not checked)."""

    charged: bool
    failures: int
    locked_until: dt.datetime | None


@dataclass(frozen=True)
class LockoutState:
    """What an operator sees: failures that count now, and the lock if it still holds."""

    failures: int
    locked_until: dt.datetime | None
    max_failures: int
    window: dt.timedelta

    @property
    def locked(self) -> bool:
        return self.locked_until is not None


class PinLockout:
    """The lockout rule over the database; safe across threads and processes."""

    def __init__(self, store: Store, policy: LockoutPolicy | None = None) -> None:
        self.store = store
        self.policy = policy or LockoutPolicy()

    def charge(self, vin: str, now: dt.datetime) -> Charge:
        """Count one attempt unless the PIN is locked (see the module docstring)."""
        c, t = pin_failures.c, pin_failure_times.c
        take = (
            pin_failures.update()
            .where(c.vin == vin, sa.or_(c.locked_until.is_(None), c.locked_until <= now))
            .values(updated_at=now)
            .returning(c.locked_until)
        )
        with self.store.begin() as conn:
            # the vehicle's row, created if missing (a vehicle added behind our back)
            insert_ignore(conn, pin_failures, {"vin": vin, "updated_at": now})
            row = conn.execute(take).first()
            if row is None:  # locked: not charged, not checked
                state = conn.execute(
                    sa.select(c.failures, c.locked_until).where(c.vin == vin)).one()
                return Charge(False, int(state.failures), as_utc(state.locked_until))
            # a lock that ran out forgets every failure; otherwise those a window old
            horizon = now if row.locked_until is not None else now - self.policy.window
            conn.execute(pin_failure_times.delete().where(t.vin == vin, t.at <= horizon))
            conn.execute(pin_failure_times.insert().values(vin=vin, at=now))
            failures = int(conn.execute(
                sa.select(sa.func.count()).where(t.vin == vin)).scalar_one())
            locked_until = (now + self.policy.lockout
                            if failures >= self.policy.max_failures else None)
            conn.execute(pin_failures.update().where(c.vin == vin).values(
                failures=failures, locked_until=locked_until))
            return Charge(True, failures, locked_until)

    @staticmethod
    def clear(conn: Connection, vin: str, now: dt.datetime) -> tuple[int, dt.datetime | None]:
        """Forget every failure and lift any lock, in the caller's transaction.

        Returns the ``(failures, locked_until)`` stored before (for the audit)."""
        c = pin_failures.c
        before = conn.execute(sa.select(c.failures, c.locked_until).where(c.vin == vin)).first()
        conn.execute(pin_failure_times.delete().where(pin_failure_times.c.vin == vin))
        if before is None:
            conn.execute(pin_failures.insert().values(vin=vin, updated_at=now))
            return 0, None
        conn.execute(pin_failures.update().where(c.vin == vin).values(
            failures=0, locked_until=None, updated_at=now))
        return int(before.failures), as_utc(before.locked_until)

    def state(self, conn: Connection, vin: str, now: dt.datetime) -> LockoutState:
        """At ``now``: while locked, the failures that set the lock and its end; else
        the failures that still count (younger than the window) and no lock."""
        c, t = pin_failures.c, pin_failure_times.c
        row = conn.execute(sa.select(c.failures, c.locked_until).where(c.vin == vin)).first()
        locked_until = as_utc(row.locked_until) if row is not None else None
        if row is not None and locked_until is not None and locked_until > now:
            return LockoutState(int(row.failures), locked_until, self.policy.max_failures,
                                self.policy.window)
        failures = 0
        if locked_until is None:  # a lock that ran out forgot the failures that set it
            failures = int(conn.execute(sa.select(sa.func.count()).where(
                t.vin == vin, t.at > now - self.policy.window)).scalar_one())
        return LockoutState(failures, None, self.policy.max_failures, self.policy.window)
