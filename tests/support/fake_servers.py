"""Real HTTP servers on 127.0.0.1 that play the gateway's upstreams in tests.

Each fake is a stdlib :class:`http.server.ThreadingHTTPServer` on an ephemeral
port, served from a daemon thread, used as a context manager::

    with FakeAssistanceCentre() as centre:
        client = AssistanceCentreClient(centre.url, timeout_s=0.5)
        centre.mode = "503"
        ...

Every fake records what reached it on the wire (``.requests``, thread-safe) and
can be switched between behaviours with ``.mode`` at any time.  Besides HTTP
answers the base class can change the *transport*:

``refuse``
    the listening socket is closed, so connections are refused at once; going
    back to an HTTP mode listens again on the same port.
``blackhole``
    a raw socket listens on the port (backlog 0) and never ``accept()``\\s: the
    first connection is completed by the kernel and then never read (the client
    sees a *read* timeout); once that one-slot accept queue is full, further
    SYNs are dropped (the client sees a *connect* timeout).

Handlers that sleep (``slow``/``timeout`` modes) wait on
an event that is set on every transport change and on close, so ``close()``
never waits for a sleeping handler and ``server_close()`` joins every handler
thread (no thread or socket outlives the ``with`` block).
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
import socket
import threading
import time
from base64 import b64decode
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, ClassVar, Self
from urllib.parse import parse_qs, urlsplit

from requests.structures import CaseInsensitiveDict

HOST = "127.0.0.1"

#: the transport-level modes every fake understands
TRANSPORT_MODES = frozenset({"refuse", "blackhole"})


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request as it arrived on the wire."""

    method: str
    path: str
    query: dict[str, str]
    headers: CaseInsensitiveDict[str]
    body: bytes
    #: the parsed body when it was JSON, else None
    json: Any
    #: the parsed body when it was a form (first value of each field), else None
    form: dict[str, str] | None
    #: ``time.monotonic()`` when the request was read
    time: float

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    @property
    def idempotency_key(self) -> str | None:
        return self.headers.get("Idempotency-Key")


@dataclass
class Reply:
    """What a fake answers; ``None`` from :meth:`FakeServer.respond` means "no answer"."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins handler threads (block_on_close)
    fake: FakeServer


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection: no idle keep-alive sockets
    timeout = 5.0  # a client that connects and never sends cannot pin server_close()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        headers: CaseInsensitiveDict[str] = CaseInsensitiveDict(dict(self.headers.items()))
        content_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        parsed_json: Any = None
        form: dict[str, str] | None = None
        if content_type == "application/json" and body:
            try:
                parsed_json = json.loads(body)
            except ValueError:
                parsed_json = None
        elif content_type == "application/x-www-form-urlencoded":
            form = {k: v[0] for k, v in parse_qs(body.decode("utf-8"),
                                                 keep_blank_values=True).items()}
        request = RecordedRequest(
            method=self.command, path=parts.path,
            query={k: v[0] for k, v in parse_qs(parts.query).items()},
            headers=headers, body=body, json=parsed_json, form=form, time=time.monotonic(),
        )
        fake._record(request)
        reply = fake.respond(request)
        if reply is None:  # hold/drop: close without an answer
            return
        payload = b"" if reply.body is None else json.dumps(reply.body).encode()
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except OSError:  # the client gave up (timed out) before we answered
            pass

    def do_POST(self) -> None:
        self._handle()

    def do_GET(self) -> None:
        self._handle()


class FakeServer:
    """Base of the fakes: lifecycle, transport modes, request log, waiting helpers."""

    #: HTTP modes of the subclass (besides the transport modes)
    MODES: ClassVar[frozenset[str]] = frozenset({"up"})

    def __init__(self, *, mode: str = "up", slow_s: float = 2.0) -> None:
        #: how long ``slow``/``timeout`` handlers sleep (longer than client timeouts)
        self.slow_s = slow_s
        self._cond = threading.Condition()
        self._requests: list[RecordedRequest] = []
        self._release = threading.Event()  # set: sleeping/holding handlers give up
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._raw: socket.socket | None = None
        self._port = 0
        self._closed = False
        self._mode = "up"
        self._started = False
        self._initial_mode = mode
        self._check_mode(mode)

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> Self:
        if self._started:
            raise RuntimeError("already started")
        self._started = True
        self._listen_http()
        self.mode = self._initial_mode
        return self

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_transport()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self._port}"

    # -- modes -----------------------------------------------------------------------

    def _check_mode(self, mode: str) -> None:
        if mode not in self.MODES | TRANSPORT_MODES:
            raise ValueError(f"{type(self).__name__}: unknown mode {mode!r} "
                             f"(known: {sorted(self.MODES | TRANSPORT_MODES)})")

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        self._check_mode(mode)
        if self._closed:
            raise RuntimeError("server is closed")
        with self._cond:
            previous, self._mode = self._mode, mode
            self._on_mode(previous, mode)
        if mode == "refuse":
            self._stop_transport()
        elif mode == "blackhole":
            self._stop_transport()
            self._listen_raw()
        elif self._server is None:
            self._stop_transport()
            self._listen_http()

    def _on_mode(self, previous: str, mode: str) -> None:
        """Hook for subclasses (called under the lock)."""

    def _listen_http(self) -> None:
        server = _Server((HOST, self._port), _Handler)
        server.fake = self
        self._port = server.server_address[1]
        self._release = threading.Event()
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"{type(self).__name__}:{self._port}", daemon=True)
        self._thread.start()

    def _listen_raw(self) -> None:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        raw.bind((HOST, self._port))
        raw.listen(0)
        self._raw = raw

    def _stop_transport(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._raw is not None:
            self._raw.close()
            self._raw = None

    # -- handler side ----------------------------------------------------------------

    def _record(self, request: RecordedRequest) -> None:
        with self._cond:
            self._requests.append(request)
            self._cond.notify_all()

    def respond(self, request: RecordedRequest) -> Reply | None:
        raise NotImplementedError

    def pause(self, seconds: float) -> bool:
        """Sleep in a handler; False when released early (transport change or close)."""
        return not self._release.wait(seconds)

    # -- test side -------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._cond:
            return list(self._requests)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Wait until ``predicate()`` holds (re-checked on every request); False on timeout."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)


def _twilio_error(status: int, code: int, message: str) -> Reply:
    """Twilio's (legacy) REST error body."""
    return Reply(status, {"code": code, "message": message,
                          "more_info": f"https://www.twilio.com/docs/errors/{code}",
                          "status": status})


# -------------------------------------------------------------------------------------
# assistance centre


class FakeAssistanceCentre(FakeServer):
    """``POST /incidents``; honours ``Idempotency-Key``.

    Modes: ``up`` (201, or 200 for a key it already has), ``503``, ``429``,
    ``400``, ``slow`` (stores the incident, sleeps ``slow_s``, then 201),
    ``flap`` (503, 201, 503, ... per request), ``refuse``, ``blackhole``.
    A request without an ``Idempotency-Key`` or without a JSON object body gets 400.
    """

    MODES = frozenset({"up", "503", "429", "400", "slow", "flap"})

    def __init__(self, *, mode: str = "up", slow_s: float = 2.0) -> None:
        super().__init__(mode=mode, slow_s=slow_s)
        #: idempotency key -> the first body stored under it
        self.incidents: dict[str, Any] = {}
        #: idempotency key -> requests on the wire carrying it (any outcome)
        self.deliveries: Counter[str] = Counter()
        self._flap = itertools.count()
        self._ids = itertools.count(1)

    def _on_mode(self, previous: str, mode: str) -> None:
        self._flap = itertools.count()

    def _store(self, key: str, body: Any) -> tuple[bool, str]:
        with self._cond:
            new = key not in self.incidents
            if new:
                self.incidents[key] = body
            self._cond.notify_all()
            return new, f"INC-{list(self.incidents).index(key) + 1:04d}"

    def respond(self, request: RecordedRequest) -> Reply | None:
        if request.method != "POST" or request.path != "/incidents":
            return Reply(404, {"error": "not found"})
        key = request.idempotency_key
        if key:
            with self._cond:
                self.deliveries[key] += 1
        mode = self.mode
        if mode == "flap":
            with self._cond:
                mode = "503" if next(self._flap) % 2 == 0 else "up"
        if mode == "503":
            return Reply(503, {"error": "service unavailable"}, {"Retry-After": "1"})
        if mode == "429":
            return Reply(429, {"error": "too many requests"}, {"Retry-After": "1"})
        if mode == "400":
            return Reply(400, {"error": "incident rejected: schema"})
        if not key:
            return Reply(400, {"error": "Idempotency-Key header required"})
        if not isinstance(request.json, dict):
            return Reply(400, {"error": "body must be a JSON object"})
        new, incident_id = self._store(key, request.json)
        if mode == "slow" and not self.pause(self.slow_s):
            return None
        return Reply(201 if new else 200, {"incident_id": incident_id, "duplicate": not new})

    def wait_for_incidents(self, n: int, timeout: float = 5.0) -> dict[str, Any]:
        """Wait until at least ``n`` distinct incidents arrived; AssertionError otherwise."""
        if not self.wait_until(lambda: len(self.incidents) >= n, timeout):
            raise AssertionError(f"{len(self.incidents)} incident(s) after {timeout}s, wanted {n}")
        with self._cond:
            return dict(self.incidents)


# -------------------------------------------------------------------------------------
# Twilio REST API (Messages)

_MESSAGES_PATH = re.compile(r"^/2010-04-01/Accounts/(?P<sid>AC[0-9a-fA-F]{32})/Messages\.json$")
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")


class FakeTwilioApi(FakeServer):
    """Twilio's ``POST /2010-04-01/Accounts/{AccountSid}/Messages.json``.

    Checks HTTP Basic auth (account SID : auth token) -> 401 / 20003, a sender
    (``From`` or ``MessagingServiceSid``) -> 400 / 21603, a ``Body`` -> 400 / 21602,
    and that ``To`` is E.164 -> 400 / 21211; answers 201 with a Message resource.
    Modes: ``up``, ``500``, ``429``, ``400`` (every send rejected with 21211),
    ``slow`` (sleeps ``slow_s`` then answers), ``refuse``, ``blackhole``.
    """

    MODES = frozenset({"up", "500", "429", "400", "slow"})

    def __init__(self, account_sid: str, auth_token: str, *, mode: str = "up",
                 slow_s: float = 2.0) -> None:
        super().__init__(mode=mode, slow_s=slow_s)
        self.account_sid = account_sid
        self.auth_token = auth_token
        #: the Message resources created, in order
        self.messages: list[dict[str, Any]] = []

    def _authorised(self, request: RecordedRequest, sid: str) -> bool:
        scheme, _, encoded = (request.header("Authorization") or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = b64decode(encoded, validate=True).decode().partition(":")
        except ValueError:
            return False
        return (secrets.compare_digest(user, self.account_sid) and sid == self.account_sid
                and secrets.compare_digest(password, self.auth_token))

    def respond(self, request: RecordedRequest) -> Reply | None:
        match = _MESSAGES_PATH.match(request.path)
        if request.method != "POST" or match is None:
            return _twilio_error(404, 20404, f"The requested resource {request.path} was not found")
        if not self._authorised(request, match["sid"]):
            return _twilio_error(401, 20003, "Authenticate")
        mode = self.mode
        if mode == "slow" and not self.pause(self.slow_s):
            return None
        if mode == "500":
            return _twilio_error(500, 20500, "Internal Server Error")
        if mode == "429":
            return _twilio_error(429, 20429, "Too Many Requests")
        form = request.form or {}
        to = form.get("To", "")
        if mode == "400" or not _E164.match(to):
            return _twilio_error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        if not (form.get("From") or form.get("MessagingServiceSid")):
            return _twilio_error(400, 21603, "A 'From' phone number is required.")
        if not form.get("Body"):
            return _twilio_error(400, 21602, "Message body is required.")
        sid = "SM" + secrets.token_hex(16)
        message: dict[str, Any] = {
            "sid": sid, "account_sid": self.account_sid, "api_version": "2010-04-01",
            "to": to, "from": form.get("From"), "body": form["Body"],
            "messaging_service_sid": form.get("MessagingServiceSid"),
            "status": "queued", "direction": "outbound-api", "num_segments": "1",
            "num_media": "0", "error_code": None, "error_message": None,
            "price": None, "price_unit": "USD",
            "date_created": formatdate(usegmt=True), "date_updated": formatdate(usegmt=True),
            "date_sent": None,
            "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json",
            "subresource_uris": {},
        }
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()
        return Reply(201, message)


# -------------------------------------------------------------------------------------
# vehicle command service

_COMMANDS_PATH = re.compile(r"^/vehicles/(?P<vin>[^/]+)/commands$")


class FakeVehicleService(FakeServer):
    """``POST /vehicles/{vin}/commands``.

    Modes: ``up`` (200 ``{"status": "accepted", "command_id": ...}``; 404 for a VIN
    outside ``known_vins`` when that is set), ``timeout`` (sleeps ``slow_s``, past
    the client's timeout), ``flaky`` (the first ``flaky_failures`` requests since
    the mode was set fail as ``flaky_kind``: ``"timeout"`` or ``"503"``; then as
    ``up``), ``404`` (unknown vehicle), ``refuse``, ``blackhole``.
    An ``Idempotency-Key`` already accepted gets the same ``command_id`` again.
    """

    MODES = frozenset({"up", "timeout", "flaky", "404"})

    def __init__(self, *, mode: str = "up", slow_s: float = 2.0, flaky_failures: int = 2,
                 flaky_kind: str = "timeout", known_vins: frozenset[str] | None = None) -> None:
        if flaky_kind not in ("timeout", "503"):
            raise ValueError(f"flaky_kind must be 'timeout' or '503', not {flaky_kind!r}")
        super().__init__(mode=mode, slow_s=slow_s)
        self.flaky_failures = flaky_failures
        self.flaky_kind = flaky_kind
        self.known_vins = known_vins
        #: every command request on the wire: {"vin", "body", "idempotency_key", "time"}
        self.commands: list[dict[str, Any]] = []
        self._accepted: dict[str, dict[str, Any]] = {}  # idempotency key -> first accepted
        self._flaky_seen = 0
        self._ids = itertools.count(1)

    def _on_mode(self, previous: str, mode: str) -> None:
        self._flaky_seen = 0

    @property
    def unique_commands(self) -> dict[str, dict[str, Any]]:
        """Idempotency key -> the command as first accepted (what the car executed)."""
        with self._cond:
            return dict(self._accepted)

    def _timeout(self) -> Reply | None:
        if not self.pause(self.slow_s):
            return None
        return Reply(504, {"error": "vehicle did not answer"})

    def respond(self, request: RecordedRequest) -> Reply | None:
        match = _COMMANDS_PATH.match(request.path)
        if request.method != "POST" or match is None:
            return Reply(404, {"error": "not found"})
        vin, key, body = match["vin"], request.idempotency_key, request.json
        with self._cond:
            self.commands.append({"vin": vin, "body": body, "idempotency_key": key,
                                  "time": request.time})
            mode = self.mode
            if mode == "flaky":
                self._flaky_seen += 1
                mode = (self.flaky_kind if self._flaky_seen <= self.flaky_failures else "up")
            self._cond.notify_all()
        if mode == "timeout":
            return self._timeout()
        if mode == "503":
            return Reply(503, {"error": "vehicle gateway unavailable"})
        if mode == "404" or (self.known_vins is not None and vin not in self.known_vins):
            return Reply(404, {"error": "unknown vehicle", "vin": vin})
        if not key:
            return Reply(400, {"error": "Idempotency-Key header required"})
        if not isinstance(body, dict) or not isinstance(body.get("command"), str):
            return Reply(400, {"error": "body must be a JSON object with a 'command'"})
        with self._cond:
            accepted = self._accepted.get(key)
            if accepted is None:
                accepted = {"vin": vin, "body": body, "command_id": f"cmd-{next(self._ids)}"}
                self._accepted[key] = accepted
        return Reply(200, {"status": "accepted", "command_id": accepted["command_id"],
                           "vin": vin, "command": body["command"]})


# -------------------------------------------------------------------------------------
# push notifications


class FakePush(FakeServer):
    """``POST /push``: modes ``up`` (202), ``503``, ``refuse``, ``blackhole``.

    ``.pushes`` holds every accepted push: the JSON body plus ``idempotency_key``.
    """

    MODES = frozenset({"up", "503"})

    def __init__(self, *, mode: str = "up") -> None:
        super().__init__(mode=mode)
        self.pushes: list[dict[str, Any]] = []

    @property
    def push_url(self) -> str:
        return f"{self.url}/push"

    def respond(self, request: RecordedRequest) -> Reply | None:
        if request.method != "POST" or request.path != "/push":
            return Reply(404, {"error": "not found"})
        if self.mode == "503":
            return Reply(503, {"error": "push provider unavailable"})
        if not isinstance(request.json, dict):
            return Reply(400, {"error": "body must be a JSON object"})
        with self._cond:
            self.pushes.append({**request.json, "idempotency_key": request.idempotency_key})
            self._cond.notify_all()
        return Reply(202, {"id": f"push-{len(self.pushes)}"})


__all__ = [
    "FakeAssistanceCentre", "FakePush", "FakeServer", "FakeTwilioApi", "FakeVehicleService",
    "RecordedRequest", "Reply",
]


# -------------------------------------------------------------------------------------
# the car behind the vehicle command service (for the durable command queue)


class FakeCarCommands(FakeVehicleService):
    """:class:`FakeVehicleService` plus what a car can answer itself.

    Extra modes: ``confirm`` (the car executed it at once: 200 ``{"status":
    "confirmed", "command_id": ...}``), ``reject`` (200 ``{"status": "rejected",
    "reason": ...}``), ``503`` (every request), ``hang`` (the request is read and
    taken, then never answered: the handler waits ``slow_s`` -- or until the
    transport changes or the fake closes -- and drops the connection).  The other
    modes behave as in :class:`FakeVehicleService` (``up`` answers ``accepted``).
    """

    MODES = FakeVehicleService.MODES | frozenset({"confirm", "reject", "503", "hang"})

    def respond(self, request: RecordedRequest) -> Reply | None:
        mode = self.mode
        reply = super().respond(request)
        if mode == "hang":
            self.pause(self.slow_s)
            return None
        if reply is not None and reply.status == 200 and mode in ("confirm", "reject"):
            answer = dict(reply.body)
            if mode == "confirm":
                answer["status"] = "confirmed"
            else:
                answer.update(status="rejected", reason="vehicle is moving")
            return Reply(200, answer)
        return reply

    def requests_for(self, key: str) -> int:
        """How many command requests carrying this ``Idempotency-Key`` reached the service."""
        with self._cond:
            return sum(1 for c in self.commands if c["idempotency_key"] == key)


__all__ += ["FakeCarCommands"]


# -------------------------------------------------------------------------------------
# Twilio Messages, readable: the list the notifier checks before sending an SMS again


class FakeTwilioMessages(FakeTwilioApi):
    """:class:`FakeTwilioApi` plus ``GET .../Messages.json`` and outcomes in doubt.

    The list answers like Twilio's: the account's messages, newest first, filtered by
    ``To`` and ``From``, at most ``PageSize`` (default 50) in one page (no next page).
    In mode ``500`` it answers 500 too (the whole API is down); ``429`` and ``400``
    only refuse sends.  Extra modes, for sends only (the list answers normally):

    ``accept-500``
        the message is created (it is in ``.messages`` and in the list), then the
        answer is a 500 -- what Twilio warns a retried POST can duplicate;
    ``accept-hang``
        the message is created, then no answer: the handler waits ``slow_s`` (or until
        the transport changes or the fake closes) and drops the connection.
    """

    MODES = FakeTwilioApi.MODES | frozenset({"accept-500", "accept-hang"})

    def __init__(self, account_sid: str, auth_token: str, *, mode: str = "up",
                 slow_s: float = 2.0) -> None:
        self._as_up = threading.local()
        super().__init__(account_sid, auth_token, mode=mode, slow_s=slow_s)

    @property
    def mode(self) -> str:
        """The mode; inside an ``accept-*`` send the base class reads ``up``."""
        return "up" if getattr(self._as_up, "on", False) else self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        FakeServer.mode.fset(self, mode)  # type: ignore[attr-defined]

    def lookups(self) -> list[RecordedRequest]:
        """The list requests (GET) that reached the fake."""
        return [r for r in self.requests if r.method == "GET"]

    def sends(self) -> list[RecordedRequest]:
        """The send requests (POST) that reached the fake, whatever the answer."""
        return [r for r in self.requests if r.method == "POST"]

    def respond(self, request: RecordedRequest) -> Reply | None:
        match = _MESSAGES_PATH.match(request.path)
        if request.method == "GET" and match is not None:
            return self._list(request, match["sid"])
        mode = self._mode
        if request.method != "POST" or mode not in ("accept-500", "accept-hang"):
            return super().respond(request)
        self._as_up.on = True
        try:
            reply = super().respond(request)
        finally:
            self._as_up.on = False
        if reply is None or reply.status != 201:
            return reply
        if mode == "accept-500":
            return _twilio_error(500, 20500, "Internal Server Error")
        self.pause(self.slow_s)
        return None

    def _list(self, request: RecordedRequest, sid: str) -> Reply:
        if not self._authorised(request, sid):
            return _twilio_error(401, 20003, "Authenticate")
        if self._mode == "500":
            return _twilio_error(500, 20500, "Internal Server Error")
        if self._mode in TRANSPORT_MODES:  # pragma: no cover - the transport answers first
            return _twilio_error(500, 20500, "Internal Server Error")
        to, sender = request.query.get("To"), request.query.get("From")
        size = int(request.query.get("PageSize") or 50)
        with self._cond:
            found = [m for m in reversed(self.messages)
                     if (to is None or m["to"] == to) and (sender is None or m["from"] == sender)]
        page = found[:size]
        uri = f"/2010-04-01/Accounts/{sid}/Messages.json?PageSize={size}&Page=0"
        return Reply(200, {"messages": page, "page": 0, "page_size": size, "start": 0,
                           "end": max(len(page) - 1, 0), "uri": uri, "first_page_uri": uri,
                           "next_page_uri": None, "previous_page_uri": None})


__all__ += ["FakeTwilioMessages"]


# -------------------------------------------------------------------------------------
# a self-hosted Nominatim: GET /reverse (the reverse geocoder behind the agents' addresses)

#: Nominatim's ``/reverse?format=json`` answer for a point in central Copenhagen, in the
#: shape of the "Place Output" section of Nominatim's API documentation
NOMINATIM_COPENHAGEN: dict[str, Any] = {
    "place_id": 128_411_247,
    "licence": "Data © OpenStreetMap contributors, ODbL 1.0. https://osm.org/copyright",
    "osm_type": "way",
    "osm_id": 24_885_291,
    "lat": "55.6760968",
    "lon": "12.5683371",
    "class": "highway",
    "type": "pedestrian",
    "place_rank": 26,
    "importance": 0.10001,
    "addresstype": "road",
    "name": "Rådhuspladsen",
    "display_name": "Rådhuspladsen, Indre By, København, Københavns Kommune, "
                    "Region Hovedstaden, 1550, Danmark",
    "address": {
        "road": "Rådhuspladsen",
        "suburb": "Indre By",
        "city": "København",
        "municipality": "Københavns Kommune",
        "state": "Region Hovedstaden",
        "ISO3166-2-lvl4": "DK-84",
        "postcode": "1550",
        "country": "Danmark",
        "country_code": "dk",
    },
    "boundingbox": ["55.6752306", "55.6769873", "12.5671189", "12.5700470"],
}

#: what Nominatim answers (HTTP 200) where it has no data, e.g. at sea
NOMINATIM_UNABLE: dict[str, Any] = {"error": "Unable to geocode"}


class _NominatimHandler(_Handler):
    """Answers a ``nonsense`` reply with its raw bytes (not JSON); else as the base."""

    def do_GET(self) -> None:
        fake = self.server.fake
        if isinstance(fake, FakeNominatim) and fake.mode == "nonsense":
            parts = urlsplit(self.path)
            fake._record(RecordedRequest(
                method="GET", path=parts.path,
                query={k: v[0] for k, v in parse_qs(parts.query).items()},
                headers=CaseInsensitiveDict(dict(self.headers.items())), body=b"", json=None,
                form=None, time=time.monotonic()))
            body = b"<html><body><h1>502 Bad Gateway</h1>nginx</body></html>"
            try:
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:
                pass
            return
        self._handle()


class FakeNominatim(FakeServer):
    """``GET /reverse?lat=..&lon=..&format=json``: a self-hosted Nominatim.

    Modes: ``up`` (200: the place registered for the rounded point in ``.places``,
    else one made up in the same shape; :data:`NOMINATIM_UNABLE` for a point in
    ``.sea``), ``500``, ``hang`` (the request is read, then no answer for ``slow_s``,
    then the connection is dropped), ``nonsense`` (200 with an HTML body),
    ``wrong-json`` (200 with JSON that is no place: ``["lat", "lon"]``), ``refuse``,
    ``blackhole``.  ``.reverse_requests`` lists the reverse lookups that arrived.
    """

    MODES = frozenset({"up", "500", "hang", "nonsense", "wrong-json"})

    def __init__(self, *, mode: str = "up", slow_s: float = 5.0) -> None:
        super().__init__(mode=mode, slow_s=slow_s)
        #: (lat, lon) rounded to 4 decimals -> the JSON place answered there
        self.places: dict[tuple[float, float], dict[str, Any]] = {
            (55.6761, 12.5683): NOMINATIM_COPENHAGEN}
        #: points (rounded to 4 decimals) where Nominatim has no data
        self.sea: set[tuple[float, float]] = set()

    def _listen_http(self) -> None:
        server = _Server((HOST, self._port), _NominatimHandler)
        server.fake = self
        self._port = server.server_address[1]
        self._release = threading.Event()
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name=f"{type(self).__name__}:{self._port}", daemon=True)
        self._thread.start()

    def reverse_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == "/reverse"]

    def respond(self, request: RecordedRequest) -> Reply | None:
        if request.method != "GET" or request.path != "/reverse":
            return Reply(404, {"error": "not found"})
        mode = self.mode
        if mode == "hang":
            self.pause(self.slow_s)
            return None
        if mode == "500":
            return Reply(500, {"error": "Internal Server Error"})
        if mode == "wrong-json":
            return Reply(200, ["lat", "lon"])
        try:
            point = (round(float(request.query["lat"]), 4), round(float(request.query["lon"]), 4))
        except (KeyError, ValueError):
            return Reply(400, {"error": {"code": 400, "message": "Parameter 'lat' missing."}})
        if point in self.sea:
            return Reply(200, NOMINATIM_UNABLE)
        place = self.places.get(point)
        if place is None:
            lat, lon = point
            place = {**NOMINATIM_COPENHAGEN, "lat": f"{lat:.7f}", "lon": f"{lon:.7f}",
                     "place_id": 1_000_000 + len(self.places),
                     "display_name": f"Testvej {abs(int(lat * 10_000)) % 97 + 1}, 9999 "
                                     f"Testby, Danmark",
                     "address": {"road": "Testvej",
                                 "house_number": str(abs(int(lat * 10_000)) % 97 + 1),
                                 "city": "Testby", "postcode": "9999", "country": "Danmark",
                                 "country_code": "dk"}}
        return Reply(200, place)


__all__ += ["NOMINATIM_COPENHAGEN", "NOMINATIM_UNABLE", "FakeNominatim"]
