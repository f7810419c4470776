"""Event ingest on PostgreSQL, two instances: the gateway against a minimal handler.

Ours: two ``python -m gateway serve`` processes (gunicorn, ``--workers`` x ``--threads``
each, ``--no-worker``: no delivery threads, so only ingest is measured) on one private
PostgreSQL database.  Baselines, on the same server settings (gunicorn through
gateway.serving.gunicorn_settings, two instances, the same database server):

- ``+insert``: the bearer token checked, the JSON parsed, one INSERT of the event committed
  before the 201 (bench/_serving_baselines.py ``events --database-url``);
- ``no db``:  the same without the INSERT (the least an authorised JSON handler does).

Load: wrk (Debian's package) with a Lua script that gives every request a new
``event_id`` (a bearer token, no signature, so wrk can generate the load itself); one wrk
per instance, run at the same time, ``--connections`` each.  After each run the rows are
counted: every 201 must have its row (none lost), no event twice (none duplicated), and
for ours one outbox row per incident.  CPU-independent figures from the server's own
counters (``pg_stat_database`` of the private database, read once the servers have
exited so their backends have reported): transactions committed or rolled back, and rows
inserted, per stored row; start-up, readiness checks, the warm-up and the bench's own
few reads included.

    .venv/bin/python bench/bench_ingest.py [--seconds 10] [--connections 8]
        [--workers 1] [--threads 8] [--postgres postgresql://postgres@127.0.0.1:5432/test]

Prints ours, each baseline and the ratios from the same run, with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests
import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-vehicle-token-0123456789abcdef"
AUTH = "bench-auth-token-0123456789abcdef"
DATABASE = "bench_ingest"

EVENT = {
    "event_id": "%s", "type": "crash", "vin": "YV1ZW72U5N1234567", "msisdn": "+46701234567",
    "occurred_at": "2026-11-25T10:15:00Z",
    "location": {"lat": 55.6761, "lon": 12.5683, "heading_deg": 90.0, "accuracy_m": 8.0,
                 "trusted": True},
    "crash": {"airbag_deployed": True, "belt_tensioner_fired": True, "delta_v_kmh": 38},
    "occupants": {"count": 2},
}

LUA = r"""
local threads = {}
local prefix = os.getenv("BENCH_PREFIX")
local template = os.getenv("BENCH_BODY")
local token = os.getenv("BENCH_TOKEN")
function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end
function init(args)
  n = 0; created = 0; other = 0
  headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. token}
end
function request()
  n = n + 1
  local body = string.gsub(template, "EVENT_ID", prefix .. "-" .. tid .. "-" .. n)
  return wrk.format("POST", "/v1/events", headers, body)
end
function response(status, headers, body)
  if status == 201 then created = created + 1 else other = other + 1 end
end
function done(summary, latency, requests)
  local c, o = 0, 0
  for _, t in ipairs(threads) do c = c + t:get("created"); o = o + t:get("other") end
  io.write(string.format("RESULT created=%d other=%d requests=%d errors=%d p50=%d p99=%d max=%d\n",
    c, o, summary.requests, summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout + summary.errors.status, latency:percentile(50),
    latency:percentile(99), latency.max))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine() -> str:
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in
                   Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def engine_for(url: str) -> sa.Engine:
    return sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))


@contextmanager
def private_database(base: str, name: str = DATABASE) -> Iterator[str]:
    admin = sa.create_engine(base.replace("postgresql://", "postgresql+psycopg://", 1),
                             isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    url = sa.engine.make_url(base).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


@contextmanager
def processes(commands: list[list[str]], env: dict[str, str], work: Path,
              ports: list[int], ready_path: str) -> Iterator[None]:
    procs = []
    try:
        for n, command in enumerate(commands):
            log = (work / f"server-{n}.log").open("wb")
            procs.append(subprocess.Popen(command, env=env, cwd=work, stdout=log,
                                          stderr=subprocess.STDOUT))
        for port in ports:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if requests.get(f"http://127.0.0.1:{port}{ready_path}",
                                    timeout=1).status_code < 500:
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    logs = "\n".join((work / f"server-{n}.log").read_text(errors="replace")
                                     for n in range(len(procs)))
                    raise RuntimeError(f"servers not ready:\n{logs[-3000:]}")
                time.sleep(0.1)
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def db_counters(url: str) -> tuple[int, int]:
    """(transactions committed or rolled back, rows inserted) in this database so far."""
    engine = engine_for(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(sa.text(
                "SELECT xact_commit + xact_rollback, tup_inserted FROM pg_stat_database "
                "WHERE datname = current_database()")).one()
    finally:
        engine.dispose()
    return int(row[0]), int(row[1])


def total_rows(url: str, count_sql: str) -> int:
    engine = engine_for(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(count_sql)).scalar_one())
    finally:
        engine.dispose()


@dataclass
class Run:
    name: str
    seconds: float
    created: int
    other: int
    errors: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    rows: int
    duplicates: int
    extra: str = ""
    #: server-side, per stored row (start-up and warm-up included): transactions, rows
    #: inserted
    xacts_per_row: float | None = None
    inserts_per_row: float | None = None

    def count_server(self, before: tuple[int, int], after: tuple[int, int],
                     stored: int) -> None:
        self.xacts_per_row = (after[0] - before[0]) / stored if stored else None
        self.inserts_per_row = (after[1] - before[1]) / stored if stored else None

    @property
    def rate(self) -> float:
        return self.created / self.seconds

    @property
    def lost(self) -> int:
        return max(0, self.created - self.rows)


def wrk(ports: list[int], *, seconds: int, connections: int, prefix: str,
        work: Path) -> tuple[int, int, int, float, float, float]:
    script = work / "ingest.lua"
    script.write_text(LUA)
    body = json.dumps(EVENT).replace('"%s"', '"EVENT_ID"')
    procs = []
    for n, port in enumerate(ports):
        env = dict(os.environ, BENCH_PREFIX=f"{prefix}-{n}", BENCH_BODY=body, BENCH_TOKEN=TOKEN)
        procs.append(subprocess.Popen(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
             "-s", str(script), f"http://127.0.0.1:{port}"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    created = other = errors = 0
    p50 = p99 = top = 0.0
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 60)
        match = re.search(r"RESULT created=(\d+) other=(\d+) requests=(\d+) errors=(\d+) "
                          r"p50=(\d+) p99=(\d+) max=(\d+)", out)
        if not match:
            raise RuntimeError(f"wrk said:\n{out}")
        c, o, _r, e, a, b, m = (int(x) for x in match.groups())
        created, other, errors = created + c, other + o, errors + e
        p50, p99, top = max(p50, a / 1000), max(p99, b / 1000), max(top, m / 1000)
    return created, other, errors, p50, p99, top


def measure(name: str, ports: list[int], count_rows: str, dup_sql: str, url: str, *,
            seconds: int, connections: int, work: Path, extra_sql: str | None = None) -> Run:
    wrk(ports, seconds=2, connections=connections, prefix=f"{name}-warm", work=work)
    engine = engine_for(url)
    with engine.connect() as conn:
        before = int(conn.execute(sa.text(count_rows)).scalar_one())
    created, other, errors, p50, p99, top = wrk(ports, seconds=seconds,
                                                connections=connections, prefix=name,
                                                work=work)
    time.sleep(1.0)  # requests in flight when wrk stopped
    with engine.connect() as conn:
        rows = int(conn.execute(sa.text(count_rows)).scalar_one()) - before
        duplicates = int(conn.execute(sa.text(dup_sql)).scalar_one())
        extra = str(conn.execute(sa.text(extra_sql)).scalar_one()) if extra_sql else ""
    engine.dispose()
    return Run(name, seconds, created, other, errors, p50, p99, top, rows, duplicates, extra)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=8, help="per instance")
    ap.add_argument("--workers", type=int, default=1, help="per instance")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--postgres", default=os.environ.get(
        "GATEWAY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    a = ap.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2
    print(f"machine: {machine()}; load average before: {load_average()}")
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp, \
            private_database(a.postgres) as url:
        work = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update({"GATEWAY_TWILIO_AUTH_TOKEN": AUTH, "GATEWAY_VEHICLE_API_TOKENS": TOKEN,
                    "GATEWAY_DATABASE_URL": url, "GATEWAY_LOG_LEVEL": "WARNING",
                    "PYTHONPATH": str(REPO)})
        settings = ["--workers", str(a.workers), "--threads", str(a.threads)]

        ports = [free_port(), free_port()]
        ours = [[sys.executable, "-m", "gateway", "serve", "--port", str(p), "--no-worker",
                 *settings] for p in ports]
        before = db_counters(url)
        with processes(ours[:1], env, work, ports[:1], "/readyz"), \
                processes(ours[1:], env, work, ports[1:], "/readyz"):
            runs.append(measure(
                "ours", ports, "SELECT count(*) FROM incidents",
                "SELECT count(*) - count(DISTINCT event_id) FROM incidents", url,
                seconds=a.seconds, connections=a.connections, work=work,
                extra_sql="SELECT (SELECT count(*) FROM incidents) - "
                          "(SELECT count(*) FROM outbox)"))
            server = "ours: " + next(
                (line for line in (work / "server-0.log").read_text().splitlines()
                 if "serving on" in line), "?")
        time.sleep(1.0)  # the servers' backends report their counters as they exit
        runs[-1].count_server(before, db_counters(url),
                              total_rows(url, "SELECT count(*) FROM incidents"))

        # the baselines' table, made once here: two baselines starting together race on
        # CREATE TABLE IF NOT EXISTS (a unique violation in pg_type)
        sys.path.insert(0, str(REPO / "bench"))
        from _serving_baselines import create_table

        create_table(url)
        for name, database in (("+insert", url), ("no db", None)):
            ports = [free_port(), free_port()]
            base = [[sys.executable, str(REPO / "bench" / "_serving_baselines.py"), "events",
                     "--port", str(p), *settings,
                     *(["--database-url", database] if database else [])] for p in ports]
            before = db_counters(url)
            with processes(base, env, work, ports, "/"):
                count_sql = ("SELECT count(*) FROM baseline_events" if database
                             else "SELECT 0")
                dup_sql = ("SELECT count(*) - count(DISTINCT event_id) FROM baseline_events"
                           if database else "SELECT 0")
                runs.append(measure(name, ports, count_sql, dup_sql, url,
                                    seconds=a.seconds, connections=a.connections, work=work))
            if database:
                time.sleep(1.0)
                runs[-1].count_server(before, db_counters(url), total_rows(url, count_sql))

    print(f"load average after: {load_average()}")
    print(f"load: wrk, 1 thread and {a.connections} connections per instance, 2 instances, "
          f"{a.seconds} s after a 2 s warm-up; servers: gunicorn gthread, {a.workers} "
          f"worker(s) x {a.threads} threads per instance, 127.0.0.1, PostgreSQL "
          f"{sa.engine.make_url(a.postgres).host}")
    print(server)
    print(f"{'':10}{'events/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'201s':>8}"
          f"{'rows':>8}{'lost':>6}{'dup':>5}{'non-201':>9}{'errors':>8}")
    for r in runs:
        rows = str(r.rows) if r.name != "no db" else "-"
        print(f"{r.name:10}{r.rate:10.0f}{r.p50_ms:9.1f}{r.p99_ms:9.1f}{r.max_ms:9.1f}"
              f"{r.created:8d}{rows:>8}{r.lost if r.name != 'no db' else 0:6d}"
              f"{r.duplicates:5d}{r.other:9d}{r.errors:8d}")
    ours_run = runs[0]
    for r in runs[1:]:
        print(f"ratio ours / {r.name}: {ours_run.rate / r.rate:.2f}x events/s "
              f"(goal >= 0.5x)")
    for r in runs:
        if r.xacts_per_row is not None and r.inserts_per_row is not None:
            print(f"server counters, {r.name}: {r.xacts_per_row:.3f} transactions and "
                  f"{r.inserts_per_row:.2f} rows inserted per stored event "
                  f"(start-up and warm-up included)")
    print(f"ours: incidents without their outbox row: {ours_run.extra}")
    ok = (ours_run.lost == 0 and ours_run.duplicates == 0 and ours_run.extra == "0"
          and ours_run.other == 0)
    print("none lost or duplicated" if ok else "LOST, DUPLICATED OR REFUSED EVENTS: see above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
