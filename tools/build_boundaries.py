#!/usr/bin/env python3
"""Build ``gateway/geo/data/boundaries.bin`` from OpenStreetMap maritime borders.

Not run in CI: the output is committed. Needs ``pip install '.[geo-build]'``
(shapely, numpy; the served lookup needs neither). To regenerate::

    mkdir -p /tmp/osmb && cd /tmp/osmb
    npm pack @osm_borders/maritime_10m@1.1.0          # ODbL, (c) OpenStreetMap contributors
    tar xzf osm_borders-maritime_10m-1.1.0.tgz
    npm pack @geo-maps/earth-lands-10m@0.6.0          # OSM land polygons, ODbL (Antarctica, SBAs)
    mkdir lands && tar xzf geo-maps-earth-lands-10m-0.6.0.tgz -C lands
    cd /work/main
    .venv/bin/pip install "timezonefinder==9.0.0"      # Northern Cyprus and SBA outlines
    .venv/bin/python tools/build_boundaries.py /tmp/osmb/package/borders.geo.json \
        --lands /tmp/osmb/lands/package/map.geo.json   # 4-6 min, ~3 GB peak

    (timezonefinder 9.0.0 with timezonefinder-data 3.2026.3.post1 reproduces the
    grid model byte for byte: --v1-out writes it as format 1 to compare.)

    # or, without the sources: convert the format 1 file committed before format 2
    git show 8a5c0eb:gateway/geo/data/boundaries.bin > /tmp/v1.bin
    .venv/bin/python tools/build_boundaries.py --from-v1 /tmp/v1.bin   # ~4 min + ~2 min xz

    # optional: regenerate the committed reference sample of an independent
    # source (iD editor's hand-drawn borders) used by the integration test
    (cd /tmp/osmb && npm install @rapideditor/country-coder@5.6.1)   # pulls which-polygon
    .venv/bin/python tools/build_boundaries.py --reference-only \
        --country-coder /tmp/osmb/node_modules/@rapideditor/country-coder/dist/country-coder.cjs

What it does (see docs/country-lookup.md):

1. reads every admin_level=2 feature (land + 12 nm territorial waters) of the
   ``@osm_borders/maritime_10m`` package; ISO alpha-2 from ``isoA2`` (the three
   Dutch Caribbean features without one get BQ, CW, SX from their alpha-3);
2. replaces the source's AQ feature (the whole box south of 60 S, open sea
   included) by the Antarctic land of the OSM land polygons (ice shelves are
   land there) plus 12 nm plus the polar cap, and gives the UK Sovereign Base
   Areas on Cyprus (in no feature of the source) and 12 nm from their coast to
   CY (policy: docs/country-lookup.md);
   then adds the de-facto overrides listed in ``OVERRIDES`` (disputed areas);
3. orders the features by priority: explicit ``RANK`` first, then by area,
   smallest first, so a territory wins over a parent feature that also covers it
   (FR covers its overseas departments, NL the Caribbean islands, ...) and the
   10 m simplification slivers along land borders go to the smaller country;
4. cuts the world into 1 degree cells, each either one code (or sea), or split
   again into 32 x 32 sub-cells, each one code (or sea) or a short ordered list
   of candidate polygons (the feature clipped to the 1 degree cell);
5. quantises coordinates to 1e-7 deg (about 1 cm): that is the grid model
   (format 1's content);
6. format 2 (docs/country-lookup.md, "Format 2"): a quadtree under each mixed
   sub-cell down to nodes with at most K_EDGES candidate edges, flat int32 arrays
   in one memory-mappable map file (gateway/geo/mapfile.py), checked against GEOS
   on the grid model (--check), written as an xz pack with the map's SHA-256.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import math
import pathlib
import subprocess
import sys
import time
from fractions import Fraction

import numpy as np
import shapely

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.geo.mapfile import (
    CODE_BITS,
    CODE_MASK,
    NODE,
    RUN_BITS,
    RUN_MAX,
    encode_map,
    pack_header,
)

OUT = ROOT / "gateway" / "geo" / "data" / "boundaries.bin"
REFERENCE_OUT = ROOT / "tests" / "data" / "geo_reference_points.csv"
MAGIC = b"GWGEO1\n"
SOURCE = ("osm-maritime-boundaries (@osm_borders/maritime_10m 1.1.0, ODbL; "
          "AQ and the Cyprus SBAs from OSM land polygons, @geo-maps/earth-lands-10m 0.6.0, ODbL)")
SUB = 32  # sub-cells per degree in a mixed cell
QUANT = 10_000_000  # 1e-7 degree

ALPHA3_FALLBACK = {"BES": "BQ", "CUW": "CW", "SXM": "SX"}

# Lower rank = checked first. Everything not listed has rank 100 and is then
# ordered by area (smallest first).
RANK: dict[str, int] = {}

# Disputed areas whose de-facto answering service differs from the source's
# code. (code, outline provider, description)
OVERRIDES = [
    ("RU", "overlap:RU/UA",
     ("Crimea and Sevastopol: inside both the RU and the UA features of the source; "
      "de facto the Russian emergency services (112 over Russian operators) answer")),
    ("UM", ("parts:US@19.28,166.65;28.21,-177.37;16.73,-169.53;0.19,-176.48;"
            "0.81,-176.62;-0.37,-160.02;5.88,-162.08;6.40,-162.40;18.40,-75.01"),
     ("US Minor Outlying Islands (Wake, Midway, Johnston, Baker, Howland, Jarvis, "
      "Palmyra, Kingman, Navassa): own ISO code, no UM feature in the source, so the "
      "US feature's islands within 0.5 deg of these atolls")),
    ("TR", "tz:Asia/Famagusta",
     ("Northern Cyprus: north of the Green Line, Turkish numbering (+90 392); "
      "the services that answer are the Turkish-Cypriot ones reached through it")),
]


def log(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


def polygonal(g: shapely.Geometry) -> shapely.Geometry:
    """Only the polygonal part of g, as a MultiPolygon (possibly empty)."""
    parts = shapely.get_parts(g)
    polys: list[shapely.Geometry] = []
    for p in parts:
        t = shapely.get_type_id(p)
        if t == 3:
            polys.append(p)
        elif t == 6:
            polys.extend(shapely.get_parts(p))
        elif t == 7:
            sub = polygonal(p)
            polys.extend(shapely.get_parts(sub))
    return shapely.MultiPolygon([p for p in polys if not p.is_empty])


def load_osm(path: pathlib.Path) -> list[tuple[str, shapely.Geometry]]:
    data = json.loads(path.read_text())
    out = []
    for f in data["features"]:
        props = f["properties"]
        code = props.get("isoA2") or ALPHA3_FALLBACK.get(props["isoA3"])
        if not code or len(code) != 2:
            raise SystemExit(f"no alpha-2 code for {props}")
        g = polygonal(shapely.from_geojson(json.dumps(f["geometry"])))
        if not g.is_valid:
            log(f"  {code}: invalid ({shapely.is_valid_reason(g)}), repairing")
            g = polygonal(shapely.make_valid(g, method="structure", keep_collapsed=False))
        out.append((code.upper(), g))
    return out


def override_outline(
    provider: str, feats: list[tuple[str, shapely.Geometry]]
) -> shapely.Geometry:
    kind, name = provider.split(":", 1)
    if kind == "parts":
        parent, spots = name.split("@")
        pg = next(g for c, g in feats if c == parent)
        pts = [shapely.Point(float(b), float(a)) for a, b in
               (x.split(",") for x in spots.split(";"))]
        near = shapely.union_all([shapely.buffer(p, 0.5) for p in pts])
        parts = [q for q in shapely.get_parts(pg) if shapely.intersects(q.centroid, near)]
        return polygonal(shapely.union_all(parts))
    if kind == "overlap":
        a, b = name.split("/")
        ga = next(g for c, g in feats if c == a)
        gb = next(g for c, g in feats if c == b)
        return polygonal(shapely.intersection(ga, gb))
    assert kind == "tz"
    from timezonefinder import TimezoneFinder  # build-time only

    polys = []
    for poly in TimezoneFinder().get_geometry(tz_name=name, coords_as_pairs=False):
        rings = [list(zip(xs, ys)) for xs, ys in poly]
        polys.append(shapely.Polygon(rings[0], rings[1:]))
    return polygonal(shapely.make_valid(shapely.MultiPolygon(polys)))


# Features whose sea extent in the source goes beyond 12 nm (EC: the old
# 200 nm territorial-sea claim); clipped to the same country's time-zone polygons (which carry the
# 12 nm territorial sea), keeping the OSM line within 0.1 deg of the listed
# neighbours so land borders stay OSM's.
SEA_CLIPS = {
    "EC": (("America/Guayaquil", "Pacific/Galapagos"), ("PE", "CO")),
    # VE: found by the random-point comparison, up to 50 km beyond 12 nm off
    # the central coast.
    "VE": (("America/Caracas",), ("CO", "GY", "BR", "TT", "AW", "CW", "BQ")),
}


def tz_outline(zones: tuple[str, ...]) -> shapely.Geometry:
    return shapely.union_all([override_outline("tz:" + z, []) for z in zones])


def clip_sea_claims(feats: list[tuple[str, shapely.Geometry]]) -> list[tuple[str, shapely.Geometry]]:
    out = []
    byc = dict(feats)
    for code, g in feats:
        if code in SEA_CLIPS:
            zones, neighbours = SEA_CLIPS[code]
            keep = shapely.union_all(
                [tz_outline(zones)] + [shapely.buffer(byc[n], 0.1) for n in neighbours]
            )
            new = polygonal(shapely.intersection(g, keep))
            log(f"  {code}: sea claim clipped {approx_km2(g):.0f} -> {approx_km2(new):.0f} km2")
            g = new
        out.append((code, g))
    return out


def absorb_parent_leftovers(
    feats: list[tuple[str, shapely.Geometry]],
) -> list[tuple[str, shapely.Geometry]]:
    """Some parent features (FR, NL, US, ...) also cover their territories, with a
    slightly larger sea extent than the territory's own feature. Give such
    leftover pieces (parent minus every other feature) that touch a territory and
    lie away from the parent's main body to that territory, so that we never
    answer FR off Guadeloupe."""
    geoms = np.array([g for _, g in feats], dtype=object)
    tree = shapely.STRtree(geoms)
    extra: dict[int, list[shapely.Geometry]] = {}
    for pi, (pcode, pg) in enumerate(feats):
        kids = [
            int(k) for k in tree.query(pg, predicate="intersects")
            if k != pi and geoms[k].area < pg.area
            and shapely.intersection(geoms[k], pg).area > 0.5 * geoms[k].area
        ]
        if not kids:
            continue
        others = shapely.union_all(
            [geoms[k] for k in tree.query(pg, predicate="intersects") if k != pi]
        )
        left = shapely.get_parts(polygonal(shapely.difference(pg, others)))
        main = max(shapely.get_parts(pg), key=lambda q: q.area)
        for comp in left:
            if shapely.intersects(comp, main):
                continue
            near = [k for k in kids if shapely.distance(comp, geoms[k]) < 1e-7]
            if len(near) == 1:
                k = near[0]
                extra.setdefault(k, []).append(comp)
                if approx_km2(comp) >= 1.0:
                    log(f"  {pcode} leftover {approx_km2(comp):.0f} km2 at "
                        f"({comp.centroid.y:.2f},{comp.centroid.x:.2f}) -> {feats[k][0]}")
    out = []
    for i, (c, g) in enumerate(feats):
        if i in extra:
            g = polygonal(shapely.union_all([g] + extra[i]))
        out.append((c, g))
    return out


def approx_km2(g: shapely.Geometry) -> float:
    c = g.centroid
    return float(g.area) * 111.32**2 * math.cos(math.radians(c.y if not c.is_empty else 0.0))


# ---- land-based fixes (Antarctica, Sovereign Base Areas) ----------------------
# The maritime file has no usable coastline for these two places, so both are
# derived from OSM land polygons (@geo-maps/earth-lands-10m, ODbL, coastline
# simplified to 10 m; Antarctic ice shelves are land in OSM) plus a 12 nm belt.

EARTH_R_KM = 6371.0088  # mean Earth radius
TERRITORIAL_KM = 12 * 1.852  # 12 nautical miles


def load_land(path: pathlib.Path, boxes: dict[str, tuple[float, float, float, float]],
              ) -> dict[str, shapely.Geometry]:
    """The land polygons of the earth-lands GeoJSON that intersect each named
    (lon0, lat0, lon1, lat1) box, repaired, as one MultiPolygon per box."""
    data = json.loads(path.read_text())
    geoms = data["geometries"] if "geometries" in data else [f["geometry"] for f in data["features"]]
    parts = np.concatenate([shapely.get_parts(shapely.from_geojson(json.dumps(g))) for g in geoms])
    tree = shapely.STRtree(parts)
    out = {}
    for name, box in boxes.items():
        # clip first: the continents' polygons (millions of points) touch a small box
        sel = [shapely.make_valid(shapely.clip_by_rect(parts[i], *box))
               for i in tree.query(shapely.box(*box))]
        out[name] = polygonal(shapely.union_all(sel))
        log(f"  land {name}: {len(sel)} polygons, {shapely.get_num_coordinates(out[name])} points")
    return out


# Antarctica -----------------------------------------------------------------
# The maritime file's AQ feature is the whole Antarctic Treaty box (60 S to
# 85.05 S), open ocean included. AQ is rebuilt as the land (ice shelves
# included) plus 12 nm, buffered in a polar stereographic projection (sphere,
# true scale at 71 S) with the distance corrected for the projection's scale in
# 2-degree latitude bands (residual error < 0.5 %, ~100 m), then the polar cap
# that the Web-Mercator-limited sources lack.
PS_K0 = (1.0 + math.sin(math.radians(71.0))) / 2.0
AQ_NORTH = -60.0  # ISO 3166 AQ / Antarctic Treaty area: south of 60 S
AQ_CAP = -84.9  # south of this: all ice sheet, added as a box (source stops at 85.05 S)


def _ps_fwd(xy: np.ndarray) -> np.ndarray:
    rho = 2.0 * EARTH_R_KM * PS_K0 * np.tan(np.pi / 4.0 + np.radians(xy[:, 1]) / 2.0)
    lam = np.radians(xy[:, 0])
    return np.column_stack([rho * np.sin(lam), rho * np.cos(lam)])


def _ps_inv(xy: np.ndarray, lon0: float) -> np.ndarray:
    rho = np.hypot(xy[:, 0], xy[:, 1])
    lat = np.degrees(2.0 * np.arctan(rho / (2.0 * EARTH_R_KM * PS_K0)) - np.pi / 2.0)
    lon = np.degrees(np.arctan2(xy[:, 0], xy[:, 1]))
    lon = (lon - lon0 + 1e-7) % 360.0 + lon0 - 1e-7  # into this sector, 180 vs -180
    return np.column_stack([np.clip(lon, -180.0, 180.0), lat])


def _ps_scale(lat: float) -> float:
    return 2.0 * PS_K0 / (1.0 + math.sin(math.radians(abs(lat))))


def antarctica(land: shapely.Geometry) -> shapely.Geometry:
    land = polygonal(shapely.intersection(land, shapely.box(-180.0, -90.0, 180.0, AQ_NORTH)))
    buffers = []
    for lon0 in range(-180, 180, 90):
        for lat0 in range(-86, -58, 2):
            piece = polygonal(shapely.intersection(land, shapely.box(lon0, lat0, lon0 + 90, lat0 + 2)))
            if piece.is_empty:
                continue
            pxy = shapely.transform(shapely.segmentize(piece, 0.02), _ps_fwd)
            d = TERRITORIAL_KM * _ps_scale(lat0 + 1.0)
            buffers.append(shapely.buffer(pxy, d, quad_segs=8))
    region = shapely.simplify(shapely.union_all(buffers), 0.02)  # km
    pieces = []
    for lon0 in range(-180, 180, 45):
        wedge = shapely.transform(
            shapely.segmentize(shapely.box(lon0, AQ_CAP, lon0 + 45, AQ_NORTH), 0.01), _ps_fwd)
        part = polygonal(shapely.intersection(region, wedge))
        if not part.is_empty:
            pieces.append(shapely.transform(part, lambda xy, l0=lon0: _ps_inv(xy, l0)))
    pieces.append(shapely.box(-180.0, -90.0, 180.0, AQ_CAP))
    aq = shapely.set_precision(shapely.union_all(pieces), 1.0 / QUANT)
    aq = polygonal(shapely.intersection(aq, shapely.box(-180.0, -90.0, 180.0, AQ_NORTH)))
    holes = sum(shapely.get_num_interior_rings(p) for p in shapely.get_parts(aq))
    log(f"  AQ: land + 12 nm: {len(shapely.get_parts(aq))} polygons, {holes} holes, "
        f"{shapely.get_num_coordinates(aq)} points, {approx_km2(aq):.0f} km2")
    return aq


# UK Sovereign Base Areas on Cyprus ------------------------------------------
# The CY feature leaves notches where the SBAs are (land, OSM's 3 nm SBA sea
# and the corridor out to 12 nm), and no feature covers them: they answered
# None. Policy (docs/country-lookup.md): they answer CY. Outline: the tz zone
# Asia/Nicosia (which includes the SBAs and their 3 nm sea) minus the CY feature
# and the Northern Cyprus outline; plus 12 nm from the SBA coast (land from the
# OSM land polygons). Expected: exactly the two SBAs, containing these points.
SBA_SPOTS = {"Akrotiri (Western SBA)": (34.590, 32.988), "Dhekelia (Eastern SBA)": (34.985, 33.830)}
CYPRUS_BOX = (32.0, 34.3, 34.7, 35.8)


def _local_buffer(g: shapely.Geometry, km: float, lat0: float) -> shapely.Geometry:
    """Buffer by km on the sphere, in a local equirectangular plane (fine over
    tens of km at the latitude of Cyprus)."""
    kx = EARTH_R_KM * math.radians(1.0) * math.cos(math.radians(lat0))
    ky = EARTH_R_KM * math.radians(1.0)
    fwd = shapely.transform(g, lambda xy: xy * np.array([kx, ky]))
    return shapely.transform(shapely.buffer(fwd, km, quad_segs=16), lambda xy: xy / np.array([kx, ky]))


def sovereign_base_areas(
    feats: list[tuple[str, shapely.Geometry]], cyprus_land: shapely.Geometry,
) -> shapely.Geometry:
    byc = dict(feats)
    north = override_outline("tz:Asia/Famagusta", feats)  # Northern Cyprus (TR override)
    nicosia = tz_outline(("Asia/Nicosia",))
    rest = polygonal(shapely.difference(nicosia, shapely.union(byc["CY"], north)))
    comps = [p for p in shapely.get_parts(rest) if approx_km2(p) > 1.0]  # drop slivers
    if len(comps) != len(SBA_SPOTS) or not all(
        any(shapely.intersects_xy(p, lon, lat) for p in comps) for lat, lon in SBA_SPOTS.values()
    ):
        raise SystemExit(f"SBA outline: expected {len(SBA_SPOTS)} areas at {SBA_SPOTS}, got "
                         f"{[(round(approx_km2(p)), p.centroid.y, p.centroid.x) for p in comps]}")
    sba = shapely.union_all(comps)
    land = polygonal(shapely.intersection(sba, cyprus_land))
    belt = _local_buffer(land, TERRITORIAL_KM, 34.8)
    box = shapely.box(*CYPRUS_BOX)
    others = [g for c, g in feats if c != "CY" and shapely.intersects(g, box)] + [north]
    add = polygonal(shapely.difference(shapely.union(sba, belt), shapely.union_all(others)))
    new = polygonal(shapely.difference(add, byc["CY"]))
    log(f"  SBAs: {approx_km2(land):.0f} km2 land, {approx_km2(sba):.0f} km2 with their 3 nm sea; "
        f"{approx_km2(new):.0f} km2 added to CY (land + 12 nm)")
    return add


def build(src: pathlib.Path, lands: pathlib.Path, out: pathlib.Path = OUT,
          v1_out: pathlib.Path | None = None, *, check: int = 200_000,
          map_out: pathlib.Path | None = None) -> None:
    t0 = time.time()
    feats = load_osm(src)
    log(f"read {len(feats)} features in {time.time() - t0:.1f}s")
    feats = clip_sea_claims(feats)
    land = load_land(lands, {"antarctica": (-180.0, -90.0, 180.0, AQ_NORTH),
                             "cyprus": CYPRUS_BOX})
    # AQ: the source's feature is the whole box south of 60 S (open ocean
    # answered AQ) and stops at 85.05 S (Web Mercator): replaced by the land
    # (ice shelves included) + 12 nm, plus the polar cap.
    feats = [(c, antarctica(land["antarctica"]) if c == "AQ" else g) for c, g in feats]
    # UK Sovereign Base Areas on Cyprus: in no feature (answered None) -> CY.
    sba = sovereign_base_areas(feats, land["cyprus"])
    feats = [(c, polygonal(shapely.union(g, sba)) if c == "CY" else g) for c, g in feats]
    feats = absorb_parent_leftovers(feats)
    extra = []
    for code, provider, desc in OVERRIDES:
        g = override_outline(provider, feats)
        log(f"override {code} from {provider}: {approx_km2(g):.0f} km2 ({desc})")
        extra.append((code, g, 0))
    entries = [(c, g, 0) for c, g, _ in extra] + [
        (c, g, RANK.get(c, 100)) for c, g in feats
    ]
    entries.sort(key=lambda e: (e[2], e[1].area))
    codes = [e[0] for e in entries]
    geoms = np.array([e[1] for e in entries], dtype=object)
    # overlap report (informative)
    tree = shapely.STRtree(geoms)
    pairs = tree.query(geoms, predicate="intersects")
    for a, b in pairs.T:
        if a < b:
            inter = shapely.intersection(geoms[a], geoms[b])
            km2 = approx_km2(inter) if not inter.is_empty else 0.0
            if km2 > 1.0:
                log(f"  overlap {codes[a]} (wins) / {codes[b]}: {km2:.0f} km2")

    # ---- 1 degree cells --------------------------------------------------
    xs = np.arange(-180, 180)
    ys = np.arange(-90, 90)
    gx, gy = np.meshgrid(xs, ys)  # row = lat index
    boxes = shapely.box(gx.ravel(), gy.ravel(), gx.ravel() + 1, gy.ravel() + 1)
    cell_pairs = tree.query(boxes, predicate="intersects")
    cand: dict[int, list[int]] = {}
    for cell, fi in cell_pairs.T:
        cand.setdefault(int(cell), []).append(int(fi))
    ncodes = len(set(codes))
    code_list = sorted(set(codes))
    code_idx = {c: i + 1 for i, c in enumerate(code_list)}  # 0 = sea
    base = np.zeros(360 * 180, dtype=np.int32)  # value < 1000: code idx; >= 1000: subgrid
    SUBOFF = 1000
    assert ncodes < SUBOFF
    subgrids: list[np.ndarray] = []
    leaf_lists: list[list[int]] = []  # piece ids, priority order
    leaf_ids: dict[tuple[int, ...], int] = {}
    pieces: list[shapely.Geometry] = []
    piece_code: list[int] = []
    t1 = time.time()
    for n, cell in enumerate(sorted(cand)):
        if n % 2000 == 0:
            log(f"  cell {n}/{len(cand)} {time.time() - t1:.0f}s pieces={len(pieces)}")
        box = boxes[cell]
        cl = []
        for fi in sorted(cand[cell]):  # entries are already in priority order
            piece = polygonal(shapely.intersection(geoms[fi], box))
            if piece.is_empty or piece.area <= 0:
                continue
            cl.append((fi, piece))
        if not cl:
            continue
        if shapely.covers(cl[0][1], box):
            base[cell] = code_idx[codes[cl[0][0]]]
            continue
        x0, y0 = float(gx.ravel()[cell]), float(gy.ravel()[cell])
        sx, sy = np.meshgrid(np.arange(SUB), np.arange(SUB))
        sboxes = shapely.box(
            x0 + sx.ravel() / SUB, y0 + sy.ravel() / SUB,
            x0 + (sx.ravel() + 1) / SUB, y0 + (sy.ravel() + 1) / SUB,
        )
        pids = []
        for fi, piece in cl:
            pieces.append(piece)
            piece_code.append(code_idx[codes[fi]])
            pids.append(len(pieces) - 1)
            shapely.prepare(piece)
        inter = np.array([shapely.intersects(p, sboxes) for _, p in cl])  # (k, 256)
        cov = np.array([shapely.covers(p, sboxes) for _, p in cl])
        sub = np.zeros(SUB * SUB, dtype=np.int32)
        for s in range(SUB * SUB):
            hit = [k for k in range(len(cl)) if inter[k, s]]
            if not hit:
                continue
            if cov[hit[0], s]:
                sub[s] = code_idx[codes[cl[hit[0]][0]]]
                continue
            key = tuple(pids[k] for k in hit)
            if key not in leaf_ids:
                leaf_ids[key] = len(leaf_lists)
                leaf_lists.append(list(key))
            sub[s] = SUBOFF + leaf_ids[key]
        subgrids.append(sub)
        base[cell] = SUBOFF + len(subgrids) - 1
    for p in pieces:
        shapely.destroy_prepared(p)
    log(f"cells done in {time.time() - t1:.0f}s: {len(subgrids)} mixed cells, "
        f"{len(leaf_lists)} leaf lists, {len(pieces)} pieces")

    # ---- the grid model (format 1's arrays), then format 2 -------------------
    mp = np.array([polygonal(p) for p in pieces], dtype=object)
    gtype, coords, offsets = shapely.to_ragged_array(mp)
    assert gtype == shapely.GeometryType.MULTIPOLYGON
    q = np.round(coords * QUANT).astype(np.int64)
    dq = np.diff(q, axis=0, prepend=np.zeros((1, 2), dtype=np.int64))
    leaf_off = np.cumsum([0] + [len(x) for x in leaf_lists]).astype(np.int32)
    leaf_flat = np.array([i for x in leaf_lists for i in x], dtype=np.int32)
    header = {
        "format": 1,
        "source": SOURCE,
        "codes": [""] + code_list,
        "sub": SUB,
        "suboff": SUBOFF,
        "quant": QUANT,
        "overrides": [{"code": c, "outline": p, "why": d} for c, p, d in OVERRIDES],
        "rank": RANK,
    }
    buf = io.BytesIO()
    np.savez(
        buf,
        header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
        base=base,
        subgrids=np.concatenate(subgrids).astype(np.int32),
        leaf_off=leaf_off,
        leaf_flat=leaf_flat,
        piece_code=np.array(piece_code, dtype=np.int16),
        dcoords=dq,
        ring_off=offsets[0].astype(np.int64),
        poly_off=offsets[1].astype(np.int64),
        geom_off=offsets[2].astype(np.int64),
    )
    payload = buf.getvalue()
    log(f"grid model: payload {len(payload) / 1e6:.1f} MB, SHA-256 "
        f"{hashlib.sha256(payload).hexdigest()} in {time.time() - t0:.0f}s")
    if v1_out is not None:
        write_v1(payload, v1_out)
    write_format2(GridModel(payload), out, check=(check, check), map_out=map_out)


# ---- format 2: flat arrays for a memory-mapped, numpy-free locator ----------
# (docs/country-lookup.md, "Format"; gateway/geo/mapfile.py has the file layout
# and gateway/geo/boundaries.py the reader.) The grid model above (format 1's
# arrays: pieces clipped to 1-degree cells, the 1-degree grid, 32 x 32 sub-grids
# and ordered candidate lists) is turned into: under each mixed sub-cell a
# quadtree, split while a node has more than K_EDGES candidate edges (down to
# MAX_LEVEL); each final node either answers one code or holds a short program:
# for each candidate polygon (priority order) its edges in the node, as runs of
# the shared vertex array, and its status at one reference point, then the
# default code. The locator decides inside/outside with a crossing count along an
# L-shaped path from the point to that reference point, all inside the node.

K_EDGES = 6  # a node with more candidate edges than this is split ...
MAX_LEVEL = 10  # ... down to 1/32768 degree (~3.4 m) below a sub-cell
TOL = 1.0  # units of 1e-7 degree: an edge this close to a node counts as in it
S0 = QUANT // SUB  # a sub-cell, in units


class GridModel:
    """Format 1's arrays (the grid model), from its .npz payload."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.sha256 = hashlib.sha256(payload).hexdigest()
        with np.load(io.BytesIO(payload), allow_pickle=False) as z:
            self.header = json.loads(bytes(z["header"]).decode())
            self.base = z["base"]
            self.subgrids = z["subgrids"]
            self.leaf_off = z["leaf_off"]
            self.leaf_flat = z["leaf_flat"]
            self.piece_code = z["piece_code"].astype(np.int64)
            q = np.cumsum(z["dcoords"], axis=0)
            ro, po, go = z["ring_off"], z["poly_off"], z["geom_off"]
        assert int(self.header["sub"]) == SUB and int(self.header["quant"]) == QUANT
        self.suboff = int(self.header["suboff"])
        self.X = q[:, 0].astype(np.int64)
        self.Y = q[:, 1].astype(np.int64)
        self.ring_off = ro
        self.poly_off = po
        self.geom_off = go
        self.piece_vrange = np.stack([ro[po[go[:-1]]], ro[po[go[1:]]]], axis=1)
        valid = np.ones(len(self.X), dtype=bool)  # edge i joins vertex i and i + 1
        valid[ro[1:] - 1] = False  # ... of the same ring
        self.valid = valid

    def edges(self, p: int) -> np.ndarray:
        a, b = self.piece_vrange[p]
        return np.arange(a, b)[self.valid[a:b]]

    def pieces(self) -> np.ndarray:
        """The clipped polygons as shapely MultiPolygons (for checks only)."""
        coords = np.stack([self.X, self.Y], axis=1).astype(np.float64) / QUANT
        return shapely.from_ragged_array(shapely.GeometryType.MULTIPOLYGON, coords,
                                         (self.ring_off, self.poly_off, self.geom_off))


def read_v1(path: pathlib.Path) -> GridModel:
    """A format 1 file (``GWGEO1``: xz-compressed .npz with its SHA-256), such as the
    boundaries.bin committed before format 2 (``git show 8a5c0eb:gateway/geo/data/
    boundaries.bin``)."""
    raw = path.read_bytes()
    if not raw.startswith(MAGIC):
        raise SystemExit(f"{path}: not a format 1 file")
    payload = lzma.decompress(raw[len(MAGIC) + 65:])
    if hashlib.sha256(payload).hexdigest() != raw[len(MAGIC):len(MAGIC) + 64].decode():
        raise SystemExit(f"{path}: checksum mismatch")
    return GridModel(payload)


def write_v1(payload: bytes, out: pathlib.Path) -> None:
    comp = lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME)
    out.write_bytes(MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + comp)
    log(f"wrote {out} (format 1, {len(comp) / 1e6:.1f} MB)")


def _seg_box(ax: np.ndarray, ay: np.ndarray, bx: np.ndarray, by: np.ndarray,
             xl: np.ndarray, yl: np.ndarray, xh: np.ndarray, yh: np.ndarray) -> np.ndarray:
    """Does segment a-b meet the closed box? (Callers widen the box by TOL, so
    float rounding can only add an edge, never miss one.)"""
    ok = ((np.maximum(ax, bx) >= xl) & (np.minimum(ax, bx) <= xh)
          & (np.maximum(ay, by) >= yl) & (np.minimum(ay, by) <= yh))
    dx = bx - ax
    dy = by - ay
    d = [dx * (cy - ay) - dy * (cx - ax) for cx, cy in ((xl, yl), (xh, yl), (xl, yh), (xh, yh))]
    pos = (d[0] > 0) & (d[1] > 0) & (d[2] > 0) & (d[3] > 0)
    neg = (d[0] < 0) & (d[1] < 0) & (d[2] < 0) & (d[3] < 0)
    return ok & ~pos & ~neg


def _ranges(i0: np.ndarray, i1: np.ndarray, j0: np.ndarray, j1: np.ndarray,
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each item k every (i, j) with i0 <= i <= i1, j0 <= j <= j1: (k, i, j)."""
    ni = i1 - i0 + 1
    cnt = ni * (j1 - j0 + 1)
    item = np.repeat(np.arange(len(cnt)), cnt)
    r = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    return item, i0[item] + r % ni[item], j0[item] + r // ni[item]


def _parity_right(px: np.ndarray, py: np.ndarray, ax: np.ndarray, ay: np.ndarray,
                  bx: np.ndarray, by: np.ndarray, *, at_or_right: bool) -> np.ndarray:
    """Crossing parity of the rays from (px, py) towards +x: edges with
    (ay > py) != (by > py) whose crossing x is > px (>= px if at_or_right). With
    at_or_right the comparison is made exact (rationals) where it is close: that is
    the reference status the locator starts from."""
    out = np.zeros(len(px), dtype=np.int64)
    step = max(1, 4_000_000 // max(1, len(ax)))
    for s in range(0, len(px), step):
        X = px[s:s + step, None]
        Y = py[s:s + step, None]
        st = (ay > Y) != (by > Y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xi = ax + (Y - ay) * (bx - ax) / (by - ay)
        hit = st & ((xi >= X) if at_or_right else (xi > X))
        cnt = hit.sum(axis=1)
        if at_or_right:
            for qi, e in zip(*np.nonzero(st & (np.abs(xi - X) < 1e-3))):
                xq, yq = Fraction(float(X[qi, 0])), Fraction(float(Y[qi, 0]))
                xa, ya, xb, yb = int(ax[e]), int(ay[e]), int(bx[e]), int(by[e])
                exact = xa + (yq - ya) * (xb - xa) / Fraction(yb - ya) >= xq
                cnt[qi] += int(exact) - int(hit[qi, e])
        out[s:s + step] = cnt & 1
    return out


Leaf = tuple[int, list[tuple[int, int, list[tuple[int, int]]]]]  # default, [(code, b0, runs)]


def convert_cell(m: GridModel, cell: int, block: np.ndarray,
                 ) -> tuple[np.ndarray, np.ndarray, list[Leaf]]:
    """The quadtrees under the mixed sub-cells of one mixed 1-degree cell.

    Returns the cell's 1024 sub-grid entries, its quadtree nodes (n, 4) and its
    leaves, with local references: NODE + q for node q, -1 - l for leaf l."""
    row, col = divmod(cell, 360)
    X0 = (col - 180) * QUANT
    Y0 = (row - 90) * QUANT
    sub_out = block.astype(np.int64).copy()
    leafsubs = np.nonzero(block >= m.suboff)[0]
    lists = [tuple(int(p) for p in m.leaf_flat[m.leaf_off[v - m.suboff]:m.leaf_off[v - m.suboff + 1]])
             for v in block[leafsubs]]
    pieces = sorted({p for lst in lists for p in lst})
    if not pieces:
        return sub_out, np.zeros((0, 4), np.int64), []
    pidx = {p: k for k, p in enumerate(pieces)}
    nx0: list[float] = []
    ny0: list[float] = []
    nlev: list[int] = []
    ncand: list[tuple[int, ...]] = []
    member = np.zeros((SUB * SUB, len(pieces)), dtype=bool)
    node_of_sub = np.full(SUB * SUB, -1, dtype=np.int64)
    for s, lst in zip(leafsubs, lists):
        sy, sx = divmod(int(s), SUB)
        node_of_sub[s] = len(nx0)
        nx0.append(float(X0 + sx * S0))
        ny0.append(float(Y0 + sy * S0))
        nlev.append(0)
        ncand.append(lst)
        member[s, [pidx[p] for p in lst]] = True
    e_list = [m.edges(p) for p in pieces]
    e_piece = np.concatenate([np.full(len(e), k) for k, e in enumerate(e_list)])
    E = np.concatenate(e_list)
    ax = m.X[E].astype(np.float64)
    ay = m.Y[E].astype(np.float64)
    bx = m.X[E + 1].astype(np.float64)
    by = m.Y[E + 1].astype(np.float64)

    def span(lo: np.ndarray, hi: np.ndarray, o: np.ndarray | float, size: float, n: int,
             ) -> tuple[np.ndarray, np.ndarray]:
        a = np.clip(np.floor((lo - TOL - o) / size), 0, n - 1).astype(np.int64)
        b = np.clip(np.floor((hi + TOL - o) / size), 0, n - 1).astype(np.int64)
        return a, b

    # edges x mixed sub-cells they meet (and whose candidate list has their piece)
    i0, i1 = span(np.minimum(ax, bx), np.maximum(ax, bx), X0, S0, SUB)
    j0, j1 = span(np.minimum(ay, by), np.maximum(ay, by), Y0, S0, SUB)
    it, ii, jj = _ranges(i0, i1, j0, j1)
    keep = member[jj * SUB + ii, e_piece[it]]
    it, ii, jj = it[keep], ii[keep], jj[keep]
    xl = X0 + ii * S0 - TOL
    yl = Y0 + jj * S0 - TOL
    keep = _seg_box(ax[it], ay[it], bx[it], by[it], xl, yl, xl + S0 + 2 * TOL, yl + S0 + 2 * TOL)
    t_node = node_of_sub[(jj * SUB + ii)[keep]]
    t_edge = it[keep]
    quad: dict[int, list[int]] = {}  # split node -> its 4 children (node ids)
    finals: list[tuple[int, np.ndarray]] = []
    level = 0
    cur = np.arange(len(nx0))
    while len(cur):
        size = S0 / (1 << level)
        order = np.lexsort((t_edge, t_node))
        t_node, t_edge = t_node[order], t_edge[order]
        counts = np.bincount(t_node, minlength=len(nx0))
        split = np.zeros(len(nx0), dtype=bool)
        if level < MAX_LEVEL:
            split[cur] = counts[cur] > K_EDGES
        starts = np.searchsorted(t_node, cur, side="left")
        ends = np.searchsorted(t_node, cur, side="right")
        finals.extend((int(n), t_edge[a:b]) for n, a, b in zip(cur, starts, ends) if not split[n])
        sp = cur[split[cur]]
        if not len(sp):
            break
        first = len(nx0)
        half = size / 2
        for k, n in enumerate(sp):
            quad[int(n)] = [first + 4 * k + c for c in range(4)]
            for c in range(4):
                cy, cx = divmod(c, 2)
                nx0.append(nx0[n] + cx * half)
                ny0.append(ny0[n] + cy * half)
                nlev.append(level + 1)
                ncand.append(ncand[n])
        rank = np.full(len(nx0), -1, dtype=np.int64)
        rank[sp] = np.arange(len(sp))
        sel = split[t_node]
        pn, pe = t_node[sel], t_edge[sel]
        px0 = np.asarray(nx0)[pn]
        py0 = np.asarray(ny0)[pn]
        ci0, ci1 = span(np.minimum(ax[pe], bx[pe]), np.maximum(ax[pe], bx[pe]), px0, half, 2)
        cj0, cj1 = span(np.minimum(ay[pe], by[pe]), np.maximum(ay[pe], by[pe]), py0, half, 2)
        k, ci, cj = _ranges(ci0, ci1, cj0, cj1)
        e2 = pe[k]
        cxl = px0[k] + ci * half - TOL
        cyl = py0[k] + cj * half - TOL
        ok = _seg_box(ax[e2], ay[e2], bx[e2], by[e2], cxl, cyl, cxl + half + 2 * TOL,
                      cyl + half + 2 * TOL)
        t_node = (first + 4 * rank[pn[k]] + cj * 2 + ci)[ok]
        t_edge = e2[ok]
        cur = np.arange(first, len(nx0))
        level += 1
    ax0 = np.asarray(nx0)
    ay0 = np.asarray(ny0)
    asize = S0 / (1 << np.asarray(nlev))
    # per final node and candidate: its edges in the node, or (no edge) whether the
    # node is wholly inside it (tested at the centre, which is far from every edge)
    per_node: list[tuple[int, dict[int, np.ndarray]]] = []
    ask_centre: dict[int, list[int]] = {}
    ask_ref: dict[int, list[int]] = {}
    for n, edges in finals:
        by_piece: dict[int, np.ndarray] = {}
        if len(edges):
            ep = e_piece[edges]
            for k in np.unique(ep):
                by_piece[int(k)] = edges[ep == k]
        per_node.append((n, by_piece))
        for p in ncand[n]:
            (ask_ref if pidx[p] in by_piece else ask_centre).setdefault(pidx[p], []).append(n)
    status: dict[tuple[int, int], int] = {}
    for k in range(len(pieces)):
        sel = np.nonzero(e_piece == k)[0]
        for asks, ref in ((ask_centre, False), (ask_ref, True)):
            if k not in asks:
                continue
            nodes = np.asarray(asks[k])
            if ref:  # bottom of the right border
                px, py = ax0[nodes] + asize[nodes], ay0[nodes]
            else:
                px, py = ax0[nodes] + asize[nodes] / 2, ay0[nodes] + asize[nodes] / 2
            st = _parity_right(px, py, ax[sel], ay[sel], bx[sel], by[sel], at_or_right=ref)
            status.update(((int(n), k), int(v)) for n, v in zip(nodes, st))
    entry: dict[int, int | None] = {}
    leaves: list[Leaf] = []
    for n, by_piece in per_node:
        tests: list[tuple[int, int, list[tuple[int, int]]]] = []
        default = 0
        for p in ncand[n]:
            k = pidx[p]
            code = int(m.piece_code[p])
            if k in by_piece:
                eids = np.sort(E[by_piece[k]])
                br = np.nonzero(np.diff(eids) != 1)[0]
                run_s = np.concatenate([[eids[0]], eids[br + 1]])
                run_e = np.concatenate([eids[br], [eids[-1]]]) + 2  # vertex range, end excl.
                tests.append((code, status[(n, k)], list(zip(run_s.tolist(), run_e.tolist()))))
            elif status[(n, k)]:
                default = code
                break
        while tests and tests[-1][0] == default:  # the same answer either way
            tests.pop()
        if tests:
            entry[n] = -1 - len(leaves)
            leaves.append((default, tests))
        else:
            entry[n] = default
    for n in sorted(quad, key=lambda n: -nlev[n]):  # bottom-up: merge 4 equal codes
        ch = [entry[c] for c in quad[n]]
        entry[n] = ch[0] if all(v is not None and 0 <= v < NODE for v in ch) and \
            len(set(ch)) == 1 else None
    qid: dict[int, int] = {}
    for n in sorted(quad, key=lambda n: (nlev[n], n)):
        if entry[n] is None:
            qid[n] = len(qid)

    def ref(n: int) -> int:
        v = entry[n]
        return NODE + qid[n] if v is None else v

    quad_arr = np.array([[ref(c) for c in quad[n]] for n in sorted(qid, key=qid.__getitem__)],
                        dtype=np.int64).reshape(-1, 4)
    for s in leafsubs:
        sub_out[s] = ref(int(node_of_sub[s]))
    return sub_out, quad_arr, leaves


_MODEL: GridModel | None = None


def _convert_one(args: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, list[Leaf]]:
    assert _MODEL is not None
    cell, v = args
    return convert_cell(_MODEL, cell, _MODEL.subgrids[v * SUB * SUB:(v + 1) * SUB * SUB])


def convert(m: GridModel, processes: int = 0) -> bytes:
    """The format 2 map file (bytes) of a grid model. Deterministic."""
    import multiprocessing

    global _MODEL
    t0 = time.time()
    base = m.base
    mixed = [(int(c), int(base[c]) - m.suboff) for c in np.nonzero(base >= m.suboff)[0]]
    assert [v for _, v in mixed] == list(range(len(mixed)))
    ncodes = len(m.header["codes"])
    assert ncodes <= CODE_MASK + 1 and ncodes <= NODE
    base_out = base.astype(np.int64)
    base_out[base >= m.suboff] += NODE - m.suboff
    subs: list[np.ndarray] = []
    quads: list[np.ndarray] = []
    prog: list[int] = []
    nq = 0
    nleaves = ntests = nruns = 0
    _MODEL = m
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(processes or None) as pool:
        for n, (sub, quad, leaves) in enumerate(pool.imap(_convert_one, mixed, chunksize=4)):
            if n % 1000 == 0:
                log(f"  format 2: cell {n}/{len(mixed)} {time.time() - t0:.0f}s")
            leaf_at = []
            for default, tests in leaves:  # leaf -> its offset in prog
                leaf_at.append(len(prog))
                prog.append(default | len(tests) << CODE_BITS)
                for code, b0, runs in tests:
                    packed = []
                    for vs, ve in runs:
                        while ve - vs > RUN_MAX:  # split long runs (they share a vertex)
                            packed.append(vs << RUN_BITS | RUN_MAX)
                            vs += RUN_MAX - 1
                        packed.append(vs << RUN_BITS | (ve - vs))
                    prog.append(code | b0 << CODE_BITS | len(packed) << (CODE_BITS + 1))
                    prog.extend(packed)
                    ntests += 1
                    nruns += len(packed)
            nleaves += len(leaves)
            lut = np.asarray(leaf_at, dtype=np.int64)

            def remap(a: np.ndarray, qb: int = nq, lut: np.ndarray = lut) -> np.ndarray:
                a = a.copy()
                a[a >= NODE] += qb
                neg = a < 0
                a[neg] = -1 - lut[-1 - a[neg]]
                return a

            subs.append(remap(sub))
            quads.append(remap(quad))
            nq += len(quad)
    _MODEL = None
    verts = np.stack([m.X, m.Y], axis=1)
    assert len(verts) < 1 << (31 - RUN_BITS) and len(prog) < 1 << 31
    assert np.abs(verts).max() < 1 << 31
    sections = {
        "base": ("i", base_out.astype("<i4").tobytes()),
        "sub": ("i", np.concatenate(subs).astype("<i4").tobytes()),
        "quad": ("i", np.concatenate(quads).astype("<i4").tobytes()),
        "prog": ("i", np.asarray(prog, dtype="<i4").tobytes()),
        "verts": ("i", verts.astype("<i4").tobytes()),
    }
    header = {
        "source": m.header["source"],
        "codes": m.header["codes"],
        "meta": {k: m.header[k] for k in ("overrides", "rank") if k in m.header},
        "grid": {"sub": SUB, "quant": QUANT, "node": NODE, "code_bits": CODE_BITS,
                 "run_bits": RUN_BITS, "k_edges": K_EDGES, "max_level": MAX_LEVEL},
        "grid_model_sha256": m.sha256,
    }
    data = encode_map(header, sections)
    log(f"format 2: {len(mixed)} mixed cells, {nq} quadtree nodes, {nleaves} leaves, "
        f"{ntests} polygon tests, {nruns} runs; map {len(data) / 1e6:.1f} MB "
        f"in {time.time() - t0:.0f}s")
    return data


def pack(data: bytes) -> bytes:
    """The committed pack of a map: magic, the map's digest, xz of the map."""
    comp = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                         preset=9 | lzma.PRESET_EXTREME)
    return pack_header(data[16:80].decode(), len(comp)) + comp


def verify_format2(m: GridModel, data: bytes, n_random: int, n_edge: int, seed: int = 1) -> None:
    """Answers of the new map against exact GEOS point-in-polygon on the grid model
    (the format 1 locator's method): random points, and points 1e-9 degree either
    side of random edges. Stops the build on any difference."""
    from gateway.geo.boundaries import BoundaryLocator

    loc = BoundaryLocator.from_buffer(data, "(new map)")
    geoms = m.pieces()
    shapely.prepare(geoms)
    codes = [c or None for c in m.header["codes"]]
    rng = np.random.default_rng(seed)
    lon = rng.uniform(-180, 180, n_random)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, n_random)))
    e = rng.integers(0, len(m.X) - 1, n_edge * 2)
    e = e[m.valid[e]][:n_edge]
    a = np.stack([m.X[e], m.Y[e]], axis=1) / QUANT
    b = np.stack([m.X[e + 1], m.Y[e + 1]], axis=1) / QUANT
    d = b - a
    nrm = np.stack([-d[:, 1], d[:, 0]], axis=1) / np.hypot(d[:, 0], d[:, 1])[:, None]
    p = a + d * rng.uniform(0.01, 0.99, (len(e), 1)) + nrm * 1e-9 * rng.choice([-1, 1], (len(e), 1))
    lon = np.clip(np.concatenate([lon, p[:, 0]]), -180, 180)
    lat = np.clip(np.concatenate([lat, p[:, 1]]), -90, 90)

    def reference(la: float, lo: float) -> str | None:
        x, y = lo + 180.0, la + 90.0
        col, row = min(int(x), 359), min(int(y), 179)
        v = int(m.base[row * 360 + col])
        if v < m.suboff:
            return codes[v]
        sx, sy = min(int((x - col) * SUB), SUB - 1), min(int((y - row) * SUB), SUB - 1)
        w = int(m.subgrids[(v - m.suboff) * SUB * SUB + sy * SUB + sx])
        if w < m.suboff:
            return codes[w]
        for i in m.leaf_flat[m.leaf_off[w - m.suboff]:m.leaf_off[w - m.suboff + 1]]:
            if shapely.intersects_xy(geoms[i], lo, la):
                return codes[int(m.piece_code[i])]
        return None

    bad = [(float(la), float(lo)) for la, lo in zip(lat, lon)
           if loc.country_at(float(la), float(lo)) != reference(float(la), float(lo))]
    log(f"format 2 check: {len(lat) - len(bad)}/{len(lat)} agree with GEOS on the grid model "
        f"({n_random} random, {len(e)} at 1e-9 deg from an edge)")
    if bad:
        raise SystemExit(f"format 2 disagrees at {bad[:20]}")


def write_format2(m: GridModel, out: pathlib.Path, *, check: tuple[int, int] = (200_000, 200_000),
                  map_out: pathlib.Path | None = None) -> None:
    data = convert(m)
    if check[0] or check[1]:
        verify_format2(m, data, *check)
    packed = pack(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(packed)
    log(f"wrote {out} ({len(packed) / 1e6:.1f} MB; map {len(data) / 1e6:.1f} MB, "
        f"SHA-256 {data[16:80].decode()})")
    if map_out is not None:
        map_out.write_bytes(data)
        log(f"wrote {map_out}")


def zone_countries() -> dict[str, str]:
    """tz zone -> ISO code from the tz database's zone.tab (one row per country)."""
    out = {}
    for line in pathlib.Path("/usr/share/zoneinfo/zone.tab").read_text().splitlines():
        if line and not line.startswith("#"):
            cc, _, zone = line.split("\t")[:3]
            out[zone] = cc
    return out


def build_reference(country_coder: pathlib.Path, n: int, seed: int) -> None:
    """Answer n seeded random points (uniform on the sphere) with two sources that
    are independent of the OSM maritime file: iD's country-coder (hand-drawn
    borders) and timezonefinder's time-zone polygons mapped through zone.tab."""
    from timezonefinder import TimezoneFinder  # build-time only

    rng = np.random.default_rng(seed)
    lon = rng.uniform(-180, 180, n)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    pts = [[round(float(a), 5), round(float(b), 5)] for a, b in zip(lon, lat)]
    js = (
        "const cc=require(process.argv[1]);const pts=JSON.parse(require('fs')"
        ".readFileSync(0,'utf8'));const out=pts.map(p=>cc.iso1A2Code(p,{level:'territory'})||'');"
        "process.stdout.write(JSON.stringify(out));"
    )
    res = subprocess.run(
        ["node", "-e", js, str(country_coder)],
        input=json.dumps(pts), capture_output=True, text=True, check=True,
    )
    answers = json.loads(res.stdout)
    tf = TimezoneFinder()
    zc = zone_countries()
    with REFERENCE_OUT.open("w") as fh:
        fh.write("# seeded random points, uniform on the sphere; generated by "
                 f"tools/build_boundaries.py --reference-only, seed={seed}\n")
        fh.write("# country_coder: @rapideditor/country-coder 5.6.1 iso1A2Code level=territory "
                 "(iD editor borders, ISC)\n")
        fh.write("# tz_zone: timezonefinder 9.0.0 (timezone-boundary-builder, ODbL); "
                 "tz_country: zone via the tz database zone.tab, empty for Etc/* ocean zones\n")
        fh.write("lat,lon,country_coder,tz_zone,tz_country\n")
        for (lo, la), a in zip(pts, answers):
            z = tf.timezone_at(lat=la, lng=lo) or ""
            fh.write(f"{la},{lo},{a},{z},{zc.get(z, '')}\n")
    log(f"wrote {REFERENCE_OUT} ({n} points)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("geojson", nargs="?", type=pathlib.Path,
                    help="borders.geo.json of @osm_borders/maritime_10m")
    ap.add_argument("--country-coder", type=pathlib.Path,
                    help="dist/country-coder.cjs of @rapideditor/country-coder")
    ap.add_argument("--lands", type=pathlib.Path,
                    help="map.geo.json of @geo-maps/earth-lands-10m (Antarctica, Cyprus SBAs)")
    ap.add_argument("--from-v1", type=pathlib.Path, metavar="BIN",
                    help="convert a format 1 file (GWGEO1) instead of building from sources")
    ap.add_argument("--out", type=pathlib.Path, default=OUT, help="the pack (default: %(default)s)")
    ap.add_argument("--v1-out", type=pathlib.Path, help="also write the grid model as format 1")
    ap.add_argument("--map-out", type=pathlib.Path, help="also write the uncompressed map")
    ap.add_argument("--check", type=int, default=200_000, metavar="N",
                    help="compare N random points and N points next to edges with GEOS on "
                         "the grid model (0: skip; default %(default)s)")
    ap.add_argument("--reference-only", action="store_true")
    ap.add_argument("--points", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=20240601)
    a = ap.parse_args()
    if a.from_v1:
        write_format2(read_v1(a.from_v1), a.out, check=(a.check, a.check), map_out=a.map_out)
    elif not a.reference_only:
        if a.geojson is None or a.lands is None:
            ap.error("geojson and --lands paths required (or --from-v1)")
        build(a.geojson, a.lands, a.out, a.v1_out, check=a.check, map_out=a.map_out)
    if a.country_coder:
        build_reference(a.country_coder, a.points, a.seed)


if __name__ == "__main__":
    main()
