"""Every route is protected, and each protection is proven by a request."""

from __future__ import annotations

import pytest
from flask import Flask
from flask.testing import FlaskClient

from gateway.security import PUBLIC, TWILIO
from tests.conftest import PUBLIC_URL, Twilio
from tests.support.twilio import AUTH_TOKEN, call_params, signature

#: routes that are open on purpose
OPEN = {"ops.healthz", "ops.readyz", "ops.metrics", "openapi.openapi"}


def routes(app: Flask) -> list[tuple[str, str, set[str]]]:
    return [(rule.endpoint, rule.rule, set(rule.methods or ()) - {"HEAD", "OPTIONS"})
            for rule in app.url_map.iter_rules() if rule.endpoint != "static"]


def test_every_view_declares_its_guard(app: Flask) -> None:
    for endpoint, rule, _ in routes(app):
        guard = getattr(app.view_functions[endpoint], "guard", None)
        assert guard is not None, f"{rule} ({endpoint}) has no guard"
        if guard == PUBLIC:
            assert endpoint in OPEN, f"{rule} is public but not in the list of open routes"


def test_every_twilio_route_refuses_unsigned_and_badly_signed_requests(
    app: Flask, client: FlaskClient
) -> None:
    twilio_routes = [(e, r) for e, r, _ in routes(app)
                     if getattr(app.view_functions[e], "guard", None) == TWILIO]
    assert len(twilio_routes) >= 7
    params = call_params("CA1", "+46701234567", Digits="1", DialCallStatus="no-answer")
    for endpoint, rule in twilio_routes:
        assert client.post(rule, data=params).status_code == 403, rule
        wrong = signature(PUBLIC_URL + rule, params, token="another-token-0123456789abcdef")
        assert client.post(rule, data=params, headers={"X-Twilio-Signature": wrong}).status_code == 403
        # signed for another URL (replayed against this one)
        other = signature(PUBLIC_URL + "/elsewhere", params)
        assert client.post(rule, data=params, headers={"X-Twilio-Signature": other}).status_code == 403
        # a parameter changed after signing
        good = signature(PUBLIC_URL + rule, params)
        tampered = {**params, "From": "+4930123456"}
        assert client.post(rule, data=tampered, headers={"X-Twilio-Signature": good}).status_code == 403
        # and the correctly signed request is accepted
        assert client.post(rule, data=params, headers={"X-Twilio-Signature": good}).status_code == 200


def test_signed_query_string_cannot_be_altered(twilio: Twilio, client: FlaskClient) -> None:
    url = PUBLIC_URL + "/twilio/voice/dial-result?c=DK&n=1"
    params = call_params("CA1", "+46701234567", DialCallStatus="no-answer")
    sig = signature(url, params)
    altered = client.post("/twilio/voice/dial-result?c=SE&n=1", data=params,
                          headers={"X-Twilio-Signature": sig})
    assert altered.status_code == 403


def test_signature_is_checked_against_the_public_url_behind_a_tls_proxy(client: FlaskClient) -> None:
    """The proxy speaks plain HTTP to us; Twilio signed the https public URL."""
    params = call_params("CA1", "+46701234567")
    sig = signature(PUBLIC_URL + "/twilio/voice", params)
    response = client.post("/twilio/voice", data=params, headers={"X-Twilio-Signature": sig},
                           base_url="http://10.0.0.7:8080")
    assert response.status_code == 200
    # a signature over the internal URL is what an attacker inside could forge: refused
    internal = signature("http://10.0.0.7:8080/twilio/voice", params)
    assert client.post("/twilio/voice", data=params, headers={"X-Twilio-Signature": internal},
                       base_url="http://10.0.0.7:8080").status_code == 403


def test_sha256_shared_key_signatures_are_understood(client: FlaskClient) -> None:
    from twilio.request_validator import RequestValidator

    params = call_params("CA1", "+46701234567")
    sig = RequestValidator(AUTH_TOKEN).compute_signature(PUBLIC_URL + "/twilio/voice", params,
                                                         "HMAC_SHA256")
    ok = client.post("/twilio/voice", data=params, headers={
        "X-Twilio-Signature": sig,
        "X-Twilio-Webhooks-Signature-Settings": "key=webhooks_sharedkey_1,algorithm=HMAC_SHA256"})
    assert ok.status_code == 200


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer wrong-token-0123456789", "Basic abc"])
def test_vehicle_api_needs_a_token(client: FlaskClient, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    response = client.post("/v1/events", json={}, headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_bearer_routes_refuse_requests_without_credentials(app: Flask, client: FlaskClient) -> None:
    for endpoint, rule, methods in routes(app):
        guard = getattr(app.view_functions[endpoint], "guard", "")
        if not guard.startswith("bearer"):
            continue
        path = rule.replace("<", "").replace(">", "").replace("string:", "").replace("int:", "")
        for method in methods:
            response = client.open(path, method=method, json={})
            assert response.status_code == 401, (rule, method)


def test_open_routes_answer(client: FlaskClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
