"""Durable storage: SQLAlchemy 2 Core over SQLite (embedded) or PostgreSQL (scale-out).

Every write that the gateway acknowledges with a 2xx is committed before the
answer is sent.  Idempotency lives in unique constraints: ``incidents.event_id``
for vehicle events, ``(call_sid, step)`` for webhook steps, ``(call_sid,
callback_source, sequence_number)`` for status callbacks.  Any database failure
surfaces as :class:`~gateway.errors.StoreError`, so callers on the emergency
path can catch one type and carry on.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from gateway.errors import StoreError

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


class Store:
    """All database access goes through here; methods raise StoreError, nothing else."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def from_url(cls, url: str) -> Store:
        return cls(make_engine(url))

    # -- plumbing ---------------------------------------------------------------------

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """One transaction; any database error becomes StoreError."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except StoreError:
            raise
        except SQLAlchemyError as exc:
            raise StoreError(f"database error: {type(exc).__name__}") from exc

    def create_schema(self) -> None:
        register_tables()
        try:
            metadata.create_all(self.engine)
        except SQLAlchemyError as exc:
            raise StoreError(f"could not create schema: {type(exc).__name__}") from exc

    def ping(self) -> None:
        with self.begin() as conn:
            conn.execute(sa.text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()

    # -- incidents --------------------------------------------------------------------

    def insert_incident(
        self, row: Mapping[str, Any], *, extra: Sequence[tuple[sa.Table, Mapping[str, Any]]] = ()
    ) -> tuple[dict[str, Any], bool]:
        """Insert an incident (and rows that must commit with it).

        Returns ``(incident, created)``; on a replay of the same ``event_id`` the
        stored incident comes back with ``created=False`` and nothing is written.
        """
        try:
            with self.engine.begin() as conn:
                conn.execute(incidents.insert().values(**row))
                for table, values in extra:
                    conn.execute(table.insert().values(**values))
            return dict(row), True
        except IntegrityError:
            existing = self.incident_by_event(str(row["event_id"]))
            if existing is None:  # the conflict was on another key: a real error
                raise StoreError("incident insert conflicted") from None
            return existing, False
        except SQLAlchemyError as exc:
            raise StoreError(f"database error: {type(exc).__name__}") from exc

    def incident_by_event(self, event_id: str) -> dict[str, Any] | None:
        with self.begin() as conn:
            found = conn.execute(
                sa.select(incidents).where(incidents.c.event_id == event_id)
            ).first()
        return _row(found)

    def incident(self, incident_id: str) -> dict[str, Any] | None:
        with self.begin() as conn:
            found = conn.execute(sa.select(incidents).where(incidents.c.id == incident_id)).first()
        return _row(found)

    def open_incidents_for(
        self, msisdn: str, *, since: dt.datetime, types: tuple[str, ...]
    ) -> list[dict[str, Any]]:
        """Open incidents of these types from this MSISDN since ``since``, newest first."""
        query = (
            sa.select(incidents)
            .where(
                incidents.c.msisdn == msisdn,
                incidents.c.status == "open",
                incidents.c.type.in_(types),
                incidents.c.received_at >= since,
            )
            .order_by(incidents.c.received_at.desc())
            .limit(50)
        )
        with self.begin() as conn:
            return [dict(_row(r) or {}) for r in conn.execute(query)]

    def last_known_country(self, vin: str) -> str | None:
        """The location country of the newest incident of this car that had one."""
        query = (
            sa.select(incidents.c.location_country)
            .where(incidents.c.vin == vin, incidents.c.location_country.is_not(None))
            .order_by(incidents.c.occurred_at.desc())
            .limit(1)
        )
        with self.begin() as conn:
            value = conn.execute(query).scalar()
        return str(value) if value else None

    # -- call steps -------------------------------------------------------------------

    def call_step(self, call_sid: str, step: str) -> dict[str, Any] | None:
        with self.begin() as conn:
            found = conn.execute(
                sa.select(call_steps).where(
                    call_steps.c.call_sid == call_sid, call_steps.c.step == step
                )
            ).first()
        return _row(found)

    def record_call_step(
        self,
        *,
        call_sid: str,
        step: str,
        incident_id: str | None,
        twiml: str,
        detail: Mapping[str, Any],
        decision: Mapping[str, Any] | None = None,
    ) -> bool:
        """Store one answered webhook step (and its routing decision) once.

        Returns False when the step was already stored (a Twilio retry).
        """
        now = utcnow()
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    call_steps.insert().values(
                        call_sid=call_sid,
                        step=step,
                        incident_id=incident_id,
                        created_at=now,
                        twiml=twiml,
                        detail=dict(detail),
                    )
                )
                if decision is not None:
                    conn.execute(
                        routing_decisions.insert().values(
                            call_sid=call_sid,
                            step=step,
                            incident_id=incident_id,
                            created_at=now,
                            **decision,
                        )
                    )
            return True
        except IntegrityError:
            return False
        except SQLAlchemyError as exc:
            raise StoreError(f"database error: {type(exc).__name__}") from exc

    def decisions_for(self, *, incident_id: str | None = None, call_sid: str | None = None) -> list[
        dict[str, Any]
    ]:
        query = sa.select(routing_decisions).order_by(routing_decisions.c.id)
        if incident_id is not None:
            query = query.where(routing_decisions.c.incident_id == incident_id)
        if call_sid is not None:
            query = query.where(routing_decisions.c.call_sid == call_sid)
        with self.begin() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    # -- callbacks ----------------------------------------------------------------------

    def insert_once(self, table: sa.Table, values: Mapping[str, Any]) -> bool:
        """Insert a row stamped ``created_at``; False if a unique key says it exists."""
        try:
            with self.engine.begin() as conn:
                conn.execute(table.insert().values(created_at=utcnow(), **values))
            return True
        except IntegrityError:
            return False
        except SQLAlchemyError as exc:
            raise StoreError(f"database error: {type(exc).__name__}") from exc

    def record_callback(self, values: Mapping[str, Any]) -> bool:
        """A callback the centre owes a caller; once per call."""
        return self.insert_once(callbacks, values)

    def callbacks(self) -> list[dict[str, Any]]:
        with self.begin() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.select(callbacks))]

    # -- status callbacks -------------------------------------------------------------

    def record_status(self, values: Mapping[str, Any]) -> bool:
        """Store one status callback; False if this (call, source, sequence) was seen."""
        return self.insert_once(call_status, values)

    def latest_status(self, call_sid: str) -> dict[str, Any] | None:
        """The call's status by SequenceNumber, not by arrival order."""
        query = (
            sa.select(call_status)
            .where(call_status.c.call_sid == call_sid)
            .order_by(call_status.c.sequence_number.desc(), call_status.c.id.desc())
            .limit(1)
        )
        with self.begin() as conn:
            return _row(conn.execute(query).first())


#: modules that define tables on ``metadata`` besides this one
TABLE_MODULES = ("gateway.delivery", "gateway.centre_health", "gateway.owners", "gateway.theft",
                 "gateway.commands")


def register_tables() -> None:
    """Import every module that defines tables, so create_all sees them all."""
    import importlib

    for name in TABLE_MODULES:
        importlib.import_module(name)


def _row(found: sa.Row[Any] | None) -> dict[str, Any] | None:
    if found is None:
        return None
    data = dict(found._mapping)
    for key, value in data.items():
        if isinstance(value, dt.datetime):
            data[key] = as_utc(value)
    return data


def make_engine(url: str) -> Engine:
    """An engine with short timeouts: a webhook must never hang on the database."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 2.0})

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA busy_timeout=2000")
            cursor.close()

        return engine
    if url.startswith("postgresql"):
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
        return sa.create_engine(
            url,
            pool_pre_ping=True,
            pool_size=5,
            max_overflow=10,
            pool_timeout=2,
            connect_args={"connect_timeout": 2, "options": "-c statement_timeout=2000"},
        )
    return sa.create_engine(url, pool_pre_ping=True)
