"""What the rest of the gateway needs from its upstreams (structural protocols).

The real clients live beside this module; tests substitute the recording fakes in
``tests/support/fakes_adapters.py``.  Every method either succeeds or raises

* :class:`~gateway.errors.TransientUpstreamError`: connection refused/reset,
  connect or read timeout, HTTP 429 or 5xx -- worth retrying later;
* :class:`~gateway.errors.PermanentUpstreamError`: any other 4xx (``.status``
  carries it) -- retrying the same request will not help.

(:func:`gateway.adapters._http.error_for_status` is that rule for HTTP statuses.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class IncidentSink(Protocol):
    """The assistance centre: takes an incident, at most once per idempotency key."""

    def send_incident(self, payload: Mapping[str, Any], *, idempotency_key: str) -> int:
        """Deliver one incident (one attempt); returns the 2xx status."""
        ...


@runtime_checkable
class VehicleCommands(Protocol):
    """Remote commands to a car (flash lights, immobilise, ...)."""

    def send(self, vin: str, command: str, **params: Any) -> dict[str, Any]:
        """Send one logical command (retried briefly inside); returns the service's answer."""
        ...


@runtime_checkable
class SmsSender(Protocol):
    """Text messages to a phone."""

    def send(self, to: str, body: str, *, idempotency_key: str) -> str:
        """Send one SMS to an E.164 number (one attempt); returns the message SID."""
        ...


@runtime_checkable
class PushSender(Protocol):
    """Push notifications to the owner's app, addressed by VIN."""

    def send(self, vin: str, title: str, body: str, *, idempotency_key: str) -> None:
        """Send one push notification (one attempt)."""
        ...
