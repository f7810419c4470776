"""Slow clients (slowloris) on loopback, and nginx in front of a gateway, for tests.

:class:`SlowClients` opens a bounded number of connections from a loopback source
address of its own (``127.0.0.2``: every 127/8 address is loopback on Linux) and sends a
request a few bytes at a time, never finishing it: half of them trickle header lines,
the other half send complete headers with ``Content-Length`` and then trickle the body.
One thread drives all of them; they are closed when the ``with`` block ends, after
``max_s`` at the latest.

:func:`running_nginx` renders ``deploy/nginx/assist-gateway.conf.template`` exactly as
the README says (only its three variables replaced), wraps it in a minimal nginx.conf
of a temporary prefix (pid, logs and temp files there), and runs ``nginx`` in the
foreground on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.support.server import stop_process

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "deploy" / "nginx" / "assist-gateway.conf.template"
SLOW_SOURCE = "127.0.0.2"


class SlowClients:
    def __init__(self, host: str, port: int, *, count: int = 100, source: str = SLOW_SOURCE,
                 every_s: float = 0.5, max_s: float = 20.0,
                 path: str = "/twilio/voice") -> None:
        self.host, self.port, self.count, self.source = host, port, count, source
        self.every_s, self.max_s, self.path = every_s, max_s, path
        #: open connections, each with whether it trickles its body (else its headers)
        self.sockets: list[tuple[socket.socket, bool]] = []
        #: connections the server closed or reset while we trickled
        self.closed_by_server = 0
        #: connections that could not be opened at all
        self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slow-clients", daemon=True)

    def __enter__(self) -> Self:
        for n in range(self.count):
            try:
                sock = socket.create_connection((self.host, self.port), timeout=2,
                                                source_address=(self.source, 0))
            except OSError:
                self.refused += 1
                continue
            sock.settimeout(0.2)
            slow_body = n % 2 == 1
            head = (f"POST {self.path} HTTP/1.1\r\nHost: {self.host}\r\n"
                    "Content-Type: application/x-www-form-urlencoded\r\n")
            if slow_body:
                head += "Content-Length: 100000\r\n\r\nCallSid="
            try:
                sock.sendall(head.encode())
            except OSError:
                self.closed_by_server += 1
                sock.close()
                continue
            self.sockets.append((sock, slow_body))
        self._thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_s
        n = 0
        while not self._stop.wait(self.every_s) and time.monotonic() < deadline:
            n += 1
            for entry in list(self.sockets):
                sock, slow_body = entry
                try:
                    sock.send(b"A" if slow_body else f"X-Slow-{n}: 1\r\n".encode())
                except OSError:
                    self.closed_by_server += 1
                    self.sockets.remove(entry)
                    sock.close()

    @property
    def open(self) -> int:
        return len(self.sockets)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sock, _ in self.sockets:
            sock.close()
        self.sockets.clear()


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


def render_template(*, upstream: str, listen: str, server_name: str = "localhost") -> str:
    """The shipped template with its three variables replaced (what envsubst does)."""
    text = TEMPLATE.read_text(encoding="utf-8")
    for name, value in (("GATEWAY_UPSTREAM", upstream), ("NGINX_LISTEN", listen),
                        ("NGINX_SERVER_NAME", server_name)):
        text = text.replace("${" + name + "}", value)
    return text


@dataclass
class Nginx:
    port: int
    process: subprocess.Popen[bytes]
    prefix: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextmanager
def running_nginx(prefix: Path, *, upstream_port: int, port: int) -> Iterator[Nginx]:
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("nginx is not installed")
    prefix.mkdir(parents=True, exist_ok=True)
    site = prefix / "assist-gateway.conf"
    site.write_text(render_template(upstream=f"127.0.0.1:{upstream_port}",
                                    listen=f"127.0.0.1:{port}"), encoding="utf-8")
    temps = "\n".join(f"    {kind}_temp_path {prefix / kind};"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    user = "user root root;\n" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(f"""{user}daemon off;
worker_processes 1;
pid {prefix / 'nginx.pid'};
error_log {prefix / 'error.log'} warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
{temps}
    include {site};
}}
""", encoding="utf-8")
    check = subprocess.run([binary, "-t", "-p", str(prefix), "-c", str(conf), "-e",
                            str(prefix / "error.log")], check=False, capture_output=True,
                           text=True)
    if check.returncode != 0:
        raise RuntimeError(f"nginx -t failed:\n{check.stderr}")
    process = subprocess.Popen([binary, "-p", str(prefix), "-c", str(conf), "-e",
                                str(prefix / "error.log")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nginx = Nginx(port, process, prefix)
    try:
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"nginx exited:\n{nginx.error_log()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nginx not listening:\n{nginx.error_log()}") from None
                time.sleep(0.05)
        yield nginx
    finally:
        stop_process(process)
