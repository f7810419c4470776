"""Getting every incident to the assistance centre: a transactional outbox and its worker.

The outbox row is written in the same transaction as the incident, before the car gets
its 2xx; so an accepted incident is never lost.  A worker (a thread inside each serving
process, or ``python -m gateway worker``) claims due rows with a lease, delivers each with
tenacity (exponential backoff with jitter, capped; a per-attempt timeout; a bounded budget
per pass), and marks it delivered.  A worker killed at any moment leaves the row leased;
the lease expires and another pass delivers it again: at least once on the wire, once at
the centre thanks to the ``Idempotency-Key``.  Permanent refusals (4xx other than 429) are
recorded, logged and counted, never dropped silently.

The lease, across processes and instances sharing the database:

- **claim**: on PostgreSQL one statement, ``WITH due AS (SELECT ... FOR UPDATE SKIP
  LOCKED) UPDATE ... RETURNING``: concurrent claimers skip each other's rows instead of
  queueing on them; on SQLite (one writer at a time anyway) a conditional UPDATE per row;
- **token**: the lease's end, ``leased_until``, as the claim wrote it.  A row is claimed
  again only once that time has passed, so each claim of a row writes a later value than
  the one before: the value identifies the claim (no extra column).  Every later UPDATE
  of the pass (an attempt counted; delivered, failed, rescheduled) requires it, so a
  worker that lost its lease changes nothing, and stops sending at its next attempt;
- **budget**: tenacity's ``stop_before_delay``: no attempt starts once the wait before it
  would spend the budget, so a pass ends within ``budget_s`` plus one attempt's timeout,
  inside its lease (``budget_s + timeout_s + 5``).

With ``GATEWAY_GEOCODER_URL`` the worker looks up the incident's address before it
delivers (:mod:`gateway.adapters.geocoder`: bounded by a timeout, cached, never raises),
writes it into the outbox row's payload (where the agent API reads it,
:func:`address_of`) and delivers it as ``address``; without an answer the incident is
delivered without one.  The incident is stored long before: a call never waits for this.
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import sqlalchemy as sa
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_before_delay,
    wait_exponential_jitter,
)

from gateway.centre_health import API, CentreHealth, build_health
from gateway.config import DeliveryPolicy, Settings
from gateway.errors import PermanentUpstreamError, StoreError, TransientUpstreamError
from gateway.store import TS, Store, as_utc, metadata
from gateway.watchdog import background_thread, pool_like_this_thread

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
                                       "permanent_failures": 0, "rescheduled": 0,
                                       "lease_lost": 0}

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
        sleep: Callable[[float], None] | None = None,
        metrics: Any = None,
        geocoder: Any = None,
    ) -> None:
        self.store = store
        #: :class:`gateway.adapters.geocoder.ReverseGeocoder` (``lookup(lat, lon)``), or None
        self.geocoder = geocoder
        self.metrics = metrics
        self.sink = sink
        self.policy = policy
        self.health = health
        self.clock = clock
        #: the backoff between attempts (default: a wait that a stop cuts short)
        self.sleep = sleep or self._interruptible_sleep
        self.counters = Counters()
        self.wake = threading.Event()
        self.stopping = threading.Event()

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), tz=dt.UTC)

    # -- claiming ------------------------------------------------------------------------

    def claim(self, limit: int) -> list[dict[str, Any]]:
        """Lease up to ``limit`` due rows; only one worker anywhere gets each.  Each row
        comes back with its lease token (``leased_until`` as written by this claim)."""
        now = self._now()
        lease_until = now + dt.timedelta(seconds=self.policy.lease_s)
        params = {"now": now, "lease_until": lease_until, "limit": limit}
        if self.store.engine.dialect.name == "postgresql":
            with self.store.begin() as conn:
                rows = conn.execute(_CLAIM_SKIP_LOCKED, params).all()
            claimed = [dict(row._mapping) for row in rows]
        else:
            claimed = []
            with self.store.begin() as conn:
                due = conn.execute(_DUE, params).scalars().all()
            for row_id in due:
                with self.store.begin() as conn:
                    won = conn.execute(_CLAIM_ONE, {**params, "row_id": row_id}).rowcount
                    if won == 1:
                        claimed.append(dict(conn.execute(
                            sa.select(outbox).where(outbox.c.id == row_id)).one()._mapping))
        for row in claimed:
            row["leased_until"] = lease_until  # the token, exactly as this claim wrote it
        claimed.sort(key=lambda r: (as_utc(r["next_attempt_at"]), r["id"]))
        return claimed

    # -- delivering ----------------------------------------------------------------------

    def _attempt_started(self, row: Mapping[str, Any]) -> None:
        """Count the attempt, under the lease; _LeaseLost if another worker has the row."""
        with self.store.begin() as conn:
            counted = conn.execute(outbox.update().where(*_held(row))
                                   .values(attempts=outbox.c.attempts + 1)).rowcount
        if counted != 1:
            raise _LeaseLost()

    def with_address(self, row: Mapping[str, Any]) -> Mapping[str, Any]:
        """The row's payload, with the address of its location when the geocoder knows it
        (stored in the row, so a retry and the agent API see it).  Never raises."""
        payload: Mapping[str, Any] = row["payload"]
        location = payload.get("location") if isinstance(payload, Mapping) else None
        if (self.geocoder is None or not isinstance(location, Mapping)
                or payload.get("address") is not None):
            return payload
        lat, lon = location.get("lat"), location.get("lon")
        if not isinstance(lat, int | float) or not isinstance(lon, int | float):
            return payload
        try:
            address = self.geocoder.lookup(lat, lon)
        except Exception:  # the geocoder never raises; a bug there must not stop delivery
            log.exception("address lookup failed")
            return payload
        if address is None:
            return payload
        payload = {**payload, "address": address}
        try:
            with self.store.begin() as conn:
                conn.execute(outbox.update().where(outbox.c.id == row["id"])
                             .values(payload=payload))
        except StoreError as exc:
            log.warning("address of %s not stored (%s); delivered with it", row["incident_id"],
                        exc)
        return payload

    def deliver(self, row: Mapping[str, Any]) -> str:
        """One pass over one row: ``delivered``, ``failed`` or ``rescheduled``."""
        key = str(row["incident_id"])
        payload = self.with_address(row)

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning("delivery of %s failed (%s); retrying in %.2fs", key, exc,
                        state.next_action.sleep if state.next_action else 0)

        retrying = Retrying(
            # no attempt starts once its wait would spend the budget: the pass ends within
            # budget_s + one attempt's timeout, inside the lease
            stop=stop_before_delay(self.policy.budget_s),
            wait=wait_exponential_jitter(multiplier=self.policy.backoff_initial_s,
                                         max=self.policy.backoff_max_s,
                                         jitter=self.policy.backoff_initial_s),
            retry=retry_if_exception_type(TransientUpstreamError),
            sleep=self.sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    if self.stopping.is_set() and attempt.retry_state.attempt_number > 1:
                        raise _Stopping()
                    self._attempt_started(row)
                    _count(self.metrics, "delivery_attempts")
                    try:
                        status = self.sink.send_incident(payload, idempotency_key=key)
                    except TransientUpstreamError as exc:
                        self.counters.add("transient_failures")
                        _count(self.metrics, "delivery_failures", "transient")
                        self._feed_health(ok=False, reason=f"delivery: {exc}")
                        raise
        except _LeaseLost:
            return self._lost(row, "before an attempt")
        except PermanentUpstreamError as exc:
            self.counters.add("permanent_failures")
            _count(self.metrics, "delivery_failures", "permanent")
            _count(self.metrics, "deliveries", "failed")
            log.error("incident %s refused by the centre (HTTP %s): %s; not retried",
                      key, exc.status, exc)
            if not self._finish(row, status="failed", last_status=exc.status, error=str(exc)):
                return self._lost(row, "before its refusal was recorded")
            return "failed"
        except (TransientUpstreamError, _Stopping) as exc:
            self.counters.add("rescheduled")
            _count(self.metrics, "deliveries", "rescheduled")
            if not self._reschedule(row, error=str(exc) or type(exc).__name__):
                return self._lost(row, "before it was rescheduled")
            return "rescheduled"
        self.counters.add("delivered")
        _count(self.metrics, "deliveries", "delivered")
        self._feed_health(ok=True, reason=f"delivered {key}")
        if not self._finish(row, status="delivered", last_status=status, error=None):
            return self._lost(row, "before it was marked delivered")
        log.info("incident %s delivered (HTTP %s)", key, status)
        return "delivered"

    def _lost(self, row: Mapping[str, Any], when: str) -> str:
        """Another worker holds the row now (this lease ran out): nothing was changed."""
        self.counters.add("lease_lost")
        log.warning("delivery of %s: lease lost %s; the row is another worker's",
                    row["incident_id"], when)
        return "lost"

    def _interruptible_sleep(self, seconds: float) -> None:
        self.stopping.wait(seconds)  # a stop cuts the backoff short

    def _feed_health(self, *, ok: bool, reason: str) -> None:
        if self.health is not None:
            self.health.record_safely(API, ok=ok, reason=reason)

    def _finish(self, row: Mapping[str, Any], *, status: str, last_status: int | None,
                error: str | None) -> bool:
        """Record the outcome under this pass's lease; False (nothing changed) if lost."""
        now = self._now()
        with self.store.begin() as conn:
            return bool(conn.execute(outbox.update().where(*_held(row)).values(
                status=status, leased_until=None, last_status=last_status,
                last_error=(error or "")[:300] or None,
                delivered_at=now if status == "delivered" else None)).rowcount == 1)

    def _reschedule(self, row: Mapping[str, Any], *, error: str) -> bool:
        """Still pending: try again after the capped backoff (never dropped); False
        (nothing changed) if the lease was lost."""
        now = self._now()
        with self.store.begin() as conn:
            return bool(conn.execute(outbox.update().where(*_held(row)).values(
                leased_until=None, last_error=error[:300],
                next_attempt_at=now + dt.timedelta(seconds=self.policy.backoff_max_s)
            )).rowcount == 1)

    # -- loop ------------------------------------------------------------------------------

    def run_once(self) -> int:
        """Claim and deliver what is due; returns how many rows were handled."""
        rows = self.claim(self.policy.concurrency * 4)
        if not rows:
            return 0
        with pool_like_this_thread(self.policy.concurrency,
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
        thread = threading.Thread(target=background_thread(self.run),
                                  name="outbox-worker", daemon=True)
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


class _LeaseLost(Exception):
    """Another worker claimed the row after this pass's lease ran out: stop, change nothing."""


def _held(row: Mapping[str, Any]) -> tuple[sa.ColumnElement[bool], ...]:
    """The row, still pending and still under the lease this pass claimed it with."""
    return (outbox.c.id == row["id"], outbox.c.status == "pending",
            outbox.c.leased_until == row["leased_until"])


# -- the claim's statements, built once (bound parameters: now, lease_until, limit, row_id) ------

_NOW = sa.bindparam("now", type_=TS)
_FREE = sa.or_(outbox.c.leased_until.is_(None), outbox.c.leased_until < _NOW)
_DUE_WHERE = (outbox.c.status == "pending", outbox.c.next_attempt_at <= _NOW, _FREE)

#: SQLite: the due rows' ids, then one conditional UPDATE per row (the first wins it)
_DUE = (sa.select(outbox.c.id).where(*_DUE_WHERE)
        .order_by(outbox.c.next_attempt_at, outbox.c.id)
        .limit(sa.bindparam("limit", type_=sa.Integer)))
_CLAIM_ONE = (outbox.update().where(outbox.c.id == sa.bindparam("row_id", type_=sa.Integer),
                                    outbox.c.status == "pending", _FREE)
              .values(leased_until=sa.bindparam("lease_until", type_=TS)))

#: PostgreSQL: one round trip; rows another claimer has locked are skipped, not waited for
_DUE_LOCKED = _DUE.with_for_update(skip_locked=True).cte("due")
_CLAIM_SKIP_LOCKED = (outbox.update().where(outbox.c.id == _DUE_LOCKED.c.id)
                      .values(leased_until=sa.bindparam("lease_until", type_=TS))
                      .returning(*outbox.c))


def build_worker(settings: Settings, store: Store, health: CentreHealth | None,
                 clock: Callable[[], float] = time.time, *,
                 metrics: Any = None) -> OutboxWorker | None:
    """The worker for these settings, or None without GATEWAY_ASSISTANCE_URL."""
    if not settings.assistance_url:
        return None
    from gateway.adapters.assistance import AssistanceCentreClient

    client = AssistanceCentreClient(settings.assistance_url, timeout_s=settings.delivery.timeout_s)
    geocoder = None
    if settings.geocoder_url:
        from gateway.adapters.geocoder import geocoder_for

        geocoder = geocoder_for(settings.geocoder_url, settings.geocoder)
    return OutboxWorker(store, client, policy=settings.delivery, health=health, clock=clock,
                        metrics=metrics, geocoder=geocoder)


def address_of(store: Store, incident_id: str) -> dict[str, Any] | None:
    """The address the worker found for an incident (None: not looked up, or unknown)."""
    with store.begin() as conn:
        payload = conn.execute(sa.select(outbox.c.payload)
                               .where(outbox.c.incident_id == incident_id)).scalar()
    address = payload.get("address") if isinstance(payload, Mapping) else None
    return dict(address) if isinstance(address, Mapping) else None


def run_worker_process(settings: Settings, *, metrics_port: int | None = None,
                       metrics_host: str = "127.0.0.1") -> int:
    """``python -m gateway worker``: deliver until SIGTERM/SIGINT; with ``metrics_port``
    its Prometheus metrics are served on ``metrics_host:metrics_port``."""
    from gateway.metrics import Metrics
    from gateway.plan import load_plan_or_none

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
