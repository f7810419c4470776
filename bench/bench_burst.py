"""A burst: many crashes at once, and a wave of calls.  Every call must get TwiML, fast.

Phase 1: 500 crash events and their calls within 10 s: every 20 ms a car posts its
data message (POST /v1/events) and, as soon as it is answered, calls the number it got
(a signed POST /twilio/voice with a fresh CallSid).
Phase 2: 1,000 signed calls within 2 s (one every 2 ms), fresh CallSids, from the cars
of phase 1 (each finds its incident).

Open loop: each request is sent at its scheduled time whatever the others do (asyncio,
one connection per request, ``Connection: close``), so a slow server is not offered
less load; latency counts from the scheduled time (the generator's own lag, reported,
included).  A bounded Python generator, not wrk: every webhook carries its own
X-Twilio-Signature (HMAC-SHA1 of its URL and fields), computed before the run.

Against: ``python -m gateway serve`` as shipped (gunicorn, one worker of 8 threads, the
default SQLite; ``--postgres URL --workers 2`` for PostgreSQL), and the minimal signed
TwiML handler of bench/_serving_baselines.py on the same server settings (phase 2 only
has a baseline: it has no events).

    .venv/bin/python bench/bench_burst.py [--postgres URL --workers 2]

Pass: every call answered 200 with TwiML (a <Dial> or a <Say>), p99 under 2 s, none
over 10 s (Twilio gives up at 15 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_ingest import (
    AUTH,
    EVENT,
    REPO,
    TOKEN,
    free_port,
    load_average,
    machine,
    private_database,
    processes,
)
from twilio.request_validator import RequestValidator

PUBLIC = "https://gateway.example.com"
DATABASE = "bench_burst"
TO = "+15005550006"


@dataclass
class Result:
    kind: str  # event | call
    scheduled: float
    sent: float = 0.0
    done: float = 0.0
    status: int = 0
    twiml: bool = False
    error: str = ""
    body: bytes = b""

    @property
    def latency(self) -> float:
        return self.done - self.scheduled


@dataclass
class Phase:
    name: str
    results: list[Result] = field(default_factory=list)

    def calls(self) -> list[Result]:
        return [r for r in self.results if r.kind == "call"]

    def summary(self, kind: str = "call") -> dict[str, float]:
        chosen = [r for r in self.results if r.kind == kind]
        latencies = sorted(r.latency for r in chosen)
        lag = max((r.sent - r.scheduled for r in chosen), default=0.0)
        return {
            "n": len(chosen),
            "ok": sum(1 for r in chosen if (r.twiml if kind == "call" else r.status == 201)),
            "p50": statistics.median(latencies) if latencies else float("nan"),
            "p99": latencies[max(0, int(len(latencies) * 0.99) - 1)] if latencies else float("nan"),
            "max": latencies[-1] if latencies else float("nan"),
            "lag": lag,
        }


def call_params(sid: str, msisdn: str) -> dict[str, str]:
    return {"CallSid": sid, "AccountSid": "AC" + "0" * 32, "From": msisdn, "To": TO,
            "Caller": msisdn, "Called": TO, "CallStatus": "ringing",
            "ApiVersion": "2010-04-01", "Direction": "inbound"}


def signed_call(sid: str, msisdn: str, validator: RequestValidator) -> tuple[bytes, str]:
    params = call_params(sid, msisdn)
    return urlencode(params).encode(), validator.compute_signature(PUBLIC + "/twilio/voice",
                                                                   params)


def msisdn_of(n: int) -> str:
    return f"+4670{2000000 + n:07d}"


async def http_post(port: int, path: str, body: bytes, headers: dict[str, str],
                    result: Result, timeout: float = 20.0) -> None:
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{head}"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    result.sent = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port),
                                                timeout)
        writer.write(request)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
        writer.close()
    except (TimeoutError, OSError) as exc:
        result.done = time.monotonic()
        result.error = type(exc).__name__
        return
    result.done = time.monotonic()
    status_line, _, rest = raw.partition(b"\r\n")
    result.status = int(status_line.split()[1]) if len(status_line.split()) > 1 else 0
    result.body = rest.partition(b"\r\n\r\n")[2]
    if result.kind == "call" and result.status == 200:
        try:
            root = ET.fromstring(result.body)
            result.twiml = root.tag == "Response" and (root.find("Dial") is not None
                                                       or root.find("Say") is not None)
        except ET.ParseError:
            result.twiml = False


async def at(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def crash_and_call(port: int, n: int, start: float, spacing: float,
                         validator: RequestValidator, phase: Phase) -> None:
    scheduled = start + n * spacing
    await at(scheduled)
    msisdn = msisdn_of(n)
    event = dict(EVENT, event_id=f"burst-{n}", msisdn=msisdn,
                 vin=f"YV1ZW72U5N{n:07d}")
    posted = Result("event", scheduled)
    phase.results.append(posted)
    await http_post(port, "/v1/events", json.dumps(event).encode(),
                    {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
                    posted)
    body, sig = signed_call(f"CAburst1{n:08d}", msisdn, validator)
    call = Result("call", time.monotonic())
    phase.results.append(call)
    await http_post(port, "/twilio/voice", body,
                    {"Content-Type": "application/x-www-form-urlencoded",
                     "X-Twilio-Signature": sig}, call)


async def one_call(port: int, n: int, when: float, signed: tuple[bytes, str],
                   phase: Phase) -> None:
    await at(when)
    body, sig = signed
    call = Result("call", when)
    phase.results.append(call)
    await http_post(port, "/twilio/voice", body,
                    {"Content-Type": "application/x-www-form-urlencoded",
                     "X-Twilio-Signature": sig}, call)


async def phase_one(port: int, count: int, seconds: float) -> Phase:
    validator = RequestValidator(AUTH)
    phase = Phase(f"{count} crash events + calls in {seconds:g} s")
    start = time.monotonic() + 0.2
    await asyncio.gather(*(crash_and_call(port, n, start, seconds / count, validator, phase)
                           for n in range(count)))
    return phase


async def phase_two(port: int, count: int, seconds: float, cars: int) -> Phase:
    validator = RequestValidator(AUTH)
    signed = [signed_call(f"CAburst2{n:08d}", msisdn_of(n % cars), validator)
              for n in range(count)]
    phase = Phase(f"{count} calls in {seconds:g} s")
    start = time.monotonic() + 0.2
    await asyncio.gather(*(one_call(port, n, start + n * seconds / count, signed[n], phase)
                           for n in range(count)))
    return phase


@contextmanager
def server(command: list[str], env: dict[str, str], work: Path, port: int,
           ready: str) -> Iterator[None]:
    with processes([command], env, work, [port], ready):
        yield


def report(name: str, phase: Phase, kind: str = "call") -> dict[str, float]:
    s = phase.summary(kind)
    what = "calls answered with TwiML" if kind == "call" else "events stored (201)"
    print(f"  {name:9} {phase.name}: {int(s['ok'])}/{int(s['n'])} {what}; "
          f"p50 {s['p50'] * 1000:.0f} ms, p99 {s['p99'] * 1000:.0f} ms, "
          f"max {s['max'] * 1000:.0f} ms (generator lag at most {s['lag'] * 1000:.0f} ms)")
    errors: dict[str, int] = {}
    for r in phase.results:
        if r.kind == kind and not (r.twiml if kind == "call" else r.status == 201):
            key = r.error or f"HTTP {r.status}"
            errors[key] = errors.get(key, 0) + 1
    if errors:
        print(f"            failures: {errors}")
    return s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--postgres", help="serve on PostgreSQL (a private database) instead "
                                       "of the default SQLite file")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--events", type=int, default=500)
    ap.add_argument("--events-seconds", type=float, default=10.0)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--calls-seconds", type=float, default=2.0)
    a = ap.parse_args()
    print(f"machine: {machine()}; load average before: {load_average()}")
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench-burst-") as tmp, \
            (private_database(a.postgres, DATABASE) if a.postgres else _no_database()) as pg_url:
        work = Path(tmp)
        url = pg_url or f"sqlite:///{work}/gateway.sqlite3"
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update({"GATEWAY_TWILIO_AUTH_TOKEN": AUTH, "GATEWAY_VEHICLE_API_TOKENS": TOKEN,
                    "GATEWAY_DATABASE_URL": url, "GATEWAY_PUBLIC_URL": PUBLIC,
                    "GATEWAY_LOG_LEVEL": "WARNING", "PYTHONPATH": str(REPO)})
        settings = ["--workers", str(a.workers), "--threads", str(a.threads)]
        port = free_port()
        with server([sys.executable, "-m", "gateway", "serve", "--port", str(port),
                     *settings], env, work, port, "/readyz"):
            line = next((x for x in (work / "server-0.log").read_text().splitlines()
                         if "serving on" in x), "?")
            print(f"ours: {line}")
            first = asyncio.run(phase_one(port, a.events, a.events_seconds))
            time.sleep(2.0)
            second = asyncio.run(phase_two(port, a.calls, a.calls_seconds, a.events))
        base_port = free_port()
        with server([sys.executable, str(REPO / "bench" / "_serving_baselines.py"), "twiml",
                     "--port", str(base_port), "--public-url", PUBLIC, *settings],
                    env, work, base_port, "/"):
            baseline = asyncio.run(phase_two(base_port, a.calls, a.calls_seconds, a.events))
    print(f"load average after: {load_average()}")
    print(f"database: {'PostgreSQL (private database ' + DATABASE + ')' if a.postgres else 'SQLite file'}; "
          f"gunicorn gthread {a.workers} worker(s) x {a.threads} threads, 127.0.0.1; "
          "generator: Python asyncio, open loop, one connection per request")
    report("ours", first, "event")
    s1 = report("ours", first)
    s2 = report("ours", second)
    sb = report("baseline", baseline)
    print(f"  phase 2 ratio ours/baseline: p50 {s2['p50'] / sb['p50']:.2f}x, "
          f"p99 {s2['p99'] / sb['p99']:.2f}x, max {s2['max'] / sb['max']:.2f}x "
          "(latency: lower is better)")
    for name, s in (("phase 1", s1), ("phase 2", s2)):
        passed = s["ok"] == s["n"] and s["p99"] < 2.0 and s["max"] < 10.0
        ok = ok and passed
        print(f"  {name}: {'PASS' if passed else 'FAIL'} (every call TwiML, p99 < 2 s, "
              "none over 10 s)")
    return 0 if ok else 1


@contextmanager
def _no_database() -> Iterator[None]:
    yield None


if __name__ == "__main__":
    sys.exit(main())
