"""Signing requests the way Twilio does, with twilio's own RequestValidator."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from urllib.parse import urlencode, urlsplit

from twilio.request_validator import RequestValidator

AUTH_TOKEN = "test-auth-token-0123456789abcdef"
VEHICLE_TOKEN = "vehicle-token-0123456789abcdef"


def signature(url: str, params: Mapping[str, str], token: str = AUTH_TOKEN) -> str:
    return RequestValidator(token).compute_signature(url, dict(params))


def call_params(call_sid: str, from_: str, to: str = "+15005550006", **extra: str) -> dict[str, str]:
    """The fields Twilio always sends on a voice webhook (plus extras)."""
    params = {
        "CallSid": call_sid,
        "AccountSid": "AC" + "0" * 32,
        "From": from_,
        "To": to,
        "Caller": from_,
        "Called": to,
        "CallStatus": "in-progress",
        "ApiVersion": "2010-04-01",
        "Direction": "inbound",
    }
    params.update(extra)
    return params


def path_of(url: str) -> str:
    """'https://host/a/b?x=1' -> '/a/b?x=1' (what a test client requests)."""
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def parse(xml: str | bytes) -> ET.Element:
    root = ET.fromstring(xml)
    assert root.tag == "Response", xml
    return root


def dial_of(root: ET.Element) -> ET.Element:
    dial = root.find("Dial")
    assert dial is not None, ET.tostring(root)
    return dial


def dialled_number(root: ET.Element) -> str:
    number = dial_of(root).find("Number")
    assert number is not None and number.text, ET.tostring(root)
    return number.text


def with_query(url: str, **params: str) -> str:
    return url + ("&" if "?" in url else "?") + urlencode(params)
