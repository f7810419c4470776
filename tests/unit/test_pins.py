"""PINs: salted scrypt, constant-time compare, malformed input refused before any hash,
and the lockout rule at its boundaries (a fake clock over a real SQLite database)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gateway.errors import StoreError
from gateway.owners import PinHasher, check_pin_format, is_valid_pin
from gateway.owners.pins import (
    Charge,
    LockoutPolicy,
    LockoutState,
    PinLockout,
    pin_failure_times,
    pin_failures,
)
from gateway.store import Store

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



# -- malformed input never reaches the hash ---------------------------------------------

MALFORMED = ["１２３４", "١٢٣٤", "12a4", "", "123", "123456789", "1234 ", " 1234", "12*4",
             "1234#", "+1234", "1234\n", "\x00123", None, 1234, b"1234"]


@pytest.mark.parametrize("entry", MALFORMED)
def test_malformed_entry_is_refused_before_the_stored_hash_or_scrypt(
    hasher: PinHasher, entry: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = hasher.hash(PIN)
    touched: list[str] = []
    monkeypatch.setattr(hashlib, "scrypt", lambda *a, **k: touched.append("scrypt"))
    monkeypatch.setattr(PinHasher, "_parse", staticmethod(lambda s: touched.append("parse")))
    assert not is_valid_pin(entry)
    assert hasher.verify(entry, stored) is False
    # even against a damaged row: a malformed entry is not reported as a damaged hash
    assert hasher.verify(entry, "garbage") is False
    assert touched == []


@pytest.mark.parametrize("entry", ["0000", "12345678", "0123", "99999999"])
def test_well_formed_entries_are_hashed(hasher: PinHasher, entry: str) -> None:
    assert is_valid_pin(entry) and check_pin_format(entry) == entry
    assert hasher.verify(entry, hasher.hash(PIN)) is False


def test_pin_format_message_names_the_rule_without_a_digit() -> None:
    with pytest.raises(ValueError, match="^PIN must be four to eight ASCII digits$"):
        check_pin_format("12")


# -- the lockout rule at its boundaries -------------------------------------------------

VIN = "YV1ZW72U5N1234567"
T0 = dt.datetime(2026, 11, 25, 10, 0, tzinfo=dt.UTC)


def after(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store.from_url(f"sqlite:///{tmp_path}/pins.sqlite3")
    store.create_schema()
    yield store
    store.dispose()


@pytest.fixture
def lockout(store: Store) -> PinLockout:
    return PinLockout(store)  # 3 failures within 15 minutes lock for 15 minutes


def charges(lockout: PinLockout, *seconds: float) -> list[Charge]:
    return [lockout.charge(VIN, after(s)) for s in seconds]


def state(lockout: PinLockout, seconds: float) -> LockoutState:
    with lockout.store.begin() as conn:
        return lockout.state(conn, VIN, after(seconds))


def test_default_rule_is_three_failures_in_fifteen_minutes_lock_fifteen() -> None:
    policy = LockoutPolicy()
    assert (policy.max_failures, policy.window, policy.lockout) == (
        3, dt.timedelta(minutes=15), dt.timedelta(minutes=15))


def test_three_failures_within_the_window_lock(lockout: PinLockout) -> None:
    first, second, third = charges(lockout, 0, 450, 899)
    assert first == Charge(True, 1, None)
    assert second == Charge(True, 2, None)
    assert third == Charge(True, 3, after(899 + 900))
    assert lockout.charge(VIN, after(900)) == Charge(False, 3, after(1799))
    assert lockout.charge(VIN, after(1798)) == Charge(False, 3, after(1799))
    locked = state(lockout, 1798)
    assert (locked.failures, locked.locked_until, locked.locked) == (3, after(1799), True)


def test_a_failure_is_forgotten_when_it_is_exactly_the_window_old(lockout: PinLockout) -> None:
    assert [c.failures for c in charges(lockout, 0, 899)] == [1, 2]
    assert state(lockout, 899.999).failures == 2
    assert state(lockout, 900).failures == 1  # the first is 15:00 old: forgotten
    third = lockout.charge(VIN, after(900))
    assert third == Charge(True, 2, None)  # not locked: only two within the window
    # at 1798 s the failure at 899 s is 899 s old: it still counts, with those at 900, 1798
    assert lockout.charge(VIN, after(1798)) == Charge(True, 3, after(1798 + 900))


def test_two_wrong_pins_months_apart_and_one_more_do_not_lock(lockout: PinLockout) -> None:
    day = 24 * 3600
    assert [c.failures for c in charges(lockout, 0, 60 * day, 60 * day + 1)] == [1, 1, 2]
    assert not state(lockout, 60 * day + 1).locked


def test_a_lock_that_ran_out_forgets_the_failures_that_set_it(lockout: PinLockout) -> None:
    charges(lockout, 0, 1, 2)
    assert lockout.charge(VIN, after(901.999)).charged is False
    expired = state(lockout, 902)
    assert (expired.failures, expired.locked_until, expired.locked) == (0, None, False)
    assert lockout.charge(VIN, after(902)) == Charge(True, 1, None)


def test_a_longer_lock_than_window_still_starts_afresh(store: Store) -> None:
    lockout = PinLockout(store, LockoutPolicy(max_failures=2, window=dt.timedelta(minutes=1),
                                              lockout=dt.timedelta(hours=1)))
    assert charges(lockout, 0, 59)[-1] == Charge(True, 2, after(59 + 3600))
    # both failures are older than the window by now; the lock still holds and says why
    assert state(lockout, 3000) == LockoutState(2, after(3659), 2, dt.timedelta(minutes=1))
    assert lockout.charge(VIN, after(3658)).charged is False
    assert lockout.charge(VIN, after(3659)) == Charge(True, 1, None)


def test_a_shorter_lock_than_window_also_forgets_the_failures_that_set_it(
    store: Store,
) -> None:
    lockout = PinLockout(store, LockoutPolicy(max_failures=2, window=dt.timedelta(hours=1),
                                              lockout=dt.timedelta(minutes=1)))
    assert charges(lockout, 0, 1)[-1] == Charge(True, 2, after(61))
    # both failures are still inside the hour, but the lock they set has run out
    assert state(lockout, 61).failures == 0
    assert lockout.charge(VIN, after(61)) == Charge(True, 1, None)


def test_clear_forgets_failures_and_lifts_the_lock(lockout: PinLockout, store: Store) -> None:
    charges(lockout, 0, 1, 2)
    with store.begin() as conn:
        assert lockout.clear(conn, VIN, after(3)) == (3, after(902))
    assert state(lockout, 3) == LockoutState(0, None, 3, dt.timedelta(minutes=15))
    assert lockout.charge(VIN, after(4)) == Charge(True, 1, None)
    with store.begin() as conn:
        rows = conn.execute(sa.select(pin_failure_times.c.at)).all()
    assert len(rows) == 1


def test_clear_without_any_row_creates_one(lockout: PinLockout, store: Store) -> None:
    with store.begin() as conn:
        assert lockout.clear(conn, VIN, T0) == (0, None)
        row = conn.execute(sa.select(pin_failures)).one()
    assert (row.vin, row.failures, row.locked_until) == (VIN, 0, None)


def test_state_of_an_unknown_vehicle_is_clean(lockout: PinLockout) -> None:
    assert state(lockout, 0) == LockoutState(0, None, 3, dt.timedelta(minutes=15))


def test_charge_creates_the_missing_row_and_keeps_one_row_per_vehicle(
    lockout: PinLockout, store: Store
) -> None:
    charges(lockout, 0, 1)
    with store.begin() as conn:
        rows = conn.execute(sa.select(pin_failures)).all()
    assert len(rows) == 1 and rows[0].failures == 2 and rows[0].updated_at is not None


def test_charge_reports_a_database_that_cannot_be_written(tmp_path: Path) -> None:
    broken = PinLockout(Store.from_url(f"sqlite:///{tmp_path}/missing/x.sqlite3"))
    with pytest.raises(StoreError):
        broken.charge(VIN, T0)


@pytest.mark.parametrize("bad", [
    {"max_failures": 0},
    {"window": dt.timedelta(0)},
    {"lockout": dt.timedelta(seconds=-1)},
])
def test_policy_refuses_nonsense(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        LockoutPolicy(**bad)


def test_policy_accepts_the_smallest_values() -> None:
    tiny = dt.timedelta(microseconds=1)
    assert LockoutPolicy(max_failures=1, window=tiny, lockout=tiny).max_failures == 1


# -- the limits of the cost parameters, exactly ---------------------------------------------

N_MESSAGE = "^scrypt n must be a power of two between 2 and 2\\*\\*17$"
RP_MESSAGE = "^scrypt r or p out of range$"
LENGTH_MESSAGE = "^salt and key length must be between 16 and 64 bytes$"


@pytest.mark.parametrize("params", [
    {"n": 2}, {"n": 2**17}, {"r": 1}, {"r": 16}, {"p": 1}, {"p": 8},
    {"salt_bytes": 16}, {"salt_bytes": 64}, {"dklen": 16}, {"dklen": 64},
])
def test_cost_parameters_at_their_limits_are_accepted(params: dict[str, int]) -> None:
    hasher = PinHasher(**{"n": 4, "r": 1, "p": 1, **params})
    for name, value in params.items():
        assert getattr(hasher, name) == value


@pytest.mark.parametrize(("params", "message"), [
    ({"n": 1}, N_MESSAGE), ({"n": 3}, N_MESSAGE), ({"n": 2**17 + 2**16}, N_MESSAGE),
    ({"n": 2**18}, N_MESSAGE), ({"r": 0}, RP_MESSAGE), ({"r": 17}, RP_MESSAGE),
    ({"p": 0}, RP_MESSAGE), ({"p": 9}, RP_MESSAGE), ({"salt_bytes": 15}, LENGTH_MESSAGE),
    ({"salt_bytes": 65}, LENGTH_MESSAGE), ({"dklen": 15}, LENGTH_MESSAGE),
    ({"dklen": 65}, LENGTH_MESSAGE),
])
def test_cost_parameters_past_their_limits_are_refused(params: dict[str, int],
                                                       message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PinHasher(**{"n": 4, "r": 1, "p": 1, **params})


def test_tiny_parameters_still_hash_and_verify() -> None:
    hasher = PinHasher(n=2, r=1, p=1, salt_bytes=64, dklen=64)
    stored = hasher.hash("4711")
    assert hasher.verify("4711", stored) and not hasher.verify("4712", stored)
    salt, digest = (base64.b64decode(part) for part in stored.split("$")[2:])
    assert len(salt) == 64 and len(digest) == 64


def test_scrypt_may_use_only_the_memory_the_stored_parameters_need(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tampered row is bounded by the parameter limits: 128*r*(n+p+2) bytes + 1 MiB."""
    seen: list[int] = []
    original = hashlib.scrypt

    def spy(*args: Any, **kwargs: Any) -> bytes:
        seen.append(kwargs["maxmem"])
        return original(*args, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", spy)
    hasher = PinHasher(n=2**8, r=8, p=1)
    stored = hasher.hash(PIN)
    old = PinHasher(n=2**6, r=4, p=3).hash(PIN)
    assert hasher.verify(PIN, stored) and hasher.verify(PIN, old)
    need_new, need_old = 128 * 8 * (2**8 + 1 + 2), 128 * 4 * (2**6 + 3 + 2)
    assert seen == [need_new + 2**20, need_old + 2**20, need_new + 2**20, need_old + 2**20]


def test_a_stored_hash_needing_more_than_openssls_default_memory_verifies() -> None:
    # 128 * 16 * 2**15 = 64 MiB: above OpenSSL's 32 MiB default, within our limits
    big = PinHasher(n=2**15, r=16, p=1)
    assert PinHasher(**FAST).verify(PIN, big.hash(PIN))


def stored_hash(n: int = 4, r: int = 1, p: int = 1, salt: int = 16, digest: int = 32) -> str:
    b64 = base64.b64encode
    return f"scrypt$n={n},r={r},p={p}${b64(bytes(salt)).decode()}${b64(bytes(digest)).decode()}"


@pytest.mark.parametrize("stored", [
    stored_hash(n=2), stored_hash(n=2**17), stored_hash(r=16), stored_hash(p=8),
    stored_hash(r=1, p=1), stored_hash(salt=16, digest=16), stored_hash(salt=64, digest=64),
])
def test_stored_hashes_at_the_limits_are_readable(hasher: PinHasher, stored: str) -> None:
    assert hasher.needs_rehash(stored) is True  # parsed, not refused


@pytest.mark.parametrize(("stored", "message"), [
    (stored_hash(n=1), "out-of-range parameters"), (stored_hash(n=3), "out-of-range parameters"),
    (stored_hash(n=2**18), "out-of-range parameters"),
    (stored_hash(r=0), "out-of-range parameters"), (stored_hash(r=17), "out-of-range parameters"),
    (stored_hash(p=0), "out-of-range parameters"), (stored_hash(p=9), "out-of-range parameters"),
    (stored_hash(salt=15), "a bad salt or key length"),
    (stored_hash(salt=65), "a bad salt or key length"),
    (stored_hash(digest=15), "a bad salt or key length"),
    (stored_hash(digest=65), "a bad salt or key length"),
    ("scrypt$n=4,r=1,p=1$AAAA", "malformed"), ("", "malformed"),
    (None, "malformed"), (b"scrypt$n=4", "malformed"),
])
def test_damaged_stored_hashes_are_named(hasher: PinHasher, stored: Any, message: str) -> None:
    with pytest.raises(ValueError, match=f"^stored PIN hash (has |is ){message}$"):
        hasher.verify(PIN, stored)
    with pytest.raises(ValueError, match=f"^stored PIN hash (has |is ){message}$"):
        hasher.needs_rehash(stored)


def test_needs_rehash_compares_every_parameter() -> None:
    current = PinHasher(n=4, r=1, p=1, salt_bytes=16, dklen=32)
    assert current.needs_rehash(stored_hash()) is False
    for other in (stored_hash(n=8), stored_hash(r=2), stored_hash(p=2), stored_hash(salt=17),
                  stored_hash(digest=33)):
        assert current.needs_rehash(other) is True, other


# -- lockout: messages, and one vehicle never touches another --------------------------------


@pytest.mark.parametrize(("bad", "message"), [
    ({"max_failures": 0}, "^max_failures must be at least 1$"),
    ({"window": dt.timedelta(0)}, "^window must be positive$"),
    ({"lockout": dt.timedelta(0)}, "^lockout must be positive$"),
])
def test_policy_messages(bad: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LockoutPolicy(**bad)


OTHER = "WDD2050421F123456"


def test_each_vehicle_has_its_own_row_count_and_lock(lockout: PinLockout, store: Store) -> None:
    assert lockout.charge(OTHER, after(0)) == Charge(True, 1, None)
    assert [c.failures for c in charges(lockout, 1, 2, 3)] == [1, 2, 3]
    assert lockout.charge(VIN, after(4)).charged is False
    assert lockout.charge(OTHER, after(4)) == Charge(True, 2, None)  # not locked by VIN
    with store.begin() as conn:
        other = lockout.state(conn, OTHER, after(5))
        rows = {r.vin: r for r in conn.execute(sa.select(pin_failures))}
    assert (other.failures, other.locked) == (2, False)
    assert rows[VIN].locked_until is not None and rows[OTHER].locked_until is None
    assert rows[OTHER].updated_at is not None


def test_a_lock_running_out_forgets_only_that_vehicles_failures(lockout: PinLockout) -> None:
    charges(lockout, 0, 1, 2)  # VIN locked until 902
    lockout.charge(OTHER, after(900))
    lockout.charge(OTHER, after(901))
    assert lockout.charge(VIN, after(902)) == Charge(True, 1, None)
    assert lockout.charge(OTHER, after(903)) == Charge(True, 3, after(903 + 900))


def test_clear_resets_the_row_it_keeps(lockout: PinLockout, store: Store) -> None:
    charges(lockout, 0, 1, 2)
    with store.begin() as conn:
        lockout.clear(conn, VIN, after(10))
        row = conn.execute(sa.select(pin_failures).where(pin_failures.c.vin == VIN)).one()
    assert (row.failures, row.locked_until) == (0, None)
    assert row.updated_at.replace(tzinfo=dt.UTC) == after(10)
