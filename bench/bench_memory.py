#!/usr/bin/env python3
"""Benchmark (4) of issue 10: memory per worker and cold start, ours vs a bare
Flask + twilio worker, same run.

    .venv/bin/python bench/bench_memory.py [--lookups 10000] [--repeat 3] [--root PATH]
        [--installed] [--no-gunicorn] [--gunicorn-workers 2] [--requests 400]
        [--postgres-url URL]

Every worker is a fresh ``python`` process (the one running this script):

- (a) baseline: a bare Flask + twilio worker: one POST route that checks
  X-Twilio-Signature with twilio's RequestValidator and answers TwiML (as
  bench/_twiml_baseline.py), built, then one signed request answered through
  Flask's test client;
- ours without boundary data: ``create_app(locator=None)``, to tell the boundary
  data's share from the rest of the app's;
- (b) ours: ``gateway.app.create_app()`` with its boundary data and number plan
  (SQLite in a temp dir), one ``GET /healthz`` answered, one country lookup
  answered; then ``--lookups`` lookups (uniform on the sphere and near the borders
  and coasts of Europe), to show that reading the mapped boundary data grows shared,
  clean page cache and not private memory;
- (c) two of our workers alive together, each after the same lookups: the mapped
  file's pages are shared between them (Shared_Clean), so the second costs about
  what the first costs without the data.

Cold start = from just before the process is spawned to "ready" (app built, the
request and, for ours, the lookup answered), median of ``--repeat`` fresh starts.
Memory from /proc/<pid>/smaps_rollup when the worker is ready (and after the
lookups): RSS, USS (= Private_Clean + Private_Dirty: what would be freed if the
process exited), Private_Dirty (anonymous memory written by this process alone) and
PSS. Linux only.

``--root PATH`` runs our worker from another checkout (e.g. ``git worktree add
/tmp/before <commit>``), to compare formats in the same run.

Then the production shape (skipped with ``--no-gunicorn``): (d) ``python -m gateway
serve`` with ``--gunicorn-workers`` workers (gthread, ``preload_app``: the code, plan and
boundary data loaded in the master before the fork) on a private PostgreSQL database
(``--postgres-url``; SQLite refuses several workers, so without PostgreSQL one worker on
SQLite), against (a') the bare Flask + twilio app served by gunicorn the same way
(bench/_serving_baselines.py twiml: gateway.serving.gunicorn_settings, the app built in
each worker after the fork).  After ``--requests`` signed incoming-call webhooks (a
fresh CallSid each, a new connection each, 4 at a time) each worker's
/proc/<pid>/smaps_rollup is read: USS and Private_Dirty are what the worker holds
alone (pages it wrote since the fork included); pages still shared with the master
count in PSS only.  Start = spawn of the master to the first 200 (ours: ``/readyz``,
plan, boundary data and database checked; bare: a signed webhook), median of
``--repeat``.

Python bytecode: the workers run without PYTHONDONTWRITEBYTECODE and with a private
PYTHONPYCACHEPREFIX, so our modules are compiled once (by the first, unmeasured start)
as an installed wheel's are at install time; compiling ~250 modules at every start
would be a cost of this checkout, not of a deployment.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.server import stop_process

TOKEN = "bench-memory-auth-token-0123456789"

WORKER = r'''
import os, sys, time, math, random
mode = sys.argv[1]
if mode == "bare":
    from flask import Flask, Response, request
    from twilio.request_validator import RequestValidator
    from twilio.twiml.voice_response import Dial, VoiceResponse
    app = Flask("bare")
    validator = RequestValidator(os.environ["GATEWAY_TWILIO_AUTH_TOKEN"])
    @app.post("/twilio/voice")
    def voice():
        url = "http://127.0.0.1" + request.full_path.rstrip("?")
        if not validator.validate(url, request.form, request.headers.get("X-Twilio-Signature", "")):
            return Response("invalid signature\n", status=403, mimetype="text/plain")
        r = VoiceResponse()
        r.say("Connecting you to the assistance centre.", language="en-GB")
        d = Dial(timeout=20)
        d.number("+442079460999")
        r.append(d)
        return Response(str(r), status=200, mimetype="text/xml")
    form = {"CallSid": "CA" + "0" * 32, "From": "+46700000000", "To": "+442079460900"}
    sig = validator.compute_signature("http://127.0.0.1/twilio/voice", form)
    resp = app.test_client().post("/twilio/voice", data=form, headers={"X-Twilio-Signature": sig})
    assert resp.status_code == 200, resp.status_code
    lookup = None
else:
    from gateway.app import create_app
    app = create_app() if mode == "ours" else create_app(locator=None)
    resp = app.test_client().get("/healthz")
    assert resp.status_code in (200, 503), (resp.status_code, resp.get_data())
    loc = app.extensions["gateway"].locator
    lookup = None
    if mode == "ours":
        assert loc is not None, app.extensions["gateway"].problems
        assert loc.country_at(51.4383, 4.9269) == "BE"
        lookup = loc.country_at
print("ready", time.time(), flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "lookups" and lookup is not None:
        rnd = random.Random(1)
        n = int(cmd[1])
        for _ in range(n // 2):
            lookup(math.degrees(math.asin(rnd.uniform(-1, 1))), rnd.uniform(-180, 180))
            lookup(rnd.uniform(35, 60), rnd.uniform(-10, 30))
    print("done", flush=True)
    if cmd[0] == "quit":
        break
'''


def smaps(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0].rstrip(":")] = int(parts[1]) / 1024.0
    out["USS"] = out["Private_Clean"] + out["Private_Dirty"]
    return out


class Worker:
    def __init__(self, mode: str, env: dict[str, str], cwd: pathlib.Path) -> None:
        t0 = time.time()
        self.p = subprocess.Popen([sys.executable, "-c", WORKER, mode], env=env, cwd=cwd,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.p.stdout is not None
        line = self.p.stdout.readline().split()
        if not line or line[0] != "ready":
            self.p.kill()
            raise SystemExit(f"{mode} worker did not start (exit {self.p.wait()})")
        self.cold = float(line[1]) - t0

    def ask(self, cmd: str) -> None:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        self.p.stdout.readline()

    def mem(self) -> dict[str, float]:
        return smaps(self.p.pid)

    def stop(self) -> None:
        try:
            self.ask("quit")
        except (BrokenPipeError, OSError):
            pass
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.p.kill()


# -- (d) gunicorn workers, ours and bare, served as `serve` serves ------------------------

TO = "+442079460900"  # numbers/inbound.csv: the emergency number, any country
CALLER = "+46700000000"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def children(pid: int) -> list[int]:
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def signed_call(base: str) -> tuple[bytes, dict[str, str]]:
    from twilio.request_validator import RequestValidator

    params = {"CallSid": "CA" + uuid.uuid4().hex, "AccountSid": "AC" + "0" * 32,
              "From": CALLER, "To": TO, "Caller": CALLER, "Called": TO,
              "CallStatus": "ringing", "ApiVersion": "2010-04-01", "Direction": "inbound"}
    sig = RequestValidator(TOKEN).compute_signature(base + "/twilio/voice", params)
    return (urllib.parse.urlencode(params).encode(),
            {"X-Twilio-Signature": sig, "Content-Type": "application/x-www-form-urlencoded",
             "Connection": "close"})


def answer(base: str, what: str) -> int:
    """The status of one request (``call``: a signed incoming-call webhook); 0: none."""
    if what == "call":
        body, headers = signed_call(base)
        req = urllib.request.Request(base + "/twilio/voice", data=body, headers=headers)
    else:
        req = urllib.request.Request(base + what, headers={"Connection": "close"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            resp.read()
            status: int = resp.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def served(kind: str, env: dict[str, str], cwd: pathlib.Path, workers: int,
           requests: int) -> tuple[float, list[dict[str, float]], int, list[float]]:
    """Start ``kind`` under gunicorn, wait for its first 200, send ``requests`` signed
    webhooks, read each worker's memory, stop it (SIGTERM). Returns (seconds to the
    first 200, each worker's memory, webhooks answered 200, for ours each worker's
    seconds from the fork's post_worker_init to its app built, from its log)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(env, GATEWAY_PUBLIC_URL=base,
               GATEWAY_LOG_LEVEL="INFO" if kind == "ours" else "WARNING")
    if kind == "ours":
        cmd = [sys.executable, "-m", "gateway", "serve", "--port", str(port),
               "--workers", str(workers)]
        probe = "/readyz"
    else:
        cmd = [sys.executable, str(ROOT / "bench" / "_serving_baselines.py"), "twiml",
               "--port", str(port), "--workers", str(workers), "--public-url", base]
        env["PYTHONPATH"] = str(ROOT)  # the baseline imports gateway.serving's settings
        probe = "call"
    t0 = time.time()
    log = open(cwd / f"{kind}-{port}.log", "w")  # noqa: SIM115 -- closed below
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    try:
        while answer(base, probe) != 200:
            if p.poll() is not None or time.time() - t0 > 120:
                log.flush()
                tail = pathlib.Path(log.name).read_text()[-2000:]
                raise SystemExit(f"{kind} under gunicorn did not become ready: exit "
                                 f"{p.poll()}\n{tail}")
            time.sleep(0.02)
        start = time.time() - t0
        while len(children(p.pid)) < workers and time.time() - t0 < 120:
            time.sleep(0.05)
        ok = []
        lock = threading.Lock()

        def send(n: int) -> None:
            for _ in range(n):
                status = answer(base, "call")
                with lock:
                    ok.append(status == 200)

        threads = [threading.Thread(target=send, args=(requests // 4,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(0.5)  # steps written after the answer
        mems = [smaps(pid) for pid in children(p.pid)]
    finally:
        stop_process(p, timeout=30)
        log.close()
    built = [float(m.group(1)) for m in re.finditer(r"worker \d+ ready in ([\d.]+) s",
                                                     pathlib.Path(log.name).read_text())]
    return start, mems, sum(ok), built


def private_postgres(admin_url: str, name: str) -> str | None:
    """A fresh private database on the server of ``admin_url`` (None: not reachable)."""
    try:
        import psycopg

        parts = urllib.parse.urlsplit(admin_url)
        server = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/postgres", "", ""))
        with psycopg.connect(server, autocommit=True, connect_timeout=2) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {name}")
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, f"/{name}", "", ""))
    except Exception as exc:  # noqa: BLE001 -- optional: say why and go on
        print(f"PostgreSQL not used: {type(exc).__name__}: {exc}")
        return None


def drop_postgres(admin_url: str, name: str) -> None:
    import psycopg

    parts = urllib.parse.urlsplit(admin_url)
    server = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/postgres", "", ""))
    with psycopg.connect(server, autocommit=True, connect_timeout=2) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in
                pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.machine())
    mem = next(int(ln.split()[1]) for ln in pathlib.Path("/proc/meminfo").read_text().splitlines()
               if ln.startswith("MemTotal"))
    return (f"{cpu}, {os.cpu_count()} cores, {mem / 2**20:.0f} GiB, Python "
            f"{platform.python_version()}, {platform.system()} {platform.release()}, "
            f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def row(name: str, cold: float | None, m: dict[str, float]) -> str:
    c = f"{cold:6.2f} s" if cold is not None else " " * 8
    return (f"{name:34} {c} {m['Rss']:7.1f} {m['USS']:7.1f} {m['Private_Dirty']:8.1f} "
            f"{m['Pss']:7.1f} {m['Shared_Clean']:7.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lookups", type=int, default=10000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--root", type=pathlib.Path, default=ROOT,
                    help="checkout to run our worker from (default: this one)")
    ap.add_argument("--installed", action="store_true",
                    help="run the gateway installed in this interpreter's environment "
                         "(e.g. a venv with `pip install .[postgres]`: no test tools), "
                         "not a checkout")
    ap.add_argument("--no-gunicorn", action="store_true",
                    help="skip (d): workers under gunicorn, ours and bare")
    ap.add_argument("--gunicorn-workers", type=int, default=2)
    ap.add_argument("--requests", type=int, default=400,
                    help="signed webhooks sent to each gunicorn server before measuring")
    ap.add_argument("--postgres-url", default=os.environ.get(
        "GATEWAY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a PostgreSQL server; a private database helper_mem is made and dropped")
    a = ap.parse_args()
    if not pathlib.Path("/proc/self/smaps_rollup").exists():
        raise SystemExit("needs Linux (/proc/<pid>/smaps_rollup)")
    root = a.root.resolve()
    if a.installed:
        import gateway

        where = pathlib.Path(gateway.__file__).parent
        if where.is_relative_to(ROOT):
            raise SystemExit(f"--installed: this interpreter's gateway is the checkout "
                             f"({where}); run the bench with the venv it is installed in")
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("GATEWAY_", "PROMETHEUS_", "PYTHONDONTWRITEBYTECODE"))}
        env.update({
            "GATEWAY_TWILIO_AUTH_TOKEN": TOKEN,
            "GATEWAY_PUBLIC_URL": "http://127.0.0.1",
            "GATEWAY_DATABASE_URL": f"sqlite:///{tmp}/gateway.sqlite3",
            "PYTHONPYCACHEPREFIX": f"{tmp}/pycache",
        })
        if not a.installed:
            env["PYTHONPATH"] = str(root)
        if os.environ.get("GATEWAY_CACHE_DIR"):
            env["GATEWAY_CACHE_DIR"] = os.environ["GATEWAY_CACHE_DIR"]
        # first starts outside the measurement: compile the bytecode into the private
        # prefix, and expand the boundary pack into the cache if this checkout has never
        # been loaded (a one-off, ~3 s)
        for mode in ("bare", "ours", "nogeo"):
            Worker(mode, env, pathlib.Path(tmp)).stop()
        modes = ("bare", "nogeo", "ours")
        colds: dict[str, list[float]] = {m: [] for m in modes}
        mems: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        for _ in range(a.repeat):
            for mode in modes:
                w = Worker(mode, env, pathlib.Path(tmp))
                colds[mode].append(w.cold)
                mems[mode].append(w.mem())
                w.stop()
        cold = {k: statistics.median(v) for k, v in colds.items()}

        def med(ms: list[dict[str, float]]) -> dict[str, float]:
            return {k: statistics.median(m[k] for m in ms) for k in ms[0]}

        bare = med(mems["bare"])
        nogeo = med(mems["nogeo"])
        ours = med(mems["ours"])
        one = Worker("ours", env, pathlib.Path(tmp))
        one.ask(f"lookups {a.lookups}")
        ours_after = one.mem()
        two = Worker("ours", env, pathlib.Path(tmp))
        two.ask(f"lookups {a.lookups}")
        first_c, second_c = one.mem(), two.mem()
        one.stop()
        two.stop()
        gun: dict[str, tuple[float, dict[str, float], int]] = {}
        if not a.no_gunicorn:
            gun = gunicorn_part(a, env, pathlib.Path(tmp))

    print(f"machine: {machine()}")
    print(f"ours: {'installed: ' + str(where) if a.installed else root}; MB from /proc/<pid>/smaps_rollup; cold start and memory at "
          f"ready: median of {a.repeat} fresh starts")
    print(f"{'':34} {'cold':>8} {'RSS':>7} {'USS':>7} {'PrivDirty':>8} {'PSS':>7} "
          f"{'ShClean':>7}")
    print(row("(a) bare Flask + twilio worker", cold["bare"], bare))
    print(row("    ours without boundary data", cold["nogeo"], nogeo))
    print(row("(b) ours, ready", cold["ours"], ours))
    print(row(f"    ours, after {a.lookups} lookups", None, ours_after))
    print(row(f"(c) two of ours, 1st, {a.lookups} lookups", None, first_c))
    print(row(f"    two of ours, 2nd, {a.lookups} lookups", None, second_c))
    print(f"ratio ours/bare at ready: RSS {ours['Rss'] / bare['Rss']:.2f}x, USS "
          f"{ours['USS'] / bare['USS']:.2f}x, Private_Dirty "
          f"{ours['Private_Dirty'] / bare['Private_Dirty']:.2f}x, cold start "
          f"{cold['ours'] / cold['bare']:.2f}x")
    print(f"ours - bare, private memory: USS {ours['USS'] - bare['USS']:+.1f} MB at ready, "
          f"{ours_after['USS'] - bare['USS']:+.1f} MB after the lookups; Private_Dirty "
          f"{ours['Private_Dirty'] - bare['Private_Dirty']:+.1f} / "
          f"{ours_after['Private_Dirty'] - bare['Private_Dirty']:+.1f} MB (goal: within 40 MB)")
    print(f"the boundary data's share: USS {ours['USS'] - nogeo['USS']:+.1f} MB, Private_Dirty "
          f"{ours['Private_Dirty'] - nogeo['Private_Dirty']:+.1f} MB, cold start "
          f"{cold['ours'] - cold['nogeo']:+.2f} s (ours minus ours without boundary data)")
    print(f"second worker alongside the first: USS {second_c['USS']:.1f} MB "
          f"(Private_Dirty {second_c['Private_Dirty']:.1f}), its mapped pages shared "
          f"{second_c['Shared_Clean']:.1f} MB; cold start goal < 1 s: ours "
          f"{cold['ours']:.2f} s")


    if gun:
        print(f"(d) under gunicorn ({a.gunicorn_workers} worker(s), gthread, preload_app, as "
              f"`serve`), after {a.requests} signed webhooks each; per worker, median over "
              f"workers and {a.repeat} starts; start = spawn to the first 200")
        print(f"{'':34} {'start':>8} {'RSS':>7} {'USS':>7} {'PrivDirty':>8} {'PSS':>7} "
              f"{'ShClean':>7}")
        gb, go = gun["bare"], gun["ours"]
        print(row("(a') bare, gunicorn worker", gb[0], gb[1]) + f"  {gb[2]} answered")
        print(row("(d) ours, gunicorn worker", go[0], go[1]) + f"  {go[2]} answered")
        print(f"ratio ours/bare per gunicorn worker: USS {go[1]['USS'] / gb[1]['USS']:.2f}x "
              f"({go[1]['USS'] - gb[1]['USS']:+.1f} MB), Private_Dirty "
              f"{go[1]['Private_Dirty'] - gb[1]['Private_Dirty']:+.1f} MB, PSS "
              f"{go[1]['Pss'] - gb[1]['Pss']:+.1f} MB (goal: within 40 MB); start "
              f"{go[0] / gb[0]:.2f}x")
        if a.worker_built is not None:
            print(f"ours: a worker's app built after the fork (its log, median of "
                  f"{a.repeat * a.gunicorn_workers}) in {a.worker_built:.2f} s")
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def gunicorn_part(a: argparse.Namespace, env: dict[str, str], tmp: pathlib.Path) -> dict[str, tuple[float, dict[str, float], int]]:
    """(d): both under gunicorn, alternating, ``--repeat`` times; medians."""
    workers = a.gunicorn_workers
    db = "helper_mem"
    url = private_postgres(a.postgres_url, db) if workers > 1 else None
    if url is None and workers > 1:
        print("several workers need PostgreSQL: one worker on SQLite")
        workers = 1
    genv = dict(env, GATEWAY_DATABASE_URL=url or env["GATEWAY_DATABASE_URL"])
    if url is not None:
        print(f"(d) on PostgreSQL (private database {db})")
    starts: dict[str, list[float]] = {"bare": [], "ours": []}
    mems: dict[str, list[dict[str, float]]] = {"bare": [], "ours": []}
    answered: dict[str, list[int]] = {"bare": [], "ours": []}
    built: list[float] = []
    try:
        for kind in ("bare", "ours"):  # unmeasured: bytecode of gunicorn's modules
            served(kind, genv, tmp, workers, 8)
        for _ in range(a.repeat):
            for kind in ("bare", "ours"):
                start, ms, ok, b = served(kind, genv, tmp, workers, a.requests)
                built.extend(b)
                starts[kind].append(start)
                mems[kind].extend(ms)
                answered[kind].append(ok)
    finally:
        if url is not None:
            drop_postgres(a.postgres_url, db)
    a.gunicorn_workers = workers
    a.worker_built = statistics.median(built) if built else None
    return {k: (statistics.median(starts[k]),
                {f: statistics.median(m[f] for m in mems[k]) for f in mems[k][0]},
                min(answered[k])) for k in starts}


if __name__ == "__main__":
    main()
