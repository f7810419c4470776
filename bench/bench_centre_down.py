"""Time from call arrival to an emergency route when the assistance centre is down.

Run by hand:  .venv/bin/python bench/bench_centre_down.py

Both gateways answer real (signed) webhooks in this process; a simulated Twilio follows
their TwiML.  Ringing cannot be measured without Twilio, so a <Dial> to the dead centre
costs its ``timeout`` plus Twilio's ~5 s slack in virtual time (no-answer); everything
else (webhook handling) is measured wall time; speech is not counted for either side
(tests/integration/test_call_budget.py counts it).  The naive gateway is what a first draft
does: <Dial timeout="30"> to the centre, one retry, then the emergency number.
"""

from __future__ import annotations

import logging
import statistics
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flask import Flask, request
from twilio.twiml.voice_response import VoiceResponse

from gateway.app import create_app
from gateway.config import Settings
from gateway.geo import load_locator
from gateway.plan import load_plan
from tests.support.events import crash_event
from tests.support.twilio import AUTH_TOKEN, VEHICLE_TOKEN, call_params, signature

TWILIO_SLACK_S = 5.0
PUBLIC = "https://gateway.example.com"


def naive_app(centre: str, emergency: str) -> Flask:
    app = Flask("naive")

    @app.post("/voice")
    def voice() -> str:
        r = VoiceResponse()
        r.dial(centre, timeout=30, action="/retry")
        return str(r)

    @app.post("/retry")
    def retry() -> str:
        r = VoiceResponse()
        if request.form.get("DialCallStatus") in ("completed", "answered"):
            r.hangup()
        else:
            r.dial(centre, timeout=30, action="/emergency")
        return str(r)

    @app.post("/emergency")
    def emergency_step() -> str:
        r = VoiceResponse()
        r.dial(emergency)
        return str(r)

    return app


class VirtualClock:
    """Real time plus the ringing the simulated Twilio skipped: the gateway's clock."""

    def __init__(self) -> None:
        self.skipped = 0.0

    def __call__(self) -> float:
        return time.time() + self.skipped


CLOCK = VirtualClock()


def simulate(app: Flask, entry: str, *, sign: bool, emergency: set[str], call_sid: str) -> float:
    """Follow the TwiML like Twilio with every centre line dead; seconds until an
    emergency number is dialled (virtual ringing + measured handling)."""
    client = app.test_client()
    virtual = 0.0
    wall = 0.0
    url = entry
    status: dict[str, str] = {}
    for _ in range(20):
        params = call_params(call_sid, "+46701234567", **status)
        full = url if url.startswith("http") else PUBLIC + url
        headers = {"X-Twilio-Signature": signature(full, params)} if sign else {}
        path = full.removeprefix(PUBLIC)
        started = time.perf_counter()
        body = client.post(path, data=params, headers=headers).data
        wall += time.perf_counter() - started
        root = ET.fromstring(body)
        dial = root.find("Dial")
        if dial is None:  # the hand-back: the car dials the emergency number itself
            assert root.find("Hangup") is not None, body
            return virtual + wall
        number = dial.find("Number")
        target = (number.text if number is not None else dial.text or "").strip()
        if target in emergency:
            return virtual + wall
        ring = float(dial.get("timeout", "30")) + TWILIO_SLACK_S
        virtual += ring
        CLOCK.skipped += ring
        status = {"DialCallStatus": "no-answer"}
        url = dial.get("action", "")
    raise RuntimeError("never reached an emergency route")


def main() -> None:
    logging.disable(logging.WARNING)
    plan = load_plan()
    locator = load_locator()
    tmp = Path(tempfile.mkdtemp())
    settings = Settings.from_env({
        "GATEWAY_TWILIO_AUTH_TOKEN": AUTH_TOKEN, "GATEWAY_PUBLIC_URL": PUBLIC,
        "GATEWAY_DATABASE_URL": f"sqlite:///{tmp}/bench.sqlite3",
        "GATEWAY_VEHICLE_API_TOKENS": VEHICLE_TOKEN,
    })
    ours = create_app(settings, plan=plan, locator=locator, clock=CLOCK)
    client = ours.test_client()
    emergency = {plan.entry("DK").emergency_number, "112"}
    naive = naive_app(plan.centres_for("SE")[0].number, "112")

    runs = 30
    cold = "ours, first call (outage not yet known)"
    results: dict[str, list[float]] = {"naive": [], cold: [], "ours, centre known down": []}
    for n in range(runs):
        results["naive"].append(simulate(naive, "/voice", sign=False, emergency=emergency,
                                         call_sid=f"CAn{n}"))
    for n in range(runs):
        fresh = create_app(settings.replace(
            database_url=f"sqlite:///{tmp}/cold-{n}.sqlite3"), plan=plan, locator=locator,
            clock=CLOCK)
        fresh.test_client().post("/v1/events", json=crash_event(), headers={
            "Authorization": f"Bearer {VEHICLE_TOKEN}"})
        results[cold].append(
            simulate(fresh, "/twilio/voice", sign=True, emergency=emergency, call_sid=f"CAu{n}"))
    services = ours.extensions["gateway"]
    for centre in plan.centres:  # every line failed its last dials: known down
        for _ in range(settings.delivery.breaker_failures):
            services.centre_health.record(centre.centre_id, ok=False, reason="bench: busy")
    services.line_health.refresh()
    for n in range(runs):
        client.post("/v1/events", json=crash_event(), headers={
            "Authorization": f"Bearer {VEHICLE_TOKEN}"})
        results["ours, centre known down"].append(
            simulate(ours, "/twilio/voice", sign=True, emergency=emergency, call_sid=f"CAd{n}"))

    baseline = statistics.median(results["naive"])
    print(f"time from call arrival to an emergency route, centre down ({runs} calls each)")
    print(f"{'gateway':36} {'median s':>10} {'max s':>10} {'naive / this':>14}")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:36} {median:10.3f} {max(values):10.3f} {baseline / median:14.1f}x")
    policy = settings.voice
    print(f"(ours: up to {policy.dial_attempts} centre lines x {policy.ring_timeout_s}s ring "
          f"within a {policy.emergency_deadline_s}s deadline; naive: 2 x 30s; "
          f"Twilio slack {TWILIO_SLACK_S:.0f}s per dial; a Swedish car in Copenhagen is "
          "handed back: Twilio cannot dial 112 in Denmark)")


if __name__ == "__main__":
    main()
