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
        process.terminate()
        try:
            process.wait(timeout=10)
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
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"gateway not ready after {timeout}s:\n{gateway.logs()}")
