"""What the Twilio views share: URL state, action URLs, TwiML responses, callbacks.

The voice views (cars) and the IVR (owners) both import from here; neither imports
the other's module for it.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Self, TypeVar
from urllib.parse import urlencode

from flask import Response, current_app, request, url_for
from twilio.twiml.voice_response import VoiceResponse

from gateway import twiml
from gateway.calls.call_plan import centre_answered
from gateway.calls.inbound import e164
from gateway.errors import StoreError
from gateway.views.context import services

log = logging.getLogger(__name__)

S = TypeVar("S", bound="UrlState")


@dataclass(frozen=True)
class UrlState:
    """State carried in a Twilio action URL (Twilio signs the URL with the request)."""

    @classmethod
    def parse(cls, args: Mapping[str, str]) -> Self:
        """Lenient: a missing or garbled value falls back to its default."""
        values: dict[str, Any] = {}
        for name, default in asdict(cls()).items():
            raw = args.get(name)
            if raw is None:
                continue
            if isinstance(default, int):
                try:
                    values[name] = max(0, int(raw))
                except ValueError:
                    continue
            else:
                values[name] = raw[:64]
        return cls(**values)

    def params(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items() if v not in ("", 0)}


def action_url(endpoint: str, state: UrlState | Mapping[str, str] | None = None,
               **extra: str) -> str:
    """An absolute URL under the configured public URL (what Twilio signs): the text
    ``url_for(endpoint, **params)`` gives, with the path looked up once per endpoint."""
    params: dict[str, Any] = {}
    if isinstance(state, UrlState):
        params.update(state.params())
    elif state:
        params.update(state)
    params.update(extra)
    base = endpoint_url(endpoint)
    if base is None:
        return services().settings.public_url + url_for(endpoint, **params)
    return base + encode_query(params)


#: url_for's query encoding (werkzeug's), so the URLs are the text url_for writes
_QUERY_SAFE = "!$'()*,/:;?@"


#: text that urlencode(..., safe=_QUERY_SAFE) leaves as it is: ASCII letters, digits,
#: "_.-~" (always safe) and _QUERY_SAFE
_UNQUOTED = re.compile(r"[A-Za-z0-9_.\-~!$'()*,/:;?@]*\Z")


def encode_query(params: Mapping[str, Any]) -> str:
    """``?a=1&b=2`` as url_for appends it (values of None left out); "" for none.

    The text urlencode(items, safe=_QUERY_SAFE) writes, without its per-character
    quoting for keys and values that need none (a plan's ids, countries, numbers):
    that was ~50 µs of every answer."""
    parts = []
    for key, value in params.items():
        if value is None:
            continue
        text = value if isinstance(value, str) else str(value) if isinstance(value, int) else ""
        if not (text or value == "") or not _UNQUOTED.match(key) or not _UNQUOTED.match(text):
            parts.append(urlencode([(key, value)], safe=_QUERY_SAFE))
        else:
            parts.append(f"{key}={text}")
    return "?" + "&".join(parts) if parts else ""


def endpoint_url(endpoint: str) -> str | None:
    """The public URL of ``endpoint``'s path, without a query, cached per app and script
    root; None for a route with path variables (those need url_for)."""
    cache: dict[tuple[str, str], str | None] = current_app.extensions.setdefault(
        "gateway.endpoint_urls", {})
    key = (request.script_root, endpoint)
    if key not in cache:
        if any(rule.arguments for rule in current_app.url_map.iter_rules(endpoint)):
            cache[key] = None
        else:
            cache[key] = services().settings.public_url + url_for(endpoint)
    return cache[key]


def twiml_response(response: VoiceResponse | str) -> Response:
    body = response if isinstance(response, str) else twiml.to_xml(response)
    return Response(body, status=200, mimetype="text/xml")


def e164_or_none(raw: str | None) -> str | None:
    """The caller's number in E.164 from any form Twilio sends (SIP URI included)."""
    return e164(raw)


def unreachable_centres() -> frozenset[str]:
    """Centre lines known down, from the cached line health (never blocks)."""
    cache = services().line_health
    return cache.down() if cache is not None else frozenset()


def dial_outcome(attempt: int, *, kind: str) -> tuple[bool, str]:
    """``(answered, DialCallStatus)`` of an IVR centre <Dial action>; feeds the line's health."""
    svc = services()
    status = request.form.get("DialCallStatus", "")
    accepted: bool | None
    try:
        accepted = svc.store.call_step(request.form.get("CallSid", ""),
                                       f"accept:{attempt}") is not None
    except StoreError:
        accepted = None
    answered = centre_answered(status, request.form.get("DialBridged"), accepted)
    centre = request.args.get("centre", "")
    if svc.centre_health is not None and (answered or status in ("busy", "no-answer", "failed")):
        svc.centre_health.record_safely(centre, ok=answered, reason=f"{kind} dial {status}")
    return answered, status


def record_callback_safely(*, call_sid: str, vin: str | None, incident_id: str | None,
                           reason: str) -> None:
    """A callback the centre owes this caller (best effort: the caller is told anyway)."""
    try:
        services().store.record_callback({
            "call_sid": call_sid or request.form.get("CallSid", ""),
            "number": e164_or_none(request.form.get("From")), "vin": vin,
            "incident_id": incident_id, "reason": reason[:300]})
    except StoreError:
        log.error("could not record the callback request")


def entitlement_of(vehicle: Any) -> Any:
    """The roadside entitlement of a registered vehicle, today."""
    svc = services()
    today = dt.datetime.fromtimestamp(svc.clock(), tz=dt.UTC).date()
    return svc.market_rule.entitlement(purchase_date=vehicle.purchase_date, today=today,
                                       market=vehicle.market,
                                       serviced_regularly=vehicle.serviced_regularly)


def roadside_entitlement(vin: str | None, *, timeout_s: float) -> Any:
    """The entitlement of the car with this VIN, or None (unknown car, or the registry
    did not answer in time: the call goes on without the notice)."""
    if not vin:
        return None
    svc = services()
    try:
        vehicle = svc.store.deadline.run(lambda _job: svc.vehicles.get(vin),
                                         timeout_s=timeout_s)
    except StoreError:
        log.warning("vehicle registry did not answer; no entitlement notice")
        return None
    return entitlement_of(vehicle) if vehicle is not None else None
