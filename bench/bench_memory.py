#!/usr/bin/env python3
"""Benchmark (4) of issue 10: memory per worker and cold start, ours vs a bare
Flask + twilio worker, same run.

    .venv/bin/python bench/bench_memory.py [--lookups 10000] [--repeat 3] [--root PATH]

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
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
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
    a = ap.parse_args()
    if not pathlib.Path("/proc/self/smaps_rollup").exists():
        raise SystemExit("needs Linux (/proc/<pid>/smaps_rollup)")
    root = a.root.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update({
            "GATEWAY_TWILIO_AUTH_TOKEN": TOKEN,
            "GATEWAY_PUBLIC_URL": "http://127.0.0.1",
            "GATEWAY_DATABASE_URL": f"sqlite:///{tmp}/gateway.sqlite3",
            "PYTHONPATH": str(root),
        })
        if os.environ.get("GATEWAY_CACHE_DIR"):
            env["GATEWAY_CACHE_DIR"] = os.environ["GATEWAY_CACHE_DIR"]
        # a first start outside the measurement: expands the boundary pack into the
        # cache if this checkout has never been loaded (a one-off, ~3 s)
        Worker("ours", env, pathlib.Path(tmp)).stop()
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

    print(f"machine: {machine()}")
    print(f"ours: {root}; MB from /proc/<pid>/smaps_rollup; cold start and memory at "
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


if __name__ == "__main__":
    main()
