"""What every schema shares: the two kinds of model, our error reasons, the strict body.

Request models are strict (a JSON ``"1"`` is not a number, ``true`` is not 1) and say
for each field the reason a caller reads when it is wrong; a pydantic error becomes one
entry of the ``fields`` dict of our error body, keyed by the dotted path
(``location.lat``, ``owner_phones[1]``).  Answer models allow properties they do not
list, so a new field in an answer never breaks a client that validates against them.

Bodies are read with :func:`gateway.events.load_event_json` first, so pydantic never
sees ``NaN``, ``Infinity``, a number that does not fit in 64 bits or nesting deeper
than 32: they are refused with their path before any model runs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import pydantic
from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticCustomError

from gateway.errors import ValidationError
from gateway.events import _uncarriable, load_event_json

#: the error type of a reason written by us (its message is the reason as is)
REASON = "gateway"
#: unknown-field names in an error are cut to this length (they come from the caller)
MAX_NAME_SHOWN = 64

M = TypeVar("M", bound="RequestModel")


def refuse(reason: str) -> PydanticCustomError:
    """An error whose message is ``reason`` exactly (raise it from a validator)."""
    return PydanticCustomError(REASON, "{reason}", {"reason": reason})


class RequestModel(BaseModel):
    """A request body.  ``reasons``: path -> the reason for any error of that field
    that its validators do not word themselves (a missing field, a wrong type)."""

    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)

    reasons: ClassVar[Mapping[str, str]] = {}
    #: the reason for a required field left out (None: its entry in ``reasons``)
    required_reason: ClassVar[str | None] = None
    #: the reason for an optional field sent as null (None: its entry in ``reasons``)
    null_reason: ClassVar[str | None] = None
    #: the reason for a property the model does not take (extra="forbid"), by name
    extra_reasons: ClassVar[Mapping[str, str]] = {}


class Answer(BaseModel):
    """An answer body: the properties listed are always there; others may be added."""

    model_config = ConfigDict(extra="allow")


def dotted(loc: tuple[int | str, ...]) -> str:
    """``("location", "lat")`` -> ``location.lat``; ``("owner_phones", 1)`` -> ``owner_phones[1]``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


_INDEX = re.compile(r"\[[0-9]+\]")


def field_errors(exc: pydantic.ValidationError, model: type[RequestModel]) -> dict[str, str]:
    """Our ``fields`` dict for a pydantic error: one reason per path, the first one.

    The reason is the validator's own (:func:`refuse`), else the model's: ``reasons`` by
    path (``owner_phones[]`` stands for every item), by the top-level field, and for a
    missing field ``required_reason``; pydantic's message only as the last resort."""
    found: dict[str, str] = {}
    for error in exc.errors(include_url=False, include_context=False, include_input=False):
        path = dotted(tuple(error["loc"]))
        kind = error["type"]
        if kind == "extra_forbidden":
            name = path
            path = path[:MAX_NAME_SHOWN]
        path = path or "body"
        if path in found:
            continue
        if kind == REASON:
            reason = str(error["msg"])
        elif kind == "extra_forbidden":
            reason = model.extra_reasons.get(name, "unknown field")
        elif kind == "missing" and model.required_reason is not None:
            reason = model.required_reason
        elif kind == "null_refused" and model.null_reason is not None:
            reason = model.null_reason
        else:
            reasons = model.reasons
            reason = (reasons.get(path) or reasons.get(_INDEX.sub("[]", path))
                      or reasons.get(path.split(".", 1)[0].split("[", 1)[0])
                      or str(error["msg"]))
        found[path] = reason
    return found


def read_json(raw: bytes) -> Any:
    """A body read strictly (see :func:`gateway.events.load_event_json`): ValidationError
    naming ``body`` or the path of every value that cannot be carried (NaN, huge numbers,
    lone surrogates, nesting past 32)."""
    body = load_event_json(raw)
    errors: dict[str, str] = {}
    _uncarriable(body, errors)
    if errors:
        raise ValidationError(errors)
    return body


def validate(model: type[M], body: Any, *, context: Mapping[str, Any] | None = None) -> M:
    """``body`` (already read strictly) as ``model``; ValidationError naming each field."""
    if not isinstance(body, dict):
        raise ValidationError({"body": "must be a JSON object"})
    try:
        return model.model_validate(body, context=dict(context or {}))
    except pydantic.ValidationError as exc:
        raise ValidationError(field_errors(exc, model)) from None


def parse(model: type[M], raw: bytes, *, empty: Any = None) -> M:
    """Read ``raw`` strictly and validate it as ``model``; an empty body counts as
    ``empty`` (None: the body is required)."""
    if not raw.strip():
        if empty is None:
            raise ValidationError({"body": "must be a JSON object"})
        return validate(model, empty)
    return validate(model, read_json(raw))
