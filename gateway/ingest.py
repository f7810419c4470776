"""Writing a new incident and the rows that commit with it: one transaction per event.

A new event costs one transaction, and nothing is written for a replay:

- **PostgreSQL**: one statement, run in autocommit mode (it is its own transaction: one
  round trip, no BEGIN or COMMIT)::

      WITH new_incident AS (INSERT INTO incidents ... ON CONFLICT (event_id) DO NOTHING
                            RETURNING id),
           extra_0 AS (INSERT INTO outbox (...) SELECT :x0_... FROM new_incident)
      SELECT id FROM new_incident

  The outbox row is inserted only when the incident is (``FROM new_incident`` has no
  row on a conflict), and both or neither commit: a data-modifying statement in WITH is
  part of its statement.  A conflict returns no row; the stored incident is then read
  by ``event_id`` (a replay costs that second round trip).
- **SQLite** (no data-modifying WITH): one transaction of INSERT ... ON CONFLICT
  (event_id) DO NOTHING RETURNING, then the extra rows if the incident is new, or the
  stored incident if it is not.

The statements are built once per shape (the columns given) and executed with the
values as bound parameters, so SQLAlchemy finds each compiled form in its cache instead
of building and compiling a statement around every event's values.  Only a conflict on
``event_id`` is a replay: any other constraint error fails the whole write
(:class:`~gateway.errors.StoreError`), and nothing of it is committed.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gateway.errors import StoreError
from gateway.store import Store, incidents

#: rows to commit with a new incident: (table, values)
ExtraRows = Sequence[tuple[sa.Table, Mapping[str, Any]]]

#: a statement's shape: the incident's columns, and each extra row's table and columns
_Shape = tuple[tuple[str, ...], tuple[tuple[sa.Table, tuple[str, ...]], ...]]


def insert_incident(store: Store, row: Mapping[str, Any], *,
                    extra: ExtraRows = ()) -> tuple[dict[str, Any], bool]:
    """Insert an incident and the rows that must commit with it, in one transaction.

    Returns ``(incident, created)``: on a conflict on ``event_id`` (a replay, or a
    concurrent request with the same event_id) the stored incident comes back with
    ``created=False`` and nothing is written.  Raises StoreError on any other failure;
    when it returns ``created=True`` the incident and its extra rows are committed."""
    shape: _Shape = (tuple(row), tuple((table, tuple(values)) for table, values in extra))
    if store.engine.dialect.name == "postgresql":
        statement = _statement(shape)
        params = {f"inc_{name}": value for name, value in row.items()}
        for n, (_table, values) in enumerate(extra):
            params.update((f"x{n}_{name}", value) for name, value in values.items())
        created = store.one_statement(
            lambda conn: conn.execute(statement, params).first()) is not None
        if created:
            return dict(row), True
        existing = store.incident_by_event(str(row["event_id"]))
    else:
        with store.begin() as conn:
            if _insert_sqlite(conn, row, extra):
                return dict(row), True
            existing = store.incident_from(conn, str(row["event_id"]))
    if existing is None:  # no conflict on event_id, and no row written: cannot happen
        raise StoreError("incident insert wrote nothing and found no incident")
    return existing, False


def _insert_sqlite(conn: Connection, row: Mapping[str, Any], extra: ExtraRows) -> bool:
    """The incident, then its extra rows if it is new; True if it is new."""
    key = ("sqlite", incidents)
    statement = _SQLITE.get(key)
    if statement is None:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        statement = (sqlite_insert(incidents)
                     .on_conflict_do_nothing(index_elements=[incidents.c.event_id])
                     .returning(incidents.c.id))
        _SQLITE[key] = statement
    if conn.execute(statement, dict(row)).first() is None:
        return False
    for table, values in extra:
        plain = _SQLITE.get(("insert", table))
        if plain is None:
            plain = _SQLITE[("insert", table)] = table.insert()
        conn.execute(plain, dict(values))
    return True


def _statement(shape: _Shape) -> sa.Select[Any]:
    """PostgreSQL's one statement for this shape (built once; see the module's doc).
    Parameters: ``inc_<column>`` for the incident, ``x<n>_<column>`` for extra row n."""
    statement = _POSTGRES.get(shape)
    if statement is not None:
        return statement
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    columns, extras = shape
    new = (pg_insert(incidents)
           .values({name: sa.bindparam(f"inc_{name}", type_=incidents.c[name].type)
                    for name in columns})
           .on_conflict_do_nothing(index_elements=[incidents.c.event_id])
           .returning(incidents.c.id)
           .cte("new_incident"))
    statement = sa.select(new.c.id)
    for n, (table, names) in enumerate(extras):
        values = sa.select(*[sa.bindparam(f"x{n}_{name}", type_=table.c[name].type)
                             for name in names]).select_from(new)
        statement = statement.add_cte(
            table.insert().from_select(list(names), values).cte(f"extra_{n}"))
    with _LOCK:
        _POSTGRES.setdefault(shape, statement)
    return _POSTGRES[shape]


_LOCK = threading.Lock()
#: PostgreSQL statements by shape
_POSTGRES: dict[_Shape, sa.Select[Any]] = {}
#: SQLite statements: the incident's insert-or-ignore, each extra table's INSERT
_SQLITE: dict[tuple[str, sa.Table], Any] = {}
