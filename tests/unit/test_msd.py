"""Decoding the eCall MSD (EN 15722): public vectors to their published values, and every
way bytes can fail to be an MSD named with the decoder's reason."""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path

import asn1tools  # type: ignore[import-untyped]
import pytest

import gateway
from gateway import msd as msd_module
from gateway.msd import (
    ASN1_MODULE,
    MAX_MSD_BYTES,
    UNKNOWN_DIRECTION,
    UNKNOWN_POSITION,
    Msd,
    MsdError,
    decode,
    decode_base64,
    specification,
)
from tests.support.msd import LEGATO_V2_VECTOR, V1_VECTOR, V2_VECTOR, build_msd


def test_the_version_2_vector_decodes_to_its_published_values() -> None:
    msd = decode(bytes.fromhex(V2_VECTOR))
    assert msd.version == 2
    assert msd.vin == "ECALLEXAMPLE02023"
    assert msd.timestamp == 1694414911
    assert msd.occurred_at() == dt.datetime(2023, 9, 11, 6, 48, 31, tzinfo=dt.UTC)
    assert msd.latitude_mas == 81044974 and msd.longitude_mas == 410169092
    assert msd.lat == pytest.approx(22.5125, abs=1e-4)
    assert msd.lon == pytest.approx(113.9359, abs=1e-4)
    assert msd.direction == 0 and msd.heading_deg == 0.0
    assert msd.recent_n1 == (-512, -512)
    assert msd.recent_n2 == (511, 511)
    assert msd.passengers == 2
    assert msd.message_identifier == 1
    assert msd.automatic_activation is True and msd.event_type == "crash"
    assert msd.test_call is False and msd.position_can_be_trusted is True
    assert msd.vehicle_type == "passengerVehicleClassM1"
    assert msd.propulsion == ("gasolineTankPresent",)
    assert msd.additional_oid is None and msd.additional_data is None


def test_the_version_1_vector_decodes_to_its_published_values() -> None:
    msd = decode(bytes.fromhex(V1_VECTOR))
    assert msd.version == 1
    assert msd.vin == "WM9VDSVDSYA123456"
    assert msd.propulsion == ("gasolineTankPresent", "electricEnergyStorage")
    assert msd.timestamp == 123456789
    assert msd.lat == pytest.approx(48.3003, abs=1e-4)
    assert msd.lon == pytest.approx(11.6174, abs=1e-4)
    assert msd.direction == 14 and msd.heading_deg == 28.0
    assert msd.recent_n1 == (10, -10)
    assert msd.recent_n2 == (10, -20)
    assert msd.passengers == 2
    # additional data present: relative OID 1.2.125 and four bytes
    assert msd.additional_oid == "1.2.125"
    assert msd.additional_data == b"00FF"


def test_the_bytes_are_kept_as_received_though_a_re_encoding_differs() -> None:
    raw = bytes.fromhex(V1_VECTOR)
    msd = decode(raw)
    assert msd.raw == raw and base64.b64decode(msd.base64()) == raw
    spec = specification()
    again = spec.encode("ECallMessageV1", spec.decode("ECallMessageV1", raw))
    assert again != raw  # the vector sends FALSE storage flags a canonical encoder omits
    assert decode(bytes(again)).vin == msd.vin


def test_an_open_source_stacks_version_2_example_decodes() -> None:
    msd = decode(bytes.fromhex(LEGATO_V2_VECTOR))
    assert (msd.version, msd.vin, msd.timestamp) == (2, "ECALLEXAMPLE02013", 1367878452)
    assert (msd.latitude_mas, msd.longitude_mas, msd.direction) == (18859320, 187996428, 45)
    assert (msd.recent_n1, msd.recent_n2, msd.passengers) == ((0, 10), (0, 30), 2)


def test_version_3_is_read_with_the_version_2_types() -> None:
    raw = bytearray.fromhex(V2_VECTOR)
    raw[0] = 3
    msd = decode(bytes(raw))
    assert msd.version == 3 and msd.vin == "ECALLEXAMPLE02023" and msd.passengers == 2


def test_extension_additions_of_a_later_version_are_skipped() -> None:
    """A later edition adds through the extension markers: a field after the root and a
    new vehicle type are skipped, the rest reads as before."""
    text = ASN1_MODULE.read_text()
    text = text.replace("numberOfPassengers           INTEGER (0..255) OPTIONAL,\n    ...\n}",
                        "numberOfPassengers           INTEGER (0..255) OPTIONAL,\n    ...,\n"
                        "    futureField INTEGER (0..1000) OPTIONAL\n}")
    text = text.replace("motorcyclesClassL7e            (13),\n    ...\n",
                        "motorcyclesClassL7e            (13),\n    ...,\n    futureVehicle (14)\n")
    assert "futureField" in text and "futureVehicle" in text
    later = asn1tools.compile_string(text, "uper")
    spec = specification()
    message = spec.decode("MSDMessage", spec.decode("ECallMessage", bytes.fromhex(V2_VECTOR))["msd"])
    message["msdStructure"]["futureField"] = 999
    message["msdStructure"]["control"]["vehicleType"] = "futureVehicle"
    inner = later.encode("MSDMessage", message)
    msd = decode(bytes(later.encode("ECallMessage", {"id": 3, "msd": inner})))
    assert msd.version == 3 and msd.vin == "ECALLEXAMPLE02023" and msd.passengers == 2
    assert msd.vehicle_type is None


def test_flags_unknowns_and_additional_data() -> None:
    msd = decode(build_msd(control={"testCall": True, "automaticActivation": False,
                                    "positionCanBeTrusted": False},
                           vehicleLocation={"positionLatitude": UNKNOWN_POSITION},
                           vehicleDirection=UNKNOWN_DIRECTION, numberOfPassengers=None,
                           recentVehicleLocationN1=None, recentVehicleLocationN2=None,
                           additional={"oid": b"\x81\x00\x05", "data": b"\x00\xff"}))
    assert msd.test_call is True and msd.event_type == "sos"
    assert msd.position_can_be_trusted is False
    assert msd.position_known is False and msd.lat is None and msd.lon is None
    assert msd.heading_deg is None and msd.passengers is None
    assert msd.recent_n1 is None and msd.recent_n2 is None
    assert msd.additional_oid == "128.5" and msd.additional_data == b"\x00\xff"


def test_a_direction_past_179_steps_reads_as_unknown() -> None:
    assert decode(build_msd(vehicleDirection=180)).heading_deg is None
    assert decode(build_msd(vehicleDirection=179)).heading_deg == 358.0


def test_zero_padding_after_a_version_2_message_is_allowed() -> None:
    raw = bytes.fromhex(V2_VECTOR)
    padded = raw + bytes(MAX_MSD_BYTES - len(raw))
    assert decode(padded).vin == decode(raw).vin


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty"),
        (b"\x00" + bytes.fromhex(V2_VECTOR)[1:], "unknown MSD version 0"),
        (b"\x04" + bytes.fromhex(V2_VECTOR)[1:], "unknown MSD version 4"),
        (bytes.fromhex(V2_VECTOR) + b"\x00" * 120, "at most 140"),
        (bytes.fromhex(V2_VECTOR)[:20], "out of data"),
        (bytes.fromhex(V1_VECTOR)[:12], "out of data"),
        (bytes.fromhex(V2_VECTOR) + b"\x01", "not padding"),
        # a VIN character index past the 33 of the alphabet (all ones)
        (bytes.fromhex("0225") + bytes.fromhex(V2_VECTOR)[2:5] + b"\xff" * 34,
         "vehicleIdentificationNumber"),
    ],
)
def test_what_is_not_an_msd_is_refused_with_the_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(MsdError, match=reason):
        decode(raw)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"vehicleLocation": {"positionLatitude": 90 * 3_600_000 + 1}}, "positionLatitude"),
        ({"vehicleLocation": {"positionLongitude": -180 * 3_600_000 - 1}}, "positionLongitude"),
        ({"additional": {"oid": b"", "data": b""}}, "oid is empty"),
        ({"additional": {"oid": b"\x81", "data": b""}}, "inside a sub-identifier"),
        ({"additional": {"oid": b"\x80\x01", "data": b""}}, "leading 0x80"),
    ],
)
def test_values_that_cannot_be_a_place_or_an_oid_are_refused(fields: dict[str, object],
                                                              reason: str) -> None:
    with pytest.raises(MsdError, match=reason):
        decode(build_msd(**fields))  # type: ignore[arg-type]


def test_an_unknown_position_is_not_out_of_range() -> None:
    msd = decode(build_msd(vehicleLocation={"positionLatitude": UNKNOWN_POSITION,
                                            "positionLongitude": UNKNOWN_POSITION}))
    assert not msd.position_known


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (123, "must be text"),
        ("", "not base64"),
        ("AiUc BoDj", "not base64"),
        ("AiUcBoDj-_", "not base64"),
        ("AiU", "length or the padding"),
        ("A" * 200, "too long"),
    ],
)
def test_the_base64_field_is_read_strictly(text: object, reason: str) -> None:
    with pytest.raises(MsdError, match=reason):
        decode_base64(text)


def test_base64_of_a_vector_decodes() -> None:
    text = base64.b64encode(bytes.fromhex(V2_VECTOR)).decode()
    assert isinstance(decode_base64(text), Msd)


def test_the_module_is_a_package_file_compiled_once() -> None:
    """Inside gateway/, so the wheel (hatch: packages = ["gateway"]) carries it."""
    assert ASN1_MODULE.is_file()
    assert ASN1_MODULE.parent.parent == Path(gateway.__file__).resolve().parent
    msd_module.preload()
    assert specification() is specification()
