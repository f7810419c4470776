"""Owner services: the vehicle registry, PINs and their lockout, customer numbers, audit.

- :mod:`~gateway.owners.registry`: :class:`Vehicles`, joining its parts: ``records``
  (tables, :class:`Vehicle`), ``pin_checks``, ``immobiliser``, ``enrolment`` (what
  operators do), with ``vehicle_fields`` validating what they give;
- :mod:`~gateway.owners.pins`: PIN hashing and the lockout rule;
- :mod:`~gateway.owners.customer_numbers`: the 8-digit number the IVR asks for;
- :mod:`~gateway.owners.audit`: who did what, never a PIN;
- :mod:`~gateway.owners.car_commands`: immobilise, reactivate, unlock and tracking,
  confirmed by the car (imported from there: it builds on :mod:`gateway.commands`).

Everything the rest of the gateway uses is re-exported here (``from gateway.owners
import Vehicles``); importing the package registers every table on the shared metadata.
"""

from gateway.owners.audit import AuditEntry, audit, write_audit
from gateway.owners.customer_numbers import (
    LOOKUP_CODE_LENGTH,
    legacy_lookup_code_valid,
    lookup_check_digit,
    lookup_code_accepted,
    lookup_code_valid,
    new_lookup_code,
)
from gateway.owners.enrolment import ImportResult
from gateway.owners.pins import (
    PIN_FORMAT_MESSAGE,
    LockoutPolicy,
    LockoutState,
    PinCheck,
    PinHasher,
    PinOutcome,
    check_pin_format,
    is_valid_pin,
    pin_failure_times,
    pin_failures,
)
from gateway.owners.records import (
    UnknownVehicleError,
    Vehicle,
    VehicleConflictError,
    owner_phones,
    vehicles,
)
from gateway.owners.registry import Vehicles
from gateway.owners.vehicle_fields import VehicleRecord, parse_changes, parse_record

__all__ = [
    "LOOKUP_CODE_LENGTH",
    "PIN_FORMAT_MESSAGE",
    "AuditEntry",
    "ImportResult",
    "LockoutPolicy",
    "LockoutState",
    "PinCheck",
    "PinHasher",
    "PinOutcome",
    "UnknownVehicleError",
    "Vehicle",
    "VehicleConflictError",
    "VehicleRecord",
    "Vehicles",
    "audit",
    "check_pin_format",
    "is_valid_pin",
    "legacy_lookup_code_valid",
    "lookup_check_digit",
    "lookup_code_accepted",
    "lookup_code_valid",
    "new_lookup_code",
    "owner_phones",
    "parse_changes",
    "parse_record",
    "pin_failure_times",
    "pin_failures",
    "vehicles",
    "write_audit",
]
