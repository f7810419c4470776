"""HTTP failure mapping shared by the adapters (private to the package).

* transport failures -- refused/reset connections, connect and read timeouts,
  a body cut short -- are :class:`~gateway.errors.TransientUpstreamError`;
* 429 and 5xx are transient; any other 4xx is
  :class:`~gateway.errors.PermanentUpstreamError`; so is a 3xx, since the
  clients never follow redirects (a redirect means a misconfigured URL).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

import requests

from gateway.errors import PermanentUpstreamError, TransientUpstreamError, UpstreamError

#: transport failures worth retrying (ConnectTimeout is both a ConnectionError and a Timeout)
TRANSIENT_REQUEST_ERRORS: tuple[type[requests.RequestException], ...] = (
    requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
)


def error_for_status(service: str, status: int, detail: str = "") -> UpstreamError | None:
    """The error a non-2xx answer means, or None for a 1xx/2xx."""
    if status < 300:
        return None
    message = f"{service} answered HTTP {status}" + (f": {detail}" if detail else "")
    if status == 429 or status >= 500:
        return TransientUpstreamError(message)
    return PermanentUpstreamError(message, status)


def error_for_response(service: str, response: requests.Response) -> UpstreamError | None:
    return error_for_status(service, response.status_code, response.text[:200].strip())


def transient_from(service: str, exc: BaseException, timeout_s: float) -> TransientUpstreamError:
    """Describe a transport failure as a :class:`TransientUpstreamError`."""
    if isinstance(exc, requests.ConnectTimeout):
        what = f"connect timed out after {timeout_s:g}s"
    elif isinstance(exc, requests.Timeout):
        what = f"no answer within {timeout_s:g}s"
    elif isinstance(exc, requests.ConnectionError):
        what = "connection failed"
    else:
        what = "answer cut short"
    return TransientUpstreamError(f"{service} unreachable: {what} ({type(exc).__name__})")


def post_json(session: requests.Session, service: str, url: str, body: dict[str, Any], *,
              idempotency_key: str, timeout_s: float) -> requests.Response:
    """One POST with an explicit timeout; the 2xx response or an UpstreamError.

    The response body is read (``.content``) before returning, so the connection
    is back in the pool whatever the caller does next.
    """
    try:
        response = session.post(url, json=body, headers={"Idempotency-Key": idempotency_key},
                                timeout=timeout_s, allow_redirects=False)
        with response:
            response.content  # noqa: B018 -- read inside the try: a cut body is transient
    except TRANSIENT_REQUEST_ERRORS as exc:
        raise transient_from(service, exc, timeout_s) from exc
    error = error_for_response(service, response)
    if error is not None:
        raise error
    return response


class SessionClient:
    """Base of the JSON clients: owns (or borrows) a ``requests.Session``.

    A session passed in belongs to the caller and is never closed here.
    """

    def __init__(self, session: requests.Session | None) -> None:
        self._owns_session = session is None
        self._session = session if session is not None else requests.Session()

    def close(self) -> None:
        if self._owns_session:
            self._session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
