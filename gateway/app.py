"""The composition root: settings, adapters and views wired in one place."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from gateway.config import Settings
from gateway.errors import GatewayError
from gateway.plan import NumberPlan, load_plan_or_none
from gateway.routing import Locator
from gateway.services import Services
from gateway.startup import loaded
from gateway.store import Store

log = logging.getLogger(__name__)

_UNSET: Any = object()


def build_adapters(settings: Settings) -> dict[str, Any]:
    """Clients for the outside services that are configured (None for the others)."""
    from gateway.adapters.assistance import AssistanceCentreClient
    from gateway.adapters.messaging import PushClient, TwilioSms
    from gateway.adapters.vehicle_commands import VehicleCommandClient

    return {
        "commands": VehicleCommandClient(settings.vehicle_command_url, timeout_s=2.5)
        if settings.vehicle_command_url else None,
        "sms": TwilioSms(settings.twilio_account_sid, settings.twilio_auth_token,
                         from_number=settings.sms_from, api_url=settings.twilio_api_url)
        if settings.twilio_account_sid and settings.sms_from else None,
        "push": PushClient(settings.push_url, timeout_s=5.0) if settings.push_url else None,
        "centre": AssistanceCentreClient(settings.assistance_url,
                                         timeout_s=settings.delivery.timeout_s)
        if settings.assistance_url else None,
    }


def _load_locator(settings: Settings) -> Locator:
    from gateway.geo import load_locator  # inside the load: a broken install is recorded

    return load_locator(settings.boundaries_path)


def create_app(
    settings: Settings | None = None,
    *,
    store: Store | None = None,
    plan: NumberPlan | None = _UNSET,
    locator: Locator | None = _UNSET,
    clock: Callable[[], float] | None = None,
    start_worker: bool = False,
    commands: Any = _UNSET,
    sms: Any = _UNSET,
    push: Any = _UNSET,
) -> Flask:
    """Build the app.  Anything not passed in is built from ``settings``."""
    settings = settings or Settings.from_env()
    problems: dict[str, str] = {}
    if store is None:
        store = Store.from_url(settings.database_url)
        try:  # the migrations, under a database lock: instances may start together
            store.create_schema()
        except GatewayError as exc:  # the emergency path still serves; /readyz says why
            log.error("database schema not brought up to date at start-up: %s", exc)
            problems["database"] = str(exc)
        else:
            store.warm_voice_reads()
    if plan is _UNSET:
        plan = load_plan_or_none(settings, problems)
    if locator is _UNSET:
        locator = loaded(problems, "boundaries", "boundary data",
                         lambda: _load_locator(settings))

    from gateway import delivery
    from gateway.centre_health import build_health
    from gateway.metrics import Metrics

    clock = clock or time.time
    health = build_health(settings, store, plan, clock)
    metrics = Metrics()
    metrics.watch_database(store, health=health, clock=clock)
    worker = (delivery.build_worker(settings, store, health, clock, metrics=metrics)
              if start_worker else None)

    from gateway.entitlement import MarketRule
    from gateway.notify import NotificationWorker
    from gateway.owners import PinHasher, Vehicles

    adapters = build_adapters(settings)
    commands = adapters["commands"] if commands is _UNSET else commands
    sms = adapters["sms"] if sms is _UNSET else sms
    push = adapters["push"] if push is _UNSET else push
    # escalations reach the centre through the delivery outbox: wake its worker
    notifier = NotificationWorker(store, sms=sms, push=push, clock=clock,
                                  poll_s=settings.delivery.poll_s,
                                  backoff_initial_s=settings.notify_retry_s,
                                  backoff_max_s=max(60.0, settings.notify_retry_s),
                                  on_escalation=(lambda _key: worker.wake.set()) if worker else None)
    from gateway.commands import CommandQueue
    from gateway.owners.car_commands import CarCommands, apply_settled

    command_queue = CommandQueue(store, commands, clock=clock, poll_s=settings.delivery.poll_s,
                                 confirm_s=settings.command_confirm_s, on_settled=apply_settled,
                                 metrics=metrics)
    registry = Vehicles(store, PinHasher(n=settings.pin_scrypt_n), clock=clock)

    from gateway.line_health import LineHealthCache
    from gateway.steps import StepWriter

    steps = StepWriter(store, health=health, metrics=metrics)  # its thread starts on first use

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
        metrics=metrics,
        vehicles=registry,
        commands=commands,
        notifier=notifier,
        command_queue=command_queue,
        car_commands=CarCommands(command_queue, registry),
        market_rule=MarketRule(settings.roadside_free_markets),
        steps=steps,
        line_health=LineHealthCache(health),
    )
    if worker is not None:
        worker.start_thread()
    if start_worker:
        notifier.start_thread()
        command_queue.start_thread()

    from gateway.views import admin, agent, ivr, openapi, ops, vehicle, voice

    for module in (ops, vehicle, voice, ivr, agent, admin, openapi):
        app.register_blueprint(module.bp)
    _request_hooks(app, metrics)

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


#: blueprints whose routes are Twilio webhooks (answers and latency are counted)
WEBHOOK_BLUEPRINTS = ("voice", "ivr")


def _request_hooks(app: Flask, metrics: Any) -> None:
    """Per request: the log context (bound at the start, cleared at the end, whatever
    happened) and, for Twilio webhooks, the answer's outcome and latency."""
    from flask import g, request

    from gateway import logs

    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()
        try:  # a body the view would refuse (too large) is refused there, not here
            form = request.form if request.mimetype == "application/x-www-form-urlencoded" else {}
            call_sid = form.get("CallSid")
        except HTTPException:
            call_sid = None
        logs.bind_request(call_sid=call_sid, incident_id=request.args.get("i")
                          or (request.view_args or {}).get("incident_id"))

    @app.after_request
    def _count(response: Any) -> Any:
        if request.blueprint in WEBHOOK_BLUEPRINTS and request.endpoint:
            outcome = g.get("webhook_outcome") or (
                "rejected" if response.status_code == 403
                else "unavailable" if response.status_code == 503
                else "error" if response.status_code >= 500
                else "answered")
            started = g.get("started")
            metrics.webhook(request.endpoint, outcome,
                            None if started is None else time.perf_counter() - started)
        return response

    @app.teardown_request
    def _end(_exc: BaseException | None) -> None:
        logs.clear_request()


def stop_background(app: Flask, *, timeout_s: float = 5.0) -> None:
    """Write out the queued voice steps and stop the app's background threads (what a
    thread had leased is retried once its lease ends).  Never raises."""
    svc: Services = app.extensions["gateway"]
    for name in ("worker", "notifier", "command_queue", "line_health"):
        part = getattr(svc, name, None)
        if part is not None:
            try:
                part.stop()
            except Exception:  # shutting down: log and go on
                log.exception("could not stop the %s", name)
    if svc.steps is not None:
        if not svc.steps.flush(timeout=timeout_s):
            log.error("voice steps still queued after %.1f s at shutdown", timeout_s)
        svc.steps.stop(timeout=1.0)
