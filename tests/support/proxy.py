"""A TCP proxy on 127.0.0.1 that can make a real server hang or vanish on demand.

::

    with TcpProxy("127.0.0.1", 5432) as proxy:
        store = Store.from_url(f"postgresql://postgres@127.0.0.1:{proxy.port}/test")
        proxy.mode = "blackhole"
        ...

Modes, switchable at any time (also for connections already open):

``forward``
    bytes go both ways unchanged.
``blackhole``
    the proxy keeps accepting connections and reading (so the kernel ACKs every
    byte), but forwards nothing and answers nothing: a database that "accepts TCP
    and never answers".  Connections open before the switch go quiet too, and so
    do connections accepted while black (they stay black when forwarding resumes:
    the bytes they sent are gone).
``refuse``
    the listening socket is closed (new connections are refused) and every open
    connection is reset; switching back listens again on the same port.

Only the standard library: one accept thread, two pipe threads per connection,
all daemons; ``close()`` (or leaving the ``with`` block) shuts everything down.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Literal, Self

Mode = Literal["forward", "blackhole", "refuse"]
MODES = ("forward", "blackhole", "refuse")


class _Link:
    """One client connection and (when forwarding) its upstream connection."""

    def __init__(self, client: socket.socket, upstream: socket.socket | None) -> None:
        self.client, self.upstream = client, upstream
        self.closed = False
        self.lock = threading.Lock()

    def close(self, *, reset: bool = False) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            try:
                if reset:  # close with SO_LINGER 0 sends RST instead of FIN
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.shutdown(socket.SHUT_RD)  # wakes the pipe thread without a FIN
                else:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, *, mode: Mode = "forward",
                 host: str = "127.0.0.1", port: int = 0) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.target = (target_host, target_port)
        self.host, self.port = host, port
        self._mode: Mode = mode
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self.accepted = 0  # connections accepted since start
        self.discarded = 0  # bytes read and thrown away while black

    # -- life cycle --------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def start(self) -> None:
        if self._mode != "refuse":
            self._listen()
        elif not self.port:  # refuse from the start: still reserve a port number
            probe = socket.socket()
            probe.bind((self.host, 0))
            self.port = probe.getsockname()[1]
            probe.close()

    def close(self) -> None:
        self._stop_listening()
        self._drop_links(reset=False)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, mode: Mode) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        with self._lock:
            previous, self._mode = self._mode, mode
        if mode == "refuse" and previous != "refuse":
            self._stop_listening()
            self._drop_links(reset=True)
        elif mode != "refuse" and previous == "refuse":
            self._listen()

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._links)

    # -- internals ---------------------------------------------------------------------

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        with self._lock:
            self._listener = listener
        self._spawn(self._accept_loop, listener)

    def _stop_listening(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
            except OSError:
                pass
            listener.close()

    def _drop_links(self, *, reset: bool) -> None:
        with self._lock:
            links, self._links = list(self._links), set()
        for link in links:
            link.close(reset=reset)

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True,  # type: ignore[arg-type]
                                  name="tcp-proxy")
        thread.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # listener closed
            with self._lock:
                self.accepted += 1
                mode = self._mode
            upstream = None
            if mode == "forward":
                try:
                    upstream = socket.create_connection(self.target, timeout=2.0)
                    upstream.settimeout(None)
                except OSError:
                    _Link(client, None).close(reset=True)
                    continue
            link = _Link(client, upstream)
            with self._lock:
                if self._mode == "refuse":  # switched while we connected
                    link.close(reset=True)
                    continue
                self._links.add(link)
            self._spawn(self._pipe, link, client, upstream)
            if upstream is not None:
                self._spawn(self._pipe, link, upstream, client)

    def _pipe(self, link: _Link, src: socket.socket, dst: socket.socket | None) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self._mode == "forward" and dst is not None:
                    dst.sendall(data)
                else:
                    with self._lock:
                        self.discarded += len(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._links.discard(link)
            link.close()


def proxied_url(url: str, proxy: TcpProxy) -> str:
    """A database URL with its host and port replaced by the proxy's."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url).set(host=proxy.host, port=proxy.port)
    return parsed.render_as_string(hide_password=False)
