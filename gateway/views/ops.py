"""Endpoints for operations: liveness, readiness and metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Response, jsonify

from gateway.calls.call_plan import emergency_route
from gateway.errors import StoreError
from gateway.plan import NumberPlan
from gateway.security import public
from gateway.views.context import services

bp = Blueprint("ops", __name__)

#: the classic Prometheus text format, what ``generate_latest`` writes
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@bp.get("/healthz")
@public
def healthz() -> Any:
    """The process is alive and answering."""
    return jsonify(status="ok")


@bp.get("/readyz")
@public
def readyz() -> Any:
    """Ready when the database answers and the plan and boundary data are loaded.

    ``emergency_routes`` counts the countries whose emergency route only hands the call
    back to the car: a warning for the operator, not a reason to refuse traffic.
    """
    svc = services()
    checks: dict[str, str] = {}
    try:
        svc.store.ping()
        checks["database"] = "ok"
    except StoreError as exc:
        checks["database"] = f"unavailable: {exc}"
    checks["number_plan"] = (
        f"ok ({len(svc.plan)} countries)" if svc.plan is not None
        else f"not loaded: {svc.problems.get('number_plan', 'unknown')}"
    )
    checks["emergency_routes"] = _emergency_routes(svc.plan, svc.settings.emergency_caller_ids)
    checks["boundaries"] = (
        "ok" if svc.locator is not None
        else f"not loaded: {svc.problems.get('boundaries', 'unknown')}"
    )
    ready = all(v.startswith("ok") for v in checks.values())
    response = jsonify(status="ready" if ready else "not ready", checks=checks)
    response.status_code = 200 if ready else 503
    return response


def _emergency_routes(plan: NumberPlan | None, caller_ids: Mapping[str, str]) -> str:
    if plan is None:
        return "unknown: the number plan is not loaded"
    total = len(plan)
    dial = sum(1 for c in plan.countries() if emergency_route(c, plan, caller_ids).completable)
    return f"ok ({dial} of {total} countries dial; {total - dial} hand back to the car)"


@bp.get("/metrics")
@public
def metrics() -> Response:
    """Prometheus text format; counts and states only, never caller data.  The outbox
    and breaker states are read from the database here, within 0.5 s (NaN, and
    ``gateway_database_up 0``, when it does not answer in time)."""
    body = services().metrics.render()
    return Response(body, content_type=METRICS_CONTENT_TYPE)
