"""assist-gateway: voice gateway for a connected-car assistance centre."""

__version__ = "0.1.0"
