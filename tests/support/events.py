"""Vehicle data messages for tests."""

from __future__ import annotations

import itertools
from typing import Any

_ids = itertools.count(1)

SWEDISH_CAR = {"vin": "YV1ZW72U5N1234567", "msisdn": "+46701234567"}
COPENHAGEN = {"lat": 55.6761, "lon": 12.5683}


def crash_event(**overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": f"evt-{next(_ids)}",
        "type": "crash",
        **SWEDISH_CAR,
        "occurred_at": "2026-11-25T10:15:00Z",
        "location": {**COPENHAGEN, "heading_deg": 90.0, "accuracy_m": 8.0, "trusted": True},
        "crash": {"airbag_deployed": True, "belt_tensioner_fired": True, "delta_v_kmh": 38},
        "occupants": {"count": 2},
    }
    event.update(overrides)
    return event
