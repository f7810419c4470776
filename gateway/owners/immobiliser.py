"""Immobiliser and tracking flags in the registry, set directly (enrolment tools, tests).

The agent API and the IVR never set them here: their commands go through
:mod:`gateway.owners.car_commands`, which changes these flags only when the car
acknowledges the command (reactivation, with the owner's PIN, included)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from gateway.errors import ValidationError
from gateway.owners.audit import write_audit
from gateway.owners.pin_checks import PinChecksMixin
from gateway.owners.records import (
    UnknownVehicleError,
    Vehicle,
    checked_actor,
    exists,
    normal_vin,
    vehicles,
)
from gateway.owners.records import reference as reference_text  # the method has a `reference`


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

