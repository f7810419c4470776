"""What the command-queue tests share: a schema'd SQLite store, a client of the fake
car with short timeouts, and a queue with fast test settings."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gateway.adapters.vehicle_commands import VehicleCommandClient
from gateway.commands import CommandQueue
from gateway.store import Store

#: CommandQueue settings of the tests: polls fast, backs off 1-4 s, 60 s budget, a sent
#: command fails 120 s after it was sent if the car has not reported on it
QUEUE_SETTINGS: dict[str, Any] = {"poll_s": 0.05, "budget_s": 60.0, "backoff_initial_s": 1.0,
                                  "backoff_max_s": 4.0, "lease_s": 10.0, "confirm_s": 120.0}
#: QUEUE_SETTINGS' confirmation window, seconds
CONFIRM_S = 120


@contextlib.contextmanager
def sqlite_store(path: Path) -> Iterator[Store]:
    store = Store.from_url(f"sqlite:///{path}")
    store.create_schema()
    try:
        yield store
    finally:
        store.dispose()


def car_client(url: str, *, attempts: int, timeout_s: float = 0.3) -> VehicleCommandClient:
    """A client of the fake car: ``attempts`` tries of ``timeout_s`` within 1 s."""
    return VehicleCommandClient(url, timeout_s=timeout_s, attempts=attempts,
                                backoff_initial_s=0.01, backoff_max_s=0.02, total_budget_s=1.0)


def queue_builder(store: Store, commands: Any,
                  clock: Callable[[], float]) -> Callable[..., CommandQueue]:
    """``build(**overrides)``: a queue with :data:`QUEUE_SETTINGS` (``commands`` may be
    overridden too)."""
    def build(**overrides: Any) -> CommandQueue:
        sender = overrides.pop("commands", commands)
        return CommandQueue(store, sender, clock=clock, **{**QUEUE_SETTINGS, **overrides})

    return build
