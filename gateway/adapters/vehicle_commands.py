"""Client of the vehicle command service: ``POST {base_url}/vehicles/{vin}/commands``.

Commands are sent while a caller is on the line (inside a Twilio webhook, which
Twilio abandons after 15 s), so a car that cannot be reached -- a garage with
poor signal -- is retried briefly and then reported as
:class:`~gateway.errors.TransientUpstreamError` ("car unreachable").

Every logical command gets one ``Idempotency-Key`` (the caller's
``idempotency_key``, else a fresh UUID) that is reused on each retry, so a
command that reached the car but whose answer was lost is not executed twice.
A durable queue (:mod:`gateway.commands`) passes its row's key, so its retries
across passes are deduplicated by the car as well.

Budget: at most ``attempts`` attempts, and the whole call -- attempts plus
backoff sleeps -- stays within ``total_budget_s``: each attempt's timeout is
clipped to the budget left, and no retry starts if its backoff sleep would end
past the budget (``stop_before_delay``; ``stop_after_delay`` alone only checks
*after* an attempt, so it can overrun by a backoff plus a whole timeout).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import requests
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    stop_before_delay,
    wait_exponential_jitter,
)

from gateway.adapters._http import SessionClient, post_json
from gateway.errors import PermanentUpstreamError, TransientUpstreamError

SERVICE = "vehicle command service"

#: Twilio abandons a webhook after 15 s; leave room for the rest of the request.
MAX_TOTAL_BUDGET_S = 12.0
#: an attempt is not started with less than this left of the budget
MIN_ATTEMPT_S = 0.05


class VehicleCommandClient(SessionClient):
    """``send(vin, command, **params)`` -> the service's JSON answer."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float,
        attempts: int = 3,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 2.0,
        total_budget_s: float = 8.0,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        if backoff_initial_s < 0 or backoff_max_s < backoff_initial_s:
            raise ValueError("need 0 <= backoff_initial_s <= backoff_max_s")
        if not 0 < total_budget_s <= MAX_TOTAL_BUDGET_S:
            raise ValueError(f"total_budget_s must be in (0, {MAX_TOTAL_BUDGET_S:g}] s "
                             "to stay inside Twilio's 15 s webhook limit")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.total_budget_s = total_budget_s
        self._sleep = sleep
        super().__init__(session)

    def command_url(self, vin: str) -> str:
        return f"{self.base_url}/vehicles/{quote(vin, safe='')}/commands"

    def send(self, vin: str, command: str, *, idempotency_key: str | None = None,
             **params: Any) -> dict[str, Any]:
        """Send one logical command; retried on transient failures within the budget.

        Raises :class:`PermanentUpstreamError` at once on a 4xx other than 429
        (unknown vehicle, rejected command) and :class:`TransientUpstreamError`
        ("car unreachable") once the attempts or the budget are spent.
        """
        if not vin or not command:
            raise ValueError("vin and command are required")
        url = self.command_url(vin)
        body: dict[str, Any] = {"command": command, **params}
        key = idempotency_key or str(uuid.uuid4())
        deadline = time.monotonic() + self.total_budget_s

        def attempt() -> dict[str, Any]:
            left = deadline - time.monotonic()
            if left < MIN_ATTEMPT_S:
                raise TransientUpstreamError(f"{SERVICE}: no time left for another attempt")
            response = post_json(self._session, SERVICE, url, body, idempotency_key=key,
                                 timeout_s=min(self.timeout_s, left))
            try:
                answer = response.json()
            except ValueError:
                answer = None
            if not isinstance(answer, dict):
                raise PermanentUpstreamError(
                    f"{SERVICE} answered HTTP {response.status_code} without a JSON object",
                    response.status_code)
            return answer

        retrying = Retrying(
            stop=(stop_after_attempt(self.attempts) | stop_after_delay(self.total_budget_s)
                  | stop_before_delay(self.total_budget_s)),
            wait=_backoff(self.backoff_initial_s, self.backoff_max_s),
            retry=retry_if_exception_type(TransientUpstreamError),
            sleep=self._sleep,
            reraise=False,
        )
        started = time.monotonic()
        try:
            return retrying(attempt)
        except RetryError as exc:
            last = exc.last_attempt
            cause = last.exception()
            raise TransientUpstreamError(
                f"car unreachable: vehicle {vin} did not answer {command!r} "
                f"({last.attempt_number} attempt(s) in {time.monotonic() - started:.1f}s; "
                f"last: {cause})"
            ) from cause



def _backoff(initial_s: float, max_s: float) -> wait_exponential_jitter:
    """initial, 2*initial, 4*initial, ... (+ up to ``initial_s`` of jitter), capped at max.

    tenacity >= 9.1 names the factor ``multiplier`` and deprecates ``initial`` (a
    DeprecationWarning); older releases only know ``initial``.
    """
    try:
        return wait_exponential_jitter(multiplier=initial_s, max=max_s, jitter=initial_s)
    except TypeError:  # pragma: no cover - tenacity < 9.1
        return wait_exponential_jitter(initial=initial_s, max=max_s, jitter=initial_s)
