"""The :class:`Store`: every database access goes through it, and any database failure
surfaces as :class:`~gateway.errors.StoreError`.

It holds the engine and the deadline hand-off (:meth:`Store.within`, see
:mod:`gateway.db`), runs the schema's migrations, and reads and writes the call path's
rows (incidents, call steps, callbacks, status callbacks).  The voice webhook's one read
is :mod:`gateway.store.voice_read`; writing rows once is :mod:`gateway.store.inserts`.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from gateway.db import DeadlineRunner, Job, make_engine, socket_of
from gateway.errors import StoreError
from gateway.store import voice_read
from gateway.store.inserts import insert_ignore, write_step
from gateway.store.tables import (
    call_status,
    call_steps,
    callbacks,
    incidents,
    routing_decisions,
    row_dict,
    utcnow,
)
from gateway.store.voice_read import KnownSteps, VoiceLookup, pg_reads_for, sqlite_reads_for
from gateway.watchdog import (
    TRANSACTION_TIMEOUT_S,
    Watchdog,
    connection_within,
    on_background_thread,
)

T = TypeVar("T")

#: an incident by its event_id (built once)
_BY_EVENT = sa.select(incidents).where(
    incidents.c.event_id == sa.bindparam("event_id", type_=incidents.c.event_id.type))


class Store:
    """All database access goes through here; methods raise StoreError, nothing else."""

    def __init__(self, engine: Engine, *, deadline_workers: int = 16,
                 background_workers: int = 3, suspect_s: float = 2.0,
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
        #: the slots of background work (the step writer, the refresh of line health):
        #: it never takes a slot a webhook's read needs (seen: 8 serving threads and
        #: the writer on 8 shared slots refused reads under load), and a deadline it
        #: misses never makes the request threads fail fast
        self.background = DeadlineRunner(workers=background_workers, suspect_s=suspect_s,
                                         name="db-background")
        #: cuts a transaction on a request thread at its deadline (gateway.watchdog)
        self.watchdog = Watchdog()
        #: steps this process wrote or read with their TwiML (a stored step never changes)
        self.known_steps = KnownSteps(known_steps)
        #: the voice read on a SQLite file: on the request thread, few columns
        #: (gateway.store.sqlite_reads says why); None: through within() like the rest
        self.sqlite_reads = sqlite_reads_for(engine)
        #: the voice read on PostgreSQL: on the request thread when it has a connection
        #: (gateway.store.pg_reads); through within() otherwise
        self.pg_reads = pg_reads_for(engine)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Store:
        return cls(make_engine(url), **kwargs)

    # -- plumbing ---------------------------------------------------------------------

    @contextmanager
    def begin(self, *, timeout_s: float = TRANSACTION_TIMEOUT_S,
              autocommit: bool = False) -> Iterator[Connection]:
        """One transaction on this thread, ended at ``timeout_s`` (see
        :meth:`transaction`); any database error becomes StoreError."""
        try:
            with self.transaction(timeout_s=timeout_s, autocommit=autocommit) as conn:
                yield conn
        except StoreError:
            raise
        except SQLAlchemyError as exc:
            raise StoreError(f"database error: {type(exc).__name__}") from exc

    @contextmanager
    def transaction(self, *, timeout_s: float = TRANSACTION_TIMEOUT_S,
                    autocommit: bool = False) -> Iterator[Connection]:
        """One transaction on this thread; on PostgreSQL its connection is cut at
        ``timeout_s`` (gateway.watchdog: DeadlineMissed, a StoreError) and fails fast
        while the database is suspect.  Other database errors come as SQLAlchemy
        raised them (a caller may want its IntegrityError).  ``autocommit``: each
        statement commits on its own (PostgreSQL; one round trip, no BEGIN)."""
        if self._autocommit is None:  # SQLite: no socket to cut (busy timeout: 2 s)
            with self.engine.begin() as conn:
                yield conn
            return
        engine = self._autocommit if autocommit else self.engine
        runner = self.background if on_background_thread() else self.deadline
        with connection_within(engine, timeout_s=timeout_s, runner=runner,
                               watchdog=self.watchdog) as conn:
            if autocommit:
                yield conn
            else:
                with conn.begin():
                    yield conn

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
        self.watchdog.close()
        if self.sqlite_reads is not None:
            self.sqlite_reads.close()
        if self.pg_reads is not None:
            self.pg_reads.close()
        self.engine.dispose()

    # -- incidents --------------------------------------------------------------------

    def one_statement(self, fn: Callable[[Connection], T], *,
                      timeout_s: float = TRANSACTION_TIMEOUT_S) -> T:
        """``fn(conn)``, which runs exactly one statement, committed, on this thread
        and within ``timeout_s`` (the caller answers only after the commit; a statement
        cut at its deadline may still commit, which a retry of the same event finds).
        On PostgreSQL in autocommit mode: the statement is its own transaction, one
        round trip instead of BEGIN, the statement and COMMIT.  Any database error
        becomes StoreError."""
        with self.begin(timeout_s=timeout_s, autocommit=True) as conn:
            return fn(conn)

    def incident_by_event(self, event_id: str) -> dict[str, Any] | None:
        """The incident of this event_id (one statement; the writes are in
        :mod:`gateway.ingest`)."""
        return self.one_statement(lambda conn: self.incident_from(conn, event_id))

    @staticmethod
    def incident_from(conn: Connection, event_id: str) -> dict[str, Any] | None:
        return row_dict(conn.execute(_BY_EVENT, {"event_id": event_id}).first())

    def incident(self, incident_id: str, *, timeout_s: float | None = None
                 ) -> dict[str, Any] | None:
        """One incident; with ``timeout_s``, under that deadline (the call path)."""
        query = sa.select(incidents).where(incidents.c.id == incident_id)
        if timeout_s is not None:
            return self.within(lambda conn: row_dict(conn.execute(query).first()),
                               timeout_s=timeout_s)
        with self.begin() as conn:
            return row_dict(conn.execute(query).first())

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
            return [dict(row_dict(r) or {}) for r in conn.execute(query)]

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
        """The stored ``steps`` of this call and the caller's incident: one statement
        (:func:`gateway.store.voice_read.voice_lookup`).

        The incident is the newest of ``msisdn`` with a type in ``types`` received at or
        after ``since``, whatever its status; crash and SOS win over other types.

        With ``replay_first`` the first of ``steps`` is the step being answered: when
        this process already wrote or read it with its TwiML (a replay: the caller
        answers with that TwiML and needs nothing else), the answer is that step alone,
        from memory (:class:`KnownSteps`), with no incident and no database read."""
        return voice_read.voice_lookup(self, call_sid=call_sid, steps=steps, msisdn=msisdn,
                                       since=since, types=types, timeout_s=timeout_s,
                                       replay_first=replay_first)

    def warm_voice_reads(self, *, timeout_s: float = 2.0) -> None:
        """Run each shape of the voice read once (start-up): the first call of a process
        then finds its statement compiled, a deadline thread and a connection open,
        instead of paying for them inside its 0.3 s deadline.  Never raises."""
        voice_read.warm_voice_reads(self, timeout_s=timeout_s)

    def call_step(self, call_sid: str, step: str, *,
                  timeout_s: float = 2.0) -> dict[str, Any] | None:
        query = sa.select(call_steps).where(call_steps.c.call_sid == call_sid,
                                            call_steps.c.step == step)
        return row_dict(self.within(lambda conn: conn.execute(query).first(), timeout_s=timeout_s))

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
            with self.transaction() as conn:
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
            return row_dict(conn.execute(query).first())
