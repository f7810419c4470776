"""The voice webhook's one read: the call's stored steps and the caller's incident.

:func:`voice_lookup` (what :meth:`Store.voice_lookup <gateway.store.Store.voice_lookup>`
runs) answers everything a voice webhook needs in one statement, under the request's
deadline: a replay this process already answered comes from memory
(:class:`KnownSteps`); on a SQLite file the read runs on the request thread
(:mod:`gateway.store.sqlite_reads`), on PostgreSQL too when the thread has a connection
(:mod:`gateway.store.pg_reads`), each with the row of each side packed into one JSON text
(:func:`_packed_voice_query`); otherwise through :meth:`Store.within
<gateway.store.Store.within>`.  The statements are built and compiled once per shape.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.errors import StoreError
from gateway.store.pg_reads import NotReady, ReadTimeout
from gateway.store.tables import TS, as_utc, call_steps, incidents, row_dict, utcnow

if TYPE_CHECKING:
    from gateway.store.core import Store

log = logging.getLogger(__name__)

#: incident types a voice call prefers over any other type it may match
PREFERRED_TYPES = ("crash", "sos")


@dataclass(frozen=True)
class VoiceLookup:
    """What a voice webhook reads from the database, in one round trip."""

    #: step name -> the stored step (twiml, detail, incident_id, created_at) of this call
    steps: Mapping[str, Mapping[str, Any]]
    #: the caller's newest matching incident (crash/sos first), any status; None if none
    incident: dict[str, Any] | None


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


def voice_lookup(store: Store, *, call_sid: str, steps: Sequence[str], msisdn: str | None,
                 since: dt.datetime, types: Sequence[str], timeout_s: float,
                 replay_first: bool) -> VoiceLookup:
    """:meth:`Store.voice_lookup <gateway.store.Store.voice_lookup>` (which says what it
    answers) for ``store``: a replay from memory; else the one statement on this thread
    (a SQLite file; PostgreSQL when the thread has a connection and the database did not
    just miss a deadline); else through :meth:`Store.within <gateway.store.Store.within>`
    in what is left of ``timeout_s``."""
    step_names = [name for name in steps if name]
    want_steps = bool(call_sid and step_names)
    if want_steps and replay_first:
        known = store.known_steps.get(call_sid, step_names[0])
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
    if store.sqlite_reads is not None:
        return _packed_voice_lookup(store, call_sid, n_steps, n_types, params, timeout_s)
    started = time.monotonic()
    if store.pg_reads is not None and not store.deadline.suspect:
        try:
            return _packed_voice_lookup(store, call_sid, n_steps, n_types, params, timeout_s)
        except NotReady:
            pass  # no connection on this thread yet: the deadline thread reads
        except ReadTimeout:
            store.deadline.missed()  # fail fast for a while, as a missed hand-off does
            raise
        except StoreError as exc:  # the connection broke: read the other way, in time
            log.warning("voice read on this thread failed (%s); reading again", exc)
    query = _voice_query(n_steps, n_types)
    rows = store.within(lambda conn: conn.execute(query, params).all(),
                        timeout_s=max(0.0, timeout_s - (time.monotonic() - started)),
                        single_read=True)

    def pairs() -> Iterator[tuple[Any, Any]]:
        for row in rows:
            data = row_dict(row) or {}
            yield ({name: data[f"s_{name}"] for name in STEP_FIELDS}
                   if data.get("s_step") is not None else None,
                   {key[2:]: value for key, value in data.items() if key.startswith("i_")}
                   if data.get("i_id") is not None else None)

    return _lookup_of(store, call_sid, pairs())


def _packed_voice_lookup(store: Store, call_sid: str, n_steps: int, n_types: int,
                         params: dict[str, Any], timeout_s: float) -> VoiceLookup:
    """voice_lookup on this thread: the same statement with each side's row packed into
    one JSON text (:mod:`gateway.store.sqlite_reads`, :mod:`gateway.store.pg_reads`)."""
    packed = _packed_voice_query(store.engine.dialect, n_steps, n_types)
    texts: list[Any]
    if store.sqlite_reads is not None:
        texts = [row[0] for row in store.sqlite_reads.fetch(
            packed.sql, packed.parameters(params), timeout_s=timeout_s)]
    else:
        assert store.pg_reads is not None
        texts = store.pg_reads.fetch_text(
            f"voice_{n_steps}_{n_types}", packed.sql,
            [None if v is None else str(v) for v in packed.parameters(params)],
            timeout_s=timeout_s)
    def pairs() -> Iterator[tuple[Any, Any]]:
        for text in texts:
            step, incident = json.loads(text)
            yield (None if step is None else packed.convert(step),
                   None if incident is None else packed.convert(incident))

    return _lookup_of(store, call_sid, pairs())


def _lookup_of(store: Store, call_sid: str, pairs: Iterator[tuple[Any, Any]]
               ) -> VoiceLookup:
    """The lookup from each row's (step, incident), either None when that side of
    the outer join found nothing; the steps read are remembered (KnownSteps)."""
    found: dict[str, Mapping[str, Any]] = {}
    incident: dict[str, Any] | None = None
    try:
        for step, found_incident in pairs:
            if step is not None:
                found[step["step"]] = step
                store.known_steps.put(call_sid, step)
            if incident is None and found_incident is not None:
                incident = found_incident
    except Exception as exc:  # the voice path catches one type
        log.exception("could not read the voice lookup's rows")
        raise StoreError(f"unreadable lookup rows: {type(exc).__name__}") from exc
    return VoiceLookup(steps=found, incident=incident)


def warm_voice_reads(store: Store, *, timeout_s: float) -> None:
    """:meth:`Store.warm_voice_reads <gateway.store.Store.warm_voice_reads>`: each shape
    the voice webhooks read, once, through ``store.voice_lookup``; never raises."""
    since = utcnow()
    shapes = ((("voice",), ("crash", "sos", "on_call")), (("voice",), ("on_call",)),
              (("dial-result:0", "accept:0"), ()), (("emergency-result:0",), ()))
    try:
        for steps, types in shapes:
            store.voice_lookup(call_sid="CAwarm-up", steps=steps, msisdn="+0" if types
                               else None, since=since, types=types, timeout_s=timeout_s)
    except StoreError as exc:
        log.warning("voice reads not warmed up at start: %s", exc)


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


def sqlite_reads_for(engine: Engine) -> Any:
    """A :class:`~gateway.store.sqlite_reads.SqliteReads` for a SQLite file given by a plain
    URL; None for anything else (PostgreSQL, in memory, URL options)."""
    url = engine.url
    if engine.dialect.name != "sqlite" or url.query or url.database in (None, "", ":memory:"):
        return None
    from gateway.store.sqlite_reads import SqliteReads

    return SqliteReads(url.database)


def pg_reads_for(engine: Engine) -> Any:
    """A :class:`~gateway.store.pg_reads.PgReads` over ``engine``'s own connection settings
    (each connection taken from its pool and detached), or None if not PostgreSQL."""
    if engine.dialect.name != "postgresql":
        return None
    from gateway.store.pg_reads import PgReads

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
