"""Prometheus metrics: counts and states, never caller data.

Two kinds:

- **Counted where they happen** (events, webhook answers and their latency, route
  decisions, fallbacks, hand-backs, deliveries, PIN checks, step writes): counters and
  histograms of this :class:`Metrics`.  Each app gets its own registry, so tests and
  several apps in one process never share one.  With ``PROMETHEUS_MULTIPROC_DIR`` set
  (by the start-up script, before the process starts, to an empty directory shared by
  every worker process of one host) prometheus_client keeps the values in files there and
  a scrape of any process reports the sum over all of them (its *multiprocess mode*).
- **Read from the database at scrape time** (:class:`DatabaseCollector`: outbox pending
  and its oldest row's age, each breaker's state), so any instance, with or without a
  delivery worker, reports the same numbers.  One read with a 0.5 s deadline: a hung
  database never hangs ``/metrics``; the values are then NaN, the breaker states are
  left out and ``gateway_database_up`` is 0.

The ``python -m gateway worker`` process serves the same exposition on its own port
(:meth:`Metrics.serve`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import sqlalchemy as sa
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy.engine import Connection

from gateway.errors import StoreError
from gateway.store import Store, as_utc

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: the database read of one scrape waits at most this long
SCRAPE_DB_TIMEOUT_S = 0.5
#: webhook latency buckets: Twilio waits 15 s in all; a voice answer should take ms
WEBHOOK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0)

EVENT_TYPES = ("crash", "sos", "on_call", "alarm_triggered", "alarm_disarmed")
EVENT_OUTCOMES = ("created", "replayed", "invalid", "conflict", "unavailable")


def multiprocess_dir() -> str | None:
    """The multiprocess directory, when prometheus_client runs in that mode."""
    return os.environ.get(MULTIPROC_ENV) or None


def decision_reason(step_name: str) -> str:
    """The reason class of a routing decision: what made the gateway decide (bounded,
    unlike the decision's free-text reason stored with the incident)."""
    trigger = step_name.split(":", 1)[0]
    return {
        "voice": "new_call",
        "dial-result": "centre_leg_ended",
        "roadside-result": "roadside_leg_ended",
        "emergency-result": "emergency_leg_ended",
        "fallback": "twilio_fallback",
        "failsafe": "handler_error",
    }.get(trigger, "other")


class Metrics:
    def __init__(self) -> None:
        # no ``*_created`` series: counts only (a process-wide setting)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        self._scrape: CollectorRegistry | None = None
        self._database: DatabaseCollector | None = None
        r = self.registry
        self.events = Counter(
            "gateway_events", "Vehicle events by type and outcome", ["type", "outcome"],
            registry=r)
        self.webhooks = Counter(
            "gateway_webhook_answers", "Twilio webhook answers by route and outcome",
            ["route", "outcome"], registry=r)
        self.webhook_seconds = Histogram(
            "gateway_webhook_duration_seconds", "Time to answer a Twilio webhook, by route",
            ["route"], buckets=WEBHOOK_BUCKETS, registry=r)
        self.routes = Counter(
            "gateway_route_decisions", "Call routing decisions by target and reason class",
            ["target", "reason"], registry=r)
        self.fallbacks = Counter(
            "gateway_fallbacks", "Caller-leg answers not from the normal path, by reason",
            ["reason"], registry=r)
        self.hand_backs = Counter(
            "gateway_hand_backs", "Calls handed back to the car (it dials itself), by reason",
            ["reason"], registry=r)
        self.pin_attempts = Counter(
            "gateway_pin_attempts", "PIN checks by outcome (never the digits)", ["outcome"],
            registry=r)
        # delivery to the assistance centre (gateway.delivery.OutboxWorker)
        self.delivery_attempts = Counter(
            "gateway_delivery_attempts", "HTTP attempts to deliver an incident", registry=r)
        self.delivery_failures = Counter(
            "gateway_delivery_failures", "Failed delivery attempts (transient: retried; "
            "permanent: refused, not retried)", ["kind"], registry=r)
        self.deliveries = Counter(
            "gateway_deliveries", "Outbox rows handled by a delivery pass, by outcome",
            ["outcome"], registry=r)
        # voice steps, written after the answer by gateway.steps.StepWriter
        self.steps_written = Counter(
            "gateway_steps_written", "Voice steps written to the database", registry=r)
        self.steps_replayed = Counter(
            "gateway_steps_replayed", "Voice step records that were already stored",
            registry=r)
        self.steps_dropped = Counter(
            "gateway_steps_dropped", "Voice step records lost (queue full, or a write "
            "that can never succeed)", ["reason"], registry=r)
        self.step_write_retries = Counter(
            "gateway_step_write_retries", "Voice step writes retried after a database error",
            registry=r)
        # vehicle commands (gateway.commands.CommandQueue), counted once committed
        self.vehicle_commands = Counter(
            "gateway_vehicle_commands_settled", "Vehicle commands settled, by command, "
            "outcome (confirmed, failed, cancelled) and how (send: the service's answer; "
            "report: the car's result; cancel; expired_unsent; expired_unconfirmed: the car "
            "did not report within GATEWAY_COMMAND_CONFIRM_S)",
            ["command", "outcome", "how"], registry=r)
        self.step_queue_depth = Gauge(
            "gateway_step_queue_depth", "Voice step records waiting to be written (summed "
            "over live processes)", multiprocess_mode="livesum", registry=r)

    # -- counting (never raises: a count never stands in the way of an answer) ---------

    def event(self, event_type: object, outcome: str) -> None:
        """One vehicle event answered: ``outcome`` is one of :data:`EVENT_OUTCOMES`."""
        with _never_raise("event"):
            kind = event_type if isinstance(event_type, str) and event_type in EVENT_TYPES \
                else "unknown"
            self.events.labels(kind, outcome).inc()

    def voice_step(self, target: str, step_name: str, *, hand_back: str | None = None) -> None:
        """A call-plan step rendered: its route decision, the Twilio Fallback URL if that
        is what asked, and the hand-back's reason."""
        with _never_raise("voice step"):
            self.routes.labels(target, decision_reason(step_name)).inc()
            if step_name.startswith("fallback:"):
                self.fallbacks.labels("twilio_fallback_url").inc()
            if hand_back is not None:
                self.hand_backs.labels(hand_back).inc()

    def fallback(self, reason: str) -> None:
        with _never_raise("fallback"):
            self.fallbacks.labels(reason).inc()

    def webhook(self, route: str, outcome: str, seconds: float | None) -> None:
        with _never_raise("webhook"):
            self.webhooks.labels(route, outcome).inc()
            if seconds is not None:
                self.webhook_seconds.labels(route).observe(seconds)

    # -- exposing ------------------------------------------------------------------------

    def watch_database(self, store: Store, *, health: Any = None,
                       clock: Callable[[], float] = time.time) -> None:
        """Report the outbox and the breakers, read from ``store`` at each scrape."""
        self._database = DatabaseCollector(store, health=health, clock=clock)
        if multiprocess_dir() is None:
            self.registry.register(self._database)

    def scrape_registry(self) -> CollectorRegistry:
        """What a scrape exposes: this registry; in multiprocess mode, every process's
        values from the shared directory, plus this process's database read."""
        path = multiprocess_dir()
        if path is None:
            return self.registry
        if self._scrape is None:
            scrape = CollectorRegistry()
            MultiProcessCollector(scrape, path=path)  # type: ignore[no-untyped-call]
            if self._database is not None:
                scrape.register(self._database)
            self._scrape = scrape
        return self._scrape

    def render(self) -> bytes:
        return bytes(generate_latest(self.scrape_registry()))

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Serve the exposition on ``host:port`` from a daemon thread (the worker
        process); raises OSError when the port cannot be bound."""
        start_http_server(port, addr=host, registry=self.scrape_registry())


@contextlib.contextmanager
def _never_raise(what: str) -> Iterator[None]:
    try:
        yield
    except Exception:
        log.exception("metrics: %s not counted", what)


class DatabaseCollector(Collector):
    """Outbox and breaker state, read from the database when scraped, with a deadline."""

    def __init__(self, store: Store, *, health: Any = None,
                 clock: Callable[[], float] = time.time,
                 timeout_s: float = SCRAPE_DB_TIMEOUT_S) -> None:
        self.store = store
        self.health = health
        self.clock = clock
        self.timeout_s = timeout_s

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def _families(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "gateway_database_up", "1 if the database answered this scrape's read in time")
        yield GaugeMetricFamily(
            "gateway_outbox_pending", "Incidents not yet delivered to the centre (NaN: the "
            "database did not answer)")
        yield GaugeMetricFamily(
            "gateway_outbox_oldest_age_seconds", "Age of the oldest undelivered incident "
            "(0: none; NaN: the database did not answer)")
        yield GaugeMetricFamily(
            "gateway_centre_open", "1 if the centre line (or the 'api' key) is known "
            "unreachable (breaker open or half-open)", labels=["centre"])
        yield GaugeMetricFamily(
            "gateway_centre_state", "Breaker state of each centre line and of the 'api' "
            "key: 1 for the current state", labels=["centre", "state"])

    def collect(self) -> Iterable[Metric]:
        up, pending, oldest, open_, state = self._families()
        try:
            count, oldest_at, states = self.store.within(self._read, timeout_s=self.timeout_s)
        except Exception as exc:  # a scrape answers whatever went wrong
            if isinstance(exc, StoreError):
                log.warning("metrics: database not read (%s)", exc)
            else:
                log.exception("metrics: database read failed")
            up.add_metric([], 0.0)
            pending.add_metric([], math.nan)
            oldest.add_metric([], math.nan)
            return [up, pending, oldest, open_, state]
        up.add_metric([], 1.0)
        pending.add_metric([], float(count))
        oldest_utc = as_utc(oldest_at)
        oldest.add_metric([], max(0.0, self.clock() - oldest_utc.timestamp())
                          if oldest_utc is not None else 0.0)
        known = set(getattr(self.health, "centre_ids", ()) or ())
        if self.health is not None:
            known.add("api")
        for key in sorted(known | set(states)):
            current = states.get(key, "closed")
            open_.add_metric([key], 0.0 if current == "closed" else 1.0)
            for name in ("closed", "open", "half_open"):
                state.add_metric([key, name], 1.0 if current == name else 0.0)
        return [up, pending, oldest, open_, state]

    @staticmethod
    def _read(conn: Connection) -> tuple[int, Any, dict[str, str]]:
        from gateway.centre_health import centre_health
        from gateway.delivery import outbox

        count, oldest_at = conn.execute(
            sa.select(sa.func.count(), sa.func.min(outbox.c.created_at))
            .where(outbox.c.status == "pending")).one()
        states = {str(k): str(s) for k, s in conn.execute(
            sa.select(centre_health.c.key, centre_health.c.state))}
        return int(count or 0), oldest_at, states
