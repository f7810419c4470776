"""Sending theft notifications: SMS through Twilio Messaging, app push, centre escalation.

Rows are created by :mod:`gateway.theft` and cancelled there by ``alarm_disarmed``;
this worker sends the due ones.  ``mark_sent`` only changes a row that is still
pending, so a disarm that lands mid-send leaves the cancellation in force for
everything not yet out.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from gateway import theft
from gateway.adapters.ports import IncidentSink, PushSender, SmsSender
from gateway.errors import PermanentUpstreamError, StoreError, TransientUpstreamError
from gateway.store import Store

log = logging.getLogger(__name__)


class NotificationWorker:
    def __init__(
        self,
        store: Store,
        *,
        sms: SmsSender | None,
        push: PushSender | None,
        centre: IncidentSink | None,
        clock: Callable[[], float] = time.time,
        poll_s: float = 1.0,
        retry_after_s: float = 60.0,
    ) -> None:
        self.store = store
        self.sms, self.push, self.centre = sms, push, centre
        self.clock = clock
        self.poll_s = poll_s
        self.retry_after = dt.timedelta(seconds=retry_after_s)
        self.wake = threading.Event()
        self.stopping = threading.Event()

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), tz=dt.UTC)

    def _send(self, row: dict[str, Any]) -> None:
        key = str(row["idempotency_key"])
        kind = row["kind"]
        if kind == "sms":
            if self.sms is None:
                raise PermanentUpstreamError("SMS is not configured (GATEWAY_TWILIO_ACCOUNT_SID)")
            self.sms.send(str(row["target"]), str(row["body"]), idempotency_key=key)
        elif kind == "push":
            if self.push is None:
                raise PermanentUpstreamError("push is not configured (GATEWAY_PUSH_URL)")
            self.push.send(str(row["vin"]), "Vehicle alarm", str(row["body"]), idempotency_key=key)
        elif kind == "escalation":
            if self.centre is None:
                raise PermanentUpstreamError("no assistance centre (GATEWAY_ASSISTANCE_URL)")
            self.centre.send_incident({"type": "theft_escalation", "vin": row["vin"],
                                       "alarm_event_id": row["alarm_event_id"],
                                       "body": row["body"]}, idempotency_key=key)
        else:
            raise PermanentUpstreamError(f"unknown notification kind {kind!r}")

    def run_once(self) -> int:
        rows = theft.pending_notifications(self.store, now=self._now())
        for row in rows:
            try:
                self._send(row)
            except PermanentUpstreamError as exc:
                log.error("notification %s (%s) failed permanently: %s", row["id"], row["kind"], exc)
                theft.mark_failed(self.store, row["id"], str(exc), permanent=True, now=self._now())
                continue
            except TransientUpstreamError as exc:
                log.warning("notification %s (%s) will be retried: %s", row["id"], row["kind"], exc)
                theft.mark_failed(self.store, row["id"], str(exc), permanent=False, now=self._now(),
                                  retry_after=self.retry_after)
                continue
            if not theft.mark_sent(self.store, row["id"], now=self._now()):
                log.warning("notification %s was cancelled while it was being sent", row["id"])
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
        thread = threading.Thread(target=self.run, name="notifier", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
