"""The vehicle registry: vehicles and their owners, immobiliser and tracking state.

PINs and their lockout are in :mod:`gateway.owners.pins`, customer numbers in
:mod:`gateway.owners.customer_numbers`, the audit trail in :mod:`gateway.owners.audit`;
:class:`Vehicles` puts them together over one :class:`~gateway.store.Store`.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import phonenumbers
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from gateway.errors import GatewayError, StoreError, ValidationError
from gateway.owners.audit import AuditEntry, audit, write_audit
from gateway.owners.customer_numbers import lookup_code_accepted, new_lookup_code
from gateway.owners.pins import (
    PIN_FORMAT_MESSAGE,
    LockoutPolicy,
    LockoutState,
    PinCheck,
    PinHasher,
    PinLockout,
    is_valid_pin,
    pin_failures,
)
from gateway.store import TS, Store, as_utc, metadata

log = logging.getLogger(__name__)

# -- tables ---------------------------------------------------------------------------

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

# -- errors ---------------------------------------------------------------------------


class UnknownVehicleError(GatewayError, LookupError):
    """No vehicle is registered under this VIN."""

    def __init__(self, vin: str) -> None:
        super().__init__(f"no vehicle registered with VIN {vin!r}")
        self.vin = vin


# -- records --------------------------------------------------------------------------


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

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Vehicle:
        return cls(
            vin=row["vin"],
            car_msisdn=row["car_msisdn"],
            owner_phone=row["owner_phone"],
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
            updated_at=_utc(row["updated_at"]),
        )


@dataclass(frozen=True)
class Reactivation:
    check: PinCheck
    vehicle: Vehicle
    #: True when this call switched the immobiliser off
    changed: bool

    @property
    def ok(self) -> bool:
        return self.check.ok


# -- validation helpers ---------------------------------------------------------------

_VIN_RE = re.compile(r"[A-HJ-NPR-Z0-9]{17}", re.ASCII)
_MARKET_RE = re.compile(r"[A-Z]{2}", re.ASCII)
_LANGUAGE_RE = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*", re.ASCII)


def _e164(value: str | None, field: str, errors: dict[str, str]) -> str | None:
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


def _normalise_phone(value: str) -> str | None:
    errors: dict[str, str] = {}
    return _e164(value, "phone", errors)


def _reference(value: object, field: str, errors: dict[str, str], *, limit: int = 100) -> str:
    text = value.strip() if isinstance(value, str) else ""
    if not text:
        errors[field] = "required"
    elif len(text) > limit:
        errors[field] = f"at most {limit} characters"
    return text


def _vin(value: object) -> str:
    return value.strip().upper() if isinstance(value, str) else ""


def _actor(value: object) -> str:
    text = value.strip() if isinstance(value, str) else ""
    if not text or len(text) > 100:
        raise ValidationError({"actor": "required, at most 100 characters"})
    return text


# -- the registry ---------------------------------------------------------------------


class Vehicles:
    """The vehicle registry over a :class:`Store`; every database error is StoreError."""

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

    # -- registration and lookup ------------------------------------------------------

    def register(
        self,
        *,
        vin: str,
        owner_name: str,
        market: str,
        purchase_date: dt.date,
        actor: str,
        serviced_regularly: bool = False,
        owner_phone: str | None = None,
        car_msisdn: str | None = None,
        language: str | None = None,
        lookup_code: str | None = None,
        pin: str | None = None,
    ) -> Vehicle:
        """Add a vehicle; ValidationError names each bad or already-taken field."""
        actor = _actor(actor)
        errors: dict[str, str] = {}
        vin = vin.strip().upper() if isinstance(vin, str) else ""
        if not _VIN_RE.fullmatch(vin):
            errors["vin"] = "must be 17 characters, digits and letters except I, O, Q"
        if not isinstance(owner_name, str) or not owner_name.strip():
            errors["owner_name"] = "required"
        elif len(owner_name) > 200:
            errors["owner_name"] = "at most 200 characters"
        if not isinstance(market, str) or not _MARKET_RE.fullmatch(market):
            errors["market"] = "must be an upper-case ISO 3166-1 alpha-2 code"
        if language is not None and not _LANGUAGE_RE.fullmatch(language):
            errors["language"] = "must be a language tag such as sv-SE"
        if not isinstance(purchase_date, dt.date) or isinstance(purchase_date, dt.datetime):
            errors["purchase_date"] = "must be a date"
        owner_phone = _e164(owner_phone, "owner_phone", errors)
        car_msisdn = _e164(car_msisdn, "car_msisdn", errors)
        if lookup_code is not None and not lookup_code_accepted(lookup_code):
            errors["lookup_code"] = "must be 8 digits with a valid check digit"
        pin_hash = None
        if pin is not None:
            if is_valid_pin(pin):
                pin_hash = self.hasher.hash(pin)
            else:
                errors["pin"] = PIN_FORMAT_MESSAGE
        if errors:
            raise ValidationError(errors)

        now = self._now()
        for _ in range(5):
            code = lookup_code or new_lookup_code()
            row = {
                "vin": vin,
                "car_msisdn": car_msisdn,
                "owner_phone": owner_phone,
                "owner_name": owner_name.strip(),
                "market": market,
                "language": language,
                "purchase_date": purchase_date,
                "serviced_regularly": bool(serviced_regularly),
                "lookup_code": code,
                "pin_hash": pin_hash,
                "immobilised": False,
                "tracking": False,
                "updated_at": now,
            }
            try:
                with self.store.engine.begin() as conn:
                    conn.execute(vehicles.insert().values(**row))
                    conn.execute(
                        pin_failures.insert().values(vin=vin, failures=0, updated_at=now)
                    )
                    write_audit(
                        conn, vin=vin, actor=actor, action="register", at=now,
                        detail={"market": market, "pin_set": pin_hash is not None},
                    )
            except IntegrityError:
                taken = self._taken(vin=vin, car_msisdn=car_msisdn, lookup_code=code)
                if taken == {"lookup_code"} and lookup_code is None:
                    continue  # a generated code collided: draw another
                raise ValidationError(
                    {f: "already registered to another vehicle" for f in taken or {"vin"}}
                ) from None
            except SQLAlchemyError as exc:
                raise StoreError(f"database error: {type(exc).__name__}") from exc
            log.info("vehicle %s registered", vin)
            return self._get_required(vin)
        raise StoreError("could not draw a free lookup code")

    def _taken(self, *, vin: str, car_msisdn: str | None, lookup_code: str) -> set[str]:
        taken: set[str] = set()
        with self._tx() as conn:
            if conn.execute(sa.select(vehicles.c.vin).where(vehicles.c.vin == vin)).first():
                taken.add("vin")
            if car_msisdn is not None and conn.execute(
                sa.select(vehicles.c.vin).where(vehicles.c.car_msisdn == car_msisdn)
            ).first():
                taken.add("car_msisdn")
            if conn.execute(
                sa.select(vehicles.c.vin).where(vehicles.c.lookup_code == lookup_code)
            ).first():
                taken.add("lookup_code")
        return taken

    def _one(self, where: sa.ColumnElement[bool]) -> Vehicle | None:
        with self._tx() as conn:
            found = conn.execute(sa.select(vehicles).where(where)).first()
        return Vehicle.from_row(found._mapping) if found is not None else None

    def get(self, vin: str) -> Vehicle | None:
        return self._one(vehicles.c.vin == _vin(vin))

    def _get_required(self, vin: str) -> Vehicle:
        found = self.get(vin)
        if found is None:
            raise UnknownVehicleError(vin)
        return found

    def by_owner_phone(self, phone: str) -> list[Vehicle]:
        """Every vehicle whose owner has this number (an owner may have several cars)."""
        number = _normalise_phone(phone)
        if number is None:
            return []
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(vehicles).where(vehicles.c.owner_phone == number).order_by(vehicles.c.vin)
            ).all()
        return [Vehicle.from_row(r._mapping) for r in rows]

    def by_car_msisdn(self, msisdn: str) -> Vehicle | None:
        number = _normalise_phone(msisdn)
        return self._one(vehicles.c.car_msisdn == number) if number else None

    def by_lookup_code(self, code: str) -> Vehicle | None:
        """The vehicle for digits typed by the caller; None for unknown or mistyped codes."""
        code = code.strip() if isinstance(code, str) else ""
        if not lookup_code_accepted(code):
            return None
        return self._one(vehicles.c.lookup_code == code)

    # -- PIN --------------------------------------------------------------------------

    def set_pin(self, vin: str, pin: str, *, actor: str) -> None:
        """Store a new PIN (hash only) and clear any failures or lock."""
        vin = _vin(vin)
        actor = _actor(actor)
        if not is_valid_pin(pin):
            raise ValidationError({"pin": PIN_FORMAT_MESSAGE})
        pin_hash = self.hasher.hash(pin)
        now = self._now()
        with self._tx() as conn:
            updated = conn.execute(
                vehicles.update()
                .where(vehicles.c.vin == vin)
                .values(pin_hash=pin_hash, updated_at=now)
            ).rowcount
            if not updated:
                raise UnknownVehicleError(vin)
            self.pins.clear(conn, vin, now)
            write_audit(conn, vin=vin, actor=actor, action="pin_set", at=now)

    def verify_pin(self, vin: str, pin: str, *, actor: str) -> PinCheck:
        """Check one PIN attempt against the lockout rule; every attempt is audited.

        A malformed entry (not 4 to 8 ASCII digits) is charged and answered as a wrong
        PIN without reading or computing any hash (``PinCheck.malformed``)."""
        vin = _vin(vin)
        actor = _actor(actor)
        now = self._now()
        with self._tx() as conn:
            stored = conn.execute(
                sa.select(vehicles.c.pin_hash).where(vehicles.c.vin == vin)
            ).first()
            if stored is None:
                raise UnknownVehicleError(vin)
            if stored.pin_hash is None:
                write_audit(conn, vin=vin, actor=actor, action="pin_not_set", at=now)
                return PinCheck("not_set", 0, None)
        pin_hash: str = stored.pin_hash

        charge = self.pins.charge(vin, now)
        failures, locked_until = charge.failures, charge.locked_until
        if not charge.charged:
            with self._tx() as conn:
                write_audit(
                    conn, vin=vin, actor=actor, action="pin_locked", at=now,
                    detail={"failures": failures, "locked_until": _iso(locked_until)},
                )
            return PinCheck("locked", failures, locked_until)

        malformed = not is_valid_pin(pin)
        matched = False
        if not malformed:
            try:
                matched = self.hasher.verify(pin, pin_hash)
            except ValueError:
                # a damaged hash row: the attempt stays charged; nobody gets in
                log.error("stored PIN hash of vehicle %s is unreadable", vin)
                raise StoreError("stored PIN hash is unreadable") from None

        with self._tx() as conn:
            if matched:
                self.pins.clear(conn, vin, now)
                write_audit(conn, vin=vin, actor=actor, action="pin_ok", at=now)
                return PinCheck("ok", 0, None)
            detail: dict[str, Any] = {"failures": failures, "max_failures": self.max_failures}
            if locked_until is not None:
                detail["locked_until"] = _iso(locked_until)
            if malformed:
                detail["malformed"] = True
            write_audit(conn, vin=vin, actor=actor, action="pin_wrong", at=now, detail=detail)
        if locked_until is not None:
            log.warning("vehicle %s locked after %d wrong PIN attempts", vin, failures)
        return PinCheck("wrong", failures, locked_until, malformed=malformed)

    def unlock_pin(self, vin: str, *, actor: str, reason: str) -> LockoutState:
        """An operator clears the failures and any lock; audited with the reason."""
        vin = _vin(vin)
        actor = _actor(actor)
        errors: dict[str, str] = {}
        reason = _reference(reason, "reason", errors, limit=200)
        if errors:
            raise ValidationError(errors)
        now = self._now()
        with self._tx() as conn:
            if not self._exists(conn, vin):
                raise UnknownVehicleError(vin)
            was = self.pins.state(conn, vin, now)
            self.pins.clear(conn, vin, now)
            write_audit(conn, vin=vin, actor=actor, action="pin_unlock", at=now, detail={
                "reason": reason, "failures": was.failures,
                "locked_until": _iso(was.locked_until)})
            return self.pins.state(conn, vin, now)

    # -- immobiliser and tracking -----------------------------------------------------

    def immobilise(self, vin: str, *, actor: str, authority_reference: str) -> Vehicle:
        """Switch the immobiliser on (agent API only); needs a police/authority reference.

        Already immobilised: nothing changes (the first reference stands), and
        the repeat request is audited.
        """
        return self._switch_on(
            vin, actor=actor, flag=vehicles.c.immobilised, action="immobilise",
            reference=(authority_reference, "authority_reference"),
            columns=("immobilised_by", "immobilised_reference", "immobilised_at"))

    def reactivate(self, vin: str, *, actor: str, pin: str) -> Reactivation:
        """Switch the immobiliser off, only if the owner's PIN checks out in this call."""
        vin = _vin(vin)
        actor = _actor(actor)
        check = self.verify_pin(vin, pin, actor=actor)
        changed = 0
        if check.ok:
            now = self._now()
            with self._tx() as conn:
                changed = conn.execute(
                    vehicles.update()
                    .where(vehicles.c.vin == vin, vehicles.c.immobilised.is_(True))
                    .values(
                        immobilised=False, reactivated_by=actor, reactivated_at=now, updated_at=now
                    )
                ).rowcount
                write_audit(
                    conn, vin=vin, actor=actor, action="reactivate", at=now,
                    detail={"changed": bool(changed)},
                )
        return Reactivation(check=check, vehicle=self._get_required(vin), changed=bool(changed))

    def start_tracking(self, vin: str, *, actor: str, police_reference: str) -> Vehicle:
        """Start tracking after unauthorised use is confirmed, recording the police report."""
        return self._switch_on(
            vin, actor=actor, flag=vehicles.c.tracking, action="tracking_started",
            reference=(police_reference, "police_reference"),
            columns=("tracking_started_by", "tracking_police_reference", "tracking_started_at"))

    def _switch_on(
        self,
        vin: str,
        *,
        actor: str,
        flag: sa.Column[Any],
        action: str,
        reference: tuple[str, str],
        columns: tuple[str, str, str],
    ) -> Vehicle:
        """Set a state flag with who, which reference and when; a repeat changes nothing
        (the first reference stands) but is audited.  ``columns`` name the by/reference/at
        columns; ``reference`` is (value, field name for the error)."""
        vin = _vin(vin)
        actor = _actor(actor)
        errors: dict[str, str] = {}
        value = _reference(reference[0], reference[1], errors)
        if errors:
            raise ValidationError(errors)
        now = self._now()
        by, ref, at = columns
        with self._tx() as conn:
            changed = conn.execute(
                vehicles.update()
                .where(vehicles.c.vin == vin, flag.is_(False))
                .values({flag.name: True, by: actor, ref: value, at: now, "updated_at": now})
            ).rowcount
            if not changed and not self._exists(conn, vin):
                raise UnknownVehicleError(vin)
            write_audit(
                conn, vin=vin, actor=actor, action=action, at=now,
                detail={reference[1]: value, "changed": bool(changed)},
            )
        return self._get_required(vin)

    def record(
        self, vin: str, *, actor: str, action: str, detail: Mapping[str, Any] | None = None
    ) -> None:
        """Audit an action decided elsewhere (e.g. ``unlock_requested``); no PINs in detail."""
        actor, vin = _actor(actor), _vin(vin)
        with self._tx() as conn:
            if not self._exists(conn, vin):
                raise UnknownVehicleError(vin)
            write_audit(conn, vin=vin, actor=actor, action=action, at=self._now(), detail=detail)

    def audit_for(self, vin: str, *, limit: int = 200) -> list[AuditEntry]:
        """The vehicle's audit trail, oldest first."""
        vin = _vin(vin)
        query = (
            sa.select(audit).where(audit.c.vin == vin).order_by(audit.c.id).limit(limit)
        )
        with self._tx() as conn:
            rows = conn.execute(query).all()
        return [
            AuditEntry(
                id=r.id, at=_utc(r.at), vin=r.vin, actor=r.actor,
                action=r.action, detail=dict(r.detail or {}),
            )
            for r in rows
        ]

    def lockout_state(self, vin: str) -> tuple[int, dt.datetime | None]:
        """``(failures that count now, locked_until while the lock holds)``."""
        state = self.lockout(vin)
        return state.failures, state.locked_until

    def lockout(self, vin: str) -> LockoutState:
        """The PIN lockout as an operator sees it (failures counted, lock, the rule)."""
        vin = _vin(vin)
        with self._tx() as conn:
            return self.pins.state(conn, vin, self._now())

    @staticmethod
    def _exists(conn: Connection, vin: str) -> bool:
        return conn.execute(sa.select(vehicles.c.vin).where(vehicles.c.vin == vin)).first() is not None


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
