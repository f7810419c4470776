"""Start the real gateway (``python -m gateway serve``) as a separate process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import requests

from tests.support.twilio import AUTH_TOKEN, VEHICLE_TOKEN, signature

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class GatewayProcess:
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def post_event(self, event: Mapping[str, object]) -> requests.Response:
        return requests.post(f"{self.base_url}/v1/events", json=event, timeout=10,
                             headers={"Authorization": f"Bearer {VEHICLE_TOKEN}"})

    def twilio(self, url_or_path: str, params: Mapping[str, str]) -> requests.Response:
        """A signed webhook, exactly as Twilio would send it."""
        url = url_or_path if url_or_path.startswith("http") else self.base_url + url_or_path
        return requests.post(url, data=dict(params), timeout=10,
                             headers={"X-Twilio-Signature": signature(url, params)})

    def logs(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    def worker_pids(self, *, at_least: int = 0, timeout: float = 10.0) -> list[int]:
        """The serving processes under this one (gunicorn's workers; none under waitress);
        with ``at_least``, waits until that many are there (the master forks them one
        after another, and the first one serving makes the gateway ready)."""
        deadline = time.monotonic() + timeout
        while True:
            pids = children_of(self.process.pid)
            if len(pids) >= at_least or time.monotonic() > deadline:
                return pids
            time.sleep(0.05)

    def raw_webhook(self, path: str, params: Mapping[str, str]) -> bytes:
        """A signed webhook as the bytes of one HTTP/1.1 request (for tests that send it
        in pieces, on a socket of their own)."""
        body = urlencode(params).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                "Content-Type: application/x-www-form-urlencoded\r\n"
                f"X-Twilio-Signature: {signature(self.base_url + path, params)}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        return head.encode() + body


def children_of(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def gateway_env(tmp: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update({
        "GATEWAY_TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "GATEWAY_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "GATEWAY_DATABASE_URL": f"sqlite:///{tmp}/gateway.sqlite3",
        "GATEWAY_VEHICLE_API_TOKENS": VEHICLE_TOKEN,
        "PYTHONPATH": str(REPO),
    })
    env.update(extra)
    return env


@contextmanager
def running_gateway(tmp: Path, *args: str, port: int | None = None,
                    **env_extra: str) -> Iterator[GatewayProcess]:
    port = port or free_port()
    log_path = tmp / f"gateway-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port),
             *args],
            env=gateway_env(tmp, port, **env_extra), stdout=log, stderr=subprocess.STDOUT,
            cwd=tmp,
        )
    gateway = GatewayProcess(f"http://127.0.0.1:{port}", process, log_path)
    try:
        wait_ready(gateway)
        yield gateway
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_ready(gateway: GatewayProcess, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            raise RuntimeError(f"gateway exited early:\n{gateway.logs()}")
        try:
            if requests.get(gateway.base_url + "/readyz", timeout=1).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):
            # gunicorn listens before its worker is ready: connections wait in the backlog
            pass
        time.sleep(0.1)
    raise RuntimeError(f"gateway not ready after {timeout}s:\n{gateway.logs()}")
