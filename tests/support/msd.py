"""eCall MSDs (EN 15722) for tests: public vectors, and MSDs built from them."""

from __future__ import annotations

import base64
import copy
import itertools
from typing import Any

from gateway.msd import specification

#: version 2, published with its decoded values (VIN ECALLEXAMPLE02023, near Shenzhen)
V2_VECTOR = "02251C0680E30A51439E2955D43800800837F80C9FD707F09A94BDD30E55E080000001FFFFE040"
#: version 1, published with its decoded values (VIN WM9VDSVDSYA123456, near Munich); its
#: six storage flags are all sent explicitly (a canonical encoder leaves FALSE ones out)
#: and a zero byte of padding follows
V1_VECTOR = ("015C0681D54970D65C3597CA0420C41467F103ADE68AC52E9BB8413F149C07414FB414F601018081"
             "3E821818232300")
#: version 2, from the test of an open-source in-vehicle stack (legato-af, paQmiECallTest.c)
LEGATO_V2_VECTOR = ("02251C0680E30A51439E2955D43800800437F80A31056690"
                    "23F8A71166932185B004150043C040")

_ids = itertools.count(1)


def decoded_v2() -> dict[str, Any]:
    """The version 2 vector's MSDMessage as asn1tools decodes it (a fresh copy)."""
    spec = specification()
    inner = spec.decode("ECallMessage", bytes.fromhex(V2_VECTOR))["msd"]
    return copy.deepcopy(spec.decode("MSDMessage", inner))


def build_msd(*, version: int = 2, additional: dict[str, bytes] | None = None,
              **structure: Any) -> bytes:
    """The version 2 vector with fields of its msdStructure replaced (``control`` and
    ``vehicleLocation`` are merged), encoded as ``version`` (2 or 3)."""
    spec = specification()
    message = decoded_v2()
    fields = message["msdStructure"]
    for name, value in structure.items():
        if isinstance(value, dict) and isinstance(fields.get(name), dict):
            fields[name].update(value)
        elif value is None:
            fields.pop(name, None)
        else:
            fields[name] = value
    if additional is not None:
        message["optionalAdditionalData"] = additional
    inner = spec.encode("MSDMessage", message)
    return bytes(spec.encode("ECallMessage", {"id": version, "msd": inner}))


def b64(raw: bytes | str) -> str:
    data = bytes.fromhex(raw) if isinstance(raw, str) else raw
    return base64.b64encode(data).decode("ascii")


def msd_event(msd: bytes | str = V2_VECTOR, **fields: Any) -> dict[str, Any]:
    """An event carrying an MSD: ``event_id`` and ``msisdn`` (an MSD has no phone number)
    and whatever JSON fields are given beside it."""
    return {"event_id": f"msd-{next(_ids)}", "msisdn": "+46701234567", "msd": b64(msd),
            **fields}
