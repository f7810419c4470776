"""Getting every incident to the assistance centre: a transactional outbox and its worker.

The outbox row is written in the same transaction as the incident, before the car gets
its 2xx; so an accepted incident is never lost.  A worker (a thread inside ``serve``, or
``python -m gateway worker``) claims due rows with a lease (a conditional UPDATE, safe
across processes sharing the database), delivers each with tenacity (exponential backoff
with jitter, capped; a per-attempt timeout; a bounded budget per pass), and marks it
delivered.  A worker killed at any moment leaves the row leased; the lease expires and
another pass delivers it again: at least once on the wire, once at the centre thanks to
the ``Idempotency-Key``.  Permanent refusals (4xx other than 429) are recorded, logged
and counted, never dropped silently.
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import sqlalchemy as sa
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

from gateway.centre_health import API, CentreHealth
from gateway.config import DeliveryPolicy, Settings
from gateway.errors import PermanentUpstreamError, StoreError, TransientUpstreamError
from gateway.store import TS, Store, metadata

log = logging.getLogger(__name__)

outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("incident_id", sa.String(36), nullable=False, unique=True),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # pending | delivered | failed
    sa.Column("created_at", TS, nullable=False),
    sa.Column("next_attempt_at", TS, nullable=False, index=True),
    sa.Column("leased_until", TS),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("delivered_at", TS),
    sa.Column("last_status", sa.Integer),
    sa.Column("last_error", sa.String(300)),
)


class IncidentSink(Protocol):
    def send_incident(self, payload: Mapping[str, Any], *, idempotency_key: str) -> int: ...


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, dt.datetime) else value


def incident_payload(incident: Mapping[str, Any]) -> dict[str, Any]:
    """What the centre receives: who, where, what happened, when."""
    return {
        "incident_id": incident["id"],
        "event_id": incident["event_id"],
        "type": incident["type"],
        "vin": incident["vin"],
        "msisdn": incident["msisdn"],
        "occurred_at": _iso(incident["occurred_at"]),
        "received_at": _iso(incident["received_at"]),
        "location": {
            "lat": incident["lat"],
            "lon": incident["lon"],
            "heading_deg": incident["heading_deg"],
            "accuracy_m": incident["accuracy_m"],
            "trusted": incident["trusted"],
            "country": incident["location_country"],
        },
        "route": {
            "country": incident["route_country"],
            "reason": incident["route_reason"],
            "emergency_number": incident["emergency_number"],
            "fallback_dial": incident["fallback_dial"],
        },
        "home_country": incident["home_country"],
        "crash": incident["crash"],
        "occupants": incident["occupants"],
        # an eCall MSD (EN 15722) exactly as the car sent it, base64; test calls are flagged
        "msd": incident.get("msd"),
        "test_call": bool(incident.get("test_call")),
    }


def outbox_rows(incident: Mapping[str, Any]) -> list[tuple[sa.Table, Mapping[str, Any]]]:
    """The row committed with each new incident."""
    now = incident["received_at"]
    return [(outbox, {
        "incident_id": incident["id"],
        "payload": incident_payload(incident),
        "status": "pending",
        "created_at": now,
        "next_attempt_at": now,
        "attempts": 0,
    })]


class Counters:
    """Delivery outcomes of this worker (plain ints behind a lock); the Prometheus
    counters are in :class:`gateway.metrics.Metrics`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.values: dict[str, int] = {"delivered": 0, "transient_failures": 0,
                                       "permanent_failures": 0, "rescheduled": 0}

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.values[name] += n


def _count(metrics: Any, name: str, *labels: str) -> None:
    counter = getattr(metrics, name, None)
    if counter is not None:
        (counter.labels(*labels) if labels else counter).inc()


class OutboxWorker:
    def __init__(
        self,
        store: Store,
        sink: IncidentSink,
        *,
        policy: DeliveryPolicy,
        health: CentreHealth | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        metrics: Any = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.sink = sink
        self.policy = policy
        self.health = health
        self.clock = clock
        self.sleep = sleep
        self.counters = Counters()
        self.wake = threading.Event()
        self.stopping = threading.Event()

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), tz=dt.UTC)

    # -- claiming ------------------------------------------------------------------------

    def claim(self, limit: int) -> list[dict[str, Any]]:
        """Lease up to ``limit`` due rows; only one worker anywhere gets each."""
        now = self._now()
        lease_until = now + dt.timedelta(seconds=self.policy.lease_s)
        free = sa.or_(outbox.c.leased_until.is_(None), outbox.c.leased_until < now)
        claimed: list[dict[str, Any]] = []
        with self.store.begin() as conn:
            due = conn.execute(
                sa.select(outbox.c.id)
                .where(outbox.c.status == "pending", outbox.c.next_attempt_at <= now, free)
                .order_by(outbox.c.next_attempt_at, outbox.c.id)
                .limit(limit)
            ).scalars().all()
        for row_id in due:
            with self.store.begin() as conn:
                won = conn.execute(
                    outbox.update()
                    .where(outbox.c.id == row_id, outbox.c.status == "pending", free)
                    .values(leased_until=lease_until)
                ).rowcount
                if won == 1:
                    row = conn.execute(sa.select(outbox).where(outbox.c.id == row_id)).one()
                    claimed.append(dict(row._mapping))
        return claimed

    # -- delivering ----------------------------------------------------------------------

    def _attempt_started(self, row_id: int) -> None:
        with self.store.begin() as conn:
            conn.execute(outbox.update().where(outbox.c.id == row_id)
                         .values(attempts=outbox.c.attempts + 1))

    def deliver(self, row: Mapping[str, Any]) -> str:
        """One pass over one row: ``delivered``, ``failed`` or ``rescheduled``."""
        key = str(row["incident_id"])

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning("delivery of %s failed (%s); retrying in %.2fs", key, exc,
                        state.next_action.sleep if state.next_action else 0)

        retrying = Retrying(
            stop=stop_after_delay(self.policy.budget_s),
            wait=wait_exponential_jitter(multiplier=self.policy.backoff_initial_s,
                                         max=self.policy.backoff_max_s,
                                         jitter=self.policy.backoff_initial_s),
            retry=retry_if_exception_type(TransientUpstreamError),
            sleep=self._interruptible_sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    if self.stopping.is_set() and attempt.retry_state.attempt_number > 1:
                        raise _Stopping()
                    self._attempt_started(int(row["id"]))
                    _count(self.metrics, "delivery_attempts")
                    try:
                        status = self.sink.send_incident(row["payload"], idempotency_key=key)
                    except TransientUpstreamError as exc:
                        self.counters.add("transient_failures")
                        _count(self.metrics, "delivery_failures", "transient")
                        self._feed_health(ok=False, reason=f"delivery: {exc}")
                        raise
        except PermanentUpstreamError as exc:
            self.counters.add("permanent_failures")
            _count(self.metrics, "delivery_failures", "permanent")
            _count(self.metrics, "deliveries", "failed")
            log.error("incident %s refused by the centre (HTTP %s): %s; not retried",
                      key, exc.status, exc)
            self._finish(row, status="failed", last_status=exc.status, error=str(exc))
            return "failed"
        except (TransientUpstreamError, _Stopping) as exc:
            self.counters.add("rescheduled")
            _count(self.metrics, "deliveries", "rescheduled")
            self._reschedule(row, error=str(exc) or type(exc).__name__)
            return "rescheduled"
        self.counters.add("delivered")
        _count(self.metrics, "deliveries", "delivered")
        self._feed_health(ok=True, reason=f"delivered {key}")
        self._finish(row, status="delivered", last_status=status, error=None)
        log.info("incident %s delivered (HTTP %s)", key, status)
        return "delivered"

    def _interruptible_sleep(self, seconds: float) -> None:
        self.stopping.wait(seconds)  # a stop cuts the backoff short

    def _feed_health(self, *, ok: bool, reason: str) -> None:
        if self.health is not None:
            self.health.record_safely(API, ok=ok, reason=reason)

    def _finish(self, row: Mapping[str, Any], *, status: str, last_status: int | None,
                error: str | None) -> None:
        now = self._now()
        with self.store.begin() as conn:
            conn.execute(outbox.update().where(outbox.c.id == row["id"]).values(
                status=status, leased_until=None, last_status=last_status,
                last_error=(error or "")[:300] or None,
                delivered_at=now if status == "delivered" else None))

    def _reschedule(self, row: Mapping[str, Any], *, error: str) -> None:
        """Still pending: try again after the capped backoff (never dropped)."""
        now = self._now()
        with self.store.begin() as conn:
            conn.execute(outbox.update().where(outbox.c.id == row["id"]).values(
                leased_until=None, last_error=error[:300],
                next_attempt_at=now + dt.timedelta(seconds=self.policy.backoff_max_s)))

    # -- loop ------------------------------------------------------------------------------

    def run_once(self) -> int:
        """Claim and deliver what is due; returns how many rows were handled."""
        rows = self.claim(self.policy.concurrency * 4)
        if not rows:
            return 0
        with ThreadPoolExecutor(max_workers=self.policy.concurrency,
                                thread_name_prefix="deliver") as pool:
            list(pool.map(self.deliver, rows))
        return len(rows)

    def run(self) -> None:
        log.info("delivery worker started")
        while not self.stopping.is_set():
            try:
                handled = self.run_once()
            except StoreError as exc:
                log.error("delivery worker: database unavailable (%s)", exc)
                handled = 0
            except Exception:
                log.exception("delivery worker pass failed")
                handled = 0
            if not handled:
                self.wake.wait(self.policy.poll_s)
                self.wake.clear()
        log.info("delivery worker stopped")

    def start_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="outbox-worker", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def pending(self) -> int:
        with self.store.begin() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(outbox)
                                    .where(outbox.c.status == "pending")).scalar_one())


class _Stopping(Exception):
    """The worker is shutting down between attempts: reschedule, do not retry now."""


def build_worker(settings: Settings, store: Store, health: CentreHealth | None,
                 clock: Callable[[], float] = time.time, *,
                 metrics: Any = None) -> OutboxWorker | None:
    """The worker for these settings, or None without GATEWAY_ASSISTANCE_URL."""
    if not settings.assistance_url:
        return None
    from gateway.adapters.assistance import AssistanceCentreClient

    client = AssistanceCentreClient(settings.assistance_url, timeout_s=settings.delivery.timeout_s)
    return OutboxWorker(store, client, policy=settings.delivery, health=health, clock=clock,
                        metrics=metrics)


def run_worker_process(settings: Settings, *, metrics_port: int | None = None,
                       metrics_host: str = "127.0.0.1") -> int:
    """``python -m gateway worker``: deliver until SIGTERM/SIGINT; with ``metrics_port``
    its Prometheus metrics are served on ``metrics_host:metrics_port``."""
    from gateway.app import build_health, load_plan_or_none
    from gateway.metrics import Metrics

    store = Store.from_url(settings.database_url)
    store.create_schema()
    plan = load_plan_or_none(settings, {})
    health = build_health(settings, store, plan)
    metrics = Metrics()
    metrics.watch_database(store, health=health)
    worker = build_worker(settings, store, health, metrics=metrics)
    if worker is None:
        log.error("GATEWAY_ASSISTANCE_URL is not set: nothing to deliver to")
        return 2
    if metrics_port is not None:
        try:
            metrics.serve(metrics_port, metrics_host)
        except OSError as exc:
            log.error("worker metrics: cannot listen on %s:%s (%s)", metrics_host,
                      metrics_port, exc)
            return 2
        log.info("worker metrics on http://%s:%s/metrics", metrics_host, metrics_port)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    signal.signal(signal.SIGINT, lambda *_: worker.stop())
    worker.run()
    return 0
