"""gateway.security on a bare Flask app: bearer tokens, agent roles, Twilio signatures.

The decorators are applied here, inside each test, to fresh views on a minimal app (no
database, no blueprints): what each guard lets through and what it refuses is read off
the response, and the view's own call count proves the guard ran before it.  The real
routes are covered by tests/integration/test_security_guards.py.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from flask import Flask, g
from twilio.request_validator import RequestValidator

from gateway import security
from gateway.security import (
    ADMIN,
    PUBLIC,
    TWILIO,
    admin_token,
    agent_role,
    public,
    signed_url,
    twilio_signature_valid,
    twilio_signed,
    vehicle_token,
)

PUBLIC_URL = "https://gateway.example.com"
AUTH_TOKEN = "unit-auth-token-0123456789abcdef"
VEHICLE_TOKENS = ("vehicle-token-aaaaaaaaaaaaaaaa", "vehicle-token-bbbbbbbbbbbbbbbb",
                  "vehicle-token-cccccccccccccccc")
READER = "agent-reader-0123456789abcdef"
DISPATCHER = "agent-dispatcher-0123456789abcd"
SUPERVISOR = "agent-supervisor-0123456789abc"
AGENT_TOKENS = {READER: frozenset({"read"}), DISPATCHER: frozenset({"read", "dispatch"}),
                SUPERVISOR: frozenset({"supervisor"})}
ADMIN_TOKENS = ("admin-token-one-0123456789abcd", "admin-token-two-0123456789abcd")
FORM = {"CallSid": "CA1", "From": "+46701234567", "To": "+442079460900"}


class Calls:
    """A view that counts its calls and says who it saw."""

    def __init__(self) -> None:
        self.count = 0
        self.agents: list[str] = []

    def __call__(self, **kwargs: Any) -> Any:
        self.count += 1
        self.agents.append(getattr(g, "agent", "") or getattr(g, "admin", ""))
        return {"ok": True, **kwargs}


@pytest.fixture
def app() -> Flask:
    app = Flask(__name__)
    settings = SimpleNamespace(twilio_auth_token=AUTH_TOKEN, public_url=PUBLIC_URL,
                               vehicle_api_tokens=frozenset(VEHICLE_TOKENS),
                               agent_api_tokens=AGENT_TOKENS,
                               admin_api_tokens=frozenset(ADMIN_TOKENS))
    app.extensions["gateway"] = SimpleNamespace(settings=settings)
    return app


def route(app: Flask, rule: str, guard: Callable[[Any], Any], view: Calls,
          methods: tuple[str, ...] = ("POST",)) -> Any:
    guarded = guard(view)
    app.add_url_rule(rule, endpoint=rule, view_func=guarded, methods=list(methods))
    return guarded


def sign(url: str, params: dict[str, str], token: str = AUTH_TOKEN,
         algorithm: str | None = None) -> str:
    signed: str = RequestValidator(token).compute_signature(url, params, algorithm)
    return signed


# -- bearer tokens --------------------------------------------------------------------------


def bearer(app: Flask, header: str | None) -> str | None:
    headers = {} if header is None else {"Authorization": header}
    with app.test_request_context("/", headers=headers):
        return security._bearer_token()


@pytest.mark.parametrize(("header", "token"), [
    ("Bearer abc", "abc"),
    ("bearer abc", "abc"),  # the scheme is case-insensitive (RFC 7235)
    ("BEARER abc", "abc"),
    ("BeArEr abc", "abc"),
    ("Bearer abc  ", "abc"),  # trailing whitespace is not part of the token
    ("Bearer  abc", "abc"),  # RFC 6750: "Bearer" 1*SP b64token
    ("Bearer a.b-c_d~e+f/g=", "a.b-c_d~e+f/g="),
])
def test_bearer_token_is_read_from_the_bearer_scheme(app: Flask, header: str,
                                                     token: str) -> None:
    assert bearer(app, header) == token


@pytest.mark.parametrize("header", [
    None, "", " ", "Bearer", "Bearer ", "Bearer    ", "Bearer\t\t",
    "Basic abc", "basic abc", "Token abc", "Digest abc", "MAC abc", "Bearers abc", "Beare abc",
    "abc", "Bearer:abc", "Bearer\tabc",  # the separator is a space
    " Bearer abc",  # nothing before the scheme
])
def test_anything_but_a_bearer_token_is_no_token(app: Flask, header: str | None) -> None:
    assert bearer(app, header) is None


def test_match_compares_against_every_candidate_without_an_early_exit(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)  # the module gateway.security uses
    candidates = list(VEHICLE_TOKENS)
    for i, token in enumerate(candidates):
        compared.clear()
        assert security._match(token, candidates) == token
        # every candidate compared, in constant time, whichever one matched
        assert compared == [(token.encode(), c.encode()) for c in candidates], i
    compared.clear()
    assert security._match("vehicle-token-xxxxxxxxxxxxxxxx", candidates) is None
    assert len(compared) == len(candidates)
    assert security._match("anything", []) is None


def test_match_needs_the_whole_token() -> None:
    token = VEHICLE_TOKENS[1]
    assert security._match(token, VEHICLE_TOKENS) == token
    for wrong in (token[:-1], token + "x", token.upper(), " " + token, ""):
        assert security._match(wrong, VEHICLE_TOKENS) is None, wrong


def test_vehicle_token_guard(app: Flask) -> None:
    view = Calls()
    guarded = route(app, "/v", vehicle_token, view)
    assert guarded.guard == "bearer:vehicle"
    client = app.test_client()
    for token in VEHICLE_TOKENS:  # each configured token opens the door
        response = client.post("/v", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200 and response.json == {"ok": True}
    assert view.count == len(VEHICLE_TOKENS)
    for header in (None, f"Basic {VEHICLE_TOKENS[0]}", f"Token {VEHICLE_TOKENS[0]}", "Bearer",
                   "Bearer vehicle-token-dddddddddddddddd", f"Bearer {READER}"):
        response = client.post("/v", headers={} if header is None else {"Authorization": header})
        assert response.status_code == 401, header
        assert response.json == {"error": "unauthorized",
                                 "detail": "a valid bearer token is required"}
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="vehicle"'
    assert view.count == len(VEHICLE_TOKENS)  # refused requests never reached the view


def test_vehicle_token_passes_the_route_arguments_through(app: Flask) -> None:
    view = Calls()
    route(app, "/v/<vin>", vehicle_token, view, methods=("GET",))
    response = app.test_client().get("/v/VIN1", headers={
        "Authorization": f"Bearer {VEHICLE_TOKENS[2]}"})
    assert response.status_code == 200 and response.json == {"ok": True, "vin": "VIN1"}


def agent_id(token: str) -> str:
    """The agent's identity in records: a keyed hash of the token, never the token."""
    return hmac.new(b"agent-id", token.encode(), hashlib.sha256).hexdigest()[:12]


def test_agent_role_guard_401_without_a_valid_token(app: Flask) -> None:
    view = Calls()
    guarded = route(app, "/a", agent_role("dispatch"), view)
    assert guarded.guard == "bearer:agent:dispatch"
    client = app.test_client()
    for header in (None, "", "Bearer", f"Basic {DISPATCHER}", f"Token {DISPATCHER}",
                   f"Bearer {DISPATCHER}x", f"Bearer {VEHICLE_TOKENS[0]}"):
        response = client.post("/a", headers={} if header is None else {"Authorization": header})
        assert response.status_code == 401, header
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="agent"'
        assert (response.json or {}).get("error") == "unauthorized"
    assert view.count == 0


def test_agent_role_guard_403_for_a_valid_token_without_the_role(app: Flask) -> None:
    view = Calls()
    route(app, "/a", agent_role("dispatch"), view)
    response = app.test_client().post("/a", headers={"Authorization": f"Bearer {READER}"})
    assert response.status_code == 403
    assert response.json == {"error": "forbidden",
                             "detail": "this token lacks the role 'dispatch'"}
    assert "WWW-Authenticate" not in response.headers
    assert view.count == 0


def test_agent_role_guard_lets_the_role_and_the_supervisor_through(app: Flask) -> None:
    view = Calls()
    route(app, "/a", agent_role("dispatch"), view)
    route(app, "/r", agent_role("read"), view)
    route(app, "/i", agent_role("immobilise"), view)
    client = app.test_client()
    cases = [("/a", DISPATCHER), ("/a", SUPERVISOR), ("/r", READER), ("/r", DISPATCHER),
             ("/i", SUPERVISOR)]
    for path, token in cases:
        response = client.post(path, headers={"Authorization": f"bearer {token}"})
        assert response.status_code == 200, (path, token)
    assert view.agents == [agent_id(token) for _, token in cases]
    assert len(set(view.agents)) == 3 and all(len(a) == 12 for a in view.agents)
    assert client.post("/i", headers={"Authorization": f"Bearer {DISPATCHER}"}).status_code == 403


def test_admin_token_guard(app: Flask) -> None:
    """401 without a valid token; 403 for a valid token of another API; the admin's id
    (a keyed hash, never the token) for the view."""
    view = Calls()
    guarded = route(app, "/admin", admin_token, view)
    assert guarded.guard == ADMIN == "bearer:admin"
    client = app.test_client()
    for token in ADMIN_TOKENS:
        assert client.post("/admin", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert view.agents == [hmac.new(b"admin-id", t.encode(), hashlib.sha256).hexdigest()[:12]
                           for t in ADMIN_TOKENS]
    for other in (VEHICLE_TOKENS[0], READER, SUPERVISOR):
        response = client.post("/admin", headers={"Authorization": f"Bearer {other}"})
        assert response.status_code == 403, other
        assert response.json == {"error": "forbidden",
                                 "detail": "this token is not an admin API token"}
    for header in (None, "Bearer", f"Basic {ADMIN_TOKENS[0]}", f"Bearer {ADMIN_TOKENS[0]}x",
                   f"Basic {VEHICLE_TOKENS[0]}"):
        response = client.post("/admin", headers={} if header is None else {"Authorization": header})
        assert response.status_code == 401, header
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="admin"'
    assert view.count == len(ADMIN_TOKENS)


def test_public_marks_the_view_as_open_on_purpose() -> None:
    def probe() -> str:
        return "ok"

    assert public(probe) is probe and probe.guard == PUBLIC  # type: ignore[attr-defined]


# -- Twilio signatures ------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "expected"), [
    ("/twilio/voice", f"{PUBLIC_URL}/twilio/voice"),
    ("/twilio/voice?", f"{PUBLIC_URL}/twilio/voice"),
    ("/twilio/voice/dial-result?w=DK&t0=5&L=eu-primary%2Cglobal",
     f"{PUBLIC_URL}/twilio/voice/dial-result?w=DK&t0=5&L=eu-primary%2Cglobal"),  # raw, in order
    ("/twilio/voice/x?b=2&a=1&b=1", f"{PUBLIC_URL}/twilio/voice/x?b=2&a=1&b=1"),
])
def test_signed_url_is_the_public_base_plus_the_raw_path_and_query(
    app: Flask, path: str, expected: str
) -> None:
    # the request arrives over plain HTTP from the TLS-terminating proxy, host and all
    with app.test_request_context(path, base_url="http://10.0.0.7:8080",
                                  headers={"X-Forwarded-Proto": "http",
                                           "X-Forwarded-Host": "evil.example.com"}):
        assert signed_url(PUBLIC_URL) == expected


def test_signed_url_keeps_latin1_bytes_of_the_query(app: Flask) -> None:
    # WSGI hands the raw query over as latin-1: a byte outside ASCII is kept as it came
    with app.test_request_context("/p", environ_overrides={"QUERY_STRING": "n=%C3%A9&m=\xe9"}):
        assert signed_url(PUBLIC_URL) == f"{PUBLIC_URL}/p?n=%C3%A9&m=\xe9"


def signature_valid(app: Flask, path: str, form: dict[str, str],
                    headers: dict[str, str]) -> bool:
    with app.test_request_context(path, method="POST", data=form, headers=headers,
                                  base_url="http://10.0.0.7:8080"):
        return twilio_signature_valid(AUTH_TOKEN, PUBLIC_URL)


def test_signature_valid_only_for_this_url_these_params_this_token(app: Flask) -> None:
    url = f"{PUBLIC_URL}/twilio/voice?t0=5"
    good = sign(url, FORM)
    assert signature_valid(app, "/twilio/voice?t0=5", FORM, {"X-Twilio-Signature": good})
    assert not signature_valid(app, "/twilio/voice?t0=5", FORM, {})
    assert not signature_valid(app, "/twilio/voice?t0=5", FORM, {"X-Twilio-Signature": ""})
    assert not signature_valid(app, "/twilio/voice?t0=6", FORM, {"X-Twilio-Signature": good})
    assert not signature_valid(app, "/twilio/voice", FORM, {"X-Twilio-Signature": good})
    assert not signature_valid(app, "/twilio/voice?t0=5", {**FORM, "Digits": "1"},
                               {"X-Twilio-Signature": good})
    other = sign(url, FORM, token="another-token-0123456789abcdef")
    assert not signature_valid(app, "/twilio/voice?t0=5", FORM, {"X-Twilio-Signature": other})
    internal = sign("http://10.0.0.7:8080/twilio/voice?t0=5", FORM)
    assert not signature_valid(app, "/twilio/voice?t0=5", FORM,
                               {"X-Twilio-Signature": internal})


def test_signature_algorithm_follows_the_settings_header(app: Flask) -> None:
    url = f"{PUBLIC_URL}/twilio/voice"
    sha256 = sign(url, FORM, algorithm="HMAC_SHA256")
    settings = "key=webhooks_sharedkey_1,algorithm=HMAC_SHA256"
    assert signature_valid(app, "/twilio/voice", FORM, {
        "X-Twilio-Signature": sha256, "X-Twilio-Webhooks-Signature-Settings": settings})
    # the SHA-256 signature is not a SHA-1 one, nor the other way round
    assert not signature_valid(app, "/twilio/voice", FORM, {"X-Twilio-Signature": sha256})
    assert not signature_valid(app, "/twilio/voice", FORM, {
        "X-Twilio-Signature": sign(url, FORM), "X-Twilio-Webhooks-Signature-Settings": settings})
    assert not signature_valid(app, "/twilio/voice", FORM, {
        "X-Twilio-Signature": sha256,
        "X-Twilio-Webhooks-Signature-Settings": "key=k,algorithm=HMAC_MD5"})


@pytest.fixture
def twilio_route(app: Flask) -> Iterator[tuple[Flask, Calls]]:
    view = Calls()
    guarded = route(app, "/twilio/voice/<leg>", twilio_signed, view)
    assert guarded.guard == TWILIO
    yield app, view


def test_twilio_signed_refuses_a_bad_signature_before_the_view(
    twilio_route: tuple[Flask, Calls], caplog: pytest.LogCaptureFixture
) -> None:
    app, view = twilio_route
    client = app.test_client()
    wrong = sign(f"{PUBLIC_URL}/twilio/voice/other", FORM)
    with caplog.at_level(logging.WARNING, logger="gateway.security"):
        for headers in ({}, {"X-Twilio-Signature": wrong}):
            response = client.post("/twilio/voice/caller", data=FORM, headers=headers)
            assert response.status_code == 403
            assert response.data == b"invalid signature\n" and response.mimetype == "text/plain"
    assert view.count == 0
    assert [r.getMessage() for r in caplog.records] == [
        "rejected webhook with missing or invalid signature: /twilio/voice/caller"] * 2


def test_twilio_signed_lets_a_good_signature_through_with_its_arguments(
    twilio_route: tuple[Flask, Calls]
) -> None:
    app, view = twilio_route
    good = sign(f"{PUBLIC_URL}/twilio/voice/caller?e=1", FORM)
    response = app.test_client().post("/twilio/voice/caller?e=1", data=FORM,
                                      headers={"X-Twilio-Signature": good},
                                      base_url="http://10.0.0.7:8080")
    assert response.status_code == 200 and response.json == {"ok": True, "leg": "caller"}
    assert view.count == 1
