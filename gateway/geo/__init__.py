"""Offline country lookup from latitude/longitude (see docs/country-lookup.md)."""

from gateway.errors import GeoDataError
from gateway.geo.boundaries import BoundaryLocator, load_locator

__all__ = ["BoundaryLocator", "GeoDataError", "load_locator"]
