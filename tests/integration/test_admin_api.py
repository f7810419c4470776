"""The admin API: enrolment, PINs and lockouts over HTTP (Flask test client, real SQLite).

The PIN must never come back: not in an answer, a log line, the audit, nor anywhere in
the bytes of the database files (the WAL included).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from gateway.config import Settings
from gateway.errors import ConfigError
from gateway.owners import Vehicles, lookup_code_valid
from gateway.security import ADMIN
from tests.conftest import Clock
from tests.support.twilio import AUTH_TOKEN, VEHICLE_TOKEN

ADMIN_TOKEN = "admin-token-0123456789abcdef"
OTHER_ADMIN = "second-admin-token-0123456789"
AGENT_TOKEN = "agent-token-0123456789abcdef"  # tests/conftest.py: read+dispatch
VIN = "YV1ZW72U5N1234567"
OTHER_VIN = "WDD2050421F123456"
PIN = "73810592"  # distinctive: searched for in answers, logs and the database bytes

BODY: dict[str, Any] = {
    "vin": VIN, "car_msisdn": "+46701740606", "market": "SE", "purchase_date": "2024-03-01",
    "serviced_regularly": True, "owner_name": "Anna Lind",
    "owner_phones": ["+46701740605", "+4915112349001"], "language": "sv-SE",
}


@pytest.fixture
def admin_app(make_app: Callable[..., Flask], settings: Settings) -> Flask:
    return make_app(settings=settings.replace(
        admin_api_tokens=frozenset({ADMIN_TOKEN, OTHER_ADMIN}), pin_scrypt_n=2**8))


@pytest.fixture
def client(admin_app: Flask) -> FlaskClient:
    return admin_app.test_client()


def call(client: FlaskClient, method: str, path: str, body: Any = None,
         token: str | None = ADMIN_TOKEN, **kwargs: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.open(path, method=method, json=body, headers=headers, **kwargs)


def enrol(client: FlaskClient, **overrides: Any) -> dict[str, Any]:
    response = call(client, "POST", "/v1/admin/vehicles", {**BODY, **overrides})
    assert response.status_code == 201, response.json
    return response.json  # type: ignore[no-any-return]


def registry(app: Flask) -> Vehicles:
    vehicles: Vehicles = app.extensions["gateway"].vehicles
    return vehicles


def actions(app: Flask, vin: str = VIN) -> list[tuple[str, str]]:
    return [(a.action, a.actor) for a in registry(app).audit_for(vin)]


ROUTES = [("POST", "/v1/admin/vehicles"), ("GET", f"/v1/admin/vehicles/{VIN}"),
          ("PATCH", f"/v1/admin/vehicles/{VIN}"), ("PUT", f"/v1/admin/vehicles/{VIN}/pin"),
          ("POST", f"/v1/admin/vehicles/{VIN}/pin/unlock"),
          ("GET", f"/v1/admin/vehicles/{VIN}/audit")]


# -- who may call ------------------------------------------------------------------------


def test_every_admin_route_carries_the_admin_guard(admin_app: Flask) -> None:
    admin_rules = [r for r in admin_app.url_map.iter_rules() if r.endpoint.startswith("admin.")]
    assert len(admin_rules) == len(ROUTES)
    for rule in admin_rules:
        assert getattr(admin_app.view_functions[rule.endpoint], "guard", None) == ADMIN


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize("token", [None, "wrong-token-0123456789abcdef", ADMIN_TOKEN[:-1],
                                   ADMIN_TOKEN + "x"])
def test_no_or_a_wrong_token_is_401(client: FlaskClient, method: str, path: str,
                                    token: str | None) -> None:
    response = call(client, method, path, {"reason": "x"}, token=token)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="admin"'


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize("token", [AGENT_TOKEN, VEHICLE_TOKEN])
def test_another_apis_token_is_403(client: FlaskClient, method: str, path: str,
                                   token: str) -> None:
    response = call(client, method, path, BODY, token=token)
    assert response.status_code == 403
    assert response.json["error"] == "forbidden"
    assert call(client, "GET", f"/v1/admin/vehicles/{VIN}", token=token).status_code == 403


def test_basic_auth_or_a_bare_scheme_is_401(client: FlaskClient) -> None:
    for header in ("Basic " + ADMIN_TOKEN, "Bearer", "Bearer  ", ADMIN_TOKEN):
        response = client.get(f"/v1/admin/vehicles/{VIN}", headers={"Authorization": header})
        assert response.status_code == 401, header


def test_tokens_are_compared_in_constant_time(client: FlaskClient,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import hmac

    compared: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert call(client, "GET", f"/v1/admin/vehicles/{VIN}").status_code == 404
    # every admin token was compared (no early exit), as bytes
    assert {b for _, b in compared} >= {ADMIN_TOKEN.encode(), OTHER_ADMIN.encode()}


@pytest.mark.parametrize(("tokens", "problem"), [
    ("short-token", "at least 16 characters"),
    (f"{ADMIN_TOKEN},tiny", "at least 16 characters"),
    (VEHICLE_TOKEN, "also a vehicle or agent token"),
    (AGENT_TOKEN, "also a vehicle or agent token"),
])
def test_admin_tokens_are_checked_at_start_up(tokens: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=f"GATEWAY_ADMIN_API_TOKENS: .*{problem}"):
        Settings.from_env({"GATEWAY_TWILIO_AUTH_TOKEN": AUTH_TOKEN,
                           "GATEWAY_VEHICLE_API_TOKENS": VEHICLE_TOKEN,
                           "GATEWAY_AGENT_API_TOKENS": f"{AGENT_TOKEN}:read",
                           "GATEWAY_ADMIN_API_TOKENS": tokens})


def test_admin_tokens_are_read_from_the_environment() -> None:
    settings = Settings.from_env({"GATEWAY_TWILIO_AUTH_TOKEN": AUTH_TOKEN,
                                  "GATEWAY_ADMIN_API_TOKENS": f" {ADMIN_TOKEN} ,{OTHER_ADMIN}"})
    assert settings.admin_api_tokens == {ADMIN_TOKEN, OTHER_ADMIN}
    assert Settings.from_env({"GATEWAY_TWILIO_AUTH_TOKEN": AUTH_TOKEN}).admin_api_tokens == set()


# -- create ------------------------------------------------------------------------------


def test_create_answers_201_with_the_customer_number(admin_app: Flask,
                                                     client: FlaskClient) -> None:
    response = call(client, "POST", "/v1/admin/vehicles", BODY)
    assert response.status_code == 201
    assert response.headers["Location"] == f"/v1/admin/vehicles/{VIN}"
    created = response.json
    assert lookup_code_valid(created["customer_number"])
    assert {k: created[k] for k in BODY} == BODY
    assert created["has_pin"] is False and "pin_hash" not in created and "pin" not in created
    assert created["pin_lockout"] == {"failures": 0, "max_failures": 3, "window_s": 900,
                                      "locked": False, "locked_until": None}
    assert call(client, "GET", f"/v1/admin/vehicles/{VIN}").json == created
    assert registry(admin_app).by_lookup_code(created["customer_number"]).vin == VIN  # type: ignore[union-attr]
    assert actions(admin_app)[0][0] == "enrol" and actions(admin_app)[0][1].startswith("admin:")


def test_create_normalises_what_operators_type(client: FlaskClient) -> None:
    created = enrol(client, vin=" yv1zw72u5n1234567 ", market="se", language="SV-se",
                    car_msisdn="070-174 06 06", owner_phones=["+46 70 174 06 05"],
                    owner_name="  Anna Lind ")
    assert (created["vin"], created["market"], created["language"]) == (VIN, "SE", "sv-SE")
    assert created["car_msisdn"] == "+46701740606"  # national form of the car's market
    assert created["owner_phones"] == ["+46701740605"] and created["owner_name"] == "Anna Lind"


def test_the_same_body_again_is_200_with_the_same_vehicle(admin_app: Flask,
                                                          client: FlaskClient) -> None:
    first = enrol(client)
    again = call(client, "POST", "/v1/admin/vehicles", BODY)
    assert again.status_code == 200
    assert again.json["customer_number"] == first["customer_number"]
    # normalised the same way: still the same vehicle
    same = call(client, "POST", "/v1/admin/vehicles", {**BODY, "market": "se"}, token=OTHER_ADMIN)
    assert same.status_code == 200
    assert [a for a, _ in actions(admin_app)] == ["enrol"]  # nothing written twice


def test_another_body_for_a_registered_vin_is_409_naming_the_fields(admin_app: Flask,
                                                                   client: FlaskClient) -> None:
    enrol(client)
    response = call(client, "POST", "/v1/admin/vehicles",
                    {**BODY, "owner_name": "Someone Else", "serviced_regularly": False})
    assert response.status_code == 409
    assert response.json["error"] == "conflict"
    assert set(response.json["fields"]) == {"owner_name", "serviced_regularly"}
    assert call(client, "GET", f"/v1/admin/vehicles/{VIN}").json["owner_name"] == "Anna Lind"


def test_a_car_sim_registered_to_another_vehicle_is_409(client: FlaskClient) -> None:
    enrol(client)
    response = call(client, "POST", "/v1/admin/vehicles", {**BODY, "vin": OTHER_VIN})
    assert response.status_code == 409
    assert response.json["fields"] == {"car_msisdn": "already registered to another vehicle"}
    assert call(client, "GET", f"/v1/admin/vehicles/{OTHER_VIN}").status_code == 404


@pytest.mark.parametrize(("field", "value"), [
    ("vin", "YV1ZW72U5N12345IO"), ("vin", "SHORT"), ("vin", 12345678901234567),
    ("car_msisdn", "12"), ("car_msisdn", "not a number"), ("car_msisdn", ""),
    ("market", "XX"), ("market", "SWE"), ("market", 46),
    ("purchase_date", "2024-02-30"), ("purchase_date", "20240301"), ("purchase_date", "1989-12-31"),
    ("purchase_date", "2999-01-01"), ("purchase_date", None),
    ("serviced_regularly", "yes"), ("serviced_regularly", 1),
    ("owner_name", ""), ("owner_name", "x" * 201), ("owner_name", "Anna\nLind"),
    ("owner_phones", "+46701740605"), ("owner_phones", []), ("owner_phones", ["+4670"] * 6),
    ("language", "Swedish"), ("language", "sv_SE"), ("language", 5),
])
def test_each_invalid_field_is_named(client: FlaskClient, field: str, value: Any) -> None:
    response = call(client, "POST", "/v1/admin/vehicles", {**BODY, field: value})
    assert response.status_code == 422, response.json
    assert response.json["error"] == "invalid_request"
    assert list(response.json["fields"]) == [field]
    assert isinstance(response.json["fields"][field], str) and response.json["fields"][field]


@pytest.mark.parametrize(("phones", "key"), [
    (["+46701740605", "12"], "owner_phones[1]"),
    (["+46701740605", "+46 70 174 06 05"], "owner_phones[1]"),
    ([46701740605], "owner_phones[0]"),
])
def test_a_bad_phone_is_named_by_its_position(client: FlaskClient, phones: list[Any],
                                              key: str) -> None:
    response = call(client, "POST", "/v1/admin/vehicles", {**BODY, "owner_phones": phones})
    assert response.status_code == 422
    assert list(response.json["fields"]) == [key]


def test_missing_unknown_and_pin_fields_are_named(client: FlaskClient) -> None:
    response = call(client, "POST", "/v1/admin/vehicles",
                    {"vin": VIN, "pin": PIN, "colour": "red"})
    assert response.status_code == 422
    fields = response.json["fields"]
    assert set(fields) == {"car_msisdn", "market", "purchase_date", "owner_name",
                           "owner_phones", "pin", "colour"}
    assert fields["colour"] == "unknown field" and "PUT" in fields["pin"]
    assert PIN not in response.text


def test_optional_fields_default(client: FlaskClient) -> None:
    body = {k: v for k, v in BODY.items() if k not in ("serviced_regularly", "language")}
    response = call(client, "POST", "/v1/admin/vehicles", body)
    assert response.status_code == 201
    assert (response.json["serviced_regularly"], response.json["language"]) == (False, None)


@pytest.mark.parametrize(("kwargs", "status", "key"), [
    ({"data": "vin=x", "content_type": "application/x-www-form-urlencoded"}, 415, None),
    ({"data": "{not json", "content_type": "application/json"}, 422, "body"),
    ({"data": "[1, 2]", "content_type": "application/json"}, 422, "body"),
])
def test_a_body_that_is_not_a_json_object(client: FlaskClient, kwargs: dict[str, Any],
                                          status: int, key: str | None) -> None:
    response = client.post("/v1/admin/vehicles", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                           **kwargs)
    assert response.status_code == status
    assert set(response.json) >= {"error", "detail"}
    if key:
        assert list(response.json["fields"]) == [key]


# -- update ------------------------------------------------------------------------------


def test_patch_changes_the_given_fields_and_audits_their_names(admin_app: Flask,
                                                               client: FlaskClient) -> None:
    before = enrol(client)
    response = call(client, "PATCH", f"/v1/admin/vehicles/{VIN.lower()}",
                    {"owner_phones": ["+46701740699"], "serviced_regularly": False,
                     "language": None, "owner_name": "Anna Lind"})
    assert response.status_code == 200
    after = response.json
    assert after["changed"] == ["serviced_regularly", "owner_phones", "language"]
    assert after["owner_phones"] == ["+46701740699"] and after["language"] is None
    assert after["customer_number"] == before["customer_number"]
    entry = registry(admin_app).audit_for(VIN)[-1]
    assert entry.action == "vehicle_changed"
    assert entry.detail == {"fields": ["serviced_regularly", "owner_phones", "language"]}
    # the IVR finds the car by the new number, not the old one
    assert [v.vin for v in registry(admin_app).by_owner_phone("+46701740699")] == [VIN]
    assert registry(admin_app).by_owner_phone("+4915112349001") == []
    assert registry(admin_app).get(VIN).owner_phone == "+46701740699"  # type: ignore[union-attr]


def test_patch_with_the_same_values_changes_nothing(admin_app: Flask,
                                                    client: FlaskClient) -> None:
    enrol(client)
    response = call(client, "PATCH", f"/v1/admin/vehicles/{VIN}", {"market": "se"})
    assert (response.status_code, response.json["changed"]) == (200, [])
    assert [a for a, _ in actions(admin_app)] == ["enrol"]


def test_patch_reads_national_numbers_in_the_new_market(client: FlaskClient) -> None:
    enrol(client)
    response = call(client, "PATCH", f"/v1/admin/vehicles/{VIN}",
                    {"market": "DE", "owner_phones": ["0151 12349001"]})
    assert response.json["owner_phones"] == ["+4915112349001"]


@pytest.mark.parametrize(("body", "fields"), [
    ({"vin": OTHER_VIN}, {"vin"}),
    ({}, {"body"}),
    ({"owner_name": None}, {"owner_name"}),
    ({"owner_phones": []}, {"owner_phones"}),
    ({"purchase_date": "yesterday", "colour": "red"}, {"purchase_date", "colour"}),
    ({"pin": PIN}, {"pin"}),
])
def test_patch_names_each_bad_field(client: FlaskClient, body: dict[str, Any],
                                    fields: set[str]) -> None:
    enrol(client)
    response = call(client, "PATCH", f"/v1/admin/vehicles/{VIN}", body)
    assert response.status_code == 422
    assert set(response.json["fields"]) == fields
    assert PIN not in response.text


def test_patch_to_a_sim_of_another_vehicle_is_409(client: FlaskClient) -> None:
    enrol(client)
    enrol(client, vin=OTHER_VIN, car_msisdn="+46701740607")
    response = call(client, "PATCH", f"/v1/admin/vehicles/{OTHER_VIN}",
                    {"car_msisdn": "+46701740606"})
    assert response.status_code == 409 and list(response.json["fields"]) == ["car_msisdn"]


@pytest.mark.parametrize(("method", "suffix", "body"), [
    ("GET", "", None), ("PATCH", "", {"owner_name": "X"}), ("PUT", "/pin", {"pin": "1234"}),
    ("POST", "/pin/unlock", {"reason": "r"}), ("GET", "/audit", None),
])
@pytest.mark.parametrize("vin", [OTHER_VIN, "not-a-vin"])
def test_an_unknown_vin_is_404(client: FlaskClient, method: str, suffix: str,
                               body: Any, vin: str) -> None:
    enrol(client)
    response = call(client, method, f"/v1/admin/vehicles/{vin}{suffix}", body)
    assert response.status_code == 404
    assert response.json["fields"] == {"vin": "not registered"}


# -- PIN and lockout ---------------------------------------------------------------------


def test_set_the_pin_then_the_ivr_check_accepts_it(admin_app: Flask,
                                                   client: FlaskClient) -> None:
    enrol(client)
    response = call(client, "PUT", f"/v1/admin/vehicles/{VIN}/pin", {"pin": PIN})
    assert response.status_code == 200 and response.json["has_pin"] is True
    assert PIN not in response.text
    assert registry(admin_app).verify_pin(VIN, PIN, actor="ivr:CA1").ok
    assert ("pin_set", actions(admin_app)[0][1]) in actions(admin_app)


@pytest.mark.parametrize("pin", ["１２３４", "٧٣٨١", "12a4", "", "123", "123456789", " 1234",
                                 1234, None, ["1234"]])
def test_a_malformed_pin_is_refused_and_not_echoed(admin_app: Flask, client: FlaskClient,
                                                   pin: Any) -> None:
    enrol(client)
    response = call(client, "PUT", f"/v1/admin/vehicles/{VIN}/pin", {"pin": pin})
    assert response.status_code == 422
    assert list(response.json["fields"]) == ["pin"]
    assert not any(ch.isdigit() for ch in response.json["fields"]["pin"])
    assert registry(admin_app).get(VIN).has_pin is False  # type: ignore[union-attr]


def test_pin_body_takes_only_the_pin(client: FlaskClient) -> None:
    enrol(client)
    response = call(client, "PUT", f"/v1/admin/vehicles/{VIN}/pin", {"pin": PIN, "x": 1})
    assert response.status_code == 422 and list(response.json["fields"]) == ["x"]
    assert call(client, "PUT", f"/v1/admin/vehicles/{VIN}/pin", {}).json["fields"] == {
        "pin": "required"}


def test_lockout_is_shown_and_an_admin_unlock_clears_it_with_a_reason(
    admin_app: Flask, client: FlaskClient, clock: Clock
) -> None:
    enrol(client)
    call(client, "PUT", f"/v1/admin/vehicles/{VIN}/pin", {"pin": PIN})
    for _ in range(3):
        registry(admin_app).verify_pin(VIN, "000000", actor="ivr:CA2")
    now = dt.datetime.fromtimestamp(clock(), tz=dt.UTC)
    lockout = call(client, "GET", f"/v1/admin/vehicles/{VIN}").json["pin_lockout"]
    assert lockout == {"failures": 3, "max_failures": 3, "window_s": 900, "locked": True,
                       "locked_until": (now + dt.timedelta(minutes=15)).isoformat()}
    assert registry(admin_app).verify_pin(VIN, PIN, actor="ivr:CA3").outcome == "locked"

    refused = call(client, "POST", f"/v1/admin/vehicles/{VIN}/pin/unlock", {"reason": " "})
    assert refused.status_code == 422 and list(refused.json["fields"]) == ["reason"]
    extra = call(client, "POST", f"/v1/admin/vehicles/{VIN}/pin/unlock", {"reason": "r", "x": 1})
    assert extra.status_code == 422 and list(extra.json["fields"]) == ["x"]
    response = call(client, "POST", f"/v1/admin/vehicles/{VIN}/pin/unlock",
                    {"reason": "owner verified by passport at the dealer"})
    assert response.status_code == 200
    assert response.json["pin_lockout"]["locked"] is False
    assert response.json["pin_lockout"]["failures"] == 0
    entry = registry(admin_app).audit_for(VIN)[-1]
    assert entry.action == "pin_unlock" and entry.actor.startswith("admin:")
    assert entry.detail["reason"] == "owner verified by passport at the dealer"
    assert entry.detail["failures"] == 3 and entry.detail["locked_until"] == lockout["locked_until"]
    assert registry(admin_app).verify_pin(VIN, PIN, actor="ivr:CA4").ok


def test_the_audit_trail_names_the_admin_and_every_change(admin_app: Flask,
                                                          client: FlaskClient) -> None:
    enrol(client)
    call(client, "PATCH", f"/v1/admin/vehicles/{VIN}", {"serviced_regularly": False})
    call(client, "PUT", f"/v1/admin/vehicles/{VIN}/pin", {"pin": PIN}, token=OTHER_ADMIN)
    call(client, "POST", f"/v1/admin/vehicles/{VIN}/pin/unlock", {"reason": "test"})
    response = call(client, "GET", f"/v1/admin/vehicles/{VIN}/audit")
    entries = response.json["entries"]
    assert [e["action"] for e in entries] == ["enrol", "vehicle_changed", "pin_set", "pin_unlock"]
    first, second = entries[0]["actor"], entries[2]["actor"]
    assert first.startswith("admin:") and second.startswith("admin:") and first != second
    assert ADMIN_TOKEN not in response.text and OTHER_ADMIN not in response.text
    assert PIN not in response.text


def test_the_pin_is_nowhere_in_answers_logs_or_database_bytes(
    admin_app: Flask, client: FlaskClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    answers = [enrol(client)]
    for method, suffix, body in [
        ("PUT", "/pin", {"pin": PIN}), ("PUT", "/pin", {"pin": PIN + "9"}),
        ("PUT", "/pin", {"pin": PIN, "extra": PIN}), ("PATCH", "", {"pin": PIN}),
        ("GET", "", None), ("GET", "/audit", None), ("PUT", "/pin", {"pin": PIN}),
    ]:
        answers.append(call(client, method, f"/v1/admin/vehicles/{VIN}{suffix}", body).text)
    response = call(client, "POST", "/v1/admin/vehicles", {**BODY, "vin": OTHER_VIN,
                                                           "car_msisdn": "+46701740607",
                                                           "pin": PIN})
    answers.append(response.text)
    for _ in range(4):
        registry(admin_app).verify_pin(VIN, PIN[::-1], actor="ivr:CA5")
    call(client, "POST", f"/v1/admin/vehicles/{VIN}/pin/unlock", {"reason": "test"})
    assert registry(admin_app).verify_pin(VIN, PIN, actor="ivr:CA6").ok
    admin_app.extensions["gateway"].store.dispose()

    assert all(PIN not in str(a) for a in answers)
    assert PIN not in caplog.text
    files = sorted(tmp_path.glob("gateway.sqlite3*"))
    assert files and sum(f.stat().st_size for f in files) > 0
    for path in files:
        data = path.read_bytes()
        assert PIN.encode() not in data, path.name
        assert PIN.encode("utf-16-le") not in data, path.name
    assert b"pin_unlock" in b"".join(f.read_bytes() for f in files)  # the audit is in there


def test_database_down_is_503(make_app: Callable[..., Flask], settings: Settings,
                              tmp_path: Path) -> None:
    from gateway.store import Store

    broken = Store.from_url(f"sqlite:///{tmp_path}/missing-dir/x.sqlite3")
    app = make_app(settings=settings.replace(admin_api_tokens=frozenset({ADMIN_TOKEN})),
                   store=broken)
    for method, suffix, body in [("GET", "", None), ("POST", "/pin/unlock", {"reason": "r"})]:
        response = call(app.test_client(), method, f"/v1/admin/vehicles/{VIN}{suffix}", body)
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    response = call(app.test_client(), "POST", "/v1/admin/vehicles", BODY)
    assert response.status_code == 503
