"""Errors raised by the gateway's own code.

Hierarchy::

    GatewayError
    ├── ConfigError            configuration missing or invalid at start-up
    ├── PlanError              the number plan could not be loaded or is inconsistent
    │   └── PlanEntryMissingError   no entry for a country
    ├── GeoDataError           boundary data missing or unreadable
    ├── ValidationError        request input rejected (carries per-field reasons)
    ├── StoreError             the database could not be reached or refused a write
    └── UpstreamError          an outside service (centre, vehicle, push, Twilio) failed
        ├── TransientUpstreamError   worth retrying (timeouts, 429, 5xx, refused)
        └── PermanentUpstreamError   not worth retrying (other 4xx)
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base class of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """A setting is missing or invalid; raised while the app is being built."""


class PlanError(GatewayError):
    """The number plan could not be loaded or is inconsistent."""


class PlanEntryMissingError(PlanError):
    """The plan has no entry for the requested country."""

    def __init__(self, country: str) -> None:
        super().__init__(f"no number plan entry for country {country!r}")
        self.country = country


class GeoDataError(GatewayError):
    """The boundary data is missing or unreadable."""


class ValidationError(GatewayError):
    """Input rejected; ``errors`` maps a field path to the reason."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


class StoreError(GatewayError):
    """The database could not be reached or refused a write."""


class UpstreamError(GatewayError):
    """An outside service failed."""


class TransientUpstreamError(UpstreamError):
    """Failure worth retrying: connection refused, timeout, 429, 5xx."""


class PermanentUpstreamError(UpstreamError):
    """Failure not worth retrying: a 4xx other than 429."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
