"""Field helpers shared by the request models."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import Field
from pydantic_core import PydanticCustomError

from gateway.schemas.base import refuse


def no_null(value: Any) -> Any:
    """For a field that may be left out but not sent as ``null`` (BeforeValidator)."""
    if value is None:
        raise PydanticCustomError("null_refused", "must not be null")
    return value


def _drop_null(schema: dict[str, Any]) -> None:
    """The published schema of an optional, non-null field: no ``null`` branch, no default."""
    schema.pop("default", None)
    branches = schema.get("anyOf")
    if isinstance(branches, list):
        kept = [b for b in branches if b != {"type": "null"}]
        if len(kept) == 1:
            del schema["anyOf"]
            schema.update(kept[0])
        else:
            schema["anyOf"] = kept


def optional(description: str, **constraints: Any) -> Any:
    """A field that may be left out, and when given is not null (pair it with
    ``BeforeValidator(no_null)`` in the annotation)."""
    return Field(None, description=description, json_schema_extra=_drop_null, **constraints)


def no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def nullable(description: str, *, schema_format: str | None = None, **constraints: Any) -> Any:
    """A field that may be left out or sent as ``null`` (then it counts as not given);
    ``schema_format``: the JSON Schema ``format`` of its non-null value (an annotation)."""

    def publish(schema: dict[str, Any]) -> None:
        no_default(schema)
        if schema_format is not None:
            for branch in schema.get("anyOf", [schema]):
                if branch.get("type") == "string":
                    branch["format"] = schema_format

    return Field(None, description=description, json_schema_extra=publish, **constraints)


def stripped_text(limit: int | None, *, too_long: str | None = None,
                  blank: str = "required: a non-empty string") -> Callable[[str], str]:
    """An AfterValidator: the text stripped, refused when blank or longer than ``limit``
    (Python's own ``str.strip``, as the registry applies it)."""
    def check(value: str) -> str:
        text = value.strip()
        if not text:
            raise refuse(blank)
        if limit is not None and len(text) > limit:
            raise refuse(too_long or f"at most {limit} characters")
        return text

    return check
