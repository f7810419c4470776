"""Command line: ``python -m gateway <command>`` or ``assist-gateway <command>``."""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import sys
from collections.abc import Sequence
from typing import TextIO

from gateway import logs
from gateway.config import Settings
from gateway.errors import ConfigError, GatewayError


def _coordinate(kind: str, limit: float):  # type: ignore[no-untyped-def]
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{kind} must be a number, got {raw!r}") from None
        if not math.isfinite(value) or not -limit <= value <= limit:
            raise argparse.ArgumentTypeError(f"{kind} must be between -{limit:g} and {limit:g}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="assist-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    locate = sub.add_parser("locate", help="country and emergency route of a position (offline)")
    locate.add_argument("lat", nargs="?", type=_coordinate("latitude", 90))
    locate.add_argument("lon", nargs="?", type=_coordinate("longitude", 180))
    locate.add_argument("--csv", action="store_true",
                        help="read lat,lon lines on stdin; write lat,lon,country,emergency_number,"
                             "fallback_dial lines")
    locate.add_argument("--msisdn", help="the car's SIM number (E.164), used at sea")

    serve = sub.add_parser("serve", help="serve the gateway with a WSGI server (waitress)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--threads", type=int, default=8)
    serve.add_argument("--demo", action="store_true",
                       help="generate and print a demo auth token and vehicle API token if unset")
    serve.add_argument("--no-worker", action="store_true",
                       help="do not run the delivery worker thread in this process")

    sub.add_parser("worker", help="deliver the outbox to the assistance centre (separate process)")
    sub.add_parser("init-db", help="create the database tables")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.configure(os.environ.get("GATEWAY_LOG_LEVEL", "INFO"))
    try:
        if args.command == "locate":
            return _locate(args, sys.stdin, sys.stdout)
        if args.command == "serve":
            return _serve(args)
        if args.command == "worker":
            from gateway.delivery import run_worker_process

            return run_worker_process(Settings.from_env(require_auth_token=False))
        if args.command == "init-db":
            from gateway.store import Store

            Store.from_url(Settings.from_env(require_auth_token=False).database_url).create_schema()
            return 0
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except GatewayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 2


def _locate(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    from gateway.geo import load_locator
    from gateway.plan import load_plan
    from gateway.routing import choose_country, emergency_route

    settings = Settings.from_env(require_auth_token=False)
    locator = load_locator(settings.boundaries_path)
    plan = load_plan(settings.number_plan_dir)

    def resolve(lat: float, lon: float) -> dict[str, object]:
        choice = choose_country(lat, lon, locator=locator, last_known=lambda: None,
                                msisdn=args.msisdn)
        route = emergency_route(choice.country, plan)
        return {
            "lat": lat,
            "lon": lon,
            "country": choice.location_country,
            "route_country": choice.country,
            "emergency_number": route.emergency_number,
            "fallback_dial": route.fallback_dial,
            "reason": choice.reason,
            "boundary_source": locator.source,
            "number_source": route.source,
        }

    if not args.csv:
        if args.lat is None or args.lon is None:
            print("locate: give LAT LON, or --csv with lines on stdin", file=sys.stderr)
            return 2
        stdout.write(json.dumps(resolve(args.lat, args.lon), ensure_ascii=False) + "\n")
        return 0
    status = 0
    lat_of, lon_of = _coordinate("latitude", 90), _coordinate("longitude", 180)
    for number, line in enumerate(stdin, start=1):
        line = line.strip()
        if not line or line.lower().startswith("lat"):
            continue
        try:
            raw_lat, raw_lon = (p.strip() for p in line.split(",")[:2])
            lat, lon = lat_of(raw_lat), lon_of(raw_lon)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            print(f"line {number}: {exc or 'expected lat,lon'}", file=sys.stderr)
            status = 1
            continue
        found = resolve(lat, lon)
        stdout.write(f"{raw_lat},{raw_lon},{found['country'] or ''},"
                     f"{found['emergency_number']},{found['fallback_dial']}\n")
    return status


def _serve(args: argparse.Namespace) -> int:
    import waitress

    from gateway.app import create_app

    env = dict(os.environ)
    if args.demo:
        env.setdefault("GATEWAY_PUBLIC_URL", f"http://{args.host}:{args.port}")
        if not env.get("GATEWAY_TWILIO_AUTH_TOKEN"):
            env["GATEWAY_TWILIO_AUTH_TOKEN"] = secrets.token_hex(16)
            print(f"demo Twilio auth token: {env['GATEWAY_TWILIO_AUTH_TOKEN']}", flush=True)
        if not env.get("GATEWAY_VEHICLE_API_TOKENS"):
            env["GATEWAY_VEHICLE_API_TOKENS"] = secrets.token_hex(16)
            print(f"demo vehicle API token: {env['GATEWAY_VEHICLE_API_TOKENS']}", flush=True)
    settings = Settings.from_env(env)
    app = create_app(settings, start_worker=not args.no_worker)
    print(f"assist-gateway serving on http://{args.host}:{args.port} "
          f"(database {settings.database_url.split('@')[-1]})", flush=True)
    waitress.serve(app, host=args.host, port=args.port, threads=args.threads, ident="assist-gateway")
    return 0
