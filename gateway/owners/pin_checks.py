"""PIN operations on a registered vehicle: set, check (with the lockout rule), unlock.

Every attempt is audited without the digits; the rule itself is in
:mod:`gateway.owners.pins`.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import sqlalchemy as sa

from gateway.errors import StoreError, ValidationError
from gateway.owners.audit import write_audit
from gateway.owners.pins import PIN_FORMAT_MESSAGE, LockoutState, PinCheck, is_valid_pin
from gateway.owners.records import (
    RegistryCore,
    UnknownVehicleError,
    checked_actor,
    exists,
    iso,
    normal_vin,
    reference,
    vehicles,
)

log = logging.getLogger("gateway.owners")


class PinChecksMixin(RegistryCore):
    """The PIN half of :class:`~gateway.owners.registry.Vehicles`."""

    def set_pin(self, vin: str, pin: str, *, actor: str) -> None:
        """Store a new PIN (hash only) and clear any failures or lock."""
        vin = normal_vin(vin)
        actor = checked_actor(actor)
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
        vin = normal_vin(vin)
        actor = checked_actor(actor)
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
                    detail={"failures": failures, "locked_until": iso(locked_until)},
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
                detail["locked_until"] = iso(locked_until)
            if malformed:
                detail["malformed"] = True
            write_audit(conn, vin=vin, actor=actor, action="pin_wrong", at=now, detail=detail)
        if locked_until is not None:
            log.warning("vehicle %s locked after %d wrong PIN attempts", vin, failures)
        return PinCheck("wrong", failures, locked_until, malformed=malformed)

    def unlock_pin(self, vin: str, *, actor: str, reason: str) -> LockoutState:
        """An operator clears the failures and any lock; audited with the reason."""
        vin = normal_vin(vin)
        actor = checked_actor(actor)
        errors: dict[str, str] = {}
        reason = reference(reason, "reason", errors, limit=200)
        if errors:
            raise ValidationError(errors)
        now = self._now()
        with self._tx() as conn:
            if not exists(conn, vin):
                raise UnknownVehicleError(vin)
            was = self.pins.state(conn, vin, now)
            self.pins.clear(conn, vin, now)
            write_audit(conn, vin=vin, actor=actor, action="pin_unlock", at=now, detail={
                "reason": reason, "failures": was.failures,
                "locked_until": iso(was.locked_until)})
            return self.pins.state(conn, vin, now)

    def lockout_state(self, vin: str) -> tuple[int, dt.datetime | None]:
        """``(failures that count now, locked_until while the lock holds)``."""
        state = self.lockout(vin)
        return state.failures, state.locked_until

    def lockout(self, vin: str) -> LockoutState:
        """The PIN lockout as an operator sees it (failures counted, lock, the rule)."""
        vin = normal_vin(vin)
        with self._tx() as conn:
            return self.pins.state(conn, vin, self._now())
