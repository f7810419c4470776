"""Immobiliser and tracking: switched on by agents with a reference, off only with the PIN."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from gateway.errors import PermanentUpstreamError, TransientUpstreamError, ValidationError
from gateway.owners.audit import write_audit
from gateway.owners.pin_checks import PinChecksMixin
from gateway.owners.pins import PinCheck
from gateway.owners.records import (
    UnknownVehicleError,
    Vehicle,
    checked_actor,
    exists,
    normal_vin,
    vehicles,
)
from gateway.owners.records import reference as reference_text  # the method has a `reference`

#: sends the ``reactivate`` command with the given idempotency key; answers the car's
#: (or the vehicle command service's) JSON object, raises on failure
SendCommand = Callable[[str], Mapping[str, Any]]

#: a synchronous answer that means the car will not execute the command
REJECTED_ANSWERS = frozenset({"rejected", "failed", "refused", "error"})


def reactivation_key(vehicle: Vehicle) -> str:
    """One idempotency key per immobilisation: every retry of the same reactivation
    carries it, so a command that reached the car but whose answer was lost is not
    executed twice (the car deduplicates on the key)."""
    since = vehicle.immobilised_at.isoformat() if vehicle.immobilised_at else "unknown"
    return f"reactivate:{vehicle.vin}:{since}"


@dataclass(frozen=True)
class Reactivation:
    check: PinCheck
    vehicle: Vehicle
    #: True when this call switched the immobiliser off (the car acknowledged)
    changed: bool
    #: the car's answer to the ``reactivate`` command (None: no command was sent)
    answer: Mapping[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.check.ok


class ImmobiliserMixin(PinChecksMixin):
    """The immobiliser and tracking half of :class:`~gateway.owners.registry.Vehicles`."""

    def immobilise(self, vin: str, *, actor: str, authority_reference: str) -> Vehicle:
        """Switch the immobiliser on (agent API only); needs a police/authority reference.

        Already immobilised: nothing changes (the first reference stands), and
        the repeat request is audited.
        """
        return self._switch_on(
            vin, actor=actor, flag=vehicles.c.immobilised, action="immobilise",
            reference=(authority_reference, "authority_reference"),
            columns=("immobilised_by", "immobilised_reference", "immobilised_at"))

    def reactivate(self, vin: str, *, actor: str, pin: str, send: SendCommand) -> Reactivation:
        """Switch the immobiliser off -- only if the owner's PIN checks out in this call,
        and only once the car has acknowledged the ``reactivate`` command.

        Order: the PIN is checked (no state change); a car that is not immobilised
        gets no command (``changed`` False); otherwise ``send(idempotency_key)``
        sends the command (audited ``reactivate_requested``).  The car's 2xx answer
        (``confirmed``/``accepted``) is its acknowledgement: only then is
        ``immobilised`` set False (audited ``reactivate``).  An unreachable car
        (:class:`TransientUpstreamError`), a refusal (:class:`PermanentUpstreamError`)
        or a ``rejected`` answer (raised as :class:`PermanentUpstreamError`) leaves
        the registry unchanged (audited ``reactivate_failed``) and is raised to the
        caller; a retry sends the same idempotency key (:func:`reactivation_key`).
        """
        vin = normal_vin(vin)
        actor = checked_actor(actor)
        check = self.verify_pin(vin, pin, actor=actor)
        vehicle = self._get_required(vin)
        if not check.ok or not vehicle.immobilised:
            return Reactivation(check=check, vehicle=vehicle, changed=False)
        key = reactivation_key(vehicle)
        self._audit(vin, actor, "reactivate_requested", {"idempotency_key": key})
        try:
            answer = send(key)
            status = str(answer.get("status", "")).lower()
            if status in REJECTED_ANSWERS:
                raise PermanentUpstreamError(
                    f"the car rejected the reactivation: {str(answer.get('reason', status))[:100]}")
        except (TransientUpstreamError, PermanentUpstreamError) as exc:
            self._audit(vin, actor, "reactivate_failed",
                        {"idempotency_key": key, "error": str(exc)[:200],
                         "unreachable": isinstance(exc, TransientUpstreamError)})
            raise
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
                detail={"changed": bool(changed), "idempotency_key": key,
                        "car_status": status[:40],
                        "command_id": str(answer.get("command_id", ""))[:100] or None},
            )
        return Reactivation(check=check, vehicle=self._get_required(vin), changed=bool(changed),
                            answer=answer)

    def _audit(self, vin: str, actor: str, action: str, detail: dict[str, Any]) -> None:
        with self._tx() as conn:
            write_audit(conn, vin=vin, actor=actor, action=action, at=self._now(), detail=detail)

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
        vin = normal_vin(vin)
        actor = checked_actor(actor)
        errors: dict[str, str] = {}
        value = reference_text(reference[0], reference[1], errors)
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
            if not changed and not exists(conn, vin):
                raise UnknownVehicleError(vin)
            write_audit(
                conn, vin=vin, actor=actor, action=action, at=now,
                detail={reference[1]: value, "changed": bool(changed)},
            )
        return self._get_required(vin)

