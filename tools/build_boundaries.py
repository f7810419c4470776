#!/usr/bin/env python3
"""Build ``gateway/geo/data/boundaries.bin`` from OpenStreetMap maritime borders.

Not run in CI: the output is committed. To regenerate::

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
    committed file byte for byte.)

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
5. writes the grids and the clipped polygons (coordinates quantised to 1e-7 deg,
   about 1 cm, delta-encoded) as an ``.npz`` compressed with xz, prefixed by a
   magic line and the SHA-256 of the payload.
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

import numpy as np
import shapely

ROOT = pathlib.Path(__file__).resolve().parents[1]
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


def build(src: pathlib.Path, lands: pathlib.Path, out: pathlib.Path = OUT) -> None:
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

    # ---- encode ---------------------------------------------------------
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
    comp = lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + comp)
    log(f"wrote {out} ({len(comp) / 1e6:.1f} MB, payload {len(payload) / 1e6:.1f} MB) "
        f"in {time.time() - t0:.0f}s")


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
    ap.add_argument("--out", type=pathlib.Path, default=OUT)
    ap.add_argument("--reference-only", action="store_true")
    ap.add_argument("--points", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=20240601)
    a = ap.parse_args()
    if not a.reference_only:
        if a.geojson is None or a.lands is None:
            ap.error("geojson and --lands paths required")
        build(a.geojson, a.lands, a.out)
    if a.country_coder:
        build_reference(a.country_coder, a.points, a.seed)


if __name__ == "__main__":
    main()
