"""The boundary data file format (format 2): a flat, memory-mappable file and its
xz-compressed pack.

Standard library only (no numpy, no shapely): the serving process maps the file
and reads it in place, so the data costs page cache shared by every worker, not
private heap.

Map file (``boundaries-<digest16>.map``), little-endian::

    [0:16)    MAP_MAGIC
    [16:80)   SHA-256 (hex) of bytes [96:end)
    [80:96)   length of the JSON header, ASCII decimal, right-justified, ends "\\n"
    [96:...)  JSON header: format, source, codes, grid parameters, and the
              sections as {name: [offset, count, typecode]}
    sections, each at an 8-byte aligned offset: int32 ("i") or float64 ("d") arrays

Pack file (``data/boundaries.bin``, committed and in the wheel)::

    PACK_MAGIC
    SHA-256 (hex) of the map's bytes [96:end) (= the map's own digest), " ",
    length of the xz stream (ASCII decimal, right-justified in 12), "\\n"
    xz stream of the whole map file

The pack is expanded once (:mod:`gateway.geo.cache`) and the map is then mapped.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import struct
import sys
from collections.abc import Mapping
from typing import Any

from gateway.errors import GeoDataError

MAP_MAGIC = b"GWGEO2 map     \n"
PACK_MAGIC = b"GWGEO2 xz\n"
OLD_MAGIC = b"GWGEO1\n"
PREAMBLE = 96
FORMAT = 2
ALIGN = 8
CHUNK = 1 << 20

# grid entries (base, sub, quad): 0 <= v < NODE a country code index (0 = none),
# v >= NODE quadtree node v - NODE, v < 0 a leaf program at prog[-1 - v]
NODE = 1024
CODE_BITS = 10  # leaf header: default | ntests << CODE_BITS;
CODE_MASK = (1 << CODE_BITS) - 1  # test: code | b0 << CODE_BITS | nruns << CODE_BITS + 1
RUN_BITS = 9  # run: first vertex << RUN_BITS | number of vertices
RUN_MAX = (1 << RUN_BITS) - 1

__all__ = ["CODE_BITS", "CODE_MASK", "FORMAT", "MAP_MAGIC", "NODE", "PACK_MAGIC", "PREAMBLE",
           "RUN_BITS", "RUN_MAX", "encode_map", "pack_header", "parse_map", "read_pack_header",
           "verify_map"]


def _fail(path: os.PathLike[str] | str, why: str) -> GeoDataError:
    return GeoDataError(f"boundary data {path}: {why}")


def encode_map(header: Mapping[str, Any], sections: Mapping[str, tuple[str, bytes]]) -> bytes:
    """The bytes of a map file. ``sections``: name -> (typecode, little-endian raw
    bytes). Deterministic: same input, same bytes."""
    sizes = {"i": 4, "d": 8}
    names = list(sections)
    # the header holds the offsets, which depend on the header's length: iterate
    hdr_len = 0
    for _ in range(10):
        off = PREAMBLE + hdr_len
        off += -off % ALIGN
        table: dict[str, list[Any]] = {}
        for name in names:
            tc, raw = sections[name]
            if len(raw) % sizes[tc]:
                raise ValueError(f"section {name}: {len(raw)} bytes is not a multiple of {tc}")
            table[name] = [off, len(raw) // sizes[tc], tc]
            off += len(raw)
            off += -off % ALIGN
        hdr = json.dumps({**header, "format": FORMAT, "sections": table},
                         sort_keys=True, separators=(",", ":")).encode()
        if len(hdr) == hdr_len:
            break
        hdr_len = len(hdr)
    else:  # pragma: no cover - the length converges in two rounds
        raise RuntimeError("header length did not converge")
    body = bytearray(hdr)
    for name in names:
        start = int(table[name][0]) - PREAMBLE
        body.extend(b"\0" * (start - len(body)))
        body.extend(sections[name][1])
    digest = hashlib.sha256(body).hexdigest().encode()
    return MAP_MAGIC + digest + str(len(hdr)).rjust(15).encode() + b"\n" + bytes(body)


def pack_header(digest: str, comp_len: int) -> bytes:
    return PACK_MAGIC + digest.encode() + b" " + str(comp_len).rjust(12).encode() + b"\n"


PACK_HEADER = len(PACK_MAGIC) + 64 + 1 + 12 + 1


def read_pack_header(path: pathlib.Path) -> tuple[str, int]:
    """The map digest and the compressed length named by a pack's header, after
    checking that the file has that length (GeoDataError if it is not a pack or is
    truncated)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(PACK_HEADER)
            size = os.fstat(fh.fileno()).st_size
    except OSError as exc:
        raise _fail(path, f"cannot read ({exc})") from exc
    if not head.startswith(PACK_MAGIC):
        raise _fail(path, "not a boundary data pack (bad magic)")
    digest = head[len(PACK_MAGIC):len(PACK_MAGIC) + 64]
    length = head[len(PACK_MAGIC) + 65:-1].strip()
    if len(head) != PACK_HEADER or head[-1:] != b"\n" or not _is_hex(digest) \
            or not length.isdigit():
        raise _fail(path, "missing checksum line")
    if size != PACK_HEADER + int(length):
        raise _fail(path, f"truncated or padded ({size} bytes, header says "
                          f"{PACK_HEADER + int(length)})")
    return digest.decode(), int(length)


def _is_hex(b: bytes) -> bool:
    return len(b) == 64 and all(c in b"0123456789abcdef" for c in b)


def verify_map(fh: io.RawIOBase, where: str, expected: str | None = None) -> str:
    """Check magic and SHA-256 of an open map file, reading it in chunks with
    ``readinto`` (not through a mapping, so that checking adds nothing to the
    process's resident memory). Returns the digest; GeoDataError if anything is
    off."""
    h = hashlib.sha256()
    try:
        fh.seek(0)
        pre = fh.read(PREAMBLE)
        if not pre.startswith(MAP_MAGIC):
            raise _fail(where, "not a boundary data map (bad magic)")
        if len(pre) < PREAMBLE:
            raise _fail(where, "truncated")
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            h.update(view[:n])
    except OSError as exc:
        raise _fail(where, f"cannot read ({exc})") from exc
    digest = pre[16:80].decode("ascii", "replace")
    if h.hexdigest() != digest:
        raise _fail(where, "checksum mismatch")
    if expected is not None and digest != expected:
        raise _fail(where, "not the map of this pack (digest differs)")
    return digest


def parse_map(buf: Any, where: str) -> tuple[dict[str, Any], dict[str, memoryview]]:
    """Header and typed views of the sections of a verified map held in ``buf`` (an
    mmap or bytes). The views read the buffer in place (no copy) on little-endian
    machines."""
    mv = memoryview(buf)
    try:
        hdr_len = int(bytes(mv[80:96]).decode("ascii"))
        header = json.loads(bytes(mv[PREAMBLE:PREAMBLE + hdr_len]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise GeoDataError(f"boundary data {where}: malformed header ({exc})") from exc
    if header.get("format") != FORMAT:
        raise GeoDataError(f"boundary data {where}: unsupported format {header.get('format')!r}")
    views: dict[str, memoryview] = {}
    sizes = {"i": 4, "d": 8}
    for name, (off, count, tc) in header["sections"].items():
        size = sizes.get(tc)
        if size is None or struct.calcsize(tc) != size:
            raise GeoDataError(f"boundary data {where}: section {name}: bad type {tc!r}")
        end = off + count * size
        if off % ALIGN or end > len(mv):
            raise GeoDataError(f"boundary data {where}: section {name} out of bounds")
        raw = mv[off:end]
        if sys.byteorder == "little":
            views[name] = raw.cast("B").cast(tc)
        else:  # pragma: no cover - big-endian hosts: a private, swapped copy
            import array

            arr = array.array(tc, bytes(raw))
            arr.byteswap()
            views[name] = memoryview(arr)
    return header, views
