"""Command line: ``python -m gateway <command>`` or ``assist-gateway <command>``."""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import secrets
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from gateway import __version__, logs
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
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    locate = sub.add_parser("locate", help="country and emergency route of a position (offline)")
    locate.add_argument("lat", nargs="?", type=_coordinate("latitude", 90))
    locate.add_argument("lon", nargs="?", type=_coordinate("longitude", 180))
    locate.add_argument("--csv", action="store_true",
                        help="read lat,lon lines on stdin; write lat,lon,country,emergency_number,"
                             "fallback_dial lines (fallback_dial empty: the call is handed back "
                             "to the car)")
    locate.add_argument("--msisdn", help="the car's SIM number (E.164), used at sea")

    check = sub.add_parser(
        "check", help="the emergency route of every country of the plan with the configured "
                      "caller IDs; exit 1 if the configuration is invalid")
    check.add_argument("--json", action="store_true",
                       help="print a JSON array, one object per country")

    serve = sub.add_parser(
        "serve", help="serve the gateway (gunicorn on POSIX; waitress elsewhere)",
        description="Serve the gateway: gunicorn (POSIX) with --workers processes of "
                    "--threads threads, the read-only data loaded once and shared; or "
                    "waitress (one process).  Several workers need PostgreSQL.  Each option "
                    "also reads its variable: GATEWAY_HOST, GATEWAY_PORT, GATEWAY_WORKERS, "
                    "GATEWAY_THREADS, GATEWAY_SERVER (the option wins).")
    serve.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8080)")
    serve.add_argument("--workers", type=int, default=None,
                       help="processes (default 1; more than one needs PostgreSQL)")
    serve.add_argument("--threads", type=int, default=None,
                       help="requests served at once per process (default 8)")
    serve.add_argument("--server", choices=("gunicorn", "waitress"), default=None,
                       help="gunicorn (default on POSIX) or waitress (one process; the "
                            "default elsewhere)")
    serve.add_argument("--demo", action="store_true",
                       help="generate and print a demo auth token and vehicle API token if unset")
    serve.add_argument("--no-worker", action="store_true",
                       help="do not run the delivery worker thread in this process")

    worker = sub.add_parser("worker",
                            help="deliver the outbox to the assistance centre (separate process)")
    worker.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus metrics on this port (default: "
                             "GATEWAY_WORKER_METRICS_PORT; unset: no metrics server)")
    worker.add_argument("--metrics-host", default="127.0.0.1",
                        help="address of the metrics server (default 127.0.0.1)")
    sub.add_parser("init-db", help="same as db upgrade (kept for existing scripts)")

    db = sub.add_parser("db", help="the database schema (migrations; serve and worker "
                                   "upgrade it at start)")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("upgrade", help="bring GATEWAY_DATABASE_URL to the newest revision "
                                      "(safe while other instances start or run)")
    db_sub.add_parser("current", help="the revision of GATEWAY_DATABASE_URL and the newest one")

    simulate = sub.add_parser(
        "simulate", help="play the car and Twilio against a gateway (a demo one without --url) "
                         "and print each step of the call: what was said, dialled, and why",
        description=_SIMULATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    simulate.add_argument("scenario", choices=("crash", "sos", "oncall", "owner"))
    simulate.add_argument("--lat", type=_coordinate("latitude", 90), default=None,
                          help="where the car is (default 51.5072, central London)")
    simulate.add_argument("--lon", type=_coordinate("longitude", 180), default=None)
    simulate.add_argument("--centre", choices=("answer", "noanswer", "busy", "down"),
                          default="answer", help="how every centre line answers (default answer)")
    simulate.add_argument("--emergency", choices=("answer", "noanswer", "busy", "down"),
                          default="answer",
                          help="how every emergency leg answers (default answer: completed)")
    simulate.add_argument("--url", help="a running gateway (default: start a demo gateway)")
    simulate.add_argument("--msisdn", help="the car's SIM number (owner: the owner's phone)")
    simulate.add_argument("--vin", help="the car's VIN")
    simulate.add_argument("--customer-number",
                          help="owner: the 8-digit customer number to type if the IVR asks")

    vehicles = sub.add_parser("vehicles", help="the vehicle registry (enrolment)")
    vehicles_sub = vehicles.add_subparsers(dest="vehicles_command", required=True)
    vehicles_import = vehicles_sub.add_parser(
        "import", help="create or update vehicles from the delivery centre's CSV file "
                       "(all rows or none)",
        description=_IMPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    vehicles_import.add_argument("file", type=Path, help="the CSV file (UTF-8, header row)")
    vehicles_import.add_argument("--dry-run", action="store_true",
                                 help="check the file and say what would change; write nothing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = os.environ.get("GATEWAY_LOG_LEVEL", "").strip().upper() or "INFO"
    if level not in LOG_LEVELS:
        print(f"configuration error: GATEWAY_LOG_LEVEL: {level!r} is not one of "
              f"{', '.join(LOG_LEVELS)}", file=sys.stderr)
        return 2
    logs.configure(level)
    try:
        if args.command == "locate":
            return _locate(args, sys.stdin, sys.stdout)
        if args.command == "check":
            return _check(args, sys.stdout, sys.stderr)
        if args.command == "serve":
            host, port = _listen_address(args)
            try:
                _try_listen(host, port)  # before the app is built and the server's retries
                return _serve(args)
            except OSError as exc:
                if not isinstance(exc, socket.gaierror) and exc.errno not in LISTEN_ERRORS:
                    raise
                print(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}",
                      file=sys.stderr)
                return 2
        if args.command == "worker":
            from gateway.delivery import run_worker_process

            return run_worker_process(Settings.from_env(require_auth_token=False),
                                      metrics_port=_worker_metrics_port(args.metrics_port),
                                      metrics_host=args.metrics_host)
        if args.command == "vehicles":
            return _vehicles_import(args, sys.stdout, sys.stderr)
        if args.command == "simulate":
            return _simulate(args)
        if args.command == "init-db" or (args.command == "db" and args.db_command == "upgrade"):
            from gateway.migrations import upgrade

            result = upgrade(Settings.from_env(require_auth_token=False).database_url)
            print(result.describe())
            return 0
        if args.command == "db" and args.db_command == "current":
            from gateway.migrations import status

            found = status(Settings.from_env(require_auth_token=False).database_url)
            print(found.describe())
            return 1 if found.problems else 0
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except GatewayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 2


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: ``serve`` cannot bind its address: one line and exit 2, no traceback
LISTEN_ERRORS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})


def _listen_address(args: argparse.Namespace) -> tuple[str, str]:
    """``serve``'s host and port as given (flag, else variable, else default)."""
    host = args.host or os.environ.get("GATEWAY_HOST", "").strip() or "127.0.0.1"
    port = args.port if args.port is not None else (
        os.environ.get("GATEWAY_PORT", "").strip() or 8080)
    return str(host), str(port)


def _try_listen(host: str, port: str) -> None:
    """OSError if the address cannot be bound now (another process listens there, a
    privileged port, an address not of this machine); a port that is not a number is
    left to ``serve``'s own check."""
    if not port.isdigit():
        return
    family, kind, proto, _, address = socket.getaddrinfo(
        host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
        probe.bind(address)


def _worker_metrics_port(flag: int | None) -> int | None:
    if flag is not None:
        return flag
    raw = os.environ.get("GATEWAY_WORKER_METRICS_PORT", "").strip()
    if not raw:
        return None
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ConfigError(f"GATEWAY_WORKER_METRICS_PORT: expected a port number, got {raw!r}")
    return int(raw)


_IMPORT_HELP = """\
Create or update vehicles from a CSV file (UTF-8, comma-separated, a header row):

  vin, car_msisdn, market, purchase_date, owner_name, owner_phones   required
  serviced_regularly (true/false; empty: false), language (sv-SE), pin   optional

owner_phones: one or more numbers separated by ';' (the first gets theft SMS).
pin: 4 to 8 digits, set only on a vehicle that has no PIN yet.
Every row is checked first; any error is reported as FILE:LINE: FIELD: reason,
nothing is written and the exit status is 1.  Otherwise all rows are written in one
transaction, each reported as created, updated (with the fields) or unchanged.
Idempotent on the VIN: importing the same file again changes nothing.
Uses GATEWAY_DATABASE_URL and GATEWAY_PIN_SCRYPT_N.
"""


_SIMULATE_HELP = """\
Play the car and Twilio against a gateway and print the call, step by step.

  crash, sos, oncall   the car posts its data message (POST /v1/events), then calls
                       the number the answer gives (call_number)
  owner                the owner calls the owners' line and chooses 1 (roadside)

Every webhook is signed with GATEWAY_TWILIO_AUTH_TOKEN for the gateway's public URL
(GATEWAY_PUBLIC_URL, else --url); every action URL and whisper URL is followed as
Twilio would.  A centre line answers as --centre says (answer: the agent hears the
whisper, presses 1, the call is bridged); an emergency leg as --emergency says.
The gateway's reasons are read from the agent API when GATEWAY_AGENT_API_TOKENS has a
read token.  Without --url a demo gateway is started on a free local port (temporary
SQLite file, generated tokens, emergency caller IDs for GB and DE) and stopped after.
Exit 0 when the call ended as expected, 1 otherwise, 2 if it could not run.
"""


def _simulate(args: argparse.Namespace) -> int:
    from gateway.simulate import SimulationError, simulate

    if (args.lat is None) != (args.lon is None):
        print("simulate: give both --lat and --lon, or neither", file=sys.stderr)
        return 2
    if args.url and not args.url.startswith(("http://", "https://")):
        print(f"simulate: --url: {args.url!r} is not an http(s) URL", file=sys.stderr)
        return 2
    try:
        return simulate(args.scenario, lat=args.lat, lon=args.lon, centre=args.centre,
                        emergency=args.emergency, url=args.url, msisdn=args.msisdn,
                        vin=args.vin, customer_number=args.customer_number, out=sys.stdout)
    except SimulationError as exc:
        sys.stdout.flush()
        print(f"simulate: {exc}", file=sys.stderr)
        return 2


def _vehicles_import(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from gateway.owners import PinHasher, Vehicles
    from gateway.owners.bulk_import import import_file
    from gateway.store import Store

    settings = Settings.from_env(require_auth_token=False)
    name = args.file.name
    store = Store.from_url(settings.database_url)
    try:
        store.create_schema()
        registry = Vehicles(store, PinHasher(n=settings.pin_scrypt_n))
        report = import_file(args.file, registry=registry, actor=f"import:{name}"[:100],
                             dry_run=args.dry_run)
    except OSError as exc:
        print(f"{args.file}: cannot read the file: {exc.strerror or exc}", file=stderr)
        return 1
    except GatewayError as exc:  # the database, or a car SIM taken by a concurrent writer
        print(f"{name}: {exc}; nothing was imported", file=stderr)
        return 1
    finally:
        store.dispose()
    if report.errors:
        for error in report.errors:
            print(error.format(name), file=stderr)
        rows = len({e.line for e in report.errors})
        print(f"{name}: {len(report.errors)} error(s) in {rows} row(s); nothing was imported",
              file=stderr)
        return 1
    for line, result in report.results:
        what = ("would be " if report.dry_run else "") + result.result
        if result.fields:
            what += f" ({', '.join(result.fields)})"
        if result.customer_number:
            what += f", customer number {result.customer_number}"
        stdout.write(f"{name}:{line}: {result.vin} {what}\n")
    summary = ", ".join(f"{report.count(k)} {k}" for k in ("created", "updated", "unchanged"))
    done = "checked (dry run, nothing written)" if report.dry_run else "imported"
    stdout.write(f"{name}: {done}: {summary}\n")
    return 0


def _locate(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    from gateway.calls.call_plan import emergency_route
    from gateway.geo import load_locator
    from gateway.plan import load_plan
    from gateway.routing import choose_country

    settings = Settings.from_env(require_auth_token=False)
    locator = load_locator(settings.boundaries_path)
    plan = load_plan(settings.number_plan_dir)

    def resolve(lat: float, lon: float) -> dict[str, object]:
        choice = choose_country(lat, lon, locator=locator, last_known=lambda: None,
                                msisdn=args.msisdn)
        route = emergency_route(choice.country, plan, settings.emergency_caller_ids)
        entry = plan.get(choice.country) if choice.country else None
        return {
            "lat": lat,
            "lon": lon,
            "country": choice.location_country,
            "route_country": choice.country,
            "emergency_number": route.emergency_number,
            "fallback_dial": route.fallback_dial,  # None: the gateway hands the call back
            "completable": route.completable,
            "why": route.why,
            "reason": choice.reason,
            "boundary_source": locator.source,
            "number_source": entry.source if entry is not None else "plan default (112)",
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
                     f"{found['emergency_number']},{found['fallback_dial'] or ''}\n")
    return status


def _check(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    """One row per country: its emergency route and whether the gateway can complete it.

    Exit 1 when the configuration is invalid: the settings or the plan do not load,
    a caller ID belongs to a country where Twilio places no emergency calls, or
    ``inbound.csv`` lists no emergency number.  Countries that only hand back are
    reported, not an error: the car then dials the emergency number itself.
    """
    from gateway.calls.call_plan import emergency_route
    from gateway.calls.inbound import EMERGENCY
    from gateway.plan import TWILIO_EMERGENCY_FILE, load_plan

    try:
        settings = Settings.from_env(require_auth_token=False)
        plan = load_plan(settings.number_plan_dir)
    except GatewayError as exc:  # ConfigError, PlanError
        print(f"invalid configuration: {exc}", file=stderr)
        return 1
    problems = [
        f"GATEWAY_EMERGENCY_CALLER_IDS: {number} is a caller ID of {country}, where Twilio "
        f"places no emergency calls (not in {TWILIO_EMERGENCY_FILE}; countries there: "
        f"{' '.join(plan.twilio_emergency_countries())})"
        for country, number in sorted(settings.emergency_caller_ids.items())
        if plan.twilio_emergency(country) is None
    ]
    if not any(n.service == EMERGENCY for n in plan.inbound):
        problems.append(f"{plan.source}: inbound.csv lists no {EMERGENCY} number; the cars' "
                        "SOS and crash calls would reach no one")

    rows: list[dict[str, object]] = []
    for country in plan.countries():
        route = emergency_route(country, plan, settings.emergency_caller_ids)
        fallback: dict[str, object] = {"kind": "hand_back"}
        if route.dials:
            number, caller_id = route.dials[0]
            fallback = {"kind": "dial", "number": number, "caller_id": caller_id}
        rows.append({"country": country, "emergency_number": route.emergency_number,
                     "fallback": fallback, "completable": route.completable,
                     "why": route.why})
    if args.json:
        stdout.write(json.dumps(rows, ensure_ascii=False, indent=2) + "\n")
    else:
        _check_table(rows, stdout)
    for country, number in sorted(settings.emergency_caller_ids.items()):
        twilio = plan.twilio_emergency(country)
        if twilio is not None and twilio.address_required:
            print(f"note: Twilio routes {country} emergency calls by the address registered "
                  f"for {number}; register it with Twilio", file=stderr)
    for problem in problems:
        print(f"invalid: {problem}", file=stderr)
    return 1 if problems else 0


def _check_table(rows: list[dict[str, object]], out: TextIO) -> None:
    def fallback(dial: object) -> str:
        if not isinstance(dial, dict) or dial.get("kind") != "dial":
            return "hand back"
        return f"dial {dial['number']}" + (f" from {dial['caller_id']}"
                                          if dial.get("caller_id") else "")

    table = [("country", "emergency", "fallback", "completable", "why")] + [
        (str(r["country"]), str(r["emergency_number"]), fallback(r["fallback"]),
         "yes" if r["completable"] else "no", str(r["why"])) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(4)]
    out.writelines("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False))
                   + "  " + line[4] + "\n" for line in table)
    hand_back = sum(1 for r in rows if not r["completable"])
    out.write(f"{len(rows)} countries, {hand_back} only hand back to the car "
              f"(it dials the emergency number itself); {len(rows) - hand_back} dial\n")


def _serve(args: argparse.Namespace) -> int:
    from gateway import serving

    env = dict(os.environ)
    options = serving.resolve_options(vars(args), env)
    if args.demo:
        env.setdefault("GATEWAY_PUBLIC_URL", f"http://{options.host}:{options.port}")
        if not env.get("GATEWAY_TWILIO_AUTH_TOKEN"):
            env["GATEWAY_TWILIO_AUTH_TOKEN"] = secrets.token_hex(16)
            print(f"demo Twilio auth token: {env['GATEWAY_TWILIO_AUTH_TOKEN']}", flush=True)
        if not env.get("GATEWAY_VEHICLE_API_TOKENS"):
            env["GATEWAY_VEHICLE_API_TOKENS"] = secrets.token_hex(16)
            print(f"demo vehicle API token: {env['GATEWAY_VEHICLE_API_TOKENS']}", flush=True)
    settings = Settings.from_env(env)
    refused = serving.refusal(settings, options)
    if refused:
        print(f"serve: {refused}", file=sys.stderr)
        return 2
    where = (f"http://{options.bind} (database {settings.database_url.split('@')[-1]}; "
             f"{options.server}, {options.workers} worker(s) x {options.threads} threads)")
    if options.server == "waitress":
        import waitress

        from gateway.app import create_app

        app = create_app(settings, start_worker=options.start_worker)
        print(f"assist-gateway serving on {where}", flush=True)
        waitress.serve(app, host=options.host, port=options.port, threads=options.threads,
                       ident="assist-gateway")
        return 0
    metrics_dir = serving.private_metrics_dir(options, os.environ)
    master = os.getpid()
    try:
        server = serving.GatewayServer(settings, options)
        print(f"assist-gateway serving on {where}", flush=True)
        server.run()
    finally:
        # gunicorn forks its workers inside run(), and a worker that exits returns
        # through here too: only the master removes the directory all of them write to
        if metrics_dir and os.getpid() == master:
            import shutil

            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0
