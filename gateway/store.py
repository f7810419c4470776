"""Durable storage: SQLAlchemy 2 Core over SQLite (embedded) or PostgreSQL (scale-out).

Every vehicle event the gateway acknowledges with a 2xx is committed before the
answer is sent; voice steps are written after the TwiML went out (gateway.steps).  Idempotency lives in unique constraints: ``incidents.event_id``
for vehicle events, ``(call_sid, step)`` for webhook steps, ``(call_sid,
callback_source, sequence_number)`` for status callbacks.  Any database failure
surfaces as :class:`~gateway.errors.StoreError`, so callers on the emergency
path can catch one type and carry on.

No database on the critical path: :meth:`Store.within` runs work with a deadline
(see :mod:`gateway.db`), :meth:`Store.voice_lookup` answers everything a voice
webhook needs in one round trip under it, and the engine never pre-pings (a ping to a
hung server blocks as long as the query would).  On a SQLite file the voice read runs
on the request thread instead, under a deadline of its own (:mod:`gateway.sqlite_reads`
says why), and step batches avoid RETURNING and executemany (:func:`write_steps`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from gateway.db import DeadlineRunner, Job, socket_of
from gateway.db import make_engine as make_engine  # noqa: PLC0414 -- this module's API
from gateway.errors import StoreError
from gateway.pg_reads import NotReady, ReadTimeout

log = logging.getLogger(__name__)
metadata = sa.MetaData()
T = TypeVar("T")

#: incident types a voice call prefers over any other type it may match
PREFERRED_TYPES = ("crash", "sos")


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

#: an incident by its event_id (built once)
_BY_EVENT = sa.select(incidents).where(
    incidents.c.event_id == sa.bindparam("event_id", type_=incidents.c.event_id.type))


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


@dataclass(frozen=True)
class VoiceLookup:
    """What a voice webhook reads from the database, in one round trip."""

    #: step name -> the stored step (twiml, detail, incident_id, created_at) of this call
    steps: Mapping[str, Mapping[str, Any]]
    #: the caller's newest matching incident (crash/sos first), any status; None if none
    incident: dict[str, Any] | None


class Store:
    """All database access goes through here; methods raise StoreError, nothing else."""

    def __init__(self, engine: Engine, *, deadline_workers: int = 16,
                 background_workers: int = 2, suspect_s: float = 2.0,
                 known_steps: int = 4096) -> None:
        self.engine = engine
        #: PostgreSQL: the same pool, each connection in autocommit mode while checked
        #: out (SQLite has no round trips to save, and an in-memory database shares one
        #: connection between threads)
        self._autocommit = (engine.execution_options(isolation_level="AUTOCOMMIT")
                            if engine.dialect.name == "postgresql" else None)
        #: the deadline slots of the request threads (the default 8 serving threads and
        #: room to spare: a read refused for want of a slot is answered without it)
        self.deadline = DeadlineRunner(workers=deadline_workers, suspect_s=suspect_s)
        #: the slots of background writers (the step writer): their work never takes a
        #: slot a webhook's read needs (seen: 8 serving threads and the writer on 8
        #: shared slots refused reads under load)
        self.background = DeadlineRunner(workers=background_workers, suspect_s=suspect_s,
                                         name="db-background")
        #: steps this process wrote or read with their TwiML (a stored step never changes)
        self.known_steps = KnownSteps(known_steps)
        #: the voice read on a SQLite file: on the request thread, few columns
        #: (gateway.sqlite_reads says why); None: through within() like the rest
        self.sqlite_reads = _sqlite_reads_for(engine)
        #: the voice read on PostgreSQL: on the request thread when it has a connection
        #: (gateway.pg_reads); through within() otherwise
        self.pg_reads = _pg_reads_for(engine)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Store:
        return cls(make_engine(url), **kwargs)

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

    def within(self, fn: Callable[[Connection], T], *, timeout_s: float,
               single_read: bool = False, background: bool = False) -> T:
        """``fn(conn)`` in one transaction, waiting at most ``timeout_s``.

        ``single_read``: ``fn`` runs one SELECT, so on PostgreSQL it runs in autocommit
        mode, without a transaction around it: one round trip instead of BEGIN, SELECT,
        COMMIT (the statement still reads one snapshot).

        ``background``: a background writer's work, on slots of its own
        (:attr:`background`), never on those of the request threads.

        Raises StoreError on any database error, on the deadline (the work is
        abandoned and its connection shut down), and at once when every deadline slot
        is busy or the database missed a deadline within the last few seconds."""

        def job(handle: Job) -> T:
            try:
                if single_read and self._autocommit is not None:
                    with self._autocommit.connect() as conn:
                        handle.attach(socket_of(conn))
                        return fn(conn)
                with self.engine.begin() as conn:
                    handle.attach(socket_of(conn))
                    return fn(conn)
            except StoreError:
                raise
            except SQLAlchemyError as exc:
                raise StoreError(f"database error: {type(exc).__name__}") from exc

        runner = self.background if background else self.deadline
        return runner.run(job, timeout_s=timeout_s)

    def create_schema(self) -> None:
        """Bring the database to the current schema: the migrations
        (:func:`gateway.migrations.upgrade_engine`), under a database lock, so instances
        starting together are safe.  Raises StoreError (MigrationError) on failure."""
        from gateway.migrations import upgrade_engine

        upgrade_engine(self.engine)

    def ping(self, *, timeout_s: float = 1.0) -> None:
        self.within(lambda conn: conn.execute(sa.text("SELECT 1")), timeout_s=timeout_s)

    def dispose(self) -> None:
        if self.sqlite_reads is not None:
            self.sqlite_reads.close()
        if self.pg_reads is not None:
            self.pg_reads.close()
        self.engine.dispose()

    # -- incidents --------------------------------------------------------------------

    def one_statement(self, fn: Callable[[Connection], T]) -> T:
        """``fn(conn)``, which runs exactly one statement, committed; no deadline (the
        caller answers only after the commit).  On PostgreSQL in autocommit mode: the
        statement is its own transaction, one round trip instead of BEGIN, the statement
        and COMMIT.  Any database error becomes StoreError."""
        try:
            if self._autocommit is not None:
                with self._autocommit.connect() as conn:
                    return fn(conn)
            with self.engine.begin() as conn:
                return fn(conn)
        except StoreError:
            raise
        except SQLAlchemyError as exc:
            raise StoreError(f"database error: {type(exc).__name__}") from exc

    def incident_by_event(self, event_id: str) -> dict[str, Any] | None:
        """The incident of this event_id (one statement; the writes are in
        :mod:`gateway.ingest`)."""
        return self.one_statement(lambda conn: self.incident_from(conn, event_id))

    @staticmethod
    def incident_from(conn: Connection, event_id: str) -> dict[str, Any] | None:
        return _row(conn.execute(_BY_EVENT, {"event_id": event_id}).first())

    def incident(self, incident_id: str, *, timeout_s: float | None = None
                 ) -> dict[str, Any] | None:
        """One incident; with ``timeout_s``, under that deadline (the call path)."""
        query = sa.select(incidents).where(incidents.c.id == incident_id)
        if timeout_s is not None:
            return self.within(lambda conn: _row(conn.execute(query).first()),
                               timeout_s=timeout_s)
        with self.begin() as conn:
            return _row(conn.execute(query).first())

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

    def voice_lookup(self, *, call_sid: str, steps: Sequence[str], msisdn: str | None,
                     since: dt.datetime, types: Sequence[str],
                     timeout_s: float = 0.3, replay_first: bool = False) -> VoiceLookup:
        """The stored ``steps`` of this call and the caller's incident: one statement.

        The incident is the newest of ``msisdn`` with a type in ``types`` received at or
        after ``since``, whatever its status; crash and SOS win over other types.

        With ``replay_first`` the first of ``steps`` is the step being answered: when
        this process already wrote or read it with its TwiML (a replay: the caller
        answers with that TwiML and needs nothing else), the answer is that step alone,
        from memory (:class:`KnownSteps`), with no incident and no database read."""
        step_names = [name for name in steps if name]
        want_steps = bool(call_sid and step_names)
        if want_steps and replay_first:
            known = self.known_steps.get(call_sid, step_names[0])
            if known is not None:
                return VoiceLookup(steps={step_names[0]: known}, incident=None)
        want_incident = bool(msisdn and types)
        if not want_steps and not want_incident:
            return VoiceLookup(steps={}, incident=None)
        n_steps = len(step_names) if want_steps else 0
        n_types = len(types) if want_incident else 0
        params: dict[str, Any] = {}
        if want_steps:
            params["vl_call_sid"] = call_sid
            params.update((f"vl_step_{i}", name) for i, name in enumerate(step_names))
        if want_incident:
            params["vl_msisdn"] = msisdn
            params["vl_since"] = since
            params.update((f"vl_type_{i}", kind) for i, kind in enumerate(types))
        if self.sqlite_reads is not None:
            return self._packed_voice_lookup(call_sid, n_steps, n_types, params, timeout_s)
        started = time.monotonic()
        if self.pg_reads is not None and not self.deadline.suspect:
            try:
                return self._packed_voice_lookup(call_sid, n_steps, n_types, params,
                                                 timeout_s)
            except NotReady:
                pass  # no connection on this thread yet: the deadline thread reads
            except ReadTimeout:
                self.deadline.missed()  # fail fast for a while, as a missed hand-off does
                raise
            except StoreError as exc:  # the connection broke: read the other way, in time
                log.warning("voice read on this thread failed (%s); reading again", exc)
        query = _voice_query(n_steps, n_types)
        rows = self.within(lambda conn: conn.execute(query, params).all(),
                           timeout_s=max(0.0, timeout_s - (time.monotonic() - started)),
                           single_read=True)

        def pairs() -> Iterator[tuple[Any, Any]]:
            for row in rows:
                data = _row(row) or {}
                yield ({name: data[f"s_{name}"] for name in STEP_FIELDS}
                       if data.get("s_step") is not None else None,
                       {key[2:]: value for key, value in data.items() if key.startswith("i_")}
                       if data.get("i_id") is not None else None)

        return self._lookup_of(call_sid, pairs())

    def _packed_voice_lookup(self, call_sid: str, n_steps: int, n_types: int,
                             params: dict[str, Any], timeout_s: float) -> VoiceLookup:
        """voice_lookup on this thread: the same statement with each side's row packed
        into one JSON text (:mod:`gateway.sqlite_reads`, :mod:`gateway.pg_reads`)."""
        packed = _packed_voice_query(self.engine.dialect, n_steps, n_types)
        texts: list[Any]
        if self.sqlite_reads is not None:
            texts = [row[0] for row in self.sqlite_reads.fetch(
                packed.sql, packed.parameters(params), timeout_s=timeout_s)]
        else:
            assert self.pg_reads is not None
            texts = self.pg_reads.fetch_text(
                f"voice_{n_steps}_{n_types}", packed.sql,
                [None if v is None else str(v) for v in packed.parameters(params)],
                timeout_s=timeout_s)
        def pairs() -> Iterator[tuple[Any, Any]]:
            for text in texts:
                step, incident = json.loads(text)
                yield (None if step is None else packed.convert(step),
                       None if incident is None else packed.convert(incident))

        return self._lookup_of(call_sid, pairs())

    def _lookup_of(self, call_sid: str, pairs: Iterator[tuple[Any, Any]]) -> VoiceLookup:
        """The lookup from each row's (step, incident), either None when that side of
        the outer join found nothing; the steps read are remembered (KnownSteps)."""
        found: dict[str, Mapping[str, Any]] = {}
        incident: dict[str, Any] | None = None
        try:
            for step, found_incident in pairs:
                if step is not None:
                    found[step["step"]] = step
                    self.known_steps.put(call_sid, step)
                if incident is None and found_incident is not None:
                    incident = found_incident
        except Exception as exc:  # the voice path catches one type
            log.exception("could not read the voice lookup's rows")
            raise StoreError(f"unreadable lookup rows: {type(exc).__name__}") from exc
        return VoiceLookup(steps=found, incident=incident)

    def warm_voice_reads(self, *, timeout_s: float = 2.0) -> None:
        """Run each shape of the voice read once (start-up): the first call of a process
        then finds its statement compiled, a deadline thread and a connection open,
        instead of paying for them inside its 0.3 s deadline.  Never raises."""
        since = utcnow()
        shapes = ((("voice",), ("crash", "sos", "on_call")), (("voice",), ("on_call",)),
                  (("dial-result:0", "accept:0"), ()), (("emergency-result:0",), ()))
        try:
            for steps, types in shapes:
                self.voice_lookup(call_sid="CAwarm-up", steps=steps, msisdn="+0" if types
                                  else None, since=since, types=types, timeout_s=timeout_s)
        except StoreError as exc:
            log.warning("voice reads not warmed up at start: %s", exc)

    def call_step(self, call_sid: str, step: str, *,
                  timeout_s: float = 2.0) -> dict[str, Any] | None:
        query = sa.select(call_steps).where(call_steps.c.call_sid == call_sid,
                                            call_steps.c.step == step)
        return _row(self.within(lambda conn: conn.execute(query).first(), timeout_s=timeout_s))

    def record_call_step(
        self,
        *,
        call_sid: str,
        step: str,
        incident_id: str | None,
        twiml: str,
        detail: Mapping[str, Any],
        decision: Mapping[str, Any] | None = None,
        timeout_s: float = 3.0,
    ) -> bool:
        """Store one answered webhook step (and its routing decision) once.

        Returns False when the step was already stored (a Twilio retry)."""
        now = utcnow()
        created = self.within(lambda conn: write_step(
            conn, call_sid=call_sid, step=step, incident_id=incident_id, twiml=twiml,
            detail=detail, decision=decision, now=now), timeout_s=timeout_s)
        if created:
            self.remember_step(call_sid=call_sid, step=step, incident_id=incident_id,
                               twiml=twiml, detail=detail, created_at=now)
        return created

    def remember_step(self, *, call_sid: str, step: str, incident_id: str | None, twiml: str,
                      detail: Mapping[str, Any], created_at: dt.datetime) -> None:
        """A step this process has just stored (its write committed and was new): a
        replay of it is answered from memory.  Call only after the commit."""
        try:
            stored_detail = json.loads(json.dumps(dict(detail)))  # as the JSON column returns it
        except Exception:  # noqa: BLE001 -- never fail a committed write
            return  # not stored as given: let the database say what it holds
        self.known_steps.put(call_sid, {"step": step, "twiml": twiml, "detail": stored_detail,
                                        "incident_id": incident_id, "created_at": created_at})

    def claim_step(self, call_sid: str, step: str, *, timeout_s: float = 2.0
                   ) -> tuple[bool, str | None]:
        """Claim a step before acting on it: ``(True, None)`` for the first request,
        ``(False, stored TwiML or None while the first is still at work)`` for a replay."""

        def claim(conn: Connection) -> tuple[bool, str | None]:
            if insert_ignore(conn, call_steps, {"call_sid": call_sid, "step": step,
                                                "created_at": utcnow(), "twiml": None,
                                                "detail": {}}):
                return True, None
            stored = conn.execute(sa.select(call_steps.c.twiml).where(
                call_steps.c.call_sid == call_sid, call_steps.c.step == step)).scalar()
            return False, stored

        return self.within(claim, timeout_s=timeout_s)

    def finish_step(self, call_sid: str, step: str, twiml: str, *,
                    timeout_s: float = 2.0) -> None:
        """Store the answer of a claimed step (what a replay gets)."""
        update = call_steps.update().where(
            call_steps.c.call_sid == call_sid, call_steps.c.step == step,
            call_steps.c.twiml.is_(None)).values(twiml=twiml)
        self.within(lambda conn: conn.execute(update), timeout_s=timeout_s)

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

    def record_status(self, values: Mapping[str, Any], *, timeout_s: float = 1.0) -> bool:
        """Store one status callback under a deadline; False if this (call, source,
        sequence) was seen."""
        row = {"created_at": utcnow(), **values}
        return self.within(lambda conn: insert_ignore(conn, call_status, row),
                           timeout_s=timeout_s)

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


#: what voice_lookup returns of each stored step (and the step name itself)
STEP_FIELDS = ("step", "twiml", "detail", "incident_id", "created_at")
#: what voice_lookup returns of the caller's incident: what the caller's leg routes by
#: (gateway.views.call_steps.arrival_of, the roadside entitlement's VIN); the agent's
#: whisper reads the whole incident by its id
INCIDENT_FIELDS = ("id", "type", "vin", "status", "received_at", "home_country",
                   "route_country", "route_reason", "test_call")


class KnownSteps:
    """Stored call steps with their TwiML, by (CallSid, step), the newest ``size``.

    A stored step never changes: ``call_steps`` is only inserted into (insert-or-ignore
    on the unique CallSid + step) and a claimed step's TwiML is set once, while still
    NULL.  So once a step is known stored with its TwiML, a replay can be answered from
    memory; a step without TwiML (claimed, still at work) is never kept."""

    def __init__(self, size: int = 4096) -> None:
        self.size = max(0, size)
        self._lock = threading.Lock()
        self._steps: OrderedDict[tuple[str, str], Mapping[str, Any]] = OrderedDict()

    def get(self, call_sid: str, step: str) -> Mapping[str, Any] | None:
        return self._steps.get((call_sid, step))

    def put(self, call_sid: str, fields: Mapping[str, Any]) -> None:
        if not call_sid or not fields.get("twiml") or not self.size:
            return
        key = (call_sid, str(fields["step"]))
        with self._lock:
            if key in self._steps:
                return  # the first stored answer stays
            while len(self._steps) >= self.size:
                self._steps.popitem(last=False)  # the oldest
            self._steps[key] = dict(fields)


#: voice_lookup's statements by (number of step names, number of incident types): built
#: once from bound parameters, so each call skips building the statement and SQLAlchemy
#: finds its compiled form by the statement's memoized cache key
_VOICE_QUERIES: dict[tuple[int, int, str], sa.Select[Any]] = {}


def _voice_query(n_steps: int, n_types: int, *, packed: str = "") -> sa.Select[Any]:
    """The one statement: a one-row anchor, outer-joined to the call's stored steps
    (``n_steps`` names; 0: none) and to the caller's newest incident (``n_types`` types;
    0: none).  Parameters: vl_call_sid, vl_step_<i>, vl_msisdn, vl_since, vl_type_<i>.

    ``packed`` (a dialect name, "sqlite" or "postgresql"): one column, a JSON array of
    the step's row and the incident's, each a JSON object or null when that side found
    nothing (:func:`_packed_voice_query`)."""
    key = (n_steps, n_types, packed)
    query = _VOICE_QUERIES.get(key)
    if query is not None:
        return query
    anchor = sa.select(sa.literal_column("1").label("one")).subquery("anchor")
    source: sa.FromClause = anchor
    columns: list[Any] = [] if packed else [anchor.c.one]
    if n_steps:
        names = [sa.bindparam(f"vl_step_{i}", type_=call_steps.c.step.type)
                 for i in range(n_steps)]
        source = source.outerjoin(call_steps, sa.and_(
            call_steps.c.call_sid == sa.bindparam("vl_call_sid"), call_steps.c.step.in_(names)))
        step_columns = [call_steps.c[name] for name in STEP_FIELDS]
        columns += ([_json_row(step_columns, call_steps.c.step, packed).label("s")] if packed else
                    [column.label(f"s_{column.name}") for column in step_columns])
    elif packed:
        columns.append(sa.null().label("s"))
    if n_types:
        kinds = [sa.bindparam(f"vl_type_{i}", type_=incidents.c.type.type)
                 for i in range(n_types)]
        # plain bound values, not an expanding IN: nothing to render per execution
        constants = [sa.literal(kind, incidents.c.type.type) for kind in PREFERRED_TYPES]
        preferred = sa.case((incidents.c.type.in_(constants), 0), else_=1)
        newest = (
            sa.select(*(incidents.c[name] for name in INCIDENT_FIELDS))
            .where(incidents.c.msisdn == sa.bindparam("vl_msisdn"), incidents.c.type.in_(kinds),
                   incidents.c.received_at >= sa.bindparam("vl_since"))
            .order_by(preferred, incidents.c.received_at.desc(), incidents.c.id)
            .limit(1)
            .subquery("newest"))
        source = source.outerjoin(newest, sa.true())
        columns += ([_json_row(list(newest.c), newest.c.id, packed).label("i")] if packed else
                    [column.label(f"i_{column.name}") for column in newest.c])
    elif packed:
        columns.append(sa.null().label("i"))
    if packed:  # one column: each column fetched costs the sqlite3 module a GIL release
        array = sa.func.json_array if packed == "sqlite" else sa.func.json_build_array
        columns = [array(*columns).label("si")]
    query = sa.select(*columns).select_from(source)
    _VOICE_QUERIES[key] = query
    return query


def _sqlite_reads_for(engine: Engine) -> Any:
    """A :class:`~gateway.sqlite_reads.SqliteReads` for a SQLite file given by a plain
    URL; None for anything else (PostgreSQL, in memory, URL options)."""
    url = engine.url
    if engine.dialect.name != "sqlite" or url.query or url.database in (None, "", ":memory:"):
        return None
    from gateway.sqlite_reads import SqliteReads

    return SqliteReads(url.database)


@dataclass(frozen=True)
class _PackedQuery:
    sql: str
    #: the parameter names in the order of the statement's placeholders
    order: tuple[str, ...]
    #: the statement's own bound values (the preferred types, the LIMIT)
    constants: Mapping[str, Any]
    #: the dialect's conversion of a datetime parameter and of each packed column
    since: Callable[[Any], Any]
    processors: Mapping[str, Callable[[Any], Any]]

    def parameters(self, given: Mapping[str, Any]) -> list[Any]:
        values = {**self.constants, **given}
        if "vl_since" in given:
            values["vl_since"] = self.since(given["vl_since"])
        return [values[name] for name in self.order]

    def convert(self, data: dict[str, Any]) -> dict[str, Any]:
        """A packed row's values as the dialect reads its columns (in place)."""
        for name, process in self.processors.items():
            if name in data:
                data[name] = process(data[name])
        for name, value in data.items():
            if isinstance(value, dt.datetime):
                data[name] = as_utc(value)
        return data


_PACKED_QUERIES: dict[tuple[str, int, int], _PackedQuery] = {}


def _json_row(columns: Sequence[Any], present: Any, dialect: str = "sqlite") -> Any:
    """``columns`` as one JSON object, or NULL when ``present`` is NULL (the outer join
    found nothing).  No REAL column may be packed: SQLite's json_object writes 15
    significant digits, which do not always read back as the same double."""
    pairs: list[Any] = []
    for column in columns:
        if isinstance(column.type, sa.Float):
            raise StoreError(f"a REAL column cannot be packed exactly: {column.name}")
        pairs += [sa.literal_column(f"'{column.name}'"), column]
    build = sa.func.json_object if dialect == "sqlite" else sa.func.json_build_object
    return sa.case((present.is_not(None), build(*pairs)), else_=sa.null())


def _packed_voice_query(dialect: Any, n_steps: int, n_types: int) -> _PackedQuery:
    """:func:`_voice_query` packed for ``dialect`` (SQLite or PostgreSQL), compiled once
    with positional parameters, with the conversions of its datetime parameter and of
    each packed field (the step's and the incident's share one table: their names
    differ).

    SQLite: the dialect's own result processors (text to datetime, JSON text, 0/1),
    and ``?`` placeholders (with named ones the sqlite3 module looks each name up with
    the GIL released: a context switch per parameter under load).  PostgreSQL:
    ``$n`` placeholders for a prepared statement, text parameters, and JSON that
    already carries numbers, booleans and objects: only timestamps need reading."""
    key = (dialect.name, n_steps, n_types)
    packed = _PACKED_QUERIES.get(key)
    if packed is not None:
        return packed
    fields = (*(incidents.c[n] for n in INCIDENT_FIELDS), *(call_steps.c[n] for n in STEP_FIELDS))
    processors: dict[str, Callable[[Any], Any]] = {}
    if dialect.name == "sqlite":
        from sqlalchemy.dialects import sqlite

        compiled = _voice_query(n_steps, n_types, packed="sqlite").compile(
            dialect=sqlite.dialect())
        for column in fields:
            process = column.type.dialect_impl(dialect).result_processor(dialect, None)
            if process is not None:
                processors[column.name] = process
        bind = TS.dialect_impl(dialect).bind_processor(dialect)
        since: Callable[[Any], Any] = bind if bind is not None else (lambda value: value)
    else:
        from sqlalchemy.dialects import postgresql

        pg_dialect: Any = postgresql.dialect(paramstyle="numeric_dollar")  # type: ignore[no-untyped-call]
        compiled = _voice_query(n_steps, n_types, packed="postgresql").compile(
            dialect=pg_dialect)
        for column in fields:
            if isinstance(column.type, sa.DateTime):
                processors[column.name] = _iso_datetime
        since = _iso_text
    packed = _PackedQuery(
        sql=str(compiled),
        order=tuple(compiled.positiontup or ()),
        constants={k: v for k, v in compiled.params.items() if not k.startswith("vl_")},
        since=since,
        processors=processors)
    _PACKED_QUERIES[key] = packed
    return packed


def _iso_datetime(value: Any) -> Any:
    return dt.datetime.fromisoformat(value) if isinstance(value, str) else value


def _iso_text(value: Any) -> Any:
    return value.isoformat() if isinstance(value, dt.datetime) else value


def _pg_reads_for(engine: Engine) -> Any:
    """A :class:`~gateway.pg_reads.PgReads` over ``engine``'s own connection settings
    (each connection taken from its pool and detached), or None if not PostgreSQL."""
    if engine.dialect.name != "postgresql":
        return None
    from gateway.pg_reads import PgReads

    def connect() -> Any:
        fairy = engine.raw_connection()
        try:
            conn: Any = fairy.driver_connection
            fairy.detach()  # ours now: the pool forgets it (and its slot)
            conn.autocommit = True
            return conn
        except BaseException:
            fairy.close()
            raise

    return PgReads(connect)


def insert_ignore(conn: Connection, table: sa.Table, values: Mapping[str, Any]) -> bool:
    """INSERT ... ON CONFLICT DO NOTHING; True if the row is new.  No error, no
    savepoint: the surrounding transaction stays usable on a conflict."""
    key = (conn.dialect.name, table)
    statement = _INSERT_IGNORE.get(key)
    if statement is None:
        if conn.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            statement = pg_insert(table).on_conflict_do_nothing()
        elif conn.dialect.name == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            statement = sqlite_insert(table).on_conflict_do_nothing()
        else:
            raise StoreError(f"insert_ignore: unsupported database {conn.dialect.name}")
        # RETURNING, not rowcount: rowcount is unreliable once SQLAlchemy adds RETURNING
        statement = statement.returning(*table.primary_key.columns)
        _INSERT_IGNORE[key] = statement
    # the values as parameters: the statement (and its compiled form, by the columns
    # given) is reused, never rebuilt around each row's values
    return conn.execute(statement, dict(values)).first() is not None


#: insert_ignore's statements by (dialect name, table)
_INSERT_IGNORE: dict[tuple[str, sa.Table], Any] = {}
#: write_steps' statements by (dialect name, table, returning the key)
_INSERT_MANY: dict[tuple[str, sa.Table, bool], Any] = {}


def _insert_many(dialect: str, table: sa.Table, *, returning_key: bool) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING for executemany (built once per dialect)."""
    key = (dialect, table, returning_key)
    statement = _INSERT_MANY.get(key)
    if statement is None:
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            statement = pg_insert(table).on_conflict_do_nothing()
        elif dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            statement = sqlite_insert(table).on_conflict_do_nothing()
        else:
            raise StoreError(f"write_steps: unsupported database {dialect}")
        if returning_key:
            statement = statement.returning(table.c.call_sid, table.c.step)
        _INSERT_MANY[key] = statement
    return statement


def write_steps(conn: Connection, steps: Sequence[Mapping[str, Any]], *,
                now: dt.datetime) -> list[bool]:
    """Many ``call_steps`` rows and, for the new ones, their routing decisions, in two
    statements (not two per step); for each step True if it is new.

    Each of ``steps`` has ``call_sid``, ``step``, ``incident_id``, ``twiml``, ``detail``
    and ``decision`` (a mapping or None).  A step whose row exists is not new; a step
    given twice is new at most the first time (the first one's row is the one kept).
    """
    if not steps:
        return []
    dialect = conn.dialect.name
    rows = [{"call_sid": s["call_sid"], "step": s["step"], "incident_id": s["incident_id"],
             "created_at": now, "twiml": s["twiml"], "detail": dict(s["detail"])}
            for s in steps]
    if dialect == "sqlite":
        inserted = _insert_steps_sqlite(conn, rows)
    else:
        inserted = {(row[0], row[1]) for row in conn.execute(
            _insert_many(dialect, call_steps, returning_key=True), rows)}
    news: list[bool] = []
    decisions: list[dict[str, Any]] = []
    for s in steps:
        key = (s["call_sid"], s["step"])
        new = key in inserted
        inserted.discard(key)  # a repeat of the key later in the batch is not new
        news.append(new)
        if new and s["decision"] is not None:
            decisions.append({"call_sid": s["call_sid"], "step": s["step"],
                              "incident_id": s["incident_id"], "created_at": now,
                              "number": None, "centre_id": None, **s["decision"]})
    if decisions and dialect == "sqlite":
        _insert_rows_sqlite(conn, routing_decisions, decisions)
    elif decisions:
        conn.execute(_insert_many(dialect, routing_decisions, returning_key=False), decisions)
    return news


#: rows per multi-row INSERT on SQLite (9 columns x 100 stays under SQLite's historic
#: limit of 999 parameters)
_SQLITE_ROWS = 100


def _insert_rows_sqlite(conn: Connection, table: sa.Table, rows: Sequence[Mapping[str, Any]]
                        ) -> None:
    """INSERT ... VALUES (...), (...) ON CONFLICT DO NOTHING: one statement per
    ``_SQLITE_ROWS`` rows, each row with the keys of the first.  An executemany would
    run one statement per row, and the sqlite3 module releases the GIL around each
    step and reset of each: under load a batch of 70 steps cost ~9 GIL releases per
    step, each a context switch to a serving thread and back.  (SQLAlchemy batches an
    executemany so only with RETURNING, or without ON CONFLICT; and building
    ``insert().values([...])`` per batch cost ~130 µs a row.)"""
    if not rows:
        return
    keys = tuple(rows[0])
    (head, group, tail), order, processors = _sqlite_insert_shape(conn.dialect, table, keys)
    for start in range(0, len(rows), _SQLITE_ROWS):
        chunk = rows[start:start + _SQLITE_ROWS]
        values: list[Any] = []
        for row in chunk:
            if row.keys() != rows[0].keys():
                raise StoreError(f"rows of {table.name} with different columns in one batch")
            for name, process in zip(order, processors, strict=True):
                value = row[name]
                values.append(process(value) if process is not None else value)
        conn.exec_driver_sql(f"{head}{', '.join([group] * len(chunk))}{tail}", tuple(values))


#: (text before the VALUES group, the group, text after it), parameter order, processors
_InsertShape = tuple[tuple[str, str, str], tuple[str, ...], tuple[Any, ...]]
_SQLITE_INSERTS: dict[tuple[str, tuple[str, ...]], _InsertShape] = {}


def _sqlite_insert_shape(dialect: Any, table: sa.Table, keys: tuple[str, ...]) -> _InsertShape:
    """The single-row insert-or-ignore of ``keys`` as SQLAlchemy compiles it for
    SQLite, split around its VALUES group; the parameter order; each parameter's
    bind processor (JSON to text, datetimes to SQLite's format)."""
    cache_key = (table.name, keys)
    shape = _SQLITE_INSERTS.get(cache_key)
    if shape is not None:
        return shape
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    compiled = sqlite_insert(table).on_conflict_do_nothing().compile(
        dialect=dialect, column_keys=list(keys))
    text = str(compiled)
    head, tail = text.split(" VALUES ", 1)
    values, rest = tail.split(")", 1)
    order = tuple(compiled.positiontup or ())
    if set(order) != set(keys):
        raise StoreError(f"unexpected insert shape for {table.name}")
    processors = tuple(table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
                       for name in order)
    shape = ((f"{head} VALUES ", values + ")", rest), order, processors)
    _SQLITE_INSERTS[cache_key] = shape
    return shape


def _insert_steps_sqlite(conn: Connection, rows: Sequence[Mapping[str, Any]]
                         ) -> set[tuple[str, str]]:
    """The call_steps rows, insert-or-ignore; the (call_sid, step) keys this inserted.

    Without RETURNING (one fetched row per step, each with GIL releases per column):
    the write lock is taken first (BEGIN IMMEDIATE, unless this transaction already
    wrote and so holds it), then one statement reads which keys exist, packed into one
    JSON text, and one inserts the rest.  With the lock held nobody can insert a key
    between the two (SQLite has one writer at a time)."""
    dbapi = conn.connection.dbapi_connection
    if dbapi is not None and not getattr(dbapi, "in_transaction", True):
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    call_sids = sorted({row["call_sid"] for row in rows})
    existing: set[tuple[str, str]] = set()
    for start in range(0, len(call_sids), 500):
        packed = conn.execute(
            sa.select(sa.func.json_group_array(sa.func.json_array(call_steps.c.call_sid,
                                                                   call_steps.c.step)))
            .where(call_steps.c.call_sid.in_(call_sids[start:start + 500]))).scalar()
        existing.update((sid, step) for sid, step in json.loads(packed or "[]"))
    _insert_rows_sqlite(conn, call_steps, rows)
    return {(row["call_sid"], row["step"]) for row in rows} - existing


def write_step(conn: Connection, *, call_sid: str, step: str, incident_id: str | None,
               twiml: str, detail: Mapping[str, Any], decision: Mapping[str, Any] | None,
               now: dt.datetime) -> bool:
    """The call_steps row and, if it is new, its routing decision; True if new."""
    return write_steps(conn, [{"call_sid": call_sid, "step": step, "incident_id": incident_id,
                               "twiml": twiml, "detail": detail, "decision": decision}],
                       now=now)[0]


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
