"""``python -m gateway.geo prepare [--dir DIR] [--pack PACK]``: expand the boundary
pack into its memory-mappable map ahead of time (next to the pack by default), e.g.
in a container image build, so that no worker pays the expansion at start-up.
``python -m gateway.geo where``: print which map a load would use (expanding it
into the cache directory if needed)."""

from __future__ import annotations

import argparse
import pathlib
import sys

from gateway.errors import GeoDataError
from gateway.geo.boundaries import DEFAULT_DATA, load_locator
from gateway.geo.cache import EXIT_DATA, EXIT_OS, prepare


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gateway.geo", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="expand the pack into DIR (default: next to it)")
    p.add_argument("--dir", type=pathlib.Path)
    p.add_argument("--pack", type=pathlib.Path, default=DEFAULT_DATA)
    w = sub.add_parser("where", help="load and print where the map is read from")
    w.add_argument("--pack", type=pathlib.Path, default=DEFAULT_DATA)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "prepare":
            print(prepare(a.pack, a.dir))
        else:
            print(load_locator(a.pack).where)
    except GeoDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DATA
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_OS
    return 0


if __name__ == "__main__":
    sys.exit(main())
