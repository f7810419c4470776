from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from gateway.app import create_app, stop_background
from gateway.config import Settings
from gateway.plan import NumberPlan, load_plan
from gateway.store import Store
from tests.support.fakes import NORDIC_BOXES, BoxLocator
from tests.support.proxy import TcpProxy, proxied_url
from tests.support.twilio import AUTH_TOKEN, VEHICLE_TOKEN, path_of, signature

PUBLIC_URL = "https://gateway.example.com"
GB_CALLER_ID = "+442079460555"
DE_CALLER_ID = "+4930901820"


@pytest.fixture(scope="session")
def plan() -> NumberPlan:
    return load_plan()


@pytest.fixture
def settings(tmp_path: Any) -> Settings:
    return Settings.from_env({
        "GATEWAY_TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "GATEWAY_PUBLIC_URL": PUBLIC_URL,
        "GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path}/gateway.sqlite3",
        "GATEWAY_VEHICLE_API_TOKENS": VEHICLE_TOKEN,
        "GATEWAY_AGENT_API_TOKENS": "agent-token-0123456789abcdef:read+dispatch",
        # emergency caller IDs for Great Britain and Germany only: cars elsewhere (DK, SE)
        # have no completable emergency route and are handed back
        "GATEWAY_EMERGENCY_CALLER_IDS": f"{GB_CALLER_ID},{DE_CALLER_ID}",
    })


class Clock:
    def __init__(self, now: float | None = None) -> None:
        self.now = float(int(time.time())) if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_app(settings: Settings, plan: NumberPlan,
             clock: Clock) -> Iterator[Callable[..., Flask]]:
    """Builds apps; their background threads are stopped after the test (as serve's
    shutdown does), so none outlives its test."""
    built: list[Flask] = []

    def build(**overrides: Any) -> Flask:
        app_settings = overrides.pop("settings", settings)
        kwargs: dict[str, Any] = {"plan": plan, "locator": BoxLocator(NORDIC_BOXES), "clock": clock}
        kwargs.update(overrides)
        built.append(create_app(app_settings, **kwargs))
        return built[-1]

    yield build
    for app in built:
        stop_background(app, timeout_s=2.0)


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


class Twilio:
    """Plays Twilio: posts signed webhooks to the app, as Twilio would."""

    def __init__(self, client: FlaskClient, public_url: str = PUBLIC_URL) -> None:
        self.client = client
        self.public_url = public_url

    def post(self, url_or_path: str, params: dict[str, str], *, sign: bool = True) -> TestResponse:
        url = url_or_path if url_or_path.startswith("http") else self.public_url + url_or_path
        headers = {"X-Twilio-Signature": signature(url, params)} if sign else {}
        response = self.client.post(path_of(url), data=params, headers=headers)
        # step records are written after the answer: let them land before the next step
        services = self.client.application.extensions["gateway"]
        if services.steps is not None:
            services.steps.flush()
        return response


@pytest.fixture
def twilio(client: FlaskClient) -> Twilio:
    return Twilio(client)


@pytest.fixture
def vehicle_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {VEHICLE_TOKEN}"}


def postgres_url() -> str | None:
    """PostgreSQL for tests: required in CI, optional on a developer's machine."""
    return os.environ.get("GATEWAY_TEST_POSTGRES_URL")


@pytest.fixture
def pg_store() -> Iterator[Store]:
    url = postgres_url()
    if not url:
        if os.environ.get("CI"):
            pytest.fail("CI must provide PostgreSQL: set GATEWAY_TEST_POSTGRES_URL")
        pytest.skip("PostgreSQL not configured: set GATEWAY_TEST_POSTGRES_URL to run this test")
    from gateway.store import metadata, register_tables

    register_tables()

    store = Store.from_url(url)
    metadata.drop_all(store.engine)
    store.create_schema()
    yield store
    store.dispose()


@pytest.fixture
def proxy(pg_store: Store) -> Iterator[TcpProxy]:
    """A TcpProxy in front of the test PostgreSQL (tests/support/proxy.py)."""
    import sqlalchemy as sa

    url = sa.engine.make_url(postgres_url() or "")
    with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as running:
        yield running


@pytest.fixture
def proxied(proxy: TcpProxy) -> Iterator[Store]:
    """A store whose every connection goes through the proxy (schema already made)."""
    store = Store.from_url(proxied_url(postgres_url() or "", proxy), suspect_s=0.5)
    yield store
    proxy.mode = "forward"
    store.dispose()
