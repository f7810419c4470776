"""Registry rows: the ``vehicles`` and ``owner_phones`` tables, :class:`Vehicle`, and the
core every part of the registry builds on (clock, transactions, reading a vehicle).

An owner may register several phone numbers (``owner_phones``, in order); the first is
also kept in ``vehicles.owner_phone``, the number theft messages go to.  Rows written
before ``owner_phones`` existed have only that column, and read the same way.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import phonenumbers
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gateway.errors import GatewayError, ValidationError
from gateway.owners.pins import LockoutPolicy, PinHasher, PinLockout
from gateway.store import TS, Store, as_utc, metadata

vehicles = sa.Table(
    "vehicles",
    metadata,
    sa.Column("vin", sa.String(17), primary_key=True),
    sa.Column("car_msisdn", sa.String(20), unique=True),
    sa.Column("owner_phone", sa.String(20), index=True),
    sa.Column("owner_name", sa.String(200), nullable=False),
    sa.Column("market", sa.String(2), nullable=False),
    sa.Column("language", sa.String(16)),
    sa.Column("purchase_date", sa.Date, nullable=False),
    sa.Column("serviced_regularly", sa.Boolean, nullable=False, default=False),
    sa.Column("lookup_code", sa.String(16), nullable=False, unique=True),
    sa.Column("pin_hash", sa.Text),
    sa.Column("immobilised", sa.Boolean, nullable=False, default=False),
    sa.Column("immobilised_by", sa.String(100)),
    sa.Column("immobilised_reference", sa.String(100)),
    sa.Column("immobilised_at", TS),
    sa.Column("reactivated_by", sa.String(100)),
    sa.Column("reactivated_at", TS),
    sa.Column("tracking", sa.Boolean, nullable=False, default=False),
    sa.Column("tracking_started_by", sa.String(100)),
    sa.Column("tracking_police_reference", sa.String(100)),
    sa.Column("tracking_started_at", TS),
    sa.Column("updated_at", TS, nullable=False),
)

#: every number of the owner, in the order given (position 0 is ``vehicles.owner_phone``)
owner_phones = sa.Table(
    "owner_phones",
    metadata,
    sa.Column("vin", sa.String(17), primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True),
    sa.Column("phone", sa.String(20), nullable=False, index=True),
)


class UnknownVehicleError(GatewayError, LookupError):
    """No vehicle is registered under this VIN."""

    def __init__(self, vin: str) -> None:
        super().__init__(f"no vehicle registered with VIN {vin!r}")
        self.vin = vin


class VehicleConflictError(GatewayError):
    """The request clashes with what is registered; ``errors`` maps field -> reason."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


@dataclass(frozen=True)
class Vehicle:
    """A registry row as the rest of the gateway sees it (the PIN hash stays inside)."""

    vin: str
    car_msisdn: str | None
    owner_phone: str | None
    owner_name: str
    market: str
    language: str | None
    purchase_date: dt.date
    serviced_regularly: bool
    lookup_code: str
    has_pin: bool
    immobilised: bool
    immobilised_by: str | None
    immobilised_reference: str | None
    immobilised_at: dt.datetime | None
    reactivated_by: str | None
    reactivated_at: dt.datetime | None
    tracking: bool
    tracking_started_by: str | None
    tracking_police_reference: str | None
    tracking_started_at: dt.datetime | None
    updated_at: dt.datetime
    #: every registered number of the owner, ``owner_phone`` first
    owner_phones: tuple[str, ...] = ()

    @property
    def customer_number(self) -> str:
        """The 8-digit number the IVR asks for (stored as ``lookup_code``)."""
        return self.lookup_code

    @classmethod
    def from_row(cls, row: Mapping[Any, Any], phones: Sequence[str] = ()) -> Vehicle:
        primary = row["owner_phone"]
        return cls(
            vin=row["vin"],
            car_msisdn=row["car_msisdn"],
            owner_phone=primary,
            owner_name=row["owner_name"],
            market=row["market"],
            language=row["language"],
            purchase_date=row["purchase_date"],
            serviced_regularly=bool(row["serviced_regularly"]),
            lookup_code=row["lookup_code"],
            has_pin=row["pin_hash"] is not None,
            immobilised=bool(row["immobilised"]),
            immobilised_by=row["immobilised_by"],
            immobilised_reference=row["immobilised_reference"],
            immobilised_at=as_utc(row["immobilised_at"]),
            reactivated_by=row["reactivated_by"],
            reactivated_at=as_utc(row["reactivated_at"]),
            tracking=bool(row["tracking"]),
            tracking_started_by=row["tracking_started_by"],
            tracking_police_reference=row["tracking_police_reference"],
            tracking_started_at=as_utc(row["tracking_started_at"]),
            updated_at=utc(row["updated_at"]),
            owner_phones=tuple(phones) if phones else ((primary,) if primary else ()),
        )


# -- small helpers shared by the registry's parts ---------------------------------------


def e164(value: str | None, field: str, errors: dict[str, str]) -> str | None:
    if value is None or value == "":
        return None
    try:
        number = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException:
        errors[field] = "not an E.164 number"
        return None
    if not phonenumbers.is_valid_number(number):
        errors[field] = "not a valid phone number"
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def normalise_phone(value: str) -> str | None:
    errors: dict[str, str] = {}
    return e164(value, "phone", errors)


def reference(value: object, field: str, errors: dict[str, str], *, limit: int = 100) -> str:
    text = value.strip() if isinstance(value, str) else ""
    if not text:
        errors[field] = "required"
    elif len(text) > limit:
        errors[field] = f"at most {limit} characters"
    return text


def normal_vin(value: object) -> str:
    return value.strip().upper() if isinstance(value, str) else ""


def checked_actor(value: object) -> str:
    text = value.strip() if isinstance(value, str) else ""
    if not text or len(text) > 100:
        raise ValidationError({"actor": "required, at most 100 characters"})
    return text


def utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def exists(conn: Connection, vin: str) -> bool:
    return conn.execute(sa.select(vehicles.c.vin).where(vehicles.c.vin == vin)).first() is not None


def phones_of(conn: Connection, vins: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """The ``owner_phones`` rows of these vehicles, in order."""
    wanted = list(vins)
    if not wanted:
        return {}
    found: dict[str, list[str]] = {}
    rows = conn.execute(
        sa.select(owner_phones.c.vin, owner_phones.c.phone)
        .where(owner_phones.c.vin.in_(wanted))
        .order_by(owner_phones.c.vin, owner_phones.c.position)
    )
    for vin, phone in rows:
        found.setdefault(vin, []).append(phone)
    return {vin: tuple(phones) for vin, phones in found.items()}


def write_phones(conn: Connection, vin: str, phones: Sequence[str]) -> None:
    """Replace the owner's numbers (``vehicles.owner_phone`` is the caller's to set)."""
    conn.execute(owner_phones.delete().where(owner_phones.c.vin == vin))
    if phones:
        conn.execute(owner_phones.insert(), [
            {"vin": vin, "position": i, "phone": phone} for i, phone in enumerate(phones)])


class RegistryCore:
    """What every part of :class:`~gateway.owners.registry.Vehicles` shares; every
    database error surfaces as :class:`~gateway.errors.StoreError`."""

    def __init__(
        self,
        store: Store,
        hasher: PinHasher,
        *,
        clock: Callable[[], float] = time.time,
        max_failures: int = 3,
        lockout: dt.timedelta = dt.timedelta(minutes=15),
        window: dt.timedelta | None = None,
    ) -> None:
        """``max_failures`` wrong PINs within ``window`` (default: ``lockout``) lock the
        PIN for ``lockout``; see :mod:`gateway.owners.pins`."""
        self.store = store
        self.hasher = hasher
        self.clock = clock
        self.pins = PinLockout(store, LockoutPolicy(
            max_failures=max_failures, window=window or lockout, lockout=lockout))

    @property
    def max_failures(self) -> int:
        return self.pins.policy.max_failures

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), tz=dt.UTC)

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.store.begin() as conn:
            yield conn

    def _many(self, conn: Connection, where: sa.ColumnElement[bool]) -> list[Vehicle]:
        rows = conn.execute(sa.select(vehicles).where(where).order_by(vehicles.c.vin)).all()
        phones = phones_of(conn, (r.vin for r in rows))
        return [Vehicle.from_row(r._mapping, phones.get(r.vin, ())) for r in rows]

    def _one(self, where: sa.ColumnElement[bool]) -> Vehicle | None:
        with self._tx() as conn:
            found = self._many(conn, where)
        return found[0] if found else None

    def get(self, vin: str) -> Vehicle | None:
        return self._one(vehicles.c.vin == normal_vin(vin))

    def _get_required(self, vin: str) -> Vehicle:
        found = self.get(vin)
        if found is None:
            raise UnknownVehicleError(vin)
        return found
