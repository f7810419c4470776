"""The schema as released at dde7ea9 (revision 0001), before the gateway had migrations.

In those days every start ran ``metadata.create_all``; this is that metadata, column for
column (Python-side defaults left out: they are not in the database).  Revision 0001
creates it, and :func:`gateway.migrations.upgrade` compares a database without an
``alembic_version`` table against it to recognise a database of that release.

Frozen: never edit this file.  A change to the schema is a new revision.
"""

from __future__ import annotations

import sqlalchemy as sa

TS = sa.DateTime(timezone=True)


def released_metadata() -> sa.MetaData:
    """A new MetaData holding the 12 tables of release dde7ea9."""
    metadata = sa.MetaData()
    sa.Table(
        "incidents", metadata,
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("event_id", sa.String(128), nullable=False, unique=True),
        sa.Column("payload_sha256", sa.String(64), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("vin", sa.String(17), nullable=False, index=True),
        sa.Column("msisdn", sa.String(20), nullable=False, index=True),
        sa.Column("occurred_at", TS, nullable=False),
        sa.Column("received_at", TS, nullable=False),
        sa.Column("lat", sa.Float, nullable=False),
        sa.Column("lon", sa.Float, nullable=False),
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
    )
    sa.Table(
        "call_steps", metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("call_sid", sa.String(64), nullable=False),
        sa.Column("step", sa.String(64), nullable=False),
        sa.Column("incident_id", sa.String(36), index=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("twiml", sa.Text),
        sa.Column("detail", sa.JSON),
        sa.UniqueConstraint("call_sid", "step", name="uq_call_step"),
    )
    sa.Table(
        "routing_decisions", metadata,
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
    sa.Table(
        "call_status", metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("call_sid", sa.String(64), nullable=False, index=True),
        sa.Column("parent_call_sid", sa.String(64)),
        sa.Column("callback_source", sa.String(64), nullable=False),
        sa.Column("sequence_number", sa.Integer, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("incident_id", sa.String(36), index=True),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("call_sid", "callback_source", "sequence_number",
                            name="uq_call_status"),
    )
    sa.Table(
        "callbacks", metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("call_sid", sa.String(64), nullable=False, unique=True),
        sa.Column("number", sa.String(32)),
        sa.Column("vin", sa.String(17)),
        sa.Column("incident_id", sa.String(36)),
        sa.Column("reason", sa.String(300), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="open"),
        sa.Column("created_at", TS, nullable=False),
    )
    # gateway.delivery
    sa.Table(
        "outbox", metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("incident_id", sa.String(36), nullable=False, unique=True),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("next_attempt_at", TS, nullable=False, index=True),
        sa.Column("leased_until", TS),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("delivered_at", TS),
        sa.Column("last_status", sa.Integer),
        sa.Column("last_error", sa.String(300)),
    )
    # gateway.centre_health
    sa.Table(
        "centre_health", metadata,
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("opened_at", TS),
        sa.Column("probe_until", TS),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("last_reason", sa.String(200)),
    )
    # gateway.owners
    sa.Table(
        "vehicles", metadata,
        sa.Column("vin", sa.String(17), primary_key=True),
        sa.Column("car_msisdn", sa.String(20), unique=True),
        sa.Column("owner_phone", sa.String(20), index=True),
        sa.Column("owner_name", sa.String(200), nullable=False),
        sa.Column("market", sa.String(2), nullable=False),
        sa.Column("language", sa.String(16)),
        sa.Column("purchase_date", sa.Date, nullable=False),
        sa.Column("serviced_regularly", sa.Boolean, nullable=False),
        sa.Column("lookup_code", sa.String(16), nullable=False, unique=True),
        sa.Column("pin_hash", sa.Text),
        sa.Column("immobilised", sa.Boolean, nullable=False),
        sa.Column("immobilised_by", sa.String(100)),
        sa.Column("immobilised_reference", sa.String(100)),
        sa.Column("immobilised_at", TS),
        sa.Column("reactivated_by", sa.String(100)),
        sa.Column("reactivated_at", TS),
        sa.Column("tracking", sa.Boolean, nullable=False),
        sa.Column("tracking_started_by", sa.String(100)),
        sa.Column("tracking_police_reference", sa.String(100)),
        sa.Column("tracking_started_at", TS),
        sa.Column("updated_at", TS, nullable=False),
    )
    sa.Table(
        "pin_failures", metadata,
        sa.Column("vin", sa.String(17), primary_key=True),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("locked_until", TS),
        sa.Column("updated_at", TS, nullable=False),
    )
    sa.Table(
        "audit", metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", TS, nullable=False),
        sa.Column("vin", sa.String(17), nullable=False, index=True),
        sa.Column("actor", sa.String(100), nullable=False),
        sa.Column("action", sa.String(40), nullable=False),
        sa.Column("detail", sa.JSON, nullable=False),
    )
    # gateway.theft
    sa.Table(
        "notifications", metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("vin", sa.String(17), nullable=False, index=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("target", sa.String(64), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("due_at", TS, nullable=False, index=True),
        sa.Column("sent_at", TS),
        sa.Column("cancelled_at", TS),
        sa.Column("cancel_reason", sa.String(200)),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.String(500)),
        sa.Column("idempotency_key", sa.String(160), nullable=False, unique=True),
        sa.Column("alarm_event_id", sa.String(128), nullable=False, index=True),
    )
    return metadata
