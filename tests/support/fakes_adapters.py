"""In-process recording fakes of the adapter protocols (``gateway.adapters.ports``).

For tests of code that *uses* an adapter (outbox worker, views) where a real
server would add nothing.  Each fake records every call in ``.calls`` (failed
ones too) and can be told to fail::

    sms = RecordingSms()
    sms.fail_next(TransientUpstreamError("twilio down"), times=2)   # then succeed
    sms.fail_always(PermanentUpstreamError("bad number", 400))
    sms.succeed()                                                    # back to normal

The HTTP clients themselves are tested against the real servers in
``tests/support/fake_servers.py``.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import UpstreamError


@dataclass(frozen=True)
class Call:
    """One call to a fake: its arguments and whether it raised."""

    args: dict[str, Any]
    error: UpstreamError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class _Recorder:
    calls: list[Call] = field(default_factory=list)
    _failures: list[UpstreamError] = field(default_factory=list)
    _always: UpstreamError | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def fail_next(self, error: UpstreamError, times: int = 1) -> None:
        """The next ``times`` calls raise ``error`` (after being recorded)."""
        with self._lock:
            self._failures.extend([error] * times)

    def fail_always(self, error: UpstreamError) -> None:
        with self._lock:
            self._always = error

    def succeed(self) -> None:
        """Forget every planned failure."""
        with self._lock:
            self._failures.clear()
            self._always = None

    @property
    def successful(self) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.ok]

    def _record(self, **args: Any) -> None:
        """Record a call; raise the planned failure if there is one."""
        with self._lock:
            error = self._failures.pop(0) if self._failures else self._always
            self.calls.append(Call(args, error))
        if error is not None:
            raise error


@dataclass
class RecordingIncidentSink(_Recorder):
    """:class:`~gateway.adapters.ports.IncidentSink`; dedupes by idempotency key."""

    #: idempotency key -> first payload delivered under it
    incidents: dict[str, dict[str, Any]] = field(default_factory=dict)

    def send_incident(self, payload: Mapping[str, Any], *, idempotency_key: str) -> int:
        self._record(payload=dict(payload), idempotency_key=idempotency_key)
        with self._lock:
            if idempotency_key in self.incidents:
                return 200
            self.incidents[idempotency_key] = dict(payload)
            return 201


@dataclass
class RecordingVehicleCommands(_Recorder):
    """:class:`~gateway.adapters.ports.VehicleCommands`; answers ``{"status": status}``:
    ``accepted`` (the service took it; the car reports later), ``confirmed`` (the car
    executed it), ``rejected`` (it will not)."""

    status: str = "accepted"
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def send(self, vin: str, command: str, **params: Any) -> dict[str, Any]:
        self._record(vin=vin, command=command, params=params)
        answer = {"status": self.status, "command_id": f"cmd-{next(self._ids)}",
                  "vin": vin, "command": command}
        if self.status == "rejected":
            answer["reason"] = "vehicle is moving"
        return answer


@dataclass
class RecordingSms(_Recorder):
    """:class:`~gateway.adapters.ports.SmsSender`; returns ``SM...`` SIDs."""

    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def send(self, to: str, body: str, *, idempotency_key: str) -> str:
        self._record(to=to, body=body, idempotency_key=idempotency_key)
        return f"SM{next(self._ids):032x}"


@dataclass
class RecordingPush(_Recorder):
    """:class:`~gateway.adapters.ports.PushSender`."""

    def send(self, vin: str, title: str, body: str, *, idempotency_key: str) -> None:
        self._record(vin=vin, title=title, body=body, idempotency_key=idempotency_key)
