"""Owner services: the vehicle registry, PINs and their lockout, customer numbers, audit.

- :mod:`~gateway.owners.registry`: vehicles and owners, immobiliser and tracking state
  (:class:`Vehicles`);
- :mod:`~gateway.owners.pins`: PIN hashing and the lockout rule;
- :mod:`~gateway.owners.customer_numbers`: the 8-digit number the IVR asks for;
- :mod:`~gateway.owners.audit`: who did what, never a PIN.

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
from gateway.owners.pins import (
    PIN_FORMAT_MESSAGE,
    PinCheck,
    PinHasher,
    PinOutcome,
    check_pin_format,
    is_valid_pin,
    pin_failures,
)
from gateway.owners.registry import (
    Reactivation,
    UnknownVehicleError,
    Vehicle,
    Vehicles,
    vehicles,
)

__all__ = [
    "LOOKUP_CODE_LENGTH",
    "PIN_FORMAT_MESSAGE",
    "AuditEntry",
    "PinCheck",
    "PinHasher",
    "PinOutcome",
    "Reactivation",
    "UnknownVehicleError",
    "Vehicle",
    "Vehicles",
    "audit",
    "check_pin_format",
    "is_valid_pin",
    "legacy_lookup_code_valid",
    "lookup_check_digit",
    "lookup_code_accepted",
    "lookup_code_valid",
    "new_lookup_code",
    "pin_failures",
    "vehicles",
    "write_audit",
]
