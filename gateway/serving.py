"""Production serving on POSIX: gunicorn, its settings, and the app built in each worker.

``assist-gateway serve`` runs :class:`GatewayServer`: a gunicorn master and ``workers``
processes of the threaded worker (``gthread``, ``threads`` requests at a time each).

- **Read-only data once, in the master** (``preload_app``): the number plan and the
  boundary locator are loaded before the fork; every worker uses the master's copy
  (copy-on-write pages, shared until written, and they never are).
- **Everything with a thread or a socket, in each worker, after the fork**: threads do
  not survive ``fork()`` and a database connection must never be shared by two
  processes.  So the master loads a :class:`WorkerApp`, a WSGI callable holding only the
  preloaded data, and each worker builds the real app
  (:func:`gateway.app.create_app`: its engine, the delivery worker, the notifier, the
  command queue, the step writer, the line-health refresher) in ``post_worker_init``,
  before it accepts its first connection.
- **Graceful stop** (SIGTERM to the master): the workers stop accepting, requests in
  flight get ``graceful_timeout`` to finish (a Twilio webhook is answered in
  milliseconds; Twilio gives up after 15 s), then each worker writes out the voice steps
  still queued (:meth:`WorkerApp.shutdown`) and stops its background threads.  Rows a
  background thread had leased are leased until their lease ends, then retried.
- **A worker never outlives its master** (Linux): a master killed outright (SIGKILL, the
  OOM killer) takes its workers with it, as it would a single process.
- **Logs**: gunicorn's own lines go through the gateway's JSON logs; no access log (a
  URL may carry a caller's number).

SQLite stays the embedded database of ONE process: several workers on one SQLite file
queue on its single write lock (busy timeouts, steps answered but not stored), so
:func:`refusal` refuses ``workers > 1`` unless the database is PostgreSQL.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.config import Settings
from gateway.errors import ConfigError

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger(__name__)

#: environment equivalents of ``serve``'s options (a flag wins over its variable)
ENV = {"host": "GATEWAY_HOST", "port": "GATEWAY_PORT", "workers": "GATEWAY_WORKERS",
       "threads": "GATEWAY_THREADS", "server": "GATEWAY_SERVER"}
SERVERS = ("gunicorn", "waitress")
#: prometheus_client's multiprocess directory (gateway.metrics.MULTIPROC_ENV; not imported
#: from there: importing prometheus_client fixes its mode)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    #: processes; more than one needs PostgreSQL
    workers: int = 1
    #: requests served at once per process
    threads: int = 8
    #: gunicorn on POSIX; waitress (one process) elsewhere, or when asked for
    server: str = "gunicorn" if os.name == "posix" else "waitress"
    #: run the delivery, notification and command threads in every worker
    start_worker: bool = True
    #: a worker whose main loop has not reported for this long is killed and replaced
    timeout_s: int = 30
    #: after SIGTERM, requests in flight get this long to finish
    graceful_timeout_s: int = 20
    #: an idle kept-alive connection is closed after this long (behind the proxy)
    keepalive_s: int = 5

    @property
    def bind(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"


def resolve_options(flags: Mapping[str, Any], env: Mapping[str, str]) -> ServeOptions:
    """``serve``'s options: each flag given, else its variable (:data:`ENV`), else the
    default.  Raises ConfigError naming the flag or variable."""
    defaults = ServeOptions()

    def pick(name: str, default: Any, parse: Callable[[str], Any]) -> Any:
        if flags.get(name) is not None:
            return flags[name]
        raw = env.get(ENV[name], "").strip()
        if not raw:
            return default
        try:
            return parse(raw)
        except ValueError:
            raise ConfigError(f"{ENV[name]}: expected a whole number, got {raw!r}") from None

    options = ServeOptions(
        host=pick("host", defaults.host, str),
        port=pick("port", defaults.port, int),
        workers=pick("workers", defaults.workers, int),
        threads=pick("threads", defaults.threads, int),
        server=pick("server", defaults.server, str),
        start_worker=not flags.get("no_worker", False),
    )
    checks = (("port", 0 <= options.port <= 65535, "a port number (0-65535)"),
              ("workers", 1 <= options.workers <= 64, "between 1 and 64"),
              ("threads", 1 <= options.threads <= 256, "between 1 and 256"),
              ("server", options.server in SERVERS, " or ".join(SERVERS)))
    for name, ok, expected in checks:
        if not ok:
            source = f"--{name}" if flags.get(name) is not None else ENV[name]
            raise ConfigError(f"{source}: expected {expected}, got {getattr(options, name)!r}")
    if options.server == "gunicorn" and os.name != "posix":
        raise ConfigError("--server gunicorn: gunicorn needs a POSIX system; "
                          "use --server waitress (one process)")
    return options


def refusal(settings: Settings, options: ServeOptions) -> str | None:
    """Why these options cannot serve this database (one line), or None."""
    if options.workers == 1:
        return None
    if options.server == "waitress":
        return (f"--workers {options.workers}: waitress serves one process; "
                "use --server gunicorn (POSIX) or --workers 1")
    if settings.database_url.startswith("sqlite"):
        return (f"--workers {options.workers} needs PostgreSQL: SQLite takes one writer at a "
                "time, so several processes on one file wait on each other's locks; serve "
                "one process (--workers 1, more --threads) or set "
                "GATEWAY_DATABASE_URL=postgresql://...")
    return None


def private_metrics_dir(options: ServeOptions, env: MutableMapping[str, str]) -> str | None:
    """Several workers and no PROMETHEUS_MULTIPROC_DIR: a new empty directory, set in
    ``env`` (before prometheus_client is imported, which reads it once), so a scrape of
    any worker reports the sum over all of them.  The caller removes it at exit."""
    if options.workers == 1 or env.get(MULTIPROC_ENV):
        return None
    import tempfile

    path = tempfile.mkdtemp(prefix="assist-gateway-metrics-")
    env[MULTIPROC_ENV] = path
    return path


# -- the app, built in each worker ---------------------------------------------------------


#: the modules :func:`gateway.app.create_app` imports as it builds the app (the views and
#: their schemas, the background workers, the adapters, metrics and logs): imported in the
#: master by :func:`preload`, so every worker shares one copy of their code instead of
#: importing its own after the fork (tests/e2e/test_serving.py checks that a worker
#: imports no gateway module the master did not)
WORKER_MODULES = (
    "gateway.app", "gateway.logs", "gateway.metrics", "gateway.delivery",
    "gateway.centre_health", "gateway.entitlement", "gateway.notify", "gateway.owners",
    "gateway.commands", "gateway.line_health", "gateway.steps",
    "gateway.adapters.assistance", "gateway.adapters.messaging",
    "gateway.adapters.vehicle_commands",
    "gateway.views.ops", "gateway.views.vehicle", "gateway.views.voice", "gateway.views.ivr",
    "gateway.views.agent", "gateway.views.admin", "gateway.views.openapi",
)


def import_worker_modules() -> None:
    """Import :data:`WORKER_MODULES` (the code, before the fork)."""
    import importlib

    for name in WORKER_MODULES:
        importlib.import_module(name)


def preload(settings: Settings) -> dict[str, Any]:
    """The read-only data every worker shares, loaded in the master: ``plan`` and
    ``locator`` for :func:`gateway.app.create_app`, and the code a worker runs
    (:data:`WORKER_MODULES`).  One that fails to load is left out: each worker then
    tries again and reports it (``/readyz``).  The database schema is brought up to
    date here too, once."""
    from gateway.geo import load_locator
    from gateway.plan import load_plan

    import_worker_modules()
    loaded: dict[str, Any] = {}
    started = time.perf_counter()
    for name, load in (("plan", lambda: load_plan(settings.number_plan_dir)),
                       ("locator", lambda: load_locator(settings.boundaries_path))):
        try:
            loaded[name] = load()
        except Exception as exc:  # noqa: BLE001 -- the worker loads it again and reports it
            log.warning("%s did not load in the master (%s: %s); each worker tries again",
                        name, type(exc).__name__, exc)
    log.info("preloaded %s in the master in %.2f s", " and ".join(sorted(loaded)) or "nothing",
             time.perf_counter() - started)
    _upgrade_schema(settings)
    return loaded


def _upgrade_schema(settings: Settings) -> None:
    """Bring the schema up to date once, before the fork, and close every connection
    (none may be shared with a worker): the workers then find it current.  A failure
    is left to the workers, which try again and report it (``/readyz``)."""
    from gateway.store import Store

    try:
        store = Store.from_url(settings.database_url)
    except Exception as exc:  # noqa: BLE001 -- a bad URL: each worker reports it
        log.warning("database not opened in the master (%s: %s)", type(exc).__name__, exc)
        return
    try:
        store.create_schema()
    except Exception as exc:  # noqa: BLE001 -- the workers try again and report it
        log.warning("schema not brought up to date in the master (%s: %s); each worker "
                    "tries again", type(exc).__name__, exc)
    finally:
        store.dispose()


class WorkerApp:
    """The WSGI callable the master loads: the settings and the preloaded read-only data.

    :meth:`build` makes the Flask app (engine, background threads) in the process that
    calls it: each worker calls it after the fork, before serving.  A request that
    arrives first builds it (never the case under :class:`GatewayServer`)."""

    def __init__(self, settings: Settings, *, start_worker: bool,
                 preloaded: Mapping[str, Any]) -> None:
        self.settings = settings
        self.start_worker = start_worker
        self.preloaded = dict(preloaded)
        self._app: Flask | None = None
        self._lock = threading.Lock()

    @property
    def built(self) -> bool:
        return self._app is not None

    def build(self) -> Flask:
        with self._lock:
            if self._app is None:
                from gateway.app import create_app

                self._app = create_app(self.settings, start_worker=self.start_worker,
                                       **self.preloaded)
            return self._app

    def __call__(self, environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        app = self._app or self.build()
        result: Iterable[bytes] = app(environ, start_response)
        return result

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """After the last request: write out the queued voice steps and stop the
        background threads (what a thread had leased is retried once its lease ends)."""
        if self._app is None:
            return
        from gateway.app import stop_background

        stop_background(self._app, timeout_s=timeout_s)


# -- gunicorn ---------------------------------------------------------------------------------


def gunicorn_settings(options: ServeOptions) -> dict[str, Any]:
    """The gunicorn configuration for these options (what ``serve`` runs)."""
    from gunicorn import glogging

    class GatewayLogs(glogging.Logger):  # type: ignore[misc]
        """gunicorn's lines through the gateway's logs (the root logger: JSON lines,
        the level of GATEWAY_LOG_LEVEL); no access log."""

        def setup(self, cfg: Any) -> None:
            self.cfg = cfg
            self._access_log_enabled = False
            for logger in (self.error_log, self.access_log):
                for handler in list(logger.handlers):
                    logger.removeHandler(handler)
            self.error_log.setLevel(logging.NOTSET)
            self.error_log.propagate = True
            self.access_log.propagate = False

        def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
            return None

    return {
        "bind": [options.bind],
        "workers": options.workers,
        "worker_class": "gthread",
        "threads": options.threads,
        "timeout": options.timeout_s,
        "graceful_timeout": options.graceful_timeout_s,
        "keepalive": options.keepalive_s,
        "preload_app": True,
        "proc_name": "assist-gateway",
        "logger_class": GatewayLogs,
        "accesslog": None,
        # no control socket under $HOME; heartbeat files in memory where there is /dev/shm
        "control_socket_disable": True,
        "worker_tmp_dir": "/dev/shm" if os.path.isdir("/dev/shm") else None,
        "pre_fork": _pre_fork,
        "post_fork": _post_fork,
        "post_worker_init": _post_worker_init,
        "worker_exit": _worker_exit,
        "child_exit": _child_exit,
    }


def _pre_fork(server: Any, worker: Any) -> None:
    # What the master holds (code, plan, boundary index) moves to the collector's
    # permanent generation: a worker's collections then never write to those objects'
    # headers, which would copy their pages into the worker (Python's gc.freeze advice
    # for fork without exec).
    gc.freeze()


def _post_fork(server: Any, worker: Any) -> None:
    _die_with_parent(server.pid)


def _post_worker_init(worker: Any) -> None:
    started = time.perf_counter()
    app = worker.wsgi
    if isinstance(app, WorkerApp):
        app.build()
    log.info("worker %d ready in %.2f s", os.getpid(), time.perf_counter() - started)


def _worker_exit(server: Any, worker: Any) -> None:
    # also called in the master for a worker that vanished: only a worker shuts down
    if os.getpid() == worker.pid and isinstance(getattr(worker, "wsgi", None), WorkerApp):
        worker.wsgi.shutdown()


def _child_exit(server: Any, worker: Any) -> None:
    from gateway.metrics import multiprocess_dir

    if multiprocess_dir() is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def _die_with_parent(parent: int) -> None:
    """Linux: this process is killed when its parent dies (PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the master died before the call above
        os._exit(1)


class GatewayServer:
    """gunicorn's application: the settings in, :class:`WorkerApp` loaded in the master."""

    def __init__(self, settings: Settings, options: ServeOptions) -> None:
        from gunicorn.app.base import BaseApplication

        outer = self

        class _Application(BaseApplication):  # type: ignore[misc]
            def load_config(self) -> None:
                for key, value in gunicorn_settings(outer.options).items():
                    self.cfg.set(key, value)

            def load(self) -> WorkerApp:
                return WorkerApp(outer.settings, start_worker=outer.options.start_worker,
                                 preloaded=preload(outer.settings))

        self.settings = settings
        self.options = options
        self._application = _Application(prog="assist-gateway serve")

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (gunicorn exits the process when it stops)."""
        self._application.run()
