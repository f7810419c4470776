"""Starting the gateway as an operator would: real processes, their exit status and logs.

* Two ``serve`` instances and a ``worker`` started at once on an empty PostgreSQL
  database: all ready, the migrations applied once, nothing logged at error level.
* A bad value is one line naming its variable, exit 2, no traceback; so is a port in
  use.  ``postgres://`` URLs work like ``postgresql://``.
* ``.env.example`` lists every ``GATEWAY_`` variable the gateway reads, with values
  that pass its checks.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

from gateway.config import Settings
from gateway.migrations import LOCK_KEY, head
from tests.integration.test_migrations import private_postgres
from tests.support.twilio import AUTH_TOKEN, VEHICLE_TOKEN

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update({"PYTHONPATH": str(REPO), "GATEWAY_TWILIO_AUTH_TOKEN": AUTH_TOKEN,
                "GATEWAY_VEHICLE_API_TOKENS": VEHICLE_TOKEN,
                "GATEWAY_DATABASE_URL": f"sqlite:///{tmp}/gateway.sqlite3",
                "GATEWAY_CACHE_DIR": str(tmp / "cache")})
    env.update(extra)
    return env


def gateway(*args: str, tmp: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          text=True, timeout=60, env=base_env(tmp, **env), cwd=tmp,
                          check=False)


class Started:
    """A gateway process started in the background, its output in a file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], tmp: Path,
                 ready_url: str) -> None:
        self.name = name
        self.ready_url = ready_url
        self.log_path = tmp / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "gateway", *args], env=env,
                                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp)

    def logs(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.process.returncode}):\n"
                                     f"{self.logs()}")
            try:
                if requests.get(self.ready_url, timeout=1).status_code == 200:
                    return
            except requests.RequestException:  # not listening yet, or still starting
                pass
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not ready:\n{self.logs()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def serve(name: str, tmp: Path, database_url: str) -> Started:
    port = free_port()
    env = base_env(tmp, GATEWAY_DATABASE_URL=database_url,
                   GATEWAY_PUBLIC_URL=f"http://127.0.0.1:{port}")
    return Started(name, ["serve", "--host", "127.0.0.1", "--port", str(port), "--no-worker"],
                   env, tmp, f"http://127.0.0.1:{port}/readyz")


def worker(name: str, tmp: Path, database_url: str) -> Started:
    port = free_port()
    env = base_env(tmp, GATEWAY_DATABASE_URL=database_url,
                   GATEWAY_ASSISTANCE_URL=f"http://127.0.0.1:{free_port()}")
    return Started(name, ["worker", "--metrics-port", str(port)], env, tmp,
                   f"http://127.0.0.1:{port}/metrics")


def log_records(text: str) -> list[dict[str, object]]:
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


@pytest.fixture
def empty_postgres() -> Iterator[str]:
    yield from private_postgres("test_startup")


WAITING = "waiting for another instance's database migration"


@pytest.mark.postgres
@pytest.mark.slow
def test_two_instances_and_a_worker_start_together_on_an_empty_postgres(
        tmp_path: Path, empty_postgres: str) -> None:
    """The three processes start at once; so that their upgrades certainly overlap (the
    worker starts faster than a server), the test holds the migration lock until each
    is waiting for it, then lets go: they contend for it among themselves."""
    pg = empty_postgres
    engine = sa.create_engine(pg.replace("postgresql://", "postgresql+psycopg://", 1))
    holder = engine.connect()
    holder.execute(sa.select(sa.func.pg_advisory_lock(LOCK_KEY)))
    holder.commit()  # a session lock: held until unlocked
    started = [serve("serve-a", tmp_path, pg),
               # the same database by its other spelling (accepted: psycopg 3 either way)
               serve("serve-b", tmp_path, pg.replace("postgresql://", "postgres://", 1)),
               worker("worker", tmp_path, pg)]
    try:
        deadline = time.monotonic() + 90
        while not all(WAITING in p.logs() for p in started):
            assert time.monotonic() < deadline, {p.name: p.logs() for p in started}
            assert all(p.process.poll() is None for p in started), [p.logs() for p in started]
            time.sleep(0.1)
        holder.execute(sa.select(sa.func.pg_advisory_unlock(LOCK_KEY)))
        holder.close()
        for process in started:
            process.wait_ready(deadline)
        logs = {p.name: p.logs() for p in started}
    finally:
        holder.close()
        for process in started:
            process.stop()

    upgraded = [(name, str(r["msg"])) for name, text in logs.items()
                for r in log_records(text) if str(r.get("msg", "")).startswith("database schema")]
    applied = [msg for _, msg in upgraded if "applied" in msg]
    expected = f"database schema upgraded from an empty database to {head()} (applied 0001, 0002, 0003)"
    assert applied == [expected], upgraded
    assert {name for name, _ in upgraded} == set(logs), upgraded  # each process checked
    for name, text in logs.items():
        assert "Traceback" not in text, text
        bad = [r for r in log_records(text) if r.get("level") in ("error", "critical")]
        assert bad == [], (name, bad)
        assert "could not create schema" not in text

    try:
        with engine.connect() as conn:
            assert list(conn.execute(sa.text("SELECT version_num FROM alembic_version"))
                        .scalars()) == [head()]
    finally:
        engine.dispose()


# -- bad values: one line naming the variable, exit 2 -------------------------------------


@pytest.mark.parametrize(("variable", "value", "said"), [
    ("GATEWAY_DATABASE_URL", "mysql://app:s3cret@db/gateway", "mysql:// is not supported"),
    ("GATEWAY_DATABASE_URL", "postgresql://app:s3cret@db:five/gateway", "not a valid database"),
    ("GATEWAY_DATABASE_URL", "gateway.sqlite3", "not a database URL"),
    ("GATEWAY_DATABASE_URL", "sqlite:////nonexistent/dir/gateway.sqlite3", "does not exist"),
    ("GATEWAY_VEHICLE_API_TOKENS", "short", "at least 16 characters"),
    ("GATEWAY_AGENT_API_TOKENS", "tiny:read", "at least 16 characters"),
    ("GATEWAY_NUMBER_PLAN", "/nonexistent/plan", "number plan directory not found"),
    ("GATEWAY_BOUNDARIES", "/nonexistent/boundaries.map", "not found"),
    ("GATEWAY_LOG_LEVEL", "loud", "LOUD"),
    ("GATEWAY_PUBLIC_URL", "gateway.example.com", "not an http(s) URL"),
])
def test_a_bad_value_is_one_line_naming_its_variable(variable: str, value: str, said: str,
                                                     tmp_path: Path) -> None:
    result = gateway("serve", "--port", "0", tmp=tmp_path, **{variable: value})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0] and said in lines[0]
    assert "s3cret" not in result.stderr  # a password in the URL is never echoed


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = gateway("serve", "--host", "127.0.0.1", "--port", str(port), tmp=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use"]
    assert time.monotonic() - started < 30  # no waiting for the port to come free


# -- .env.example --------------------------------------------------------------------------

ENV_EXAMPLE = REPO / ".env.example"
#: variables earlier releases read: named only to say what replaced them
REPLACED = {"GATEWAY_VOICE_NUMBER", "GATEWAY_IVR_NUMBERS", "GATEWAY_EMERGENCY_CALLER_ID"}
#: values that name files of the operator's machine
PATHS = {"GATEWAY_NUMBER_PLAN", "GATEWAY_BOUNDARIES", "GATEWAY_CACHE_DIR"}


def read_env_example() -> tuple[dict[str, str], dict[str, str]]:
    """(set, commented out) assignments of .env.example."""
    active: dict[str, str] = {}
    commented: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        found = re.fullmatch(r"(# )?(GATEWAY_[A-Z0-9_]+)=(.*)", line)
        if found:
            (commented if found.group(1) else active)[found.group(2)] = found.group(3)
    return active, commented


def test_env_example_lists_every_variable_the_gateway_reads() -> None:
    read = set()
    for path in (REPO / "gateway").rglob("*.py"):
        read |= set(re.findall(r"GATEWAY_[A-Z0-9_]*[A-Z0-9]", path.read_text(encoding="utf-8")))
    active, commented = read_env_example()
    assert not set(active) & set(commented)
    listed = set(active) | set(commented)
    assert sorted(read - REPLACED - listed) == [], "add these to .env.example"
    assert sorted(listed - read) == [], "the gateway no longer reads these"


def test_env_example_values_pass_the_gateways_checks() -> None:
    active, commented = read_env_example()
    Settings.from_env(active)  # as copied
    Settings.from_env({**active, **{k: v for k, v in commented.items() if k not in PATHS}})
    assert active["GATEWAY_DATABASE_URL"].startswith("sqlite:///")
