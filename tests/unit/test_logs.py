"""Logs: JSON lines, the request's call ids bound and cleared, numbers and VINs masked,
PIN digits never written."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask

from gateway import logs
from tests.conftest import PUBLIC_URL, Twilio
from tests.support.twilio import call_params

Lines = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def log_lines() -> Iterator[Lines]:
    """The gateway's log configuration writing to a buffer; every line parsed as JSON."""
    root = logging.getLogger()
    level, stream = root.level, io.StringIO()
    logs.configure("INFO", stream=stream)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        for handler in [h for h in root.handlers if getattr(h, "_gateway", False)]:
            root.removeHandler(handler)
        root.setLevel(level)
        logs.clear_request()


# -- the call's ids: bound per request, cleared after it ------------------------------------


def test_a_forged_request_is_not_logged_with_the_previous_calls_call_sid(
        app: Flask, twilio: Twilio, log_lines: Lines) -> None:
    # a genuine IVR step of call A (its view sets the call's id for its log lines)
    twilio.post("/twilio/ivr/replay", call_params("CAfirst", "+46701234567"))
    # then a forged request claiming call B
    response = twilio.post("/twilio/voice", call_params("CAforged", "+46701234567"), sign=False)
    assert response.status_code == 403
    rejected = [line for line in log_lines() if "rejected webhook" in line["msg"]]
    assert len(rejected) == 1
    assert rejected[0].get("call_sid") == "CAforged"
    # and after the request, nothing of either call stays bound
    logging.getLogger("after").info("outside any request")
    after = log_lines()[-1]
    assert after["msg"] == "outside any request"
    assert "call_sid" not in after and "incident_id" not in after


def test_each_line_of_a_request_carries_its_call_sid_and_incident_id(
        app: Flask, twilio: Twilio, log_lines: Lines) -> None:
    path = PUBLIC_URL + "/twilio/voice/fallback?i=inc-42"
    twilio.post(path, call_params("CAwith", "+46701234567", ErrorCode="11200"))
    line = next(x for x in log_lines() if "fallback URL requested" in x["msg"])
    assert line["call_sid"] == "CAwith" and line["incident_id"] == "inc-42"
    twilio.post("/twilio/voice", call_params("CAnext", "+46701234567"), sign=False)
    line = next(x for x in log_lines() if "rejected webhook" in x["msg"])
    assert line["call_sid"] == "CAnext" and "incident_id" not in line


def test_a_request_id_that_is_not_an_id_is_not_bound(log_lines: Lines) -> None:
    logs.bind_request(call_sid="CA1\n{\"level\": \"fake\"}", incident_id="x" * 500)
    logging.getLogger("t").info("line")
    line = log_lines()[-1]
    assert "call_sid" not in line and "incident_id" not in line


# -- JSON lines, also from libraries --------------------------------------------------------


def test_stdlib_and_structlog_lines_are_json_with_the_same_fields(log_lines: Lines) -> None:
    logging.getLogger("waitress").warning("task queue depth is %d", 5)
    logs.get_logger("gateway.test").info("step written", step="voice")
    try:
        raise ValueError("bad value")
    except ValueError:
        logging.getLogger("sqlalchemy.pool").exception("connection failed")
    library, native, failed = log_lines()
    assert library["msg"] == "task queue depth is 5" and library["level"] == "warning"
    assert library["logger"] == "waitress" and library["ts"].endswith("Z")
    assert native["msg"] == "step written" and native["step"] == "voice"
    assert native["logger"] == "gateway.test" and native["level"] == "info"
    assert failed["level"] == "error" and "ValueError: bad value" in failed["exception"]


def test_a_line_that_cannot_be_formatted_still_comes_out_as_json() -> None:
    record = logging.LogRecord("careless", logging.INFO, __file__, 1, "%d items",
                               ("not a number",), None)
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["logger"] == "careless" and line["level"] == "error"


# -- masking --------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "masked"), [
    ("+46701234567", "+4670•••4567"),
    ("+4915112345678", "+4915•••5678"),
    ("sip:+46701234567@trunk.example.com", "sip:+4670•••4567@trunk.example.com"),
    ("+266696687", "+•••87"),  # short numbers keep two digits
    ("12345678", "•••78"),
    ("YV1ZW72U5N1234567", "•••234567"),
    ("yv1zw72u5n1234567", "•••234567"),
    ("anonymous", "anonymous"),
    ("112", "112"),
    ("", ""),
    (None, ""),
])
def test_one_helper_masks_numbers_and_vins(raw: str | None, masked: str) -> None:
    assert logs.mask(raw) == masked


def test_numbers_and_vins_are_masked_in_fields_and_in_text(log_lines: Lines) -> None:
    logs.get_logger("gateway.test").info("car called", msisdn="+46701234567",
                                         vin="YV1ZW72U5N1234567", From="+4915112345678")
    logging.getLogger("gateway.owners").info("vehicle %s registered to %s",
                                             "YV1ZW72U5N1234567", "+46701234567")
    try:
        raise RuntimeError("Twilio refused To=+46701234567")
    except RuntimeError:
        logging.getLogger("twilio.http_client").exception("send failed")
    text = "\n".join(json.dumps(line, ensure_ascii=False) for line in log_lines())
    assert "46701234567" not in text and "15112345678" not in text
    assert "YV1ZW72U5N1234567" not in text
    fields, message, failed = log_lines()
    assert fields["msisdn"] == "+4670•••4567" and fields["vin"] == "•••234567"
    assert fields["From"] == "+4915•••5678"
    assert message["msg"] == "vehicle •••234567 registered to +4670•••4567"
    assert "To=+4670•••4567" in failed["exception"]


def test_ids_and_times_are_not_taken_for_numbers_or_vins(log_lines: Lines) -> None:
    message = ("incident 3f2c1a9e-5b7d-4c3e-9a1b-2d4e6f8a0b1c, call CA"
               + "0123456789abcdef" * 2 + " at 2026-11-25T10:15:00+00:00, 112, HTTP 503")
    logging.getLogger("t").info(message)
    assert log_lines()[-1]["msg"] == message


# -- PIN digits -----------------------------------------------------------------------------


@pytest.mark.parametrize("template", [
    "form Digits=%s", "{'Digits': '%s'}", '{"Digits": "%s"}', "digits: %s",
])
def test_pin_digits_never_reach_a_line(log_lines: Lines, template: str) -> None:
    logging.getLogger("werkzeug").info(template, "4711")
    logs.get_logger("gateway.test").info("pin step", Digits="4711")
    assert "4711" not in json.dumps(log_lines())
