"""/readyz reports how many countries only hand the emergency call back to the car."""

from __future__ import annotations

from collections.abc import Callable

from flask import Flask
from flask.testing import FlaskClient

from gateway.config import Settings


def test_readyz_counts_the_countries_that_dial(client: FlaskClient) -> None:
    # the test settings configure emergency caller IDs for GB and DE only
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json is not None
    assert response.json["checks"]["emergency_routes"] == (
        "ok (2 of 252 countries dial; 250 hand back to the car)")


def test_hand_back_everywhere_is_a_warning_not_a_failure(
        make_app: Callable[..., Flask], settings: Settings) -> None:
    app = make_app(settings=settings.replace(emergency_caller_ids={}))
    response = app.test_client().get("/readyz")
    assert response.status_code == 200
    assert response.json is not None and response.json["status"] == "ready"
    assert response.json["checks"]["emergency_routes"] == (
        "ok (0 of 252 countries dial; 252 hand back to the car)")


def test_without_a_plan_the_routes_are_unknown(make_app: Callable[..., Flask]) -> None:
    response = make_app(plan=None).test_client().get("/readyz")
    assert response.status_code == 503
    assert response.json is not None
    assert response.json["checks"]["emergency_routes"].startswith("unknown")
