"""Addresses for agents: reverse geocoding through a self-hosted Nominatim, with geopy.

Optional (``GATEWAY_GEOCODER_URL``).  Only the delivery worker asks it, after the
incident is stored and before the incident is delivered: never a voice webhook, never
the event API.  What it costs a delivery is bounded:

- each lookup is one HTTP request with a timeout (``GATEWAY_GEOCODER_TIMEOUT_S``,
  geopy's ``timeout``: the connect and each read), never retried on the spot;
- answers are cached **in memory, per process**, per coordinate rounded to 4 decimals
  (about 11 m), at most ``GATEWAY_GEOCODER_CACHE_SIZE`` entries (least recently used
  evicted), each for ``GATEWAY_GEOCODER_CACHE_TTL_S``; "no address here" (Nominatim's
  ``{"error": "Unable to geocode"}``, e.g. at sea) is cached too;
- a failure (HTTP error, timeout, refused connection, a body that is not Nominatim's
  JSON) is not cached, and the geocoder is then left alone for
  ``GATEWAY_GEOCODER_BACKOFF_S``: while Nominatim hangs, one delivery waits for the
  timeout, the next ones do not wait at all.

:meth:`ReverseGeocoder.lookup` never raises: an address, or None.  Positions and
addresses are never logged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from geopy.adapters import RequestsAdapter  # type: ignore[import-untyped]
from geopy.geocoders import Nominatim  # type: ignore[import-untyped]

from gateway import __version__
from gateway.config import GeocoderPolicy

log = logging.getLogger(__name__)

#: Nominatim asks every client to identify itself; geopy refuses to run without it
USER_AGENT = f"assist-gateway/{__version__}"
#: cache key precision: 4 decimals of a degree is about 11 m of latitude
ROUND_DIGITS = 4
#: Nominatim's address parts an agent reads, in the order of :data:`CITY_KEYS` for the city
ADDRESS_KEYS = ("road", "house_number", "postcode", "city", "state", "country", "country_code")
CITY_KEYS = ("city", "town", "village", "hamlet", "municipality", "county")
#: longest text kept from one field (a display name is a comma-separated address)
MAX_TEXT = 300

Address = dict[str, str | None]


class NotAnAddress(ValueError):
    """The geocoder answered something that is not a Nominatim place."""


def _text(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise NotAnAddress(f"{name} is not text")
    value = " ".join(value.split())
    return value[:MAX_TEXT] or None


def address_of_place(place: Any) -> Address:
    """The address an agent reads, from one place of Nominatim's ``/reverse`` JSON."""
    if not isinstance(place, Mapping):
        raise NotAnAddress("the answer is not a JSON object")
    display = _text(place.get("display_name"), "display_name")
    if display is None:
        raise NotAnAddress("no display_name")
    parts = place.get("address")
    parts = {} if parts is None else parts
    if not isinstance(parts, Mapping):
        raise NotAnAddress("address is not an object")
    address: Address = {"text": display}
    for key in ADDRESS_KEYS:
        if key == "city":
            address[key] = next((_text(parts.get(k), k) for k in CITY_KEYS if parts.get(k)),
                                None)
        else:
            address[key] = _text(parts.get(key), key)
    code = address["country_code"]
    address["country_code"] = code.upper() if code and len(code) == 2 else None
    address["source"] = "nominatim"
    return address


def geocoder_for(url: str, policy: GeocoderPolicy) -> ReverseGeocoder:
    """The geocoder of ``GATEWAY_GEOCODER_URL`` (``http(s)://host[:port][/path]``)."""
    parts = urlsplit(url)
    # one attempt per lookup (geopy's requests adapter retries twice by default, which
    # would triple the wait on a hung server); the backoff below is the retry policy
    geolocator = Nominatim(domain=parts.netloc + parts.path.rstrip("/"), scheme=parts.scheme,
                           timeout=policy.timeout_s, user_agent=USER_AGENT,
                           adapter_factory=partial(RequestsAdapter, max_retries=0))
    return ReverseGeocoder(geolocator, policy=policy)


class ReverseGeocoder:
    """``lookup(lat, lon)`` -> the address there, or None; cached, bounded, never raises.

    ``geolocator`` is a geopy geocoder (``reverse(query, exactly_one=..., ...)``).
    ``stats`` counts ``hit``, ``miss`` (asked Nominatim), ``found``, ``none`` (no address
    there), ``failed`` and ``skipped`` (not asked: backing off after a failure).
    """

    def __init__(self, geolocator: Any, *, policy: GeocoderPolicy,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.geolocator = geolocator
        self.policy = policy
        self.clock = clock
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()
        #: rounded (lat, lon) -> (expires at, address or None for "no address here")
        self._cache: OrderedDict[tuple[float, float], tuple[float, Address | None]] = (
            OrderedDict())
        self._quiet_until = 0.0

    @staticmethod
    def key(lat: float, lon: float) -> tuple[float, float]:
        return round(float(lat), ROUND_DIGITS), round(float(lon), ROUND_DIGITS)

    def cached(self, lat: float, lon: float) -> tuple[bool, Address | None]:
        """``(known, address)`` from the cache alone."""
        key = self.key(lat, lon)
        with self._lock:
            entry = self._cache.get(key)
            if entry is None or entry[0] <= self.clock():
                return False, None
            self._cache.move_to_end(key)
            return True, dict(entry[1]) if entry[1] is not None else None

    def lookup(self, lat: float, lon: float) -> Address | None:
        try:
            key = self.key(lat, lon)
        except (TypeError, ValueError):
            return None
        known, address = self.cached(*key)
        if known:
            self.stats["hit"] += 1
            return address
        with self._lock:
            if self.clock() < self._quiet_until:
                self.stats["skipped"] += 1
                return None
        self.stats["miss"] += 1
        try:
            location = self.geolocator.reverse(key, exactly_one=True, addressdetails=True,
                                               zoom=18, timeout=self.policy.timeout_s)
            address = None if location is None else address_of_place(location.raw)
        except Exception as exc:  # noqa: BLE001 -- geopy's errors, a bad answer, anything
            self.stats["failed"] += 1
            with self._lock:
                self._quiet_until = self.clock() + self.policy.backoff_s
            log.warning("reverse geocoder failed (%s); not asked again for %.0f s",
                        type(exc).__name__, self.policy.backoff_s)
            return None
        self.stats["found" if address is not None else "none"] += 1
        with self._lock:
            self._cache[key] = (self.clock() + self.policy.cache_ttl_s, address)
            self._cache.move_to_end(key)
            while len(self._cache) > self.policy.cache_size:
                self._cache.popitem(last=False)
        return dict(address) if address is not None else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)
