"""Clients for the gateway's upstreams: the assistance centre, the vehicle command
service, Twilio's Messages API (SMS) and the push provider.

Every adapter makes one HTTP exchange per call with an explicit timeout and maps
failures onto :class:`~gateway.errors.TransientUpstreamError` (connection refused,
timeouts, 429, 5xx: worth retrying) or :class:`~gateway.errors.PermanentUpstreamError`
(other 4xx).  The contracts the rest of the gateway codes against are the
protocols in :mod:`gateway.adapters.ports`.
"""
