"""Loading what the gateway can serve without: a failure is recorded, never raised."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: start-up failures are logged under the composition root's name, as they always were
log = logging.getLogger("gateway.app")


def loaded(problems: dict[str, str], key: str, what: str, load: Callable[[], T]) -> T | None:
    """``load()``, or None when it fails in any way (a broken install's ImportError
    included): the failure is logged and recorded in ``problems[key]`` (what
    ``/readyz`` reports), and the process serves on without it (the emergency path
    never needs it)."""
    try:
        return load()
    except Exception as exc:
        log.exception("%s failed to load", what)
        problems[key] = f"{type(exc).__name__}: {exc}"
        return None
