"""Action URLs: the text url_for writes, with each endpoint's path looked up once."""

from __future__ import annotations

from flask import Flask, url_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.views.common import action_url, encode_query, endpoint_url
from tests.conftest import PUBLIC_URL

ENDPOINTS = ["voice.dial_result", "voice.whisper", "voice.emergency_result", "voice.status",
             "ivr.pin", "ivr.replay"]
VALUES = st.text(alphabet=st.sampled_from(list("aZ09 +-_.,:;/?@!$'()*&=#%\"<>") + ["é", "日"]),
                 max_size=10)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(endpoint=st.sampled_from(ENDPOINTS),
       params=st.dictionaries(st.sampled_from(["s", "t0", "h", "w", "i", "lg", "k", "centre"]),
                              st.one_of(VALUES, st.none()), max_size=6))
def test_action_url_is_what_url_for_writes(app: Flask, endpoint: str,
                                           params: dict[str, str | None]) -> None:
    with app.test_request_context("/twilio/voice", method="POST"):
        expected = PUBLIC_URL + url_for(endpoint, **params)
        assert action_url(endpoint, params) == expected
        assert endpoint_url(endpoint) + encode_query(params) == expected


def test_paths_are_per_script_root_and_routes_with_path_variables_use_url_for(
        app: Flask) -> None:
    with app.test_request_context("/twilio/voice", method="POST"):
        assert endpoint_url("voice.status") == PUBLIC_URL + "/twilio/voice/status"
        assert endpoint_url("agent.read_vehicle") is None  # /vehicles/<vin>
    with app.test_request_context("/twilio/voice", method="POST",
                                  base_url="http://localhost/gw/"):
        assert url_for("voice.status") == "/gw/twilio/voice/status"
        assert endpoint_url("voice.status") == PUBLIC_URL + "/gw/twilio/voice/status"
        assert action_url("agent.read_vehicle", {"vin": "WVWZZZ1JZXW000001"}) == (
            PUBLIC_URL + "/gw/v1/agent/vehicles/WVWZZZ1JZXW000001")


@settings(max_examples=300)
@given(params=st.dictionaries(st.one_of(VALUES, st.text(max_size=5)),
                              st.one_of(VALUES, st.text(max_size=8), st.integers(),
                                        st.booleans(), st.none()), max_size=8))
def test_encode_query_writes_what_urlencode_writes(params: dict[str, object]) -> None:
    """The fast path (nothing to quote) and the quoted path give urlencode's text."""
    from urllib.parse import urlencode

    from gateway.views.common import _QUERY_SAFE

    items = [(key, value) for key, value in params.items() if value is not None]
    assert encode_query(params) == ("?" + urlencode(items, safe=_QUERY_SAFE) if items else "")
