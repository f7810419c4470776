"""The eCall Minimum Set of Data (EN 15722): decoding MSD versions 1, 2 and 3.

In-vehicle systems built for EU eCall (and third-party-service eCall) send the MSD: at
most 140 bytes of ASN.1 in unaligned PER (UPER).  The ASN.1 module is our own,
``gateway/asn1/msd.asn``, written from the standard's field definitions (its header says
where each comes from); asn1tools decodes it.

On the wire the first byte is the MSD version: version 1 follows it directly with the
MSDMessage, versions 2 and 3 wrap the MSDMessage in an OCTET STRING (a length byte, or
two from 128 bytes on).  EN 15722:2020 (version 3) grows version 2 through extension
markers only, so version 3 is decoded with the version 2 types and unknown extension
additions are skipped.

Only decoding: the gateway forwards the bytes as the car sent them.  A re-encoding need
not give the same bytes (an encoder may send a BOOLEAN DEFAULT FALSE that is FALSE, or
leave it out), and the centre may want to check the MSD itself.

A decoded MSD whose values cannot describe a place (a latitude beyond 90 degrees that is
not the "unknown" value) is refused with the reason; a value that only loses a detail (a
direction beyond 179 steps, an unknown vehicle type) is kept as sent and read as unknown.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the module written for this project (shipped in the wheel with the package)
ASN1_MODULE = Path(__file__).resolve().parent / "asn1" / "msd.asn"
#: EN 15722: an MSD is at most 140 bytes
MAX_MSD_BYTES = 140
#: the base64 text of the largest MSD
MAX_MSD_BASE64_CHARS = 4 * ((MAX_MSD_BYTES + 2) // 3)
#: versions known: the first byte of the message
VERSIONS = (1, 2, 3)
#: positionLatitude/positionLongitude value for an invalid or unknown position
UNKNOWN_POSITION = 2**31 - 1
#: vehicleDirection value for an unknown direction; 0..179 are 2-degree steps
UNKNOWN_DIRECTION = 255
MAX_DIRECTION_STEP = 179
#: milliarcseconds in a degree; the recent positions count in units of 100 of them
MAS_PER_DEGREE = 3_600_000
DELTA_UNIT_MAS = 100
#: the storage flags, in the order of the ASN.1 (otherStorage from version 2 on)
STORAGE_FLAGS = ("gasolineTankPresent", "dieselTankPresent", "compressedNaturalGas",
                 "liquidPropaneGas", "electricEnergyStorage", "hydrogenStorage", "otherStorage")

_LATITUDE_LIMIT_MAS = 90 * MAS_PER_DEGREE
_LONGITUDE_LIMIT_MAS = 180 * MAS_PER_DEGREE
_VIN = re.compile(r"^[A-HJ-NPR-Z0-9]{17}$")
_BASE64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")
#: the longest decoder reason quoted back to the car
_MAX_REASON = 300


class MsdError(ValueError):
    """The bytes are not a decodable MSD; the message says why (for ``fields.msd``)."""


@dataclass(frozen=True)
class Msd:
    """One decoded MSD, with the bytes it came from (``raw``, as received)."""

    version: int
    raw: bytes
    message_identifier: int
    automatic_activation: bool
    test_call: bool
    position_can_be_trusted: bool
    #: the ASN.1 name (``passengerVehicleClassM1``), None for a value this module lacks
    vehicle_type: str | None
    vin: str
    #: the storage flags that are set, in ASN.1 order (none: unknown or other)
    propulsion: tuple[str, ...]
    #: seconds since 1970 (UTC) as the vehicle sent it; may be 0 or otherwise unusable
    timestamp: int
    latitude_mas: int
    longitude_mas: int
    #: 2-degree steps from north, clockwise; 255 unknown
    direction: int
    #: the two recent positions, ``(latitudeDelta, longitudeDelta)`` in 100 mas units
    recent_n1: tuple[int, int] | None
    recent_n2: tuple[int, int] | None
    passengers: int | None
    #: optional additional data: the relative OID in dotted form, and its bytes
    additional_oid: str | None
    additional_data: bytes | None

    @property
    def position_known(self) -> bool:
        return UNKNOWN_POSITION not in (self.latitude_mas, self.longitude_mas)

    @property
    def lat(self) -> float | None:
        return self.latitude_mas / MAS_PER_DEGREE if self.position_known else None

    @property
    def lon(self) -> float | None:
        return self.longitude_mas / MAS_PER_DEGREE if self.position_known else None

    @property
    def heading_deg(self) -> float | None:
        """Degrees from north, or None when unknown (255) or out of range (180..254)."""
        if 0 <= self.direction <= MAX_DIRECTION_STEP:
            return float(self.direction * 2)
        return None

    @property
    def event_type(self) -> str:
        """``crash`` for an automatic activation, ``sos`` for a manual one."""
        return "crash" if self.automatic_activation else "sos"

    def occurred_at(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.timestamp, tz=dt.UTC)

    def base64(self) -> str:
        """The bytes as received, in standard base64."""
        return base64.b64encode(self.raw).decode("ascii")


# -- decoding ---------------------------------------------------------------------------

_spec_lock = threading.Lock()
_spec: Any = None


def specification() -> Any:
    """The compiled ASN.1 module (compiled once, on first use: importing asn1tools and
    compiling take a few hundred milliseconds that a process without MSDs never pays)."""
    global _spec
    with _spec_lock:
        if _spec is None:
            import asn1tools  # type: ignore[import-untyped]

            _spec = asn1tools.compile_files(str(ASN1_MODULE), "uper")
        return _spec


def preload() -> None:
    """Compile the module now (e.g. at start-up), so the first MSD does not wait for it."""
    specification()


def decode_base64(text: Any) -> Msd:
    """An MSD from the ``msd`` field of an event: standard base64 of the UPER bytes."""
    if not isinstance(text, str):
        raise MsdError("must be text: base64 of the MSD's bytes")
    if len(text) > MAX_MSD_BASE64_CHARS:
        raise MsdError(f"too long: an MSD is at most {MAX_MSD_BYTES} bytes "
                       f"({MAX_MSD_BASE64_CHARS} base64 characters)")
    if not text or not _BASE64.match(text):
        raise MsdError("not base64 (standard alphabet A-Z a-z 0-9 + /, '=' padding)")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MsdError("not base64: the length or the padding is wrong") from None
    return decode(raw)


def decode(raw: bytes) -> Msd:
    """Decode MSD version 1, 2 or 3 from its bytes; MsdError with the reason if it is not one."""
    if not raw:
        raise MsdError("empty: no bytes")
    if len(raw) > MAX_MSD_BYTES:
        raise MsdError(f"{len(raw)} bytes: an MSD is at most {MAX_MSD_BYTES}")
    version = raw[0]
    if version not in VERSIONS:
        raise MsdError(f"unknown MSD version {version} (the first byte; versions "
                       f"{', '.join(map(str, VERSIONS))} are known)")
    spec = specification()
    try:
        if version == 1:
            message = spec.decode("ECallMessageV1", raw, check_constraints=True)["msd"]
        else:
            inner = spec.decode("ECallMessage", raw, check_constraints=True)["msd"]
            _only_padding_after(raw, 1 + (1 if len(inner) < 128 else 2) + len(inner))
            message = spec.decode("MSDMessage", inner, check_constraints=True)
    except MsdError:
        raise
    except Exception as exc:  # noqa: BLE001 -- whatever the decoder trips on, it is no MSD
        raise MsdError(_reason(f"not a version {version} MSD: {exc}")) from None
    return _read(version, raw, message)


def _only_padding_after(raw: bytes, used: int) -> None:
    """Bytes after a version 2/3 message may only be zero padding (a 140-byte buffer)."""
    if any(raw[used:]):
        raise MsdError(f"{len(raw) - used} bytes after the end of the MSD are not padding")


def _reason(text: str) -> str:
    return text if len(text) <= _MAX_REASON else text[:_MAX_REASON - 3] + "..."


def _read(version: int, raw: bytes, message: dict[str, Any]) -> Msd:
    structure = message["msdStructure"]
    control = structure["control"]
    number = structure["vehicleIdentificationNumber"]
    vin = "".join(number[part] for part in ("isowmi", "isovds", "isovisModelyear",
                                            "isovisSeqPlant"))
    if not _VIN.match(vin):
        raise MsdError(f"vehicleIdentificationNumber {vin!r} is not a VIN")
    latitude = int(structure["vehicleLocation"]["positionLatitude"])
    longitude = int(structure["vehicleLocation"]["positionLongitude"])
    if latitude != UNKNOWN_POSITION and not -_LATITUDE_LIMIT_MAS <= latitude <= _LATITUDE_LIMIT_MAS:
        raise MsdError(f"positionLatitude {latitude} is beyond 90 degrees "
                       f"(+-{_LATITUDE_LIMIT_MAS} milliarcseconds; {UNKNOWN_POSITION} = unknown)")
    if (longitude != UNKNOWN_POSITION
            and not -_LONGITUDE_LIMIT_MAS <= longitude <= _LONGITUDE_LIMIT_MAS):
        raise MsdError(f"positionLongitude {longitude} is beyond 180 degrees "
                       f"(+-{_LONGITUDE_LIMIT_MAS} milliarcseconds; {UNKNOWN_POSITION} = unknown)")
    storage = structure["vehiclePropulsionStorageType"]
    additional = message.get("optionalAdditionalData")
    return Msd(
        version=version,
        raw=bytes(raw),
        message_identifier=int(structure["messageIdentifier"]),
        automatic_activation=bool(control["automaticActivation"]),
        test_call=bool(control["testCall"]),
        position_can_be_trusted=bool(control["positionCanBeTrusted"]),
        vehicle_type=control["vehicleType"],
        vin=vin,
        propulsion=tuple(flag for flag in STORAGE_FLAGS if storage.get(flag)),
        timestamp=int(structure["timestamp"]),
        latitude_mas=latitude,
        longitude_mas=longitude,
        direction=int(structure["vehicleDirection"]),
        recent_n1=_delta(structure.get("recentVehicleLocationN1")),
        recent_n2=_delta(structure.get("recentVehicleLocationN2")),
        passengers=structure.get("numberOfPassengers"),
        additional_oid=_relative_oid(additional["oid"]) if additional else None,
        additional_data=bytes(additional["data"]) if additional else None,
    )


def _delta(value: dict[str, int] | None) -> tuple[int, int] | None:
    if value is None:
        return None
    return int(value["latitudeDelta"]), int(value["longitudeDelta"])


def _relative_oid(octets: bytes) -> str:
    """The X.690 contents octets of a RELATIVE-OID as dotted sub-identifiers."""
    if not octets:
        raise MsdError("optionalAdditionalData.oid is empty (a relative OID has a component)")
    parts: list[int] = []
    value = 0
    starting = True
    for octet in octets:
        if starting and octet == 0x80:
            raise MsdError("optionalAdditionalData.oid: a sub-identifier with a leading 0x80")
        value = (value << 7) | (octet & 0x7F)
        starting = not octet & 0x80
        if starting:
            parts.append(value)
            value = 0
    if not starting:
        raise MsdError("optionalAdditionalData.oid ends inside a sub-identifier")
    return ".".join(str(part) for part in parts)
