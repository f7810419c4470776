"""Durable storage: SQLAlchemy 2 Core over SQLite (embedded) or PostgreSQL (scale-out).

Every vehicle event the gateway acknowledges with a 2xx is committed before the
answer is sent; voice steps are written after the TwiML went out (gateway.steps).
Idempotency lives in unique constraints: ``incidents.event_id`` for vehicle events,
``(call_sid, step)`` for webhook steps, ``(call_sid, callback_source,
sequence_number)`` for status callbacks.  Any database failure surfaces as
:class:`~gateway.errors.StoreError`, so callers on the emergency path can catch one type
and carry on.

No database on the critical path: :meth:`Store.within` runs work with a deadline
(see :mod:`gateway.db`), :meth:`Store.voice_lookup` answers everything a voice
webhook needs in one round trip under it, and the engine never pre-pings (a ping to a
hung server blocks as long as the query would).  On a SQLite file the voice read runs
on the request thread instead, under a deadline of its own
(:mod:`gateway.store.sqlite_reads` says why), and step batches avoid RETURNING and
executemany (:func:`write_steps`).

The package, one concern a module (import what you use from here):

- :mod:`~gateway.store.tables`: the :data:`metadata`, the call path's tables, ``TS``,
  :func:`utcnow`, :func:`as_utc`, and :func:`register_tables` for the other wings'
  tables;
- :mod:`~gateway.store.core`: the :class:`Store` (engine, deadline hand-off,
  schema, incidents, call steps, callbacks, status callbacks);
- :mod:`~gateway.store.voice_read`: the voice webhook's one read, its statements and
  their packing, and the replay memory (:class:`KnownSteps`);
- :mod:`~gateway.store.sqlite_reads`, :mod:`~gateway.store.pg_reads`: that read on the
  request thread, on a SQLite file and on PostgreSQL;
- :mod:`~gateway.store.inserts`: insert-or-ignore, one row (:func:`insert_ignore`) or
  a batch of call steps (:func:`write_steps`).
"""

from __future__ import annotations

from gateway.db import make_engine
from gateway.store.core import Store
from gateway.store.inserts import insert_ignore, write_step, write_steps
from gateway.store.tables import (
    TABLE_MODULES,
    TS,
    as_utc,
    call_status,
    call_steps,
    callbacks,
    incidents,
    metadata,
    register_tables,
    routing_decisions,
    utcnow,
)
from gateway.store.voice_read import (
    INCIDENT_FIELDS,
    PREFERRED_TYPES,
    STEP_FIELDS,
    KnownSteps,
    VoiceLookup,
)

__all__ = [
    "INCIDENT_FIELDS",
    "PREFERRED_TYPES",
    "STEP_FIELDS",
    "TABLE_MODULES",
    "TS",
    "KnownSteps",
    "Store",
    "VoiceLookup",
    "as_utc",
    "call_status",
    "call_steps",
    "callbacks",
    "incidents",
    "insert_ignore",
    "make_engine",
    "metadata",
    "register_tables",
    "routing_decisions",
    "utcnow",
    "write_step",
    "write_steps",
]
