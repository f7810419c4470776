"""The store's tables: the one :data:`metadata`, the call path's tables, and the
timestamp type and helpers every table module shares.

Other wings define their own tables on :data:`metadata` (:data:`TABLE_MODULES`);
:func:`register_tables` imports them all, so the migrations see every table.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa

metadata = sa.MetaData()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def as_utc(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.UTC)


TS = sa.DateTime(timezone=True)

incidents = sa.Table(
    "incidents",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("event_id", sa.String(128), nullable=False, unique=True),
    sa.Column("payload_sha256", sa.String(64), nullable=False),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("vin", sa.String(17), nullable=False, index=True),
    sa.Column("msisdn", sa.String(20), nullable=False, index=True),
    sa.Column("occurred_at", TS, nullable=False),
    sa.Column("received_at", TS, nullable=False),
    # NULL only for an eCall MSD whose position is unknown (routed by the fallback chain)
    sa.Column("lat", sa.Float),
    sa.Column("lon", sa.Float),
    sa.Column("heading_deg", sa.Float),
    sa.Column("accuracy_m", sa.Float),
    sa.Column("trusted", sa.Boolean),
    sa.Column("crash", sa.JSON),
    sa.Column("occupants", sa.JSON),
    sa.Column("location_country", sa.String(2)),
    sa.Column("home_country", sa.String(2)),
    sa.Column("route_country", sa.String(2)),
    sa.Column("route_reason", sa.String(200), nullable=False),
    sa.Column("emergency_number", sa.String(20), nullable=False),
    sa.Column("fallback_dial", sa.String(20), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, server_default="open"),
    # the eCall MSD (EN 15722) as the car sent it, base64; and its testCall flag: a test
    # call is answered and recorded, never dialled to emergency services
    sa.Column("msd", sa.String(200)),
    sa.Column("test_call", sa.Boolean),
)


call_steps = sa.Table(
    "call_steps",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("call_sid", sa.String(64), nullable=False),
    sa.Column("step", sa.String(64), nullable=False),
    sa.Column("incident_id", sa.String(36), index=True),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("twiml", sa.Text),
    sa.Column("detail", sa.JSON),
    sa.UniqueConstraint("call_sid", "step", name="uq_call_step"),
)

routing_decisions = sa.Table(
    "routing_decisions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("incident_id", sa.String(36), index=True),
    sa.Column("call_sid", sa.String(64), nullable=False, index=True),
    sa.Column("step", sa.String(64), nullable=False),
    sa.Column("target", sa.String(16), nullable=False),
    sa.Column("number", sa.String(32)),
    sa.Column("centre_id", sa.String(64)),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.UniqueConstraint("call_sid", "step", name="uq_routing_step"),
)

call_status = sa.Table(
    "call_status",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("call_sid", sa.String(64), nullable=False, index=True),
    sa.Column("parent_call_sid", sa.String(64)),
    sa.Column("callback_source", sa.String(64), nullable=False),
    sa.Column("sequence_number", sa.Integer, nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("incident_id", sa.String(36), index=True),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.UniqueConstraint("call_sid", "callback_source", "sequence_number", name="uq_call_status"),
)


callbacks = sa.Table(
    "callbacks",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("call_sid", sa.String(64), nullable=False, unique=True),
    sa.Column("number", sa.String(32)),
    sa.Column("vin", sa.String(17)),
    sa.Column("incident_id", sa.String(36)),
    sa.Column("reason", sa.String(300), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, server_default="open"),
    sa.Column("created_at", TS, nullable=False),
)


#: modules that define tables on ``metadata`` besides this one
TABLE_MODULES = ("gateway.delivery", "gateway.centre_health", "gateway.owners", "gateway.theft",
                 "gateway.commands")


def register_tables() -> None:
    """Import every module that defines tables, so create_all sees them all."""
    import importlib

    for name in TABLE_MODULES:
        importlib.import_module(name)


def row_dict(found: sa.Row[Any] | None) -> dict[str, Any] | None:
    """A result row as a dict, its datetimes in UTC (:func:`as_utc`); None for None."""
    if found is None:
        return None
    data = dict(found._mapping)
    for key, value in data.items():
        if isinstance(value, dt.datetime):
            data[key] = as_utc(value)
    return data
