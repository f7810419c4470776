#!/usr/bin/env python3
"""Benchmark: the incoming-call webhook under load vs a minimal signed TwiML handler.

Run by hand (needs ``wrk``: ``apt-get install -y wrk``):

    .venv/bin/python bench/bench_incoming.py [--duration 10] [--connections 8]
        [--no-postgres] [--postgres-url postgresql://postgres@127.0.0.1:5432/test]

Both servers run in their own process with the same WSGI server and settings, one
process of 8 threads on 127.0.0.1, under each of (``--server``, default both):

- gunicorn (gthread), as ``serve`` runs on POSIX (gateway.serving's settings): ours is
  ``GATEWAY_SERVER=gunicorn``, the baseline bench/_serving_baselines.py ``twiml``;
- waitress, as ``serve --server waitress`` runs (and on Windows): the baseline is
  bench/_twiml_baseline.py.

- ours: ``python -m gateway serve --no-worker`` (tests/support/server.py), on the
  default embedded SQLite in a temp dir, then (if the server answers) on PostgreSQL in
  a private database ``bench_incoming`` created and dropped here;
- baseline: one Flask route that checks X-Twilio-Signature with twilio's
  RequestValidator and answers <Say> + <Dial><Number>.

The load is wrk (C, keep-alive, fixed connections, fixed duration) driven by a Lua
script that cycles through requests signed beforehand in Python (wrk's LuaJIT has no
HMAC-SHA1): every request of a "fresh" scenario carries its own CallSid, and the file
holds more requests than the run can send (a wrap-around would be reported).

Scenarios, each measured baseline then ours, back to back:

1. fresh: a new CallSid per request to /twilio/voice; From a Swedish car that sent no
   data message, To +442079460900 (the emergency number);
2. replay: one signed request sent again and again (same CallSid, step stored);
3. crash: a new CallSid per request, From one of --incidents cars that posted a crash
   event first.

Ours answers; its step records are written afterwards by a background thread, so after
each run the bench waits for that queue to drain and reports what was still queued
when the run ended and how long the drain took (that work is not in ours' req/s).  It
also counts ours' answers made without the database read (the read missed its 0.3 s
deadline, or the database was then "suspect"): fast, but not the normal answer.

Each run also reads the server's CPU time (/proc, all threads of the process and of its
children, so a gunicorn master and its worker; ours' until its step queue drained) per
request: on a machine shared with other work, req/s depends on
how much CPU the scheduler gives each side, CPU per request much less so.  Its ratio
baseline/ours is what req/s would be on a machine where both are CPU-bound.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import platform
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import requests

from tests.support.events import crash_event
from tests.support.server import free_port, running_gateway, stop_process
from tests.support.twilio import AUTH_TOKEN, call_params, signature

PATH = "/twilio/voice"
TO = "+442079460900"  # numbers/inbound.csv: emergency, any country
CAR = "+46701234567"  # a Swedish SIM with no data message
THREADS = 8  # python -m gateway serve's default, used for the baseline too
PG_DB = "bench_incoming"

WRK_LUA = r"""
-- cycles through pre-signed requests: lines [first, last) of a file of
-- "body<TAB>signature" lines; thread i of n takes lines first+i, first+i+n, ... so no two
-- threads send the same one
local counter = 0
local threads = {}

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  local file, nthreads, path = args[1], tonumber(args[2]), args[3]
  local first, last = tonumber(args[4]), tonumber(args[5])
  reqs = {}
  wrapped = 0
  n = 0
  local i = 0
  for line in io.lines(file) do
    if i >= last then break end
    if i >= first and (i - first) % nthreads == id then
      local body, sig = line:match("^([^\t]*)\t(.*)$")
      reqs[#reqs + 1] = wrk.format("POST", path, {
        ["Content-Type"] = "application/x-www-form-urlencoded",
        ["X-Twilio-Signature"] = sig,
      }, body)
    end
    i = i + 1
  end
  if #reqs == 0 then error("no requests for thread " .. id) end
end

function request()
  n = n + 1
  if n > #reqs then
    n = 1
    wrapped = wrapped + 1
  end
  return reqs[n]
end

function done(summary, latency, requests)
  local w = 0
  for _, t in ipairs(threads) do w = w + (t:get("wrapped") or 0) end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, ' ..
    '"wrapped": %d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, w))
end
"""


# -- the machine ------------------------------------------------------------------------


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    wrk = subprocess.run(["wrk", "--version"], check=False, capture_output=True, text=True).stdout
    wrk = (wrk.splitlines() or ["wrk ?"])[0].split(" Copyright")[0]
    from importlib.metadata import version

    return (f"nproc {os.cpu_count()}, {cpu}, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}; {wrk}; gunicorn {version('gunicorn')}, "
            f"waitress {version('waitress')}, "
            f"Flask {version('flask')}, twilio {version('twilio')}, "
            f"SQLAlchemy {version('sqlalchemy')}, "
            f"SQLite {sqlite3.sqlite_version}")


# -- requests signed beforehand ----------------------------------------------------------


def new_sid() -> str:
    return "CA" + uuid.uuid4().hex


def signed_line(url: str, params: Mapping[str, str]) -> str:
    return f"{urlencode(params)}\t{signature(url, params)}\n"


def write_fresh(path: pathlib.Path, url: str, count: int, callers: list[str]) -> None:
    """``count`` requests, each with a new CallSid, from ``callers`` in turn."""
    with path.open("w") as fh:
        for i in range(count):
            fh.write(signed_line(url, call_params(new_sid(), callers[i % len(callers)], TO)))


def write_replay(path: pathlib.Path, url: str, params: Mapping[str, str], copies: int) -> None:
    with path.open("w") as fh:
        fh.write(signed_line(url, params) * copies)


# -- load --------------------------------------------------------------------------------


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    wrapped: int
    #: the server process's CPU time (all its threads) per request; ours' includes
    #: writing its step records after the run
    cpu_us: float = 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live children (a gunicorn master and
    its workers), all their threads (Linux /proc)."""
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(child) for child in
                 pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    total = 0
    for one in pids:
        with contextlib.suppress(OSError):
            fields = pathlib.Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def wrk(url: str, lua: pathlib.Path, requests_file: pathlib.Path, *, duration: float,
        connections: int, threads: int, lines: tuple[int, int]) -> Result:
    """One fixed-duration run over ``lines`` [first, last) of the request file."""
    target = url.rsplit(PATH, 1)[0]
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration:g}s",
           "--timeout", "5s", "-s", str(lua), target + PATH, "--", str(requests_file),
           str(threads), PATH, str(lines[0]), str(lines[1])]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=duration + 60)
    found = re.search(r"^WRK_JSON (.*)$", out.stdout, re.MULTILINE)
    if out.returncode != 0 or found is None:
        raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    r = json.loads(found.group(1))
    seconds = r["duration_us"] / 1e6
    errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    return Result(rps=r["requests"] / seconds, p50_ms=r["p50_us"] / 1000,
                  p99_ms=r["p99_us"] / 1000, requests=r["requests"], errors=errors,
                  wrapped=r["wrapped"])


# -- servers -----------------------------------------------------------------------------


@contextlib.contextmanager
def running_baseline(tmp: pathlib.Path, server: str) -> Iterator[tuple[str, int]]:
    """The baseline's (base URL, pid) under ``server`` (gunicorn or waitress)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "GATEWAY_TWILIO_AUTH_TOKEN": AUTH_TOKEN, "GATEWAY_PUBLIC_URL": base}
    log = (tmp / f"baseline-{server}.log").open("wb")
    command = ([str(ROOT / "bench" / "_twiml_baseline.py"), "--port", str(port),
                "--threads", str(THREADS)] if server == "waitress" else
               [str(ROOT / "bench" / "_serving_baselines.py"), "twiml", "--port", str(port),
                "--public-url", base, "--workers", "1", "--threads", str(THREADS)])
    process = subprocess.Popen([sys.executable, *command], env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError((tmp / f"baseline-{server}.log").read_text())
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("baseline did not start")
            time.sleep(0.1)
        yield base, process.pid
    finally:
        stop_process(process)
        log.close()


def post_signed(base: str, params: Mapping[str, str]) -> requests.Response:
    url = base + PATH
    return requests.post(url, data=dict(params), timeout=10,
                         headers={"X-Twilio-Signature": signature(url, params)})


def check_answer(base: str, caller: str, what: str) -> str:
    """One signed request: 200 and a <Dial> (the bench measures answers, not errors)."""
    response = post_signed(base, call_params(new_sid(), caller, TO))
    if response.status_code != 200 or "<Dial" not in response.text:
        raise RuntimeError(f"{what} answered {response.status_code}: {response.text[:500]}")
    return response.text


def metrics(base: str) -> dict[str, float]:
    text = requests.get(base + "/metrics", timeout=10).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("gateway_step") and " " in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def drain(base: str, timeout: float = 300.0) -> tuple[float, float]:
    """(records queued now, seconds until the step queue was empty)."""
    started = time.monotonic()
    queued = metrics(base).get("gateway_step_queue_depth", 0.0)
    while metrics(base).get("gateway_step_queue_depth", 0.0) > 0:
        if time.monotonic() - started > timeout:
            raise RuntimeError("the step queue did not drain")
        time.sleep(0.2)
    return queued, time.monotonic() - started


# -- PostgreSQL ----------------------------------------------------------------------------


def postgres_url(admin_url: str) -> str | None:
    """A fresh private database on the server of ``admin_url`` (None: not reachable)."""
    try:
        import psycopg

        parts = urlsplit(admin_url)
        server = urlunsplit((parts.scheme, parts.netloc, "/postgres", "", ""))
        with psycopg.connect(server, autocommit=True, connect_timeout=2) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {PG_DB}")
            pg_version = conn.execute("SHOW server_version").fetchone()
        print(f"PostgreSQL {pg_version[0] if pg_version else '?'} at {parts.hostname}:{parts.port}")
        return urlunsplit((parts.scheme, parts.netloc, f"/{PG_DB}", "", ""))
    except Exception as exc:  # noqa: BLE001 -- optional: say why and go on
        print(f"PostgreSQL not used: {type(exc).__name__}: {exc}")
        return None


def drop_postgres(admin_url: str) -> None:
    import psycopg

    parts = urlsplit(admin_url)
    server = urlunsplit((parts.scheme, parts.netloc, "/postgres", "", ""))
    with psycopg.connect(server, autocommit=True, connect_timeout=2) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)")


# -- the run -------------------------------------------------------------------------------


@dataclass
class Row:
    server: str
    backend: str
    scenario: str
    baseline: list[Result]
    ours: list[Result]
    queued: list[float]
    drain_s: list[float]
    #: ours' answers made without the database read (it missed its deadline, or the
    #: database was suspect after a miss): logged "database read skipped"
    skipped: int = 0


SKIPPED = "database read skipped"


def skipped_reads(log_path: pathlib.Path, offset: int) -> int:
    """Reads skipped, as logged by the gateway since ``offset`` of its log."""
    with log_path.open("rb") as fh:
        fh.seek(offset)
        return fh.read().count(SKIPPED.encode())


def median(values: list[float]) -> float:
    return statistics.median(values)


def run_backend(server: str, name: str, tmp: pathlib.Path, baseline_server: tuple[str, int],
                lua: pathlib.Path, a: argparse.Namespace, **env: str) -> list[Row]:
    baseline, baseline_pid = baseline_server
    rows: list[Row] = []
    work = tmp / f"{server}-{name}"
    work.mkdir()
    # one process of THREADS threads under the baseline's server
    extra: dict[str, Any] = {"GATEWAY_SERVER": server, "GATEWAY_WORKERS": "1",
                             "GATEWAY_THREADS": str(THREADS), **env}
    with running_gateway(work, "--no-worker", **extra) as gw:
        ours = gw.base_url
        serving = [line for line in gw.logs().splitlines() if "serving on" in line]
        print(f"  ours ({name}): {serving[0].strip() if serving else '?'}", flush=True)
        check_answer(ours, CAR, f"ours ({name})")
        check_answer(baseline, CAR, "baseline")
        cars = [f"+4670{5000000 + i:07d}" for i in range(a.incidents)]
        for i, msisdn in enumerate(cars):
            posted = gw.post_event(crash_event(event_id=f"bench-{name}-{i}", msisdn=msisdn))
            if posted.status_code not in (200, 201):
                raise RuntimeError(f"event refused: {posted.status_code} {posted.text[:300]}")
        if cars:
            check_answer(ours, cars[0], f"ours ({name}, a car with a crash incident)")
        count = int(a.rate_cap * a.duration)
        replay = call_params(new_sid(), CAR, TO)
        first = post_signed(ours, replay)
        drain(ours)
        again = post_signed(ours, replay)
        if again.text != first.text or again.status_code != 200:
            raise RuntimeError("the replayed step was not answered from the stored TwiML")
        scenarios = {"fresh": ([CAR], None), "replay": (None, replay), "crash": (cars, None)}
        for scenario, (callers, same) in scenarios.items():
            if scenario == "crash" and not cars:
                continue
            files: dict[str, tuple[pathlib.Path, pathlib.Path]] = {}
            for who, base in (("baseline", baseline), ("ours", ours)):
                url = base + PATH
                warm = tmp / f"{name}-{scenario}-{who}-warm.txt"
                load = tmp / f"{name}-{scenario}-{who}.txt"
                if same is not None:
                    write_replay(warm, url, same, a.wrk_threads)
                    write_replay(load, url, same, a.wrk_threads)
                else:
                    assert callers is not None
                    write_fresh(warm, url, int(a.rate_cap * a.warmup), callers)
                    write_fresh(load, url, count * a.rounds, callers)
                files[who] = (warm, load)
                warm_lines = (0, a.wrk_threads if same is not None else int(a.rate_cap * a.warmup))
                wrk(url, lua, warm, duration=a.warmup, connections=a.connections,
                    threads=a.wrk_threads, lines=warm_lines)
            drain(ours)
            row = Row(server, name, scenario, [], [], [], [])
            for r in range(a.rounds):  # baseline, ours, baseline, ours, ...
                lines = (0, a.wrk_threads) if same is not None else (r * count, (r + 1) * count)
                for who, base in (("baseline", baseline), ("ours", ours)):
                    pid = baseline_pid if who == "baseline" else gw.process.pid
                    offset = gw.log_path.stat().st_size
                    cpu = cpu_seconds(pid)
                    result = wrk(base + PATH, lua, files[who][1], duration=a.duration,
                                 connections=a.connections, threads=a.wrk_threads, lines=lines)
                    if who == "ours":  # its step writer catches up: part of the work
                        queued, drain_s = drain(ours)
                        row.queued.append(queued)
                        row.drain_s.append(drain_s)
                    result.cpu_us = (cpu_seconds(pid) - cpu) / max(1, result.requests) * 1e6
                    if same is None and result.wrapped:
                        raise RuntimeError(f"{who} {scenario}: ran out of fresh requests; "
                                           "raise --rate-cap")
                    if result.errors:
                        raise RuntimeError(f"{who} {scenario}: {result.errors} errors")
                    getattr(row, who).append(result)
                    if who == "ours":
                        row.skipped += skipped_reads(gw.log_path, offset)
                print(f"  {server:8} {name:10} {scenario:7} round {r + 1}: baseline "
                      f"{row.baseline[-1].rps:6.0f} req/s, ours {row.ours[-1].rps:6.0f} req/s "
                      f"({row.ours[-1].rps / row.baseline[-1].rps:.2f}x)", flush=True)
            rows.append(row)
        final = metrics(ours)
        dropped = sum(v for k, v in final.items() if k.startswith("gateway_steps_dropped_total"))
        if dropped:
            print(f"  WARNING: ours dropped {dropped:.0f} step records ({name})")
    return rows


def loadavg() -> str:
    try:
        return " ".join(pathlib.Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    ap.add_argument("--rounds", type=int, default=3,
                    help="measured runs per server and scenario, alternating baseline and ours")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up before each")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--wrk-threads", type=int, default=2)
    ap.add_argument("--incidents", type=int, default=300,
                    help="cars that post a crash event before scenario 3 (0: skip it)")
    ap.add_argument("--rate-cap", type=float, default=4000.0,
                    help="fresh requests signed per second of run (must exceed req/s)")
    ap.add_argument("--postgres-url", default=os.environ.get(
        "GATEWAY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument("--server", choices=("both", "gunicorn", "waitress"), default="both",
                    help="gunicorn: as serve runs on POSIX; waitress: serve --server waitress")
    a = ap.parse_args()
    servers = ("gunicorn", "waitress") if a.server == "both" else (a.server,)
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install -y wrk")

    print(machine())
    print(f"wrk: {a.connections} connections, {a.wrk_threads} threads, {a.rounds} x "
          f"{a.duration:g} s per server and scenario (alternating) after {a.warmup:g} s "
          f"warm-up; servers: {', '.join(servers)}, one process of {THREADS} threads, "
          f"127.0.0.1; load average {loadavg()}", flush=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-incoming-"))
    lua = tmp / "signed.lua"
    lua.write_text(WRK_LUA)
    rows: list[Row] = []
    try:
        for server in servers:
            with running_baseline(tmp, server) as baseline:
                rows += run_backend(server, "sqlite", tmp, baseline, lua, a)
                pg = None if a.no_postgres else postgres_url(a.postgres_url)
                if pg is not None:
                    try:
                        rows += run_backend(server, "postgresql", tmp, baseline, lua, a,
                                            GATEWAY_DATABASE_URL=pg)
                    finally:
                        drop_postgres(a.postgres_url)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    goals = {"fresh": 0.5, "replay": 0.85, "crash": 0.5}
    print(f"\nload average at the end {loadavg()}; medians of {a.rounds} runs:")
    print(f"{'server':8} {'database':10} {'scenario':8} {'who':8} {'req/s':>7} {'p50 ms':>7} "
          f"{'p99 ms':>7} {'CPU us':>7}   ours/baseline req/s (goal); per round; CPU ratio")
    for row in rows:
        for who in ("baseline", "ours"):
            results: list[Result] = getattr(row, who)
            tail = ""
            if who == "ours":
                ratio = median([r.rps for r in row.ours]) / median([r.rps for r in row.baseline])
                rounds = ", ".join(f"{o.rps / b.rps:.2f}" for o, b in zip(row.ours, row.baseline))
                verdict = "ok" if ratio >= goals[row.scenario] else "BELOW GOAL"
                cpu = (median([r.cpu_us for r in row.baseline])
                       / median([r.cpu_us for r in row.ours]))
                tail = (f"   {ratio:.2f}x (>= {goals[row.scenario]}x: {verdict}); {rounds}; "
                        f"CPU per request baseline/ours {cpu:.2f}x; "
                        f"steps queued at end <= {max(row.queued):.0f}, drained in "
                        f"<= {max(row.drain_s):.1f} s; answers without the database read: "
                        f"{row.skipped}")
            print(f"{row.server:8} {row.backend:10} {row.scenario:8} {who:8} "
                  f"{median([r.rps for r in results]):7.0f} "
                  f"{median([r.p50_ms for r in results]):7.2f} "
                  f"{median([r.p99_ms for r in results]):7.2f} "
                  f"{median([r.cpu_us for r in results]):7.0f}{tail}")


if __name__ == "__main__":
    main()
