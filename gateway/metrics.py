"""Prometheus metrics, one registry per app (so tests and instances never share one)."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from gateway.errors import StoreError

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.webhooks = Counter(
            "gateway_webhook_answers", "Voice webhook answers by step and outcome",
            ["step", "outcome"], registry=self.registry)
        self.events = Counter(
            "gateway_events", "Vehicle events by type and result", ["type", "result"],
            registry=self.registry)
        self.routes = Counter(
            "gateway_route_decisions", "Routing decisions by target", ["target"],
            registry=self.registry)
        self.fail_safe = Counter(
            "gateway_fail_safe_answers", "Webhooks answered by the fail-safe path",
            registry=self.registry)
        self.pin_attempts = Counter(
            "gateway_pin_attempts", "PIN checks by outcome (never the digits)", ["outcome"],
            registry=self.registry)
        self.delivery = Gauge(
            "gateway_delivery_total", "Outbox delivery outcomes since start", ["outcome"],
            registry=self.registry)
        self.outbox_pending = Gauge(
            "gateway_outbox_pending", "Incidents not yet delivered to the centre",
            registry=self.registry)
        self.centre_state = Gauge(
            "gateway_centre_open", "1 if the centre (or its API) is known unreachable",
            ["centre"], registry=self.registry)
        # voice steps, written after the answer by gateway.steps.StepWriter
        self.steps_written = Counter(
            "gateway_steps_written", "Voice steps written to the database",
            registry=self.registry)
        self.steps_replayed = Counter(
            "gateway_steps_replayed", "Voice step records that were already stored",
            registry=self.registry)
        self.steps_dropped = Counter(
            "gateway_steps_dropped", "Voice step records lost (queue full, or a write "
            "that can never succeed)", ["reason"], registry=self.registry)
        self.step_write_retries = Counter(
            "gateway_step_write_retries", "Voice step writes retried after a database error",
            registry=self.registry)
        self.step_queue_depth = Gauge(
            "gateway_step_queue_depth", "Voice step records waiting to be written",
            registry=self.registry)

    def render(self, *, worker: Any, health: Any) -> bytes:
        if worker is not None:
            for name, value in worker.counters.values.items():
                self.delivery.labels(name).set(value)
            try:
                self.outbox_pending.set(worker.pending())
            except StoreError:
                self.outbox_pending.set(float("nan"))
        if health is not None:
            try:
                for key, state in health.states().items():
                    self.centre_state.labels(key).set(1.0 if state != "closed" else 0.0)
            except StoreError:
                log.warning("centre health unavailable for metrics")
        return bytes(generate_latest(self.registry))
