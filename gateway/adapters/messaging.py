"""Messages to the owner: SMS through Twilio's REST API, and app push notifications.

:class:`TwilioSms` uses twilio-python's own ``Client`` (so the request is exactly
what the library sends: form fields, Basic auth, headers) with a custom HTTP
client, :class:`RebasingTwilioHttpClient`.  twilio-python has no base-URL
option -- every resource builds absolute ``https://api.twilio.com/...`` URLs --
so that client overrides :meth:`TwilioHttpClient.request` and rewrites the
``https://api.twilio.com`` prefix to ``api_url`` (``GATEWAY_TWILIO_API_URL``,
pointed at a fake in tests) before handing the request to the stock
implementation.

Idempotency: Twilio's Messages API has no idempotency key; the key is sent as an
``Idempotency-Key`` header for tracing only, so a retry after a lost answer can
send a second SMS.  Callers retry SMS only on errors that happened before the
request could have been accepted, or accept the rare duplicate.
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

    One attempt per call (the outbox retries).  ``TwilioRestException`` with
    status 429/5xx, refused connections and timeouts become
    :class:`TransientUpstreamError`; any other 4xx (invalid ``To`` 21211, bad
    credentials 20003, ...) becomes :class:`PermanentUpstreamError`.
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
            raise transient_from(SMS_SERVICE, exc, self.timeout_s) from exc
        except TwilioRestException as exc:
            raise self._mapped(int(exc.status), f"{exc.code}: {exc.msg}") from exc
        except TwilioException as exc:  # TwilioServiceException (RFC 9457 errors) and others
            status = getattr(exc, "status", None)
            if not isinstance(status, int):
                raise
            raise self._mapped(status, str(exc)) from exc
        sid: Any = message.sid
        if not isinstance(sid, str) or not sid:
            raise PermanentUpstreamError(f"{SMS_SERVICE} accepted the message without a SID")
        return sid

    @staticmethod
    def _mapped(status: int, detail: str) -> TransientUpstreamError | PermanentUpstreamError:
        error = error_for_status(SMS_SERVICE, status, detail)
        if isinstance(error, TransientUpstreamError | PermanentUpstreamError):
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

