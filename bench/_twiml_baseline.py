"""The baseline of bench/bench_incoming.py: the least a signed TwiML webhook can do.

One Flask POST route that checks ``X-Twilio-Signature`` with twilio's RequestValidator
and answers a small VoiceResponse (<Say> + <Dial><Number>); no database, no plan.
Served by waitress with the same thread count as ``python -m gateway serve``:

    GATEWAY_TWILIO_AUTH_TOKEN=... GATEWAY_PUBLIC_URL=http://127.0.0.1:PORT \\
        .venv/bin/python bench/_twiml_baseline.py --port PORT [--threads 8]
"""

from __future__ import annotations

import argparse
import os

from flask import Flask, Response, request
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import Dial, VoiceResponse


def make_app(auth_token: str, public_url: str) -> Flask:
    app = Flask("twiml-baseline")
    validator = RequestValidator(auth_token)

    @app.post("/twilio/voice")
    def voice() -> Response:
        url = public_url + request.full_path.rstrip("?")
        if not validator.validate(url, request.form, request.headers.get("X-Twilio-Signature", "")):
            return Response("invalid signature\n", status=403, mimetype="text/plain")
        response = VoiceResponse()
        response.say("Connecting you to the assistance centre.", language="en-GB")
        dial = Dial(timeout=20)
        dial.number("+442079460999")
        response.append(dial)
        return Response(str(response), status=200, mimetype="text/xml")

    return app


def main() -> None:
    import waitress

    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--threads", type=int, default=8)
    a = ap.parse_args()
    app = make_app(os.environ["GATEWAY_TWILIO_AUTH_TOKEN"], os.environ["GATEWAY_PUBLIC_URL"])
    waitress.serve(app, host=a.host, port=a.port, threads=a.threads, ident="twiml-baseline")


if __name__ == "__main__":
    main()
