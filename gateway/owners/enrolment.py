"""Enrolment as operators do it: create, change and bulk-import vehicles, audited.

- :meth:`EnrolmentMixin.enrol` is idempotent on the VIN: the same record again returns
  the registered vehicle; a different record for a registered VIN is a conflict.
- :meth:`EnrolmentMixin.change` applies some fields; nothing changed, nothing audited.
- :meth:`EnrolmentMixin.import_records` writes a whole validated file in one
  transaction: every row, or (on any error) none.  A row's PIN is applied only to a
  vehicle without one, so re-importing an old file never undoes an owner's new PIN.

Customer numbers are drawn at random and checked against the registry in the same
transaction; a collision with a concurrent writer surfaces as a retry (create) or a
failed import that changed nothing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from gateway.errors import StoreError
from gateway.owners.audit import write_audit
from gateway.owners.customer_numbers import new_lookup_code
from gateway.owners.immobiliser import ImmobiliserMixin
from gateway.owners.pins import pin_failures
from gateway.owners.records import (
    UnknownVehicleError,
    Vehicle,
    VehicleConflictError,
    checked_actor,
    normal_vin,
    phones_of,
    vehicles,
    write_phones,
)
from gateway.owners.vehicle_fields import FIELDS, VehicleRecord

#: what the registry keeps of a record, column by column (owner_phones has its table)
_COLUMNS = ("car_msisdn", "market", "purchase_date", "serviced_regularly", "owner_name",
            "language")

ImportResultKind = Literal["created", "updated", "unchanged"]


@dataclass(frozen=True)
class ImportResult:
    vin: str
    result: ImportResultKind
    customer_number: str
    #: the fields this row changed (``pin`` when it set the first PIN)
    fields: tuple[str, ...] = ()


def record_of(row: Any, phones: Sequence[str]) -> VehicleRecord:
    primary = row.owner_phone
    return VehicleRecord(
        vin=row.vin, car_msisdn=row.car_msisdn, market=row.market,
        purchase_date=row.purchase_date, serviced_regularly=bool(row.serviced_regularly),
        owner_name=row.owner_name,
        owner_phones=tuple(phones) if phones else ((primary,) if primary else ()),
        language=row.language)


class EnrolmentMixin(ImmobiliserMixin):
    """The operators' half of :class:`~gateway.owners.registry.Vehicles`."""

    def enrol(self, record: VehicleRecord, *, actor: str) -> tuple[Vehicle, bool]:
        """Register ``record``; ``(vehicle, created)``.

        The same record for a registered VIN: ``created`` is False and nothing is
        written.  Another record for it, or a car SIM registered to another vehicle:
        VehicleConflictError naming the fields."""
        actor = checked_actor(actor)
        for _ in range(5):
            try:
                with self._tx() as conn:
                    created = self._enrol(conn, record, actor=actor, now=self._now())
                return self._get_required(record.vin), created
            except StoreError as exc:
                if not isinstance(exc.__cause__, IntegrityError):
                    raise
                # a concurrent create of this VIN, or a customer number drawn twice:
                # look again (the same record then answers as already enrolled)
        raise StoreError("could not enrol the vehicle: concurrent writes kept conflicting")

    def _enrol(self, conn: Connection, record: VehicleRecord, *, actor: str,
               now: dt.datetime) -> bool:
        current = self._record(conn, record.vin)
        if current is not None:
            differs = record.differences(current)
            if differs:
                raise VehicleConflictError({f: "differs from the vehicle registered with this "
                                               "VIN (change it with PATCH)" for f in differs})
            return False
        self._check_sim(conn, record.vin, record.car_msisdn)
        code = self._free_code(conn)
        conn.execute(vehicles.insert().values(
            vin=record.vin, owner_phone=record.owner_phones[0], lookup_code=code,
            pin_hash=None, immobilised=False, tracking=False, updated_at=now,
            **{c: getattr(record, c) for c in _COLUMNS}))
        write_phones(conn, record.vin, record.owner_phones)
        conn.execute(pin_failures.insert().values(vin=record.vin, failures=0, updated_at=now))
        write_audit(conn, vin=record.vin, actor=actor, action="enrol", at=now,
                    detail={"market": record.market, "phones": len(record.owner_phones)})
        return True

    def change(self, vin: str, changes: Mapping[str, Any], *, actor: str
               ) -> tuple[Vehicle, list[str]]:
        """Apply validated ``changes`` (see :func:`parse_changes`); the fields changed."""
        vin, actor = normal_vin(vin), checked_actor(actor)
        try:
            with self._tx() as conn:
                current = self._record(conn, vin, lock=True)
                if current is None:
                    raise UnknownVehicleError(vin)
                changed = self._apply(conn, current, current.replace(changes), actor=actor,
                                      now=self._now(), action="vehicle_changed")
        except StoreError as exc:
            if isinstance(exc.__cause__, IntegrityError):  # a SIM taken concurrently
                raise VehicleConflictError(
                    {"car_msisdn": "already registered to another vehicle"}) from None
            raise
        return self._get_required(vin), changed

    def _apply(self, conn: Connection, current: VehicleRecord, new: VehicleRecord, *,
               actor: str, now: dt.datetime, action: str) -> list[str]:
        differs = new.differences(current)
        if not differs:
            return []
        if "car_msisdn" in differs:
            self._check_sim(conn, new.vin, new.car_msisdn)
        values: dict[str, Any] = {c: getattr(new, c) for c in _COLUMNS if c in differs}
        if "owner_phones" in differs:
            values["owner_phone"] = new.owner_phones[0]
            write_phones(conn, new.vin, new.owner_phones)
        conn.execute(vehicles.update().where(vehicles.c.vin == new.vin)
                     .values(updated_at=now, **values))
        write_audit(conn, vin=new.vin, actor=actor, action=action, at=now,
                    detail={"fields": differs})
        return differs

    def import_records(self, rows: Sequence[tuple[VehicleRecord, str | None]], *,
                       actor: str) -> list[ImportResult]:
        """Create or update every ``(record, pin_hash)`` in ONE transaction.

        Any error (a SIM registered to a vehicle outside the file, a database
        failure) rolls back every row and raises."""
        actor = checked_actor(actor)
        now = self._now()
        results: list[ImportResult] = []
        with self._tx() as conn:
            for record, pin_hash in rows:
                results.append(self._import_one(conn, record, pin_hash, actor=actor, now=now))
        return results

    def _import_one(self, conn: Connection, record: VehicleRecord, pin_hash: str | None, *,
                    actor: str, now: dt.datetime) -> ImportResult:
        current = self._record(conn, record.vin, lock=True)
        if current is None:
            self._enrol(conn, record, actor=actor, now=now)
            kind: ImportResultKind = "created"
            changed: list[str] = []
        else:
            changed = self._apply(conn, current, record, actor=actor, now=now,
                                  action="vehicle_changed")
            kind = "updated" if changed else "unchanged"
        if pin_hash is not None:
            pin_set = conn.execute(
                vehicles.update().where(vehicles.c.vin == record.vin,
                                        vehicles.c.pin_hash.is_(None))
                .values(pin_hash=pin_hash, updated_at=now)).rowcount
            if pin_set:
                write_audit(conn, vin=record.vin, actor=actor, action="pin_set", at=now)
                if kind == "unchanged":
                    kind = "updated"
                if current is not None:
                    changed.append("pin")
        code = conn.execute(sa.select(vehicles.c.lookup_code)
                            .where(vehicles.c.vin == record.vin)).scalar_one()
        return ImportResult(record.vin, kind, code, tuple(changed))

    def records(self, vins: Iterable[str]) -> dict[str, VehicleRecord]:
        """The registered records of these VINs (the ones that exist)."""
        wanted = sorted({normal_vin(v) for v in vins})
        found: dict[str, VehicleRecord] = {}
        with self._tx() as conn:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start:start + 500]
                rows = conn.execute(sa.select(vehicles).where(vehicles.c.vin.in_(chunk))).all()
                phones = phones_of(conn, chunk)
                found.update((r.vin, record_of(r, phones.get(r.vin, ()))) for r in rows)
        return found

    def with_pin(self, vins: Iterable[str]) -> set[str]:
        """Those of these VINs whose vehicle has a PIN."""
        wanted = sorted({normal_vin(v) for v in vins})
        found: set[str] = set()
        with self._tx() as conn:
            for start in range(0, len(wanted), 500):
                found.update(conn.execute(sa.select(vehicles.c.vin).where(
                    vehicles.c.vin.in_(wanted[start:start + 500]),
                    vehicles.c.pin_hash.is_not(None))).scalars())
        return found

    def sim_holders(self, msisdns: Iterable[str]) -> dict[str, str]:
        """car MSISDN -> the VIN it is registered to, for the ones that are."""
        wanted = sorted(set(msisdns))
        found: dict[str, str] = {}
        with self._tx() as conn:
            for start in range(0, len(wanted), 500):
                rows = conn.execute(sa.select(vehicles.c.car_msisdn, vehicles.c.vin).where(
                    vehicles.c.car_msisdn.in_(wanted[start:start + 500])))
                found.update((msisdn, vin) for msisdn, vin in rows)
        return found

    # -- helpers ------------------------------------------------------------------------

    @staticmethod
    def _record(conn: Connection, vin: str, *, lock: bool = False) -> VehicleRecord | None:
        query = sa.select(vehicles).where(vehicles.c.vin == vin)
        row = conn.execute(query.with_for_update() if lock else query).first()
        if row is None:
            return None
        return record_of(row, phones_of(conn, [vin]).get(vin, ()))

    @staticmethod
    def _check_sim(conn: Connection, vin: str, msisdn: str) -> None:
        holder = conn.execute(sa.select(vehicles.c.vin).where(
            vehicles.c.car_msisdn == msisdn, vehicles.c.vin != vin)).first()
        if holder is not None:
            raise VehicleConflictError({"car_msisdn": "already registered to another vehicle"})

    @staticmethod
    def _free_code(conn: Connection) -> str:
        for _ in range(20):
            code = new_lookup_code()
            taken = conn.execute(sa.select(vehicles.c.vin)
                                 .where(vehicles.c.lookup_code == code)).first()
            if taken is None:
                return code
        raise StoreError("could not draw a free customer number")


__all__ = ["FIELDS", "EnrolmentMixin", "ImportResult", "record_of"]
