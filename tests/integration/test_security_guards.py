"""The real routes behind their guards: bearer schemes, agent roles, Twilio signatures.

Flask test client on the full app.  tests/integration/test_guards.py walks every route;
this file pins down the edges of each guard: which Authorization headers count, 401
versus 403 for agents, and which URL a Twilio signature must be computed over (the
configured public URL, whatever the proxy in front of us did to scheme and host).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flask import Flask
from flask.testing import FlaskClient

from gateway.config import Settings
from gateway.errors import ConfigError
from tests.conftest import PUBLIC_URL
from tests.support.twilio import AUTH_TOKEN, VEHICLE_TOKEN, call_params, parse, signature

READER = "agent-reader-0123456789abcdef"
DISPATCHER = "agent-dispatcher-0123456789abcd"
SUPERVISOR = "agent-supervisor-0123456789abc"
SECOND_VEHICLE = "vehicle-token-second-0123456789"
INTERNAL = "http://10.0.0.7:8080"  # how the TLS-terminating proxy reaches us


@pytest.fixture
def app(make_app: Callable[..., Flask], settings: Settings) -> Flask:
    return make_app(settings=settings.replace(
        vehicle_api_tokens=frozenset({VEHICLE_TOKEN, SECOND_VEHICLE}),
        agent_api_tokens={READER: frozenset({"read"}),
                          DISPATCHER: frozenset({"read", "dispatch"}),
                          SUPERVISOR: frozenset({"supervisor"})}))


def post_event(client: FlaskClient, header: str | None) -> int:
    """The status of an (empty, invalid) event: 401 if the guard refused, 422 if it let
    the request reach the view."""
    headers = {} if header is None else {"Authorization": header}
    return client.post("/v1/events", json={}, headers=headers).status_code


# -- the vehicle API: only "Bearer <token>" ----------------------------------------------------


ACCEPTED = [
    f"Bearer {VEHICLE_TOKEN}", f"bearer {VEHICLE_TOKEN}", f"BEARER {VEHICLE_TOKEN}",
    f"Bearer {SECOND_VEHICLE}",
    f"Bearer  {VEHICLE_TOKEN}",  # RFC 6750 allows 1*SP after the scheme
    f"Bearer {VEHICLE_TOKEN} ",
]
REFUSED = [
    None, "", "Bearer", "Bearer ", "Bearer      ",
    f"Basic {VEHICLE_TOKEN}",  # a valid token under another scheme
    f"basic {VEHICLE_TOKEN}",
    f"Token {VEHICLE_TOKEN}",
    f"Digest {VEHICLE_TOKEN}",
    VEHICLE_TOKEN,  # no scheme at all
    f"Bearer{VEHICLE_TOKEN}",
    f"Bearer:{VEHICLE_TOKEN}",
    f"Bearer\t{VEHICLE_TOKEN}",
    f"Bearer {VEHICLE_TOKEN} {VEHICLE_TOKEN}",  # extra words after the token
    f"Bearer {VEHICLE_TOKEN[:8]} {VEHICLE_TOKEN[8:]}",  # a space inside the token
    f"Bearer {VEHICLE_TOKEN[:-1]}",
    f"Bearer {VEHICLE_TOKEN}x",
    f"Bearer {VEHICLE_TOKEN.upper()}",
    f"Bearer {DISPATCHER}",  # an agent's token is not a vehicle's
]


def test_a_valid_vehicle_token_under_the_bearer_scheme_is_accepted(client: FlaskClient) -> None:
    for header in ACCEPTED:
        assert post_event(client, header) == 422, header


def test_anything_else_is_refused_with_401(client: FlaskClient) -> None:
    for header in REFUSED:
        headers = {} if header is None else {"Authorization": header}
        response = client.post("/v1/events", json={}, headers=headers)
        assert response.status_code == 401, header
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="vehicle"'


# -- the agent API: 401 without a valid token, 403 without the role ---------------------------


AGENT_CASES = [
    ("GET", "/v1/agent/incidents/nope", READER, 404),
    ("GET", "/v1/agent/incidents/nope", DISPATCHER, 404),
    ("GET", "/v1/agent/incidents/nope", SUPERVISOR, 404),
    ("POST", "/v1/agent/incidents/nope/dispatch", READER, 403),
    ("POST", "/v1/agent/incidents/nope/dispatch", DISPATCHER, 404),
    ("POST", "/v1/agent/incidents/nope/dispatch", SUPERVISOR, 404),
    ("POST", "/v1/agent/vehicles/VIN/immobilise", DISPATCHER, 403),
    ("POST", "/v1/agent/vehicles/VIN/immobilise", READER, 403),
]


def test_agent_roles_403_without_the_role_else_through_to_the_view(client: FlaskClient) -> None:
    """404: the guard let the request through to the view (the incident does not exist)."""
    for method, path, token, status in AGENT_CASES:
        response = client.open(path, method=method, json={},
                               headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == status, (method, path, token, response.json)
        if status == 403:
            assert (response.json or {}).get("error") == "forbidden"
            assert "WWW-Authenticate" not in response.headers


def test_agent_api_without_a_valid_token_is_401_not_403(client: FlaskClient) -> None:
    for header in (None, f"Basic {SUPERVISOR}", f"Token {SUPERVISOR}", f"Bearer {SUPERVISOR}x",
                   f"Bearer {VEHICLE_TOKEN}", "Bearer  "):
        for method, path in (("GET", "/v1/agent/incidents/nope"),
                             ("POST", "/v1/agent/incidents/nope/dispatch")):
            headers = {} if header is None else {"Authorization": header}
            response = client.open(path, method=method, json={}, headers=headers)
            assert response.status_code == 401, (header, path)
            assert response.headers["WWW-Authenticate"] == 'Bearer realm="agent"'


# -- Twilio signatures --------------------------------------------------------------------------


PARAMS = call_params("CAsec", "+46701234567")


def post_voice(client: FlaskClient, path: str, sig: str | None, *,
               base_url: str = "http://localhost", **headers: str) -> int:
    if sig is not None:
        headers["X-Twilio-Signature"] = sig
    return client.post(path, data=PARAMS, headers=headers, base_url=base_url).status_code


def test_missing_empty_or_wrong_signatures_are_refused(client: FlaskClient) -> None:
    url = PUBLIC_URL + "/twilio/voice"
    assert post_voice(client, "/twilio/voice", None) == 403
    assert post_voice(client, "/twilio/voice", "") == 403
    assert post_voice(client, "/twilio/voice", "not-a-signature") == 403
    assert post_voice(client, "/twilio/voice",
                      signature(url, PARAMS, token="another-token-0123456789abcdef")) == 403
    assert post_voice(client, "/twilio/voice", signature(url, {**PARAMS, "To": "+1"})) == 403
    assert post_voice(client, "/twilio/voice", signature(url, PARAMS)) == 200


SIGNED_FOR_ANOTHER_URL = [
    "http://gateway.example.com/twilio/voice",  # the scheme Twilio did not use
    "https://other.example.com/twilio/voice",  # another host
    "https://gateway.example.com/twilio/voice/",  # another path
    "https://gateway.example.com/twilio/voice/fallback",
    "https://gateway.example.com/twilio/voice?t0=1",  # a query the request lacks
    f"{INTERNAL}/twilio/voice",  # the URL as we receive it behind the proxy
    "http://localhost/twilio/voice",
]


def test_a_signature_for_another_url_is_refused(client: FlaskClient) -> None:
    for signed_for in SIGNED_FOR_ANOTHER_URL:
        sig = signature(signed_for, PARAMS)
        assert post_voice(client, "/twilio/voice", sig) == 403, signed_for
        assert post_voice(client, "/twilio/voice", sig, base_url=INTERNAL) == 403, signed_for


def test_behind_a_tls_proxy_the_public_url_is_what_counts(client: FlaskClient) -> None:
    """The request arrives over plain HTTP at an internal host; Twilio signed the https
    public URL.  Forwarded headers do not move the URL the signature must match."""
    good = signature(PUBLIC_URL + "/twilio/voice", PARAMS)
    assert post_voice(client, "/twilio/voice", good, base_url=INTERNAL) == 200
    assert post_voice(client, "/twilio/voice", good, base_url=INTERNAL,
                      **{"X-Forwarded-Proto": "http", "X-Forwarded-Host": "evil.example.com",
                         "Host": "evil.example.com"}) == 200
    forged = signature("https://evil.example.com/twilio/voice", PARAMS)
    assert post_voice(client, "/twilio/voice", forged, base_url=INTERNAL,
                      **{"X-Forwarded-Proto": "https",
                         "X-Forwarded-Host": "evil.example.com"}) == 403
    # Twilio signs with or without the default port: both forms are Twilio's
    with_port = signature("https://gateway.example.com:443/twilio/voice", PARAMS)
    assert post_voice(client, "/twilio/voice", with_port, base_url=INTERNAL) == 200


def test_a_fragment_in_the_configured_webhook_url_is_not_signed(client: FlaskClient) -> None:
    """Connection overrides (``#rc=2&rp=ct,rt``) live in the URL fragment of the webhook
    configured at Twilio.  A fragment is never sent in the request, and Twilio strips it
    before signing: the gateway checks the URL without it.  A signature that included the
    fragment could not be checked at all (the gateway never sees the fragment): refused."""
    configured = PUBLIC_URL + "/twilio/voice#rc=2&rp=ct,rt"
    stripped = configured.split("#", 1)[0]
    assert post_voice(client, "/twilio/voice", signature(stripped, PARAMS),
                      base_url=INTERNAL) == 200
    assert post_voice(client, "/twilio/voice", signature(configured, PARAMS)) == 403


def test_a_fragment_or_query_cannot_be_configured_into_the_public_url() -> None:
    base = {"GATEWAY_TWILIO_AUTH_TOKEN": AUTH_TOKEN}
    for bad in (PUBLIC_URL + "#rc=2&rp=ct,rt", PUBLIC_URL + "/?x=1"):
        with pytest.raises(ConfigError, match="query or fragment"):
            Settings.from_env({**base, "GATEWAY_PUBLIC_URL": bad})
    assert Settings.from_env({**base, "GATEWAY_PUBLIC_URL": PUBLIC_URL + "/"}).public_url == \
        PUBLIC_URL


def test_the_query_string_is_checked_as_sent_in_its_order(client: FlaskClient) -> None:
    """Twilio signs the action URL exactly as the TwiML gave it: reordering (or
    re-encoding) the query is another URL."""
    path = "/twilio/voice/emergency-result?t0=5&w=GB&e=1&L=eu-primary%2Cglobal"
    form = {**PARAMS, "DialCallStatus": "completed"}
    sig = signature(PUBLIC_URL + path, form)

    def post(p: str) -> int:
        return client.post(p, data=form, headers={"X-Twilio-Signature": sig},
                           base_url=INTERNAL).status_code

    assert post(path) == 200
    assert post("/twilio/voice/emergency-result?w=GB&t0=5&e=1&L=eu-primary%2Cglobal") == 403
    assert post("/twilio/voice/emergency-result?t0=5&w=GB&e=1&L=eu-primary,global") == 403
    assert post("/twilio/voice/emergency-result?t0=5&w=GB&e=2&L=eu-primary%2Cglobal") == 403
    assert post("/twilio/voice/emergency-result?t0=5&w=GB&e=1") == 403


def test_a_replayed_signed_request_is_valid_again_and_answers_the_same(
    client: FlaskClient, app: Flask
) -> None:
    """The same signature is valid twice (Twilio's retries are replays); idempotency
    comes from the step records, not from the signature."""
    sig = signature(PUBLIC_URL + "/twilio/voice", PARAMS)
    first = client.post("/twilio/voice", data=PARAMS, headers={"X-Twilio-Signature": sig})
    services = app.extensions["gateway"]
    if services.steps is not None:
        services.steps.flush()
    again = client.post("/twilio/voice", data=PARAMS, headers={"X-Twilio-Signature": sig})
    assert first.status_code == again.status_code == 200
    assert first.data == again.data
    assert parse(first.data).find("Dial") is not None
