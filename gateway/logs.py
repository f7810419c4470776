"""Structured (JSON-lines) logs, each line carrying the call's CallSid.

PINs arrive from Twilio as ``Digits``; nothing in the gateway logs request
bodies, and :class:`RedactDigits` scrubs any ``Digits=...`` that a library or a
careless message might still put in a line.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time

call_sid_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("call_sid", default=None)

_DIGITS = re.compile(r"(Digits[\"']?\s*[=:]\s*[\"']?)[0-9*#]+", re.IGNORECASE)


class RedactDigits(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "igits" in message:
            record.msg = _DIGITS.sub(r"\1[redacted]", message)
            record.args = ()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        call_sid = call_sid_var.get()
        if call_sid:
            line["call_sid"] = call_sid
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(level: str = "INFO", stream: object = None) -> None:
    """Send the gateway's logs as JSON lines to stderr (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_gateway", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler._gateway = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactDigits())
    root.addHandler(handler)
    root.setLevel(level.upper())
