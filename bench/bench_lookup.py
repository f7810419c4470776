#!/usr/bin/env python3
"""Benchmark: our boundary lookup vs reverse_geocoder, same run, same points.

    .venv/bin/python bench/bench_lookup.py [--points 20000] [--before PATH]

Prints, for each: load time, median and p99 microseconds per single-point call
(warm; points uniform on the sphere, and separately the hard set, which is all
borders and coasts), and accuracy on tests/data/hard_points.csv. reverse_geocoder
(nearest of ~150k GeoNames places) has no notion of sea, so on the at-sea hard
points it is counted wrong whatever it says; its accuracy on the land points is
printed too.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import pathlib
import random
import statistics
import sys
import time
from collections.abc import Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HARD = ROOT / "tests" / "data" / "hard_points.csv"


def timings(f: Callable[[float, float], object], pts: list[tuple[float, float]]) -> list[float]:
    for a, b in pts[:2000]:  # warm up
        f(a, b)
    out = []
    clock = time.perf_counter_ns
    for a, b in pts:
        t = clock()
        f(a, b)
        out.append((clock() - t) / 1000.0)
    return out


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--before", type=pathlib.Path, help="another checkout to time as well")
    a = ap.parse_args()

    rnd = random.Random(a.seed)
    pts = [(math.degrees(math.asin(rnd.uniform(-1, 1))), rnd.uniform(-180, 180))
           for _ in range(a.points)]
    with HARD.open(newline="") as fh:
        hard = list(csv.DictReader(fh))
    hard_pts = [(float(r["lat"]), float(r["lon"])) for r in hard] * 50

    from gateway.geo import load_locator

    t = time.perf_counter()
    loc = load_locator()
    load_ours = time.perf_counter() - t
    print(f"ours: {loc.where}")
    contenders: list[tuple[str, Callable[[float, float], object]]] = [("ours", loc.country_at)]
    load_before = None
    if a.before is not None:
        spec = importlib.util.spec_from_file_location(
            "_before_boundaries", a.before / "gateway" / "geo" / "boundaries.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        t = time.perf_counter()
        before = mod.load_locator()
        load_before = time.perf_counter() - t
        contenders.append(("before", before.country_at))

    import reverse_geocoder as rg

    t = time.perf_counter()
    rgeo = rg.RGeocoder(mode=1, verbose=False)  # single process: fair for single calls
    rgeo.query([(0.0, 0.0)])
    load_rg = time.perf_counter() - t

    def rg_one(lat: float, lon: float) -> str:
        return str(rgeo.query([(lat, lon)])[0]["cc"])

    results = {}
    for name, f in [*contenders, ("reverse_geocoder", rg_one)]:
        rand_t = timings(f, pts)
        hard_t = timings(f, hard_pts)
        ok = ok_land = n_land = 0
        wrong = []
        for r in hard:
            exp = r["expected"] or None
            got = f(float(r["lat"]), float(r["lon"])) or None
            ok += got == exp
            if exp:
                n_land += 1
                ok_land += got == exp
            if got != exp:
                wrong.append(f"{r['lat']},{r['lon']} expected {exp} got {got}")
        results[name] = (rand_t, hard_t, ok, ok_land, n_land, wrong)

    print(f"points: {len(pts)} uniform on the sphere (seed {a.seed}); hard set: {len(hard)} "
          f"points x 50 for timing")
    print(f"load: ours {load_ours:.2f} s, reverse_geocoder {load_rg:.2f} s"
          + (f", before {load_before:.2f} s ({a.before})" if load_before is not None else ""))
    print(f"{'':18} {'rand med':>9} {'rand p99':>9} {'hard med':>9} {'hard p99':>9} "
          f"{'hard acc':>9} {'land acc':>9}")
    for name, (rt, ht, ok, okl, nl, _) in results.items():
        print(f"{name:18} {statistics.median(rt):8.2f}u {pct(rt, .99):8.2f}u "
              f"{statistics.median(ht):8.2f}u {pct(ht, .99):8.2f}u "
              f"{ok / len(hard):8.1%} {okl / nl:8.1%}")
    o, r = results["ours"], results["reverse_geocoder"]
    print(f"ratio reverse_geocoder/ours: median {statistics.median(r[0]) / statistics.median(o[0]):.1f}x"
          f" (random), {statistics.median(r[1]) / statistics.median(o[1]):.1f}x (hard); "
          f"p99 {pct(r[0], .99) / pct(o[0], .99):.1f}x (random)")
    if "before" in results:
        b = results["before"]
        print(f"ratio before/ours: median {statistics.median(b[0]) / statistics.median(o[0]):.2f}x "
              f"(random), {statistics.median(b[1]) / statistics.median(o[1]):.2f}x (hard); p99 "
              f"{pct(b[0], .99) / pct(o[0], .99):.2f}x (random), "
              f"{pct(b[1], .99) / pct(o[1], .99):.2f}x (hard)")
    for name, res in results.items():
        if res[5]:
            print(f"\n{name} wrong on {len(res[5])} hard points:")
            for w in res[5]:
                print("  " + w)


if __name__ == "__main__":
    main()
