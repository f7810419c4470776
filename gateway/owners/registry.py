"""The vehicle registry: one :class:`Vehicles` over one :class:`~gateway.store.Store`.

Its parts, each in its own module and joined here:

- :mod:`~gateway.owners.records`: the tables, :class:`Vehicle`, reading a vehicle;
- :mod:`~gateway.owners.pin_checks`: set, check and unlock the PIN (the lockout rule is
  in :mod:`~gateway.owners.pins`);
- :mod:`~gateway.owners.immobiliser`: immobiliser and tracking;
- :mod:`~gateway.owners.enrolment`: what operators do (create, change, bulk import);
- this module: registration by code (:meth:`Vehicles.register`), look-ups, the audit.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from gateway.errors import StoreError, ValidationError
from gateway.owners.audit import AuditEntry, audit, write_audit
from gateway.owners.customer_numbers import lookup_code_accepted, new_lookup_code
from gateway.owners.enrolment import EnrolmentMixin
from gateway.owners.pins import PIN_FORMAT_MESSAGE, is_valid_pin, pin_failures
from gateway.owners.records import (
    UnknownVehicleError,
    Vehicle,
    checked_actor,
    e164,
    exists,
    normal_vin,
    normalise_phone,
    owner_phones,
    utc,
    vehicles,
    write_phones,
)
from gateway.owners.vehicle_fields import LANGUAGE_RE, MARKET_RE, VIN_RE

log = logging.getLogger("gateway.owners")


class Vehicles(EnrolmentMixin):
    """The vehicle registry; every database error surfaces as StoreError.

    Built with ``Vehicles(store, hasher, clock=..., max_failures=3, lockout=15 min,
    window=lockout)`` (see :class:`~gateway.owners.records.RegistryCore`)."""

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
        actor = checked_actor(actor)
        errors: dict[str, str] = {}
        vin = normal_vin(vin)
        if not VIN_RE.fullmatch(vin):
            errors["vin"] = "must be 17 characters, digits and letters except I, O, Q"
        if not isinstance(owner_name, str) or not owner_name.strip():
            errors["owner_name"] = "required"
        elif len(owner_name) > 200:
            errors["owner_name"] = "at most 200 characters"
        if not isinstance(market, str) or not MARKET_RE.fullmatch(market):
            errors["market"] = "must be an upper-case ISO 3166-1 alpha-2 code"
        if language is not None and not LANGUAGE_RE.fullmatch(language):
            errors["language"] = "must be a language tag such as sv-SE"
        if not isinstance(purchase_date, dt.date) or isinstance(purchase_date, dt.datetime):
            errors["purchase_date"] = "must be a date"
        owner_phone = e164(owner_phone, "owner_phone", errors)
        car_msisdn = e164(car_msisdn, "car_msisdn", errors)
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
                with self.store.transaction() as conn:
                    conn.execute(vehicles.insert().values(**row))
                    write_phones(conn, vin, [owner_phone] if owner_phone else [])
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


    # -- look-ups ---------------------------------------------------------------------

    def by_owner_phone(self, phone: str) -> list[Vehicle]:
        """Every vehicle with this number among its owner's (an owner may have several cars)."""
        number = normalise_phone(phone)
        if number is None:
            return []
        listed = sa.select(owner_phones.c.vin).where(owner_phones.c.phone == number)
        with self._tx() as conn:
            return self._many(conn, sa.or_(vehicles.c.owner_phone == number,
                                           vehicles.c.vin.in_(listed)))

    def by_car_msisdn(self, msisdn: str) -> Vehicle | None:
        number = normalise_phone(msisdn)
        return self._one(vehicles.c.car_msisdn == number) if number else None

    def by_lookup_code(self, code: str) -> Vehicle | None:
        """The vehicle for digits typed by the caller; None for unknown or mistyped codes."""
        code = code.strip() if isinstance(code, str) else ""
        if not lookup_code_accepted(code):
            return None
        return self._one(vehicles.c.lookup_code == code)

    # -- audit ------------------------------------------------------------------------

    def record(
        self, vin: str, *, actor: str, action: str, detail: Mapping[str, Any] | None = None
    ) -> None:
        """Audit an action decided elsewhere (e.g. ``unlock_requested``); no PINs in detail."""
        actor, vin = checked_actor(actor), normal_vin(vin)
        with self._tx() as conn:
            if not exists(conn, vin):
                raise UnknownVehicleError(vin)
            write_audit(conn, vin=vin, actor=actor, action=action, at=self._now(), detail=detail)

    def audit_for(self, vin: str, *, limit: int = 200) -> list[AuditEntry]:
        """The vehicle's audit trail, oldest first."""
        vin = normal_vin(vin)
        query = (
            sa.select(audit).where(audit.c.vin == vin).order_by(audit.c.id).limit(limit)
        )
        with self._tx() as conn:
            rows = conn.execute(query).all()
        return [
            AuditEntry(
                id=r.id, at=utc(r.at), vin=r.vin, actor=r.actor,
                action=r.action, detail=dict(r.detail or {}),
            )
            for r in rows
        ]
