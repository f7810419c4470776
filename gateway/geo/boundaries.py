"""Offline latitude/longitude -> ISO 3166-1 alpha-2 lookup.

The data is built by ``tools/build_boundaries.py`` from OpenStreetMap admin_level=2
boundaries *including 12 nm territorial waters* (``@osm_borders/maritime_10m``;
(c) OpenStreetMap contributors, ODbL), with Antarctica (land, ice shelves, 12 nm)
and the UK Sovereign Base Areas on Cyprus (answering CY) drawn from OSM land
polygons. See ``docs/country-lookup.md`` for the choice, the territory and
disputed-area policy and the measured figures.

Format 2 (``gateway/geo/mapfile.py``): flat int32 arrays in one file that is
memory-mapped and read in place, with the standard library only (no numpy, no
GEOS objects), so that the data sits in the page cache, shared by every worker
process, instead of in each worker's heap (``gateway/geo/cache.py`` says where the
file is).

Index: the world is cut into 1 degree cells; a cell is either wholly one code (or
sea), or split into 32 x 32 sub-cells, each wholly one code (or sea) or the root
of a quadtree whose final nodes either answer one code or hold a short program:
for each candidate polygon in priority order (the country clipped to the 1 degree
cell), its few edges inside the node and its inside/outside status at the
bottom of the node's right border; then the code when no candidate holds the
point. Inside/outside is a crossing count along an L-shaped path from the point
to that reference point (right to the border, then down along it), which only
meets edges inside the node. Most lookups are two array reads; near a border or
coastline a few more, plus a crossing count over a handful of edges.

Nothing is loaded at import time; call :func:`load_locator`.
"""

from __future__ import annotations

import pathlib
from typing import Any

from gateway.errors import GeoDataError
from gateway.geo import mapfile

DEFAULT_DATA = pathlib.Path(__file__).resolve().parent / "data" / "boundaries.bin"

NODE = mapfile.NODE
_CODE_MASK = mapfile.CODE_MASK
_CODE_BITS = mapfile.CODE_BITS
_RUN_BITS = mapfile.RUN_BITS
_RUN_MASK = mapfile.RUN_MAX

__all__ = ["DEFAULT_DATA", "BoundaryLocator", "load_locator"]


class BoundaryLocator:
    """Immutable after construction; safe for concurrent reads from many threads
    (lookups only read the mapped arrays)."""

    source: str
    #: where the map was read from (the .map file, or the pack "(in memory)")
    where: str

    def __init__(self, buf: Any, where: str) -> None:
        header, views = mapfile.parse_map(buf, where)
        try:
            grid = header["grid"]
            if (grid["sub"], grid["node"], grid["code_bits"], grid["run_bits"]) != (
                    32, NODE, _CODE_BITS, _RUN_BITS) or int(grid["quant"]) != 10_000_000:
                raise GeoDataError(f"boundary data {where}: unsupported grid {grid}")
            self._base = views["base"]
            self._sub = views["sub"]
            self._quad = views["quad"]
            self._prog = views["prog"]
            self._verts = views["verts"]
            self._codes: list[str | None] = [c or None for c in header["codes"]]
            self.source = str(header["source"])
            self.meta: dict[str, Any] = dict(header.get("meta", {}))
        except (KeyError, TypeError) as exc:
            raise GeoDataError(f"boundary data {where}: malformed header ({exc})") from exc
        if len(self._base) != 360 * 180 or len(self._sub) % 1024 or len(self._quad) % 4:
            raise GeoDataError(f"boundary data {where}: grid arrays have the wrong shape")
        if not 0 < len(self._codes) <= NODE:
            raise GeoDataError(f"boundary data {where}: bad code table")
        self.where = where
        self._buf = buf  # keeps the mapping alive

    @classmethod
    def from_buffer(cls, buf: Any, where: str = "(buffer)") -> BoundaryLocator:
        """A locator over a map held in memory (bytes); for tools and tests."""
        return cls(buf, where)

    def country_at(self, lat: float, lon: float) -> str | None:
        """ISO 3166-1 alpha-2 code (upper case; "XK" for Kosovo) at the point, or
        None at sea beyond territorial waters / outside every country.

        Raises ValueError for lat outside [-90, 90], lon outside [-180, 180], NaN.
        """
        # written for speed: this is on the crash-call path
        if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
            raise ValueError(f"coordinates out of range: lat={lat!r}, lon={lon!r}")
        x = lon + 180.0
        y = lat + 90.0
        col = int(x)
        row = int(y)
        if col == 360:
            col = 359
        if row == 180:
            row = 179
        v = self._base[row * 360 + col]
        if v < NODE:
            return self._codes[v]
        fx = (x - col) * 32.0
        fy = (y - row) * 32.0
        sx = int(fx)
        sy = int(fy)
        if sx >= 32:
            sx = 31
        if sy >= 32:
            sy = 31
        v = self._sub[(v - NODE) * 1024 + sy * 32 + sx]
        if 0 <= v < NODE:
            return self._codes[v]
        return self._near_edges(v, lat, lon, col, row, sx, sy, fx - sx, fy - sy)

    def _near_edges(self, v: int, lat: float, lon: float, col: int, row: int, sx: int,
                    sy: int, fx: float, fy: float) -> str | None:
        # down the quadtree; (kx, ky) is the node's position at its level
        quad = self._quad
        kx = ky = 0
        size = 312500.0  # a sub-cell, in units of 1e-7 degree
        while v >= NODE:
            fx += fx
            fy += fy
            kx += kx
            ky += ky
            size *= 0.5
            c = 0
            if fx >= 1.0:
                fx -= 1.0
                kx += 1
                c = 1
            if fy >= 1.0:
                fy -= 1.0
                ky += 1
                c += 2
            v = quad[(v - NODE) * 4 + c]
        if v >= 0:
            return self._codes[v]
        # a leaf program. Units of 1e-7 degree (the vertices are integers there);
        # x1: the node's right border, y0: its bottom (exact: dyadic fractions).
        x1 = (col - 180) * 10_000_000.0 + sx * 312500.0 + (kx + 1) * size
        y0 = (row - 90) * 10_000_000.0 + sy * 312500.0 + ky * size
        qx = lon * 10_000_000.0
        qy = lat * 10_000_000.0
        prog = self._prog
        verts = self._verts
        o = -1 - v
        head = prog[o]
        o += 1
        for _ in range(head >> _CODE_BITS):
            test = prog[o]
            o += 1
            # status at (x1 - d, y0 + e), then flipped by every edge crossed on the
            # way from there up to (x1 - d, qy + e) and left to the point
            inside = (test >> _CODE_BITS) & 1
            end = o + (test >> (_CODE_BITS + 1))
            while o < end:
                run = prog[o]
                o += 1
                first = (run >> _RUN_BITS) * 2
                xy: list[int] = verts[first:first + (run & _RUN_MASK) * 2].tolist()
                ax = xy[0]
                ay = xy[1]
                for i in range(2, len(xy), 2):
                    bx = xy[i]
                    by = xy[i + 1]
                    # crosses the horizontal leg (qx, x1) at height qy
                    if (ay > qy) != (by > qy) and \
                            qx < ax + (qy - ay) * (bx - ax) / (by - ay) < x1:
                        inside ^= 1
                    if (ax < x1) != (bx < x1):
                        # crosses the vertical leg just left of x1, between y0 and qy
                        # (ties broken as for the reference status: see the build)
                        if ax < x1:
                            lx, ly, rx, ry = ax, ay, bx, by
                        else:
                            lx, ly, rx, ry = bx, by, ax, ay
                        yc = ry if rx == x1 else ly + (x1 - lx) * (ry - ly) / (rx - lx)
                        if (yc > y0 or (yc == y0 and ry < ly)) and \
                                (yc < qy or (yc == qy and ry >= ly)):
                            inside ^= 1
                    ax = bx
                    ay = by
            if inside:
                return self._codes[test & _CODE_MASK]
        return self._codes[head & _CODE_MASK]

    def __repr__(self) -> str:
        return f"<BoundaryLocator {self.source}>"


def load_locator(path: pathlib.Path | None = None, *,
                 cache_dir: pathlib.Path | None = None) -> BoundaryLocator:
    """Load the boundary data (the shipped pack by default; or a prepared .map file).

    The map is memory-mapped (see :mod:`gateway.geo.cache` for where it is kept and
    how the pack is expanded once). GeoDataError on failure."""
    from gateway.geo.cache import open_map

    path = pathlib.Path(path) if path is not None else DEFAULT_DATA
    buf, where = open_map(path, cache_dir)
    try:
        return BoundaryLocator(buf, where)
    except GeoDataError:
        raise
    except Exception as exc:  # malformed content: report as data error
        raise GeoDataError(f"boundary data {where}: malformed content "
                           f"({type(exc).__name__}: {exc})") from exc
