"""Insert-or-ignore: how the store writes a row once.

:func:`insert_ignore` writes one row of any table (its unique key decides whether it is
new); :func:`write_steps` writes a batch of answered voice steps and the routing
decisions of the new ones, in two statements.  On SQLite a batch is one multi-row
INSERT per :data:`_SQLITE_ROWS` rows, without RETURNING or executemany
(:func:`_insert_rows_sqlite` says why).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gateway.errors import StoreError
from gateway.store.tables import call_steps, routing_decisions


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
