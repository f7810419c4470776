"""Client of the assistance centre's incident API: ``POST {base_url}/incidents``.

One attempt per call: retrying (with the same idempotency key) is the outbox
worker's job, so an incident is never sent twice from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import requests

from gateway.adapters._http import SessionClient, post_json

SERVICE = "assistance centre"


class AssistanceCentreClient(SessionClient):
    """``send_incident`` -> the 2xx status, or Transient/PermanentUpstreamError.

    ``timeout_s`` bounds the connect and each read separately (``requests``
    semantics).  Pass a ``session`` to share a connection pool; otherwise the
    client owns one and :meth:`close` (or ``with``) releases it.
    """

    def __init__(self, base_url: str, *, timeout_s: float,
                 session: requests.Session | None = None) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.url = base_url.rstrip("/") + "/incidents"
        self.timeout_s = timeout_s
        super().__init__(session)

    def send_incident(self, payload: Mapping[str, Any], *, idempotency_key: str) -> int:
        if not idempotency_key:
            raise ValueError("idempotency_key is required")
        response = post_json(self._session, SERVICE, self.url, dict(payload),
                             idempotency_key=idempotency_key, timeout_s=self.timeout_s)
        return response.status_code

