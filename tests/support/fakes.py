"""Fakes for the ports the gateway talks to (never patches of our own code)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BoxLocator:
    """Countries as lat/lon boxes: enough for flow tests that are not about geography."""

    boxes: list[tuple[str, float, float, float, float]] = field(default_factory=list)
    source: str = "test boxes"

    def country_at(self, lat: float, lon: float) -> str | None:
        for country, lat0, lat1, lon0, lon1 in self.boxes:
            if lat0 <= lat <= lat1 and lon0 <= lon <= lon1:
                return country
        return None


class RaisingLocator:
    source = "broken"

    def country_at(self, lat: float, lon: float) -> str | None:
        raise RuntimeError("boundary index corrupted")


#: rough boxes around Copenhagen and Malmö, Stockholm, Berlin, London, Paris
NORDIC_BOXES = [
    ("DK", 55.5, 55.8, 12.3, 12.7),
    ("SE", 55.5, 55.7, 12.9, 13.2),
    ("SE", 59.2, 59.5, 17.8, 18.3),
    ("DE", 52.3, 52.7, 13.1, 13.8),
    ("GB", 51.3, 51.7, -0.5, 0.3),
    ("FR", 48.7, 49.0, 2.1, 2.6),
]
