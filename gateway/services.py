"""What the views may use, built once per app by the composition root.

:func:`gateway.app.create_app` fills a :class:`Services` and keeps it in
``app.extensions["gateway"]``; a view reads it through
:func:`gateway.views.context.services`, so no view imports the composition root.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.config import Settings
from gateway.plan import NumberPlan
from gateway.routing import Locator
from gateway.store import Store


@dataclass
class Services:
    """What the views may use; built once per app."""

    settings: Settings
    store: Store
    plan: NumberPlan | None
    locator: Locator | None
    clock: Callable[[], float] = time.time
    #: per-centre reachability (circuit breaker); None until delivery is wired
    centre_health: Any = None
    #: rows committed with every new incident (the delivery outbox); None = none
    outbox_rows: Any = None
    #: called after a new incident is committed (wakes the delivery worker)
    on_incident: Callable[[dict[str, Any]], None] | None = None
    worker: Any = None
    metrics: Any = None
    #: the vehicle registry (owners, PINs, immobiliser)
    vehicles: Any = None
    #: vehicle command service, SMS, push (None when not configured)
    commands: Any = None
    notifier: Any = None
    #: durable vehicle commands, done when the car confirms (gateway.commands.CommandQueue)
    command_queue: Any = None
    #: immobilise/reactivate/unlock/tracking, confirmed by the car (owners.car_commands)
    car_commands: Any = None
    market_rule: Any = None
    #: voice steps written after the answer (gateway.steps.StepWriter)
    steps: Any = None
    #: centre lines known down, from memory (gateway.line_health.LineHealthCache)
    line_health: Any = None
    #: what failed to load at start-up (the app still serves the emergency path)
    problems: dict[str, str] = field(default_factory=dict)
