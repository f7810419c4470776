"""The composition root: settings, adapters and views wired in one place."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from gateway.config import Settings
from gateway.errors import GatewayError
from gateway.plan import NumberPlan, load_plan
from gateway.routing import Locator
from gateway.store import Store

log = logging.getLogger(__name__)

_UNSET: Any = object()


@dataclass
class Services:
    """What the views may use; built once per app."""

    settings: Settings
    store: Store
    plan: NumberPlan | None
    locator: Locator | None
    clock: Callable[[], float] = time.time
    #: per-centre reachability (circuit breaker); None until delivery is wired
    centre_health: Any = None
    #: rows committed with every new incident (the delivery outbox); None = none
    outbox_rows: Any = None
    #: called after a new incident is committed (wakes the delivery worker)
    on_incident: Callable[[dict[str, Any]], None] | None = None
    worker: Any = None
    metrics: Any = None
    #: what failed to load at start-up (the app still serves the emergency path)
    problems: dict[str, str] = field(default_factory=dict)


def load_locator_or_none(settings: Settings, problems: dict[str, str]) -> Locator | None:
    try:
        from gateway.geo import load_locator

        return load_locator(settings.boundaries_path)
    except Exception as exc:  # noqa: BLE001 - reported by /readyz, emergency path goes on
        log.exception("boundary data failed to load")
        problems["boundaries"] = f"{type(exc).__name__}: {exc}"
        return None


def load_plan_or_none(settings: Settings, problems: dict[str, str]) -> NumberPlan | None:
    try:
        return load_plan(settings.number_plan_dir)
    except Exception as exc:  # noqa: BLE001
        log.exception("number plan failed to load")
        problems["number_plan"] = f"{type(exc).__name__}: {exc}"
        return None


def build_health(settings: Settings, store: Store, plan: NumberPlan | None,
                 clock: Callable[[], float] = time.time) -> Any:
    from gateway.centre_health import CentreHealth

    try:
        centre_ids = [c.centre_id for c in plan.centres] if plan is not None else []
    except Exception:  # noqa: BLE001 - a broken plan must not stop the app
        log.exception("could not list the plan's centres")
        centre_ids = []
    return CentreHealth(
        store,
        centre_ids=centre_ids,
        failure_threshold=settings.delivery.breaker_failures,
        open_for_s=settings.delivery.breaker_open_s,
        clock=clock,
    )


def create_app(
    settings: Settings | None = None,
    *,
    store: Store | None = None,
    plan: NumberPlan | None = _UNSET,
    locator: Locator | None = _UNSET,
    clock: Callable[[], float] | None = None,
    start_worker: bool = False,
) -> Flask:
    """Build the app.  Anything not passed in is built from ``settings``."""
    settings = settings or Settings.from_env()
    problems: dict[str, str] = {}
    if store is None:
        store = Store.from_url(settings.database_url)
        try:
            store.create_schema()
        except GatewayError as exc:
            log.error("database unavailable at start-up: %s", exc)
            problems["database"] = str(exc)
    if plan is _UNSET:
        plan = load_plan_or_none(settings, problems)
    if locator is _UNSET:
        locator = load_locator_or_none(settings, problems)

    from gateway import delivery
    from gateway.metrics import Metrics

    clock = clock or time.time
    health = build_health(settings, store, plan, clock)
    worker = delivery.build_worker(settings, store, health, clock) if start_worker else None

    app = Flask("gateway")
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024
    app.extensions["gateway"] = Services(
        settings=settings,
        store=store,
        plan=plan,
        locator=locator,
        clock=clock,
        problems=problems,
        centre_health=health,
        outbox_rows=delivery.outbox_rows,
        on_incident=(lambda _incident: worker.wake.set()) if worker else None,
        worker=worker,
        metrics=Metrics(),
    )
    if worker is not None:
        worker.start_thread()

    from gateway.views import ops, vehicle, voice

    app.register_blueprint(ops.bp)
    app.register_blueprint(vehicle.bp)
    app.register_blueprint(voice.bp)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        response = jsonify(error=(exc.name or "error").lower().replace(" ", "_"),
                           detail=exc.description)
        response.status_code = exc.code or 500
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        # Voice views answer their own errors with TwiML; this is for the JSON APIs.
        log.exception("unhandled error")
        response = jsonify(error="internal_error", detail="the request failed; retry with the same idempotency key")
        response.status_code = 500
        return response

    return app


def services() -> Services:
    from flask import current_app

    svc: Services = current_app.extensions["gateway"]
    return svc
