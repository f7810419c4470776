"""Where the boundary map lives at run time, and expanding the pack into it once.

The package ships ``data/boundaries.bin``, an xz pack of the map (9-10 MB). The map
itself (uncompressed, ~75 MB) is what the locator memory-maps; it is found, in
this order, as ``boundaries-<digest16>.map``:

1. next to the pack (``gateway/geo/data/``: where ``python -m gateway.geo prepare``
   puts it, e.g. in a container image build);
2. in the cache directory: ``cache_dir`` if the caller gives one, else
   ``$GATEWAY_CACHE_DIR`` if set, else the user cache directory
   (``$XDG_CACHE_HOME/assist-gateway`` or ``~/.cache/assist-gateway``).

If neither holds it, the pack is expanded into the cache directory: decompressed as a stream into a temporary file in that directory,
checked against the SHA-256 in the pack header, fsynced and renamed into place
(atomic), under an exclusive lock so that workers starting together expand it once.
The expansion runs in a short-lived child process (``python -m gateway.geo
prepare``), so that the decompressor's freed heap does not stay in the worker.
Every load checks the map's SHA-256 (~0.1 s) before mapping it. If no directory
can be written, the map is decompressed into process memory (works, but every
worker then holds a private copy: a warning is logged).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import pathlib
from collections.abc import Iterator
from typing import IO, Any

from gateway.errors import GeoDataError
from gateway.geo import mapfile

log = logging.getLogger(__name__)

ENV = "GATEWAY_CACHE_DIR"
APP_DIR = "assist-gateway"

__all__ = ["ENV", "default_cache_dir", "map_name", "open_map", "prepare"]


def default_cache_dir() -> pathlib.Path:
    """``$GATEWAY_CACHE_DIR``, else the user cache directory (XDG)."""
    env = os.environ.get(ENV, "").strip()
    if env:
        return pathlib.Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    root = pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache"
    return root / APP_DIR


def map_name(digest: str) -> str:
    return f"boundaries-{digest[:16]}.map"


def open_map(path: pathlib.Path, cache_dir: pathlib.Path | None = None,
             ) -> tuple[Any, str]:
    """A verified map for ``path`` (a pack or a map file): (buffer, description).
    The buffer is a read-only mmap of the file (or bytes in the fallback)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(len(mapfile.MAP_MAGIC))
    except OSError as exc:
        raise GeoDataError(f"boundary data {path}: cannot read ({exc})") from exc
    if head.startswith(mapfile.MAP_MAGIC):
        return _map_file(path, None), str(path)
    if head.startswith(mapfile.OLD_MAGIC):
        raise GeoDataError(
            f"boundary data {path}: format 1 is no longer read; convert it with "
            "tools/build_boundaries.py --from-v1 (docs/country-lookup.md)")
    if not head.startswith(mapfile.PACK_MAGIC):
        raise GeoDataError(f"boundary data {path}: not a boundary data file (bad magic)")
    digest, _ = mapfile.read_pack_header(path)
    name = map_name(digest)
    if cache_dir is None:
        cache_dir = default_cache_dir()
    for d in dict.fromkeys((path.parent, cache_dir)):
        f = d / name
        if f.is_file():
            try:
                return _map_file(f, digest), str(f)
            except GeoDataError as exc:  # damaged: expanded again below, over it
                log.warning("boundary map %s unusable, expanding the pack again: %s", f, exc)
    try:
        f = _expand_in_child(path, cache_dir, digest)
        return _map_file(f, digest), str(f)
    except OSError as exc:
        log.warning("cannot write the boundary map into %s (%s)", cache_dir, exc)
    log.warning("boundary map: no writable cache directory (set %s); decompressing into "
                "process memory, which every worker then holds privately", ENV)
    return _expand_to_memory(path, digest), f"{path} (in memory)"


def _map_file(f: pathlib.Path, digest: str | None) -> mmap.mmap:
    try:
        with f.open("rb", buffering=0) as fh:
            mapfile.verify_map(fh, str(f), digest)
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise GeoDataError(f"boundary data {f}: cannot map ({exc})") from exc


@contextlib.contextmanager
def _locked(d: pathlib.Path, name: str) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: rename is still atomic
        yield
        return
    with (d / f".{name}.lock").open("a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _decompress(pack: pathlib.Path, digest: str, out: IO[bytes] | None) -> bytes | None:
    """Stream the pack's xz payload into ``out`` (or into memory when out is None),
    checking the SHA-256. GeoDataError if the pack is damaged."""
    import hashlib
    import lzma

    dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    h = hashlib.sha256()
    chunks: list[bytes] = []
    seen = 0
    try:
        with pack.open("rb") as fh:
            fh.seek(mapfile.PACK_HEADER)
            while not dec.eof:
                raw = fh.read(mapfile.CHUNK)
                if not raw:
                    break
                part = dec.decompress(raw)
                if seen < mapfile.PREAMBLE:
                    h.update(part[max(0, mapfile.PREAMBLE - seen):])
                else:
                    h.update(part)
                seen += len(part)
                if out is not None:
                    out.write(part)
                else:
                    chunks.append(part)
    except lzma.LZMAError as exc:
        raise GeoDataError(f"boundary data {pack}: corrupt compressed payload ({exc})") from exc
    if not dec.eof:
        raise GeoDataError(f"boundary data {pack}: truncated compressed payload")
    if h.hexdigest() != digest:
        raise GeoDataError(f"boundary data {pack}: checksum mismatch")
    return b"".join(chunks) if out is None else None


def expand(pack: pathlib.Path, d: pathlib.Path, digest: str | None = None) -> pathlib.Path:
    """Expand the pack into ``d`` (atomically; once, under a lock). Returns the map
    path. OSError if ``d`` cannot be written; GeoDataError if the pack is damaged."""
    digest = digest or mapfile.read_pack_header(pack)[0]
    name = map_name(digest)
    d.mkdir(parents=True, exist_ok=True)
    final = d / name
    with _locked(d, name):
        if final.is_file():  # another process expanded it while we waited
            try:
                _map_file(final, digest).close()
                return final
            except GeoDataError:
                pass
        tmp = d / f".{name}.{os.getpid()}.tmp"
        try:
            with tmp.open("wb") as out:
                _decompress(pack, digest, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        with contextlib.suppress(OSError):
            fd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    log.info("boundary map expanded to %s", final)
    return final


def _expand_in_child(pack: pathlib.Path, d: pathlib.Path, digest: str) -> pathlib.Path:
    """Expand in a short-lived child process: xz decompression leaves ~30 MB of freed
    heap that malloc keeps, which would otherwise stay in this worker for good.
    Falls back to expanding here if the child cannot run."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "gateway.geo", "prepare", "--pack", str(pack), "--dir", str(d)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("boundary map: cannot run %s (%s); expanding in this process", cmd, exc)
        return expand(pack, d, digest)
    why = done.stderr.strip().splitlines()[-1:] or [""]
    if done.returncode == EXIT_DATA:
        raise GeoDataError(why[0].removeprefix("error: "))
    if done.returncode == EXIT_OS:
        raise OSError(why[0].removeprefix("error: "))
    f = d / map_name(digest)
    if done.returncode != 0 or not f.is_file():
        log.warning("boundary map: %s exited %s (%s); expanding in this process", cmd,
                    done.returncode, why[0])
        return expand(pack, d, digest)
    return f


#: exit codes of ``python -m gateway.geo prepare``
EXIT_DATA = 4
EXIT_OS = 3


def _expand_to_memory(pack: pathlib.Path, digest: str) -> bytes:
    data = _decompress(pack, digest, None)
    assert data is not None
    if data[16:80].decode("ascii", "replace") != digest:
        raise GeoDataError(f"boundary data {pack}: checksum mismatch")
    return data


def prepare(pack: pathlib.Path, d: pathlib.Path | None = None) -> pathlib.Path:
    """Expand the pack ahead of time (next to it by default): for images, so that no
    worker ever pays the expansion at start-up."""
    return expand(pack, d if d is not None else pack.parent)
