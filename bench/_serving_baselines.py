"""Baselines of bench/bench_ingest.py and bench/bench_burst.py: the least a handler can do,
served exactly as ``assist-gateway serve`` serves the gateway (gunicorn, the same
settings: gateway.serving.gunicorn_settings with the same workers and threads).

``events``  POST /v1/events: the bearer token checked (constant time), the JSON body
            parsed, ``event_id`` required; with --database-url one INSERT ... ON CONFLICT
            DO NOTHING of (event_id, body) into ``baseline_events``, committed before the
            201.  No validation beyond that, no routing, no outbox.
``twiml``   POST /twilio/voice: ``X-Twilio-Signature`` checked with twilio's
            RequestValidator, a <Say> and a <Dial><Number>; no database.

    .venv/bin/python bench/_serving_baselines.py events --port P [--database-url URL]
    .venv/bin/python bench/_serving_baselines.py twiml --port P --public-url URL
(tokens from GATEWAY_VEHICLE_API_TOKENS / GATEWAY_TWILIO_AUTH_TOKEN)
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import sys
from pathlib import Path
from typing import Any

from flask import Flask, Response, request

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TABLE = "baseline_events"


def events_app(token: str, database_url: str | None) -> Any:
    """A factory of the app (the engine is made in the worker, after the fork)."""
    expected = f"Bearer {token}".encode()

    def build() -> Flask:
        import sqlalchemy as sa

        app = Flask("events-baseline")
        engine = None
        if database_url:
            engine = sa.create_engine(database_url.replace("postgresql://",
                                                           "postgresql+psycopg://", 1),
                                      pool_size=10, max_overflow=10)
        insert = sa.text(f"INSERT INTO {TABLE} (event_id, body) VALUES (:event_id, :body) "
                         "ON CONFLICT (event_id) DO NOTHING")

        @app.post("/v1/events")
        def events() -> Response:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return Response('{"error": "unauthorized"}', 401, mimetype="application/json")
            body = request.get_json(silent=True)
            if not isinstance(body, dict) or not isinstance(body.get("event_id"), str):
                return Response('{"error": "invalid"}', 422, mimetype="application/json")
            if engine is not None:
                with engine.begin() as conn:
                    conn.execute(insert, {"event_id": body["event_id"],
                                          "body": json.dumps(body)})
            return Response(json.dumps({"event_id": body["event_id"]}), 201,
                            mimetype="application/json")

        return app

    return build


def twiml_app(auth_token: str, public_url: str) -> Any:
    def build() -> Flask:
        from twilio.request_validator import RequestValidator
        from twilio.twiml.voice_response import Dial, VoiceResponse

        app = Flask("twiml-baseline")
        validator = RequestValidator(auth_token)

        @app.post("/twilio/voice")
        def voice() -> Response:
            url = public_url + request.full_path.rstrip("?")
            if not validator.validate(url, request.form,
                                      request.headers.get("X-Twilio-Signature", "")):
                return Response("invalid signature\n", status=403, mimetype="text/plain")
            response = VoiceResponse()
            response.say("Connecting you to the assistance centre.", language="en-GB")
            dial = Dial(timeout=20)
            dial.number("+442079460999")
            response.append(dial)
            return Response(str(response), status=200, mimetype="text/xml")

        return app

    return build


def create_table(database_url: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE IF NOT EXISTS {TABLE} (id bigserial PRIMARY KEY, "
                             "event_id varchar(128) NOT NULL UNIQUE, body jsonb NOT NULL, "
                             "received_at timestamptz NOT NULL DEFAULT now())"))
    engine.dispose()


def serve(build: Any, *, host: str, port: int, workers: int, threads: int) -> None:
    """gunicorn with the gateway's own settings; the app built in each worker."""
    from gunicorn.app.base import BaseApplication

    from gateway.serving import ServeOptions, gunicorn_settings

    options = ServeOptions(host=host, port=port, workers=workers, threads=threads)

    class Lazy:
        """Built in each worker after the fork, before it serves (as the gateway is)."""

        def __init__(self) -> None:
            self.app: Flask | None = None

        def build(self) -> None:
            self.app = self.app or build()

        def __call__(self, environ: Any, start_response: Any) -> Any:
            self.build()
            return self.app(environ, start_response)  # type: ignore[misc]

    class Application(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in gunicorn_settings(options).items():
                self.cfg.set(key, value)
            self.cfg.set("post_worker_init", lambda worker: worker.wsgi.build())

        def load(self) -> Lazy:
            return Lazy()

    Application(prog="baseline").run()


def main() -> None:
    from gateway import logs

    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=("events", "twiml"))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--database-url")
    ap.add_argument("--public-url")
    a = ap.parse_args()
    logs.configure("WARNING")
    if a.kind == "events":
        token = os.environ["GATEWAY_VEHICLE_API_TOKENS"].split(",")[0]
        if a.database_url:
            create_table(a.database_url)
        build = events_app(token, a.database_url)
    else:
        build = twiml_app(os.environ["GATEWAY_TWILIO_AUTH_TOKEN"], a.public_url)
    print(f"baseline {a.kind} on http://{a.host}:{a.port}", flush=True)
    serve(build, host=a.host, port=a.port, workers=a.workers, threads=a.threads)


if __name__ == "__main__":
    main()
