"""Messages to the owner: SMS through Twilio's REST API, and app push notifications.

:class:`TwilioSms` uses twilio-python's own ``Client`` (so the request is exactly
what the library sends: form fields, Basic auth, headers) with a custom HTTP
client, :class:`RebasingTwilioHttpClient`.  twilio-python has no base-URL
option -- every resource builds absolute ``https://api.twilio.com/...`` URLs --
so that client overrides :meth:`TwilioHttpClient.request` and rewrites the
``https://api.twilio.com`` prefix to ``api_url`` (``GATEWAY_TWILIO_API_URL``,
pointed at a fake in tests) before handing the request to the stock
implementation.

Idempotency: Twilio's Messages API has no idempotency key (the key is sent as an
``Idempotency-Key`` header for tracing only), and Twilio's own error page for 20500
says a retried POST that sends an SMS can reach the customer twice.  So
:meth:`TwilioSms.send` tells the two kinds of transient failure apart:

* :class:`SmsMaybeSentError` -- the request may have been accepted: a 5xx answer, a
  read timeout, a connection dropped or an answer cut short after the request went
  out.  Before sending again, look the message up with :meth:`TwilioSms.find_sent`
  (a ``GET`` of the account's recent messages to that number from our sender,
  matched on a reference the caller put in the body: GETs are safe to retry);
* any other :class:`~gateway.errors.TransientUpstreamError` -- the request was not
  taken: connection refused, connect timeout, 429.  Send again.

What remains is a message Twilio created but does not list yet when we look, which
would be sent a second time: at least once, not exactly once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Self

import requests
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.http.response import Response as TwilioResponse
from twilio.rest import Client
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError

from gateway.adapters._http import (
    TRANSIENT_REQUEST_ERRORS,
    SessionClient,
    error_for_status,
    post_json,
    transient_from,
)
from gateway.errors import PermanentUpstreamError, TransientUpstreamError

TWILIO_API_URL = "https://api.twilio.com"
SMS_SERVICE = "Twilio Messages API"
PUSH_SERVICE = "push provider"
#: how many of the most recent messages to the owner :meth:`TwilioSms.find_sent` reads
LOOKUP_LIMIT = 20


class SmsServiceError(TransientUpstreamError):
    """A transient failure of Twilio's API; ``status`` is the HTTP status if it answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class SmsMaybeSentError(SmsServiceError):
    """A transient SMS failure after which Twilio may still have accepted the message.

    Look it up (:meth:`TwilioSms.find_sent`) before sending again.
    """


def _never_sent(exc: requests.RequestException) -> bool:
    """True when the request cannot have reached the server (no connection was made)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    if isinstance(exc, requests.ConnectionError) and exc.args:
        cause = exc.args[0]
        # NewConnectionError (refused, DNS) is a ConnectTimeoutError in urllib3 2
        return isinstance(cause, MaxRetryError) and isinstance(cause.reason, ConnectTimeoutError)
    return False


class RebasingTwilioHttpClient(TwilioHttpClient):  # type: ignore[misc]
    """``TwilioHttpClient`` that sends ``https://api.twilio.com/...`` to ``api_url``.

    Only that host is rewritten; with a non-default ``api_url`` any other Twilio
    host (``messaging.twilio.com``, ...) raises ``ValueError`` rather than
    silently reaching the real Twilio from a test.  Headers set with
    :meth:`extra_headers` are added to requests made in the same thread.
    """

    def __init__(self, api_url: str = TWILIO_API_URL, *, timeout: float) -> None:
        super().__init__(timeout=timeout)
        self.api_url = api_url.rstrip("/")
        self._local = threading.local()

    def rebase(self, url: str) -> str:
        if self.api_url == TWILIO_API_URL:
            return url
        if url == TWILIO_API_URL or url.startswith(TWILIO_API_URL + "/"):
            return self.api_url + url[len(TWILIO_API_URL):]
        raise ValueError(f"no rewrite for {url!r}: only {TWILIO_API_URL} is rebased")

    @contextmanager
    def extra_headers(self, headers: dict[str, str]) -> Iterator[None]:
        previous: dict[str, str] = getattr(self._local, "headers", {})
        self._local.headers = {**previous, **headers}
        try:
            yield
        finally:
            self._local.headers = previous

    def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,
        allow_redirects: bool = False,
    ) -> TwilioResponse:
        extra: dict[str, str] = getattr(self._local, "headers", {})
        return super().request(
            method, self.rebase(url), params=params, data=data,
            headers={**(headers or {}), **extra}, auth=auth, timeout=timeout,
            allow_redirects=allow_redirects,
        )

    def close(self) -> None:
        if self.session is not None:
            self.session.close()


class TwilioSms:
    """``send(to, body, idempotency_key=...)`` -> the Message SID (``SM...``).

    One attempt per call (the notifier retries).  A 2xx with a SID is delivered.
    Refused connections, connect timeouts and 429 become
    :class:`TransientUpstreamError`; 5xx, read timeouts and dropped answers become
    :class:`SmsMaybeSentError` (see the module docstring); any other 4xx (invalid
    ``To`` 21211, bad credentials 20003, ...) becomes :class:`PermanentUpstreamError`.
    """

    def __init__(self, account_sid: str, auth_token: str, *, from_number: str,
                 api_url: str = TWILIO_API_URL, timeout_s: float = 5.0) -> None:
        if not account_sid.startswith("AC"):
            raise ValueError("account_sid must be a Twilio account SID (AC...)")
        if not from_number:
            raise ValueError("from_number is required")
        self.from_number = from_number
        self.timeout_s = timeout_s
        self.http_client = RebasingTwilioHttpClient(api_url, timeout=timeout_s)
        self._client = Client(account_sid, auth_token, http_client=self.http_client)
        # Client reads TWILIO_REGION/TWILIO_EDGE from os.environ (``environment={}``
        # does not stop it: an empty mapping falls back to os.environ) and would
        # then send to api.<edge>.<region>.twilio.com, past our rewrite.
        self._client.region = None
        self._client.edge = None

    def send(self, to: str, body: str, *, idempotency_key: str) -> str:
        try:
            with self.http_client.extra_headers({"Idempotency-Key": idempotency_key}):
                message = self._client.messages.create(to=to, from_=self.from_number, body=body)
        except TRANSIENT_REQUEST_ERRORS as exc:
            error = transient_from(SMS_SERVICE, exc, self.timeout_s)
            if _never_sent(exc):
                raise error from exc
            raise SmsMaybeSentError(str(error)) from exc
        except TwilioRestException as exc:
            raise self._mapped(int(exc.status), f"{exc.code}: {exc.msg}", sending=True) from exc
        except TwilioException as exc:  # TwilioServiceException (RFC 9457 errors) and others
            status = getattr(exc, "status", None)
            if not isinstance(status, int):
                raise
            raise self._mapped(status, str(exc), sending=True) from exc
        sid: Any = message.sid
        if not isinstance(sid, str) or not sid:
            # accepted (2xx) without the SID that proves it: treat as possibly sent
            raise SmsMaybeSentError(f"{SMS_SERVICE} answered without a message SID")
        return sid

    def find_sent(self, to: str, marker: str) -> str | None:
        """The SID of a recent message from our sender to ``to`` whose body has ``marker``.

        Reads the newest :data:`LOOKUP_LIMIT` messages of the account to ``to`` from
        ``from_number`` (one ``GET`` of the Messages list).  None if none matches.
        Transient failures raise :class:`TransientUpstreamError`; a 4xx (a key without
        read access, ...) raises :class:`PermanentUpstreamError`.
        """
        if not marker:
            raise ValueError("marker is required")
        try:
            messages = self._client.messages.list(to=to, from_=self.from_number,
                                                  limit=LOOKUP_LIMIT)
        except TRANSIENT_REQUEST_ERRORS as exc:
            raise transient_from(SMS_SERVICE, exc, self.timeout_s) from exc
        except TwilioRestException as exc:
            raise self._mapped(int(exc.status), f"{exc.code}: {exc.msg}") from exc
        except TwilioException as exc:  # a page: TwilioException("Unable to fetch page", response)
            response = exc.args[1] if len(exc.args) > 1 else None
            status = getattr(exc, "status", None) or getattr(response, "status_code", None)
            if not isinstance(status, int):
                raise
            detail = str(getattr(response, "text", "") or exc)[:200]
            raise self._mapped(status, detail) from exc
        for message in messages:
            if marker in (message.body or "") and isinstance(message.sid, str) and message.sid:
                return message.sid
        return None

    @staticmethod
    def _mapped(status: int, detail: str,
                sending: bool = False) -> TransientUpstreamError | PermanentUpstreamError:
        error = error_for_status(SMS_SERVICE, status, detail)
        if sending and status >= 500 and error is not None:
            return SmsMaybeSentError(str(error), status)  # Twilio: a 5xx POST may still have sent
        if isinstance(error, TransientUpstreamError):
            return SmsServiceError(str(error), status)
        if isinstance(error, PermanentUpstreamError):
            return error
        return PermanentUpstreamError(f"{SMS_SERVICE} failed with HTTP {status}: {detail}", status)

    def close(self) -> None:
        self.http_client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class PushClient(SessionClient):
    """``send(vin, title, body, idempotency_key=...)``: ``POST {url}`` JSON, one attempt."""

    def __init__(self, url: str, *, timeout_s: float,
                 session: requests.Session | None = None) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.url = url
        self.timeout_s = timeout_s
        super().__init__(session)

    def send(self, vin: str, title: str, body: str, *, idempotency_key: str) -> None:
        if not idempotency_key:
            raise ValueError("idempotency_key is required")
        post_json(self._session, PUSH_SERVICE, self.url,
                  {"vin": vin, "title": title, "body": body},
                  idempotency_key=idempotency_key, timeout_s=self.timeout_s)

