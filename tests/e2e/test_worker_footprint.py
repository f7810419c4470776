"""What a serving process imports, and what a gunicorn worker imports after the fork
(issue 10: a worker's private memory and its cold start; bench/bench_memory.py measures
them, these tests guard the causes, deterministically, without timing anything).

* A start on a database already at the newest revision (every start but the first after
  a release) reads one row and imports no Alembic; neither the app nor a webhook imports
  the eCall MSD decoder (asn1tools: only an event that carries ``msd``), the geocoder
  (geopy: only an address lookup) or test tools.
* The head revision read from the files without Alembic is Alembic's.
* Under ``serve`` the master imports every module a worker's app needs
  (``serving.WORKER_MODULES``): a worker building its app after the fork imports no
  module of the gateway's of its own, so the code stays shared.
* Before each fork the master's objects are frozen out of the collector.
* A worker that exits (it returns through ``serve``'s call stack, being forked inside
  it) leaves the metrics directory the workers share; only the master removes it.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest

from gateway import cli, serving
from gateway.migrations import head, head_from_files
from tests.support.twilio import AUTH_TOKEN, call_params, signature

REPO = Path(__file__).resolve().parents[2]

#: never imported to build the app or to answer a webhook
DEFERRED = ("alembic", "asn1tools", "pyparsing", "geopy", "mako", "schemathesis", "hypothesis",
            "pytest")

START = r"""
import json, sys
from gateway.app import create_app
app = create_app()
client = app.test_client()
ready = client.get("/readyz")
params, sig = json.loads(sys.argv[1])
answer = client.post("/twilio/voice", data=params, headers={"X-Twilio-Signature": sig})
app.extensions["gateway"].steps.flush(timeout=5)
print(json.dumps({"readyz": ready.status_code, "voice": answer.status_code,
                  "problems": app.extensions["gateway"].problems,
                  "modules": sorted(sys.modules)}))
"""

AFTER_PRELOAD = r"""
import json, sys
from gateway import logs, serving
from gateway.config import Settings
logs.configure("WARNING")
settings = Settings.from_env()
preloaded = serving.preload(settings)
before = set(sys.modules)
app = serving.WorkerApp(settings, start_worker=False, preloaded=preloaded).build()
print(json.dumps({"new": sorted(set(sys.modules) - before),
                  "problems": app.extensions["gateway"].problems}))
"""


def run(code: str, tmp: Path, *args: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update({"PYTHONPATH": str(REPO), "GATEWAY_TWILIO_AUTH_TOKEN": AUTH_TOKEN,
                "GATEWAY_PUBLIC_URL": "http://localhost",
                "GATEWAY_DATABASE_URL": f"sqlite:///{tmp}/gateway.sqlite3"})
    if os.environ.get("GATEWAY_CACHE_DIR"):
        env["GATEWAY_CACHE_DIR"] = os.environ["GATEWAY_CACHE_DIR"]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def signed_call() -> str:
    params = call_params("CA" + "1" * 32, "+46700000000", "+442079460900")
    return json.dumps([params, signature("http://localhost/twilio/voice", params)])


def test_a_start_at_head_and_a_webhook_import_nothing_deferred(tmp_path: Path) -> None:
    first = run(START, tmp_path, signed_call())  # the first start migrates: Alembic
    assert "alembic" in first["modules"]  # type: ignore[operator]
    again = run(START, tmp_path, signed_call())
    assert (again["readyz"], again["voice"], again["problems"]) == (200, 200, {})
    modules = set(again["modules"])  # type: ignore[call-overload]
    assert "gateway.migrations" in modules  # the schema was checked ...
    loaded = sorted(m for m in modules if m.split(".")[0] in DEFERRED)
    assert loaded == [], f"imported at start or by a webhook, not needed there: {loaded}"


def test_the_head_read_from_the_files_is_alembics() -> None:
    assert head_from_files() == head()


def test_a_worker_imports_no_gateway_module_the_master_did_not(tmp_path: Path) -> None:
    run(START, tmp_path, signed_call())  # the schema made
    found = run(AFTER_PRELOAD, tmp_path)
    assert found["problems"] == {}
    own = [m for m in found["new"] if m.startswith("gateway")]  # type: ignore[attr-defined]
    assert own == [], ("imported by each worker after the fork, not shared: add them to "
                       f"gateway.serving.WORKER_MODULES: {own}")


def test_the_master_freezes_its_objects_before_each_fork() -> None:
    hook = serving.gunicorn_settings(serving.ServeOptions())["pre_fork"]
    try:
        gc.unfreeze()
        hook(None, None)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


REAL_GETPID = os.getpid


class ForkedServer:
    """``serving.GatewayServer`` whose run() ends as a forked worker's does: SystemExit,
    in a process whose pid is not the master's when ``in_worker``."""

    in_worker: ClassVar[bool] = False
    seen: ClassVar[list[str]] = []

    def __init__(self, settings: object, options: object) -> None:
        pass

    def run(self) -> None:
        ForkedServer.seen.append(os.environ[serving.MULTIPROC_ENV])
        if ForkedServer.in_worker:
            os.getpid = lambda: REAL_GETPID() + 1
        raise SystemExit(0)


def test_only_the_master_removes_the_workers_metrics_directory() -> None:
    before = os.environ.get(serving.MULTIPROC_ENV)
    args = cli._parser().parse_args(["serve", "--workers", "2", "--server", "gunicorn"])
    ForkedServer.seen.clear()
    with pytest.MonkeyPatch.context() as monkeypatch:
        # through monkeypatch, so the variable serve sets in this process goes with it
        monkeypatch.setenv(serving.MULTIPROC_ENV, "")
        monkeypatch.setenv("GATEWAY_TWILIO_AUTH_TOKEN", AUTH_TOKEN)
        monkeypatch.setenv("GATEWAY_DATABASE_URL", "postgresql://gateway@127.0.0.1:1/gateway")
        monkeypatch.setattr(serving, "GatewayServer", ForkedServer)
        try:
            for in_worker in (True, False):  # a worker exits, then the master
                os.environ[serving.MULTIPROC_ENV] = ""
                ForkedServer.in_worker = in_worker
                with pytest.raises(SystemExit):
                    cli._serve(args)
                os.getpid = REAL_GETPID
        finally:
            # plainly, not through monkeypatch: undoing a monkeypatch.setattr made after
            # run() replaced os.getpid put the fake back for the rest of the session,
            # and a later test's os.kill(os.getpid(), SIGTERM) went to another process
            os.getpid = REAL_GETPID
    assert os.environ.get(serving.MULTIPROC_ENV) == before  # later tests' gateways
    worker_dir, master_dir = map(Path, ForkedServer.seen)
    assert worker_dir.is_dir(), "a worker's exit removed the directory the others write to"
    worker_dir.rmdir()
    assert not master_dir.exists()


def test_the_metrics_directory_test_leaves_os_getpid_as_it_found_it() -> None:
    test_only_the_master_removes_the_workers_metrics_directory()
    assert os.getpid is REAL_GETPID
