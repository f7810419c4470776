"""Offline latitude/longitude -> ISO 3166-1 alpha-2 lookup.

The data (``data/boundaries.bin``) is built by ``tools/build_boundaries.py`` from
OpenStreetMap admin_level=2 boundaries *including 12 nm territorial waters*
(``@osm_borders/maritime_10m``; (c) OpenStreetMap contributors, ODbL), with
Antarctica (land, ice shelves, 12 nm) and the UK Sovereign Base Areas on Cyprus
(answering CY) drawn from OSM land polygons. See
``docs/country-lookup.md`` for the choice, the territory and disputed-area policy
and the measured figures.

Index: the world is cut into 1 degree cells. A cell is either wholly one code
(or sea), or split into 32 x 32 sub-cells, each wholly one code (or sea) or an
ordered list of candidate polygons (the country clipped to the 1 degree cell,
GEOS-prepared) tested with an exact point-in-polygon. Most lookups are two list
indexings; points near a border or coastline cost one or two prepared
point-in-polygon tests.

Nothing is loaded at import time; call :func:`load_locator`.
"""

from __future__ import annotations

import array
import hashlib
import io
import json
import lzma
import pathlib
import threading
from typing import Any

import numpy as np
import shapely

from gateway.errors import GeoDataError

DEFAULT_DATA = pathlib.Path(__file__).resolve().parent / "data" / "boundaries.bin"
MAGIC = b"GWGEO1\n"

__all__ = ["DEFAULT_DATA", "BoundaryLocator", "load_locator"]


class BoundaryLocator:
    """Immutable after construction; safe for concurrent reads from many threads
    (the GEOS point-in-polygon step near borders is serialised by a lock)."""

    source: str

    def __init__(
        self,
        *,
        source: str,
        codes: list[str | None],
        base: list[int],
        subgrids: array.array[int] | list[int],
        leaves: list[tuple[tuple[Any, str], ...]],
        sub: int,
        suboff: int,
        meta: dict[str, Any],
    ) -> None:
        self.source = source
        self._codes = codes
        self._base = base
        self._subgrids = subgrids
        self._leaves = leaves
        self._sub = sub
        self._suboff = suboff
        self.meta = meta
        self._lock = threading.Lock()

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
        if v < self._suboff:
            return self._codes[v]
        sub = self._sub
        sx = int((x - col) * sub)
        sy = int((y - row) * sub)
        if sx >= sub:
            sx = sub - 1
        if sy >= sub:
            sy = sub - 1
        w = self._subgrids[(v - self._suboff) * sub * sub + sy * sub + sx]
        if w < self._suboff:
            return self._codes[w]
        # GEOS prepared geometries are not safe for concurrent queries (shapely
        # releases the GIL; an abort was seen in the concurrency test), so the
        # exact test is serialised. It only runs near borders and coasts.
        with self._lock:
            for geom, code in self._leaves[w - self._suboff]:
                if _intersects_xy(geom, lon, lat):
                    return code
        return None

    def __repr__(self) -> str:
        return f"<BoundaryLocator {self.source}>"


_intersects_xy = shapely.intersects_xy


def _fail(path: pathlib.Path, why: str) -> GeoDataError:
    return GeoDataError(f"boundary data {path}: {why}")


def load_locator(path: pathlib.Path | None = None) -> BoundaryLocator:
    """Load the boundary data (the shipped file by default). GeoDataError on failure."""
    path = pathlib.Path(path) if path is not None else DEFAULT_DATA
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _fail(path, f"cannot read ({exc})") from exc
    if not raw.startswith(MAGIC):
        raise _fail(path, "not a boundary data file (bad magic)")
    rest = raw[len(MAGIC):]
    nl = rest.find(b"\n")
    if nl != 64:
        raise _fail(path, "missing checksum line")
    digest = rest[:nl].decode("ascii", "replace")
    try:
        payload = lzma.decompress(rest[nl + 1:])
    except (lzma.LZMAError, EOFError) as exc:
        raise _fail(path, f"corrupt compressed payload ({exc})") from exc
    if hashlib.sha256(payload).hexdigest() != digest:
        raise _fail(path, "checksum mismatch")
    try:
        return _build(payload)
    except GeoDataError:
        raise
    except Exception as exc:  # malformed arrays: report as data error
        raise _fail(path, f"malformed content ({type(exc).__name__}: {exc})") from exc


def _build(payload: bytes) -> BoundaryLocator:
    with np.load(io.BytesIO(payload), allow_pickle=False) as z:
        header = json.loads(bytes(z["header"]).decode())
        if header.get("format") != 1:
            raise GeoDataError(f"unsupported boundary data format {header.get('format')!r}")
        codes: list[str | None] = [c or None for c in header["codes"]]
        sub = int(header["sub"])
        suboff = int(header["suboff"])
        quant = float(header["quant"])
        base = z["base"]
        subgrids = z["subgrids"]
        leaf_off = z["leaf_off"]
        leaf_flat = z["leaf_flat"]
        piece_code = z["piece_code"]
        coords = np.cumsum(z["dcoords"], axis=0).astype(np.float64) / quant
        offsets = (z["ring_off"], z["poly_off"], z["geom_off"])
    if base.shape != (360 * 180,) or subgrids.size % (sub * sub):
        raise GeoDataError("grid arrays have the wrong shape")
    ncodes = len(codes)
    nsub = subgrids.size // (sub * sub)
    nleaf = leaf_off.size - 1
    for arr, name in ((base, "base"), (subgrids, "subgrids")):
        ok = (arr >= 0) & ((arr < ncodes) | ((arr >= suboff) & (arr < suboff + max(nsub, nleaf))))
        if not bool(ok.all()):
            raise GeoDataError(f"{name} grid has out-of-range entries")
    if int(base[base >= suboff].max(initial=suboff - 1)) >= suboff + nsub:
        raise GeoDataError("base grid points past the sub-grids")
    if int(subgrids[subgrids >= suboff].max(initial=suboff - 1)) >= suboff + nleaf:
        raise GeoDataError("sub-grid points past the leaf lists")
    pieces = shapely.from_ragged_array(shapely.GeometryType.MULTIPOLYGON, coords, offsets)
    if len(pieces) != len(piece_code) or (leaf_flat.size and leaf_flat.max() >= len(pieces)):
        raise GeoDataError("piece table inconsistent")
    if piece_code.min(initial=1) < 1 or piece_code.max(initial=1) >= ncodes:
        raise GeoDataError("piece code out of range")
    shapely.prepare(pieces)
    # Build every prepared point locator now (GEOS builds it lazily on first
    # query) so that the first crash call does not pay for it.
    reps = shapely.point_on_surface(pieces)
    shapely.intersects_xy(pieces, shapely.get_x(reps), shapely.get_y(reps))
    piece_list = list(pieces)
    pc = [codes[int(c)] for c in piece_code]
    lo = leaf_off.tolist()
    lf = leaf_flat.tolist()
    leaves = [
        tuple((piece_list[i], pc[i]) for i in lf[lo[k]:lo[k + 1]]) for k in range(nleaf)
    ]
    return BoundaryLocator(
        source=str(header["source"]),
        codes=codes,
        base=base.tolist(),
        subgrids=array.array("i", subgrids.astype(np.int32).tobytes()),
        leaves=leaves,
        sub=sub,
        suboff=suboff,
        meta={k: header[k] for k in ("overrides", "rank") if k in header},
    )
