"""Structured logs: one JSON object per line, through structlog.

Every line, from the gateway or from a library logging through the standard library
(waitress, SQLAlchemy, twilio, urllib3), goes through one processor chain:

- ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg``, and ``exception`` when there
  is a traceback;
- ``call_sid`` and ``incident_id`` of the request being served: bound by the app's
  request hooks (:func:`bind_request`) and **cleared when the request ends**
  (:func:`clear_request`), so a line is never stamped with another call's ids (a
  server thread serves many requests; a context variable set and never reset leaks
  into the next one);
- masking: :func:`mask` is the one helper for phone numbers and VINs (``+4670•••4567``,
  ``•••234567``); values under keys such as ``msisdn``/``vin``/``from`` are masked
  with it, and, as a backstop for lines that format a number or VIN into their text,
  every E.164 number and VIN in ``msg`` and ``exception`` is masked too;
- PIN digits never appear: Twilio sends a PIN as ``Digits``; nothing in the gateway
  logs request bodies, and any ``Digits=...``/``"Digits": "..."`` a library or a
  careless message might still produce is replaced by ``[redacted]``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

call_sid_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("call_sid", default=None)
incident_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "incident_id", default=None)

#: what a request's id may look like to be bound (a forged request may send anything)
_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")

# -- masking ---------------------------------------------------------------------------------

MASK = "•••"
#: keys whose values are phone numbers or VINs wherever they are bound or passed
MASKED_KEYS = frozenset({"msisdn", "vin", "number", "caller", "from", "from_", "to", "phone",
                         "owner_phone", "called", "from_number", "to_number"})

_VIN = re.compile(r"[A-HJ-NPR-Z0-9]{17}", re.IGNORECASE)
_DIGIT_RUN = re.compile(r"\+?\d{5,}")
# backstop over free text: E.164 numbers (with their +) and VIN-shaped words (17 letters
# and digits without I, O, Q, at least one of each)
_E164_IN_TEXT = re.compile(r"(?<![\w+])\+\d{5,15}(?!\d)")
_VIN_IN_TEXT = re.compile(
    r"\b(?=[A-HJ-NPR-Z0-9]{0,16}\d)(?=[A-HJ-NPR-Z0-9]{0,16}[A-HJ-NPR-Z])[A-HJ-NPR-Z0-9]{17}\b",
    re.IGNORECASE)
_DIGITS = re.compile(r"(Digits[\"']?\s*[=:]\s*[\"']?)[0-9*#]+", re.IGNORECASE)


def _mask_digits(match: re.Match[str]) -> str:
    run = match.group(0)
    plus = "+" if run.startswith("+") else ""
    digits = run.lstrip("+")
    if len(digits) >= 11:  # country code and operator, the last four: 3+ digits hidden
        return f"{plus}{digits[:4]}{MASK}{digits[-4:]}"
    return f"{plus}{MASK}{digits[-2:]}"


def mask(value: object) -> str:
    """A phone number or VIN as it may appear in a log line.

    ``+46701234567`` -> ``+4670•••4567``; ``sip:+46701234567@host`` -> ``sip:+4670•••4567@host``;
    a short number keeps its last two digits (``+•••67``); a VIN keeps its last six
    (``YV1ZW72U5N1234567`` -> ``•••234567``); ``None`` -> ``""``; text without a
    number (``anonymous``) is unchanged.
    """
    if value is None:
        return ""
    text = str(value).strip()
    if _VIN.fullmatch(text) and not text.isdigit():
        return MASK + text[-6:].upper()
    return _DIGIT_RUN.sub(_mask_digits, text)


def scrub(text: str) -> str:
    """Mask every E.164 number and VIN in free text and redact PIN digits."""
    if "igits" in text:
        text = _DIGITS.sub(r"\1[redacted]", text)
    if "+" in text:
        text = _E164_IN_TEXT.sub(_mask_digits, text)
    return _VIN_IN_TEXT.sub(lambda m: MASK + m.group(0)[-6:].upper(), text)


# -- request context -------------------------------------------------------------------------


def _clean_id(value: object) -> str | None:
    text = str(value) if value else ""
    return text if _ID.fullmatch(text) else None


def bind_request(*, call_sid: object = None, incident_id: object = None) -> None:
    """Start a request's log context: its ids (or none), nothing left from before."""
    structlog.contextvars.clear_contextvars()
    call_sid_var.set(_clean_id(call_sid))
    incident_id_var.set(_clean_id(incident_id))


def bind(*, incident_id: object = None, **values: Any) -> None:
    """Add to the current request's context (cleared with it)."""
    if incident_id:
        incident_id_var.set(_clean_id(incident_id))
    if values:
        structlog.contextvars.bind_contextvars(**values)


def clear_request() -> None:
    """End a request's log context: later lines on this thread carry no call's ids."""
    call_sid_var.set(None)
    incident_id_var.set(None)
    structlog.contextvars.clear_contextvars()


# -- processors ------------------------------------------------------------------------------


def add_request_context(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    call_sid = call_sid_var.get()
    if call_sid:
        event.setdefault("call_sid", call_sid)
    incident_id = incident_id_var.get()
    if incident_id:
        event.setdefault("incident_id", incident_id)
    return event


def mask_fields(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """Numbers and VINs under known keys through :func:`mask`; the backstop over text."""
    for key, value in event.items():
        if key.lower() in MASKED_KEYS and value is not None:
            event[key] = mask(value)
        elif key in ("msg", "exception") and isinstance(value, str):
            event[key] = scrub(value)
    return event


def redact_pins(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """A ``Digits`` field bound or passed to a log call never shows its value (the
    text of ``msg`` and ``exception`` is redacted by :func:`scrub`)."""
    for key in [k for k in event if k.lower() == "digits"]:
        event[key] = "[redacted]"
    return event


_FIRST = ("ts", "level", "logger", "msg", "call_sid", "incident_id")


def order_keys(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """``ts``, ``level``, ``logger``, ``msg`` and the call's ids first: easier to read."""
    ordered = {key: event[key] for key in _FIRST if key in event}
    ordered.update((key, value) for key, value in event.items() if key not in ordered)
    return ordered


_TIMESTAMP = structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts")

#: run for every line, from structlog loggers and from stdlib records alike
_SHARED: list[Processor] = [
    structlog.contextvars.merge_contextvars,
    add_request_context,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    _TIMESTAMP,
]

_RENDER: list[Processor] = [
    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
    structlog.processors.format_exc_info,
    structlog.processors.EventRenamer("msg"),
    redact_pins,
    mask_fields,
    order_keys,
    structlog.processors.JSONRenderer(ensure_ascii=False, default=str),
]


class JsonFormatter(structlog.stdlib.ProcessorFormatter):
    """The JSON-lines formatter; a line that cannot be rendered still comes out as JSON."""

    def __init__(self) -> None:
        super().__init__(processors=_RENDER, foreign_pre_chain=_SHARED)

    def format(self, record: logging.LogRecord) -> str:
        try:
            return str(super().format(record))
        except Exception as exc:  # noqa: BLE001 -- a bad format string, a value JSON refuses
            return json.dumps({"level": "error", "logger": record.name,
                               "msg": f"log line not rendered: {type(exc).__name__}"})


def configure(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send every log line (structlog's and the standard library's) as JSON lines to
    ``stream`` (stderr by default).  Idempotent."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_gateway", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._gateway = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> Any:
    """A structlog logger (key-value events) writing through the same handler."""
    return structlog.stdlib.get_logger(name)


__all__: list[str] = [
    "MASK", "bind", "bind_request", "call_sid_var", "clear_request", "configure",
    "get_logger", "incident_id_var", "mask", "scrub",
]
