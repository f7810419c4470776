"""Sending theft notifications: SMS through Twilio Messaging, app push, escalation to the centre.

Rows are created by :mod:`gateway.theft` and cancelled there by a disarm with the key;
this worker sends the due ones.  One pass (:meth:`NotificationWorker.run_once`) claims
due rows with a lease (one sender per row, across processes), then for each:

* **SMS / push past their deadline** (a day after the alarm: past the escalation, so an
  outage longer than the escalation delay still ends with the owner told) -> ``expired``.
* **SMS / push** -> one attempt, counted before it is made.  Delivered (Twilio 2xx with a
  message SID; push 2xx) -> ``sent``.  A permanent refusal (4xx other than 429, e.g.
  Twilio 21211) -> ``failed``, that channel is not tried again.  A transient failure ->
  due again after a backoff with tenacity's ``wait_exponential_jitter`` shape
  (``initial * 2**(n-1) + uniform(0, initial)``, capped at ``backoff_max_s``), stored in
  the row's ``due_at`` -- unless that is at or after the row's deadline, which makes it
  ``expired``.  So a channel is retried until delivered, refused, disarmed by key, or
  its deadline; the escalation to the centre does not stop it.
* **escalation** (due at the deadline) -> :func:`gateway.theft.escalate`: an outbox row
  carrying every owner channel's status, attempts and last error, delivered to the
  centre by :mod:`gateway.delivery` (retried there, never dropped).

Never twice for one notification: the row's ``idempotency_key`` goes with every request
(the push provider and the centre deduplicate on it).  Twilio cannot: after an SMS
attempt that may have gone through (:class:`~gateway.adapters.messaging.SmsMaybeSentError`,
or a sender that died mid-request: the attempt is recorded as *in doubt* before the
request leaves), the next attempt first looks the message up by the reference in its
body (:meth:`~gateway.adapters.messaging.TwilioSms.find_sent`) and records it as
delivered when it is there.  A lookup that fails transiently postpones the attempt; a
lookup Twilio refuses (4xx) falls back to sending again: a duplicate SMS is better than
a lost theft alarm.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from gateway import theft
from gateway.adapters.messaging import SmsMaybeSentError
from gateway.adapters.ports import PushSender, SmsSender
from gateway.errors import PermanentUpstreamError, StoreError, TransientUpstreamError
from gateway.owner_texts import reference
from gateway.store import Store
from gateway.watchdog import background_thread

log = logging.getLogger(__name__)

#: cap of the retry backoff: within a 10-minute deadline a recovered Twilio is used within a minute
DEFAULT_BACKOFF_MAX_S = 60.0


@runtime_checkable
class SmsLookup(Protocol):
    """An SMS sender that can find a message it may already have sent."""

    def find_sent(self, to: str, marker: str) -> str | None: ...


class NotificationWorker:
    def __init__(
        self,
        store: Store,
        *,
        sms: SmsSender | None,
        push: PushSender | None,
        clock: Callable[[], float] = time.time,
        poll_s: float = 1.0,
        backoff_initial_s: float = 5.0,
        backoff_max_s: float = DEFAULT_BACKOFF_MAX_S,
        lease_s: float = 60.0,
        batch: int = 50,
        rng: random.Random | None = None,
        on_escalation: Callable[[str], None] | None = None,
    ) -> None:
        if not 0 < backoff_initial_s <= backoff_max_s:
            raise ValueError("need 0 < backoff_initial_s <= backoff_max_s")
        if lease_s <= 0 or batch < 1:
            raise ValueError("lease_s must be positive and batch at least 1")
        self.store = store
        self.sms, self.push = sms, push
        self.clock = clock
        self.poll_s = poll_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.lease = dt.timedelta(seconds=lease_s)
        self.batch = batch
        self.rng = rng or random.Random()
        #: called with the outbox key of each escalation handed to the outbox
        self.on_escalation = on_escalation
        self.wake = threading.Event()
        self.stopping = threading.Event()

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), tz=dt.UTC)

    def backoff_s(self, attempts: int) -> float:
        """The gap after the ``attempts``-th failure (tenacity's wait_exponential_jitter)."""
        exponent = min(max(attempts, 1) - 1, 32)
        gap = self.backoff_initial_s * 2.0 ** exponent + self.rng.uniform(0, self.backoff_initial_s)
        return min(gap, self.backoff_max_s)

    # -- one row ------------------------------------------------------------------------

    def handle(self, row: dict[str, Any]) -> str:
        """One claimed row: ``sent``, ``failed``, ``retry``, ``expired``, ``escalated``, ``gone``."""
        kind = row["kind"]
        now = self._now()
        if kind == "escalation":
            key = theft.escalate(self.store, row, now=now)
            if key is None:
                return "gone"
            log.warning("theft alarm %s on %s escalated to the centre (outbox %s)",
                        row["alarm_event_id"], row["vin"], key)
            if self.on_escalation is not None:
                self.on_escalation(key)
            return "escalated"
        deadline = row["deadline_at"]
        if deadline is not None and now >= deadline:
            theft.mark_expired(self.store, int(row["id"]), now=now)
            return "expired"
        if kind == "sms":
            return self._sms(row)
        if kind == "push":
            return self._push(row)
        return self._failed(row, PermanentUpstreamError(f"unknown notification kind {kind!r}"))

    def _sms(self, row: dict[str, Any]) -> str:
        if self.sms is None:
            return self._failed(row, PermanentUpstreamError(
                "SMS is not configured (GATEWAY_TWILIO_ACCOUNT_SID, GATEWAY_SMS_FROM)"))
        key, to = str(row["idempotency_key"]), str(row["target"])
        # one attempt = the lookup (after an attempt in doubt) and, unless found, the send
        if not theft.attempt_started(self.store, int(row["id"]), in_doubt=True):
            return "gone"
        if row["in_doubt"] and isinstance(self.sms, SmsLookup):
            try:
                sid = self.sms.find_sent(to, reference(key))
            except TransientUpstreamError as exc:
                return self._retry(row, f"lookup before resending: {exc}", in_doubt=True,
                                   status=getattr(exc, "status", None))
            except PermanentUpstreamError as exc:
                log.warning("notification %s: cannot look up a possibly sent SMS (%s); "
                            "sending again", row["id"], exc)
                sid = None
            if sid is not None:
                log.info("notification %s: the SMS had gone through (%s); not sent again",
                         row["id"], sid)
                return self._sent(row, sid)
        try:
            sid = self.sms.send(to, str(row["body"]), idempotency_key=key)
        except PermanentUpstreamError as exc:
            return self._failed(row, exc)
        except SmsMaybeSentError as exc:
            return self._retry(row, str(exc), in_doubt=True, status=exc.status)
        except TransientUpstreamError as exc:  # not taken (refused, 429): plainly send again
            return self._retry(row, str(exc), in_doubt=False, status=getattr(exc, "status", None))
        return self._sent(row, sid)

    def _push(self, row: dict[str, Any]) -> str:
        if self.push is None:
            return self._failed(row, PermanentUpstreamError("push is not configured (GATEWAY_PUSH_URL)"))
        if not theft.attempt_started(self.store, int(row["id"]), in_doubt=False):
            return "gone"
        try:
            self.push.send(str(row["vin"]), str(row["title"] or "Vehicle alarm"), str(row["body"]),
                           idempotency_key=str(row["idempotency_key"]))
        except PermanentUpstreamError as exc:
            return self._failed(row, exc)
        except TransientUpstreamError as exc:
            return self._retry(row, str(exc), in_doubt=False)
        return self._sent(row, None)

    # -- outcomes -----------------------------------------------------------------------

    def _sent(self, row: dict[str, Any], provider_ref: str | None) -> str:
        if not theft.mark_sent(self.store, int(row["id"]), now=self._now(), provider_ref=provider_ref):
            log.warning("notification %s was cancelled while it was being sent", row["id"])
            return "gone"
        return "sent"

    def _failed(self, row: dict[str, Any], exc: PermanentUpstreamError) -> str:
        log.error("notification %s (%s) refused for good: %s", row["id"], row["kind"], exc)
        theft.mark_failed(self.store, int(row["id"]), str(exc), permanent=True, now=self._now(),
                          status=exc.status)
        return "failed"

    def _retry(self, row: dict[str, Any], error: str, *, in_doubt: bool,
               status: int | None = None) -> str:
        now = self._now()
        attempts = int(row["attempts"]) + 1
        retry_at = now + dt.timedelta(seconds=self.backoff_s(attempts))
        updated = theft.mark_failed(self.store, int(row["id"]), error, permanent=False, now=now,
                                    retry_at=retry_at, in_doubt=in_doubt, status=status)
        if updated is None:
            return "gone"
        if updated["status"] == "expired":
            log.error("notification %s (%s) not delivered before the deadline: %s",
                      row["id"], row["kind"], error)
            return "expired"
        log.warning("notification %s (%s) failed (%s); next try at %s", row["id"], row["kind"],
                    error, retry_at.isoformat())
        return "retry"

    # -- loop ---------------------------------------------------------------------------

    def run_once(self) -> int:
        """Claim the due rows and handle each; returns how many were handled."""
        rows = theft.claim_due(self.store, now=self._now(), lease=self.lease, limit=self.batch)
        for row in rows:
            try:
                self.handle(row)
            except StoreError:
                raise
            except Exception:  # one bad row must not stop the others; its lease expires
                log.exception("notification %s failed unexpectedly", row["id"])
        return len(rows)

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                handled = self.run_once()
            except StoreError as exc:
                log.error("notifier: database unavailable (%s)", exc)
                handled = 0
            except Exception:
                log.exception("notifier pass failed")
                handled = 0
            if not handled:
                self.wake.wait(self.poll_s)
                self.wake.clear()

    def start_thread(self) -> threading.Thread:
        thread = threading.Thread(target=background_thread(self.run),
                                  name="notifier", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
