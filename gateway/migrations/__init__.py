"""Database migrations (Alembic): the schema's history, applied under a database lock.

``python -m gateway db upgrade`` brings the database to the newest revision; ``serve``
(through :func:`gateway.app.create_app`) and ``worker`` run the same upgrade at start
(:meth:`gateway.store.Store.create_schema`), so an operator never has to.  ``db current``
tells where a database stands.

Revisions (``versions/``):

* ``0001``: the schema as released at dde7ea9, when every start ran ``create_all``
  (:mod:`gateway.migrations.schema_0001`).
* ``0002``: everything since: ``owner_phones``, ``pin_failure_times``,
  ``vehicle_commands``; ``incidents.msd``/``test_call`` with ``lat``/``lon`` nullable;
  the notification retry columns; rows written before them filled in.
* ``0003``: ``ix_vehicle_commands_vin`` (a car's settled commands, for the agent API).

Concurrent starts are safe: the whole upgrade (reading the version, recognising, every
revision, the new version) is one transaction that holds a lock first: on PostgreSQL
``pg_advisory_xact_lock`` (released at commit or when the connection drops), on SQLite
``BEGIN IMMEDIATE`` (the write lock).  The instance that waited finds the work done.
Both databases run DDL inside the transaction, so a failed upgrade leaves the database
as it was.

A database that has the gateway's tables but no ``alembic_version`` was made by
``create_all`` before migrations existed: it is compared with release 0001 (and with the
current schema), stamped with the revision it matches, then upgraded.  One that matches
neither is refused with the differences; nothing is changed.

A new schema change is a new revision: edit the table, then (from the repository root,
against a database at the newest revision)::

    GATEWAY_DATABASE_URL=sqlite:///dev.sqlite3 python -m gateway db upgrade
    GATEWAY_DATABASE_URL=sqlite:///dev.sqlite3 alembic -c gateway/migrations/alembic.ini \\
        revision --autogenerate --rev-id 0003 -m "what changed"

and review what it wrote (SQLite needs batch mode for ALTERs: it is on; a new NOT NULL
column needs a server default for the rows already there; fill in data the code
expects).  ``tests/integration/test_migrations.py`` fails while the tables in the code
and the migrations differ.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Before alembic is imported (it logs its plugins then): the gateway logs one line per
# upgrade (UpgradeResult.describe); alembic's INFO lines would only repeat it.
logging.getLogger("alembic").setLevel(logging.WARNING)

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from gateway.errors import StoreError

if TYPE_CHECKING:  # alembic is imported only when a revision is applied or compared
    from alembic.config import Config
    from alembic.migration import MigrationContext, MigrationInfo
    from alembic.script import ScriptDirectory

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
#: the revision of a database made by ``create_all`` at release dde7ea9
RELEASED = "0001"
#: the key of the PostgreSQL advisory lock that serialises upgrades ("gwmigrat")
LOCK_KEY = int.from_bytes(b"gwmigrat", "big")
#: how long an upgrade waits for another instance's, and may run, by default
DEFAULT_WAIT_S = 300.0


class MigrationError(StoreError):
    """The database cannot be brought to the current schema (nothing was changed)."""


@dataclass(frozen=True)
class UpgradeResult:
    """What :func:`upgrade` found and did."""

    #: the revision found (after recognising a database without history); None: empty
    before: str | None
    #: the revision now (the head)
    after: str
    #: revisions applied, oldest first (empty: the database was already current)
    applied: tuple[str, ...] = ()
    #: the revision stamped on a database made by create_all before migrations, if any
    stamped: str | None = None
    #: seconds spent waiting for another instance's upgrade
    waited_s: float = 0.0

    def describe(self) -> str:
        parts = []
        if self.stamped:
            parts.append(f"tables made before migrations recognised as {self.stamped}")
        if self.applied:
            parts.append(f"upgraded from {self.before or 'an empty database'} to "
                         f"{self.after} (applied {', '.join(self.applied)})")
        else:
            parts.append(f"at {self.after} (head), nothing to apply")
        return "database schema " + "; ".join(parts)


@dataclass(frozen=True)
class Status:
    """Where a database stands (:func:`status`), read without changing anything."""

    #: the revision in ``alembic_version``; None: none recorded
    current: str | None
    head: str
    #: no ``alembic_version`` but tables made before migrations: the revision they match
    #: (None when they match none: ``problems`` says why)
    recognised: str | None = None
    #: the database has none of the gateway's tables
    empty: bool = False
    problems: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        if self.current == self.head:
            return f"{self.current} (head)"
        if self.current is not None:
            return f"{self.current} (head is {self.head}: run `db upgrade`)"
        if self.empty:
            return f"none: an empty database (head is {self.head}: run `db upgrade`)"
        if self.recognised:
            return (f"none recorded; the tables match {self.recognised}, made before "
                    f"migrations (head is {self.head}: `db upgrade` stamps and upgrades it)")
        return ("none recorded, and the tables match no revision: "
                + "; ".join(self.problems))


# -- the scripts and the target ------------------------------------------------------


def config() -> Config:
    from alembic.config import Config

    cfg = Config(str(HERE / "alembic.ini"))
    cfg.set_main_option("script_location", str(HERE))
    return cfg


@cache
def script_directory() -> ScriptDirectory:
    """The revisions (read once per process)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(config())


def head() -> str:
    found = script_directory().get_current_head()
    if found is None:  # pragma: no cover - the package ships its revisions
        raise MigrationError("no migration scripts found")
    return found


_REVISION = re.compile(r"^revision\s*(?::[^=]*)?=\s*[\"']([^\"']+)[\"']", re.MULTILINE)
_DOWN = re.compile(r"^down_revision\s*(?::[^=]*)?=\s*(None|[\"']([^\"']+)[\"'])",
                   re.MULTILINE)


@cache
def head_from_files() -> str | None:
    """The head revision read from ``versions/*.py`` without importing alembic (a start
    at head never needs it); None when the files are not a plain chain this simple
    reading understands, and then :func:`head` (alembic) decides."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in sorted((HERE / "versions").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        revision, down = _REVISION.search(text), _DOWN.search(text)
        if revision is None or down is None:
            return None
        revisions.add(revision.group(1))
        if down.group(2):
            parents.add(down.group(2))
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 and parents <= revisions else None


def target_metadata() -> sa.MetaData:
    """The tables as the code defines them (every table module imported)."""
    from gateway.store import metadata, register_tables

    register_tables()
    return metadata


def known_tables() -> frozenset[str]:
    """Names of every table some revision has: the gateway's tables in a database."""
    return frozenset(target_metadata().tables) | _released_tables()


@cache
def _released_tables() -> frozenset[str]:
    from gateway.migrations.schema_0001 import released_metadata

    return frozenset(released_metadata().tables)


def differences(conn: Connection, metadata: sa.MetaData) -> list[Any]:
    """Alembic's comparison of the database with ``metadata`` (types, nullability,
    server defaults, indexes, unique constraints), over the gateway's tables only:
    other tables in the same database are not ours to judge."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    known = known_tables() | frozenset(metadata.tables)

    def include_name(name: str | None, type_: str, _parents: Any) -> bool:
        return type_ != "table" or name in known

    context = MigrationContext.configure(conn, opts={
        "compare_type": True, "compare_server_default": True, "include_name": include_name,
        "target_metadata": metadata})
    return list(compare_metadata(context, metadata))


def describe_difference(diff: Any) -> str:
    """One of :func:`differences` as a short phrase (``add_column incidents.msd``)."""
    if isinstance(diff, list):  # modify_* of one column
        return ", ".join(describe_difference(d) for d in diff)
    kind, *rest = diff
    if kind in ("add_table", "remove_table"):
        return f"{kind} {rest[0].name}"
    if kind in ("add_column", "remove_column"):
        return f"{kind} {rest[1]}.{rest[2].name}"
    if kind in ("add_index", "remove_index", "add_constraint", "remove_constraint"):
        obj = rest[0]
        return f"{kind} {obj.name or ''} on {obj.table.name}"
    if kind.startswith("modify_"):
        return f"{kind} {rest[1]}.{rest[2]}"
    return str(kind)


# -- the lock --------------------------------------------------------------------------


@contextmanager
def locked_transaction(engine: Engine, *, wait_s: float = DEFAULT_WAIT_S
                       ) -> Iterator[tuple[Connection, float]]:
    """A connection in a transaction that holds the migration lock, and the seconds
    waited for it; committed when the block ends, rolled back on an error.

    PostgreSQL: ``pg_try_advisory_xact_lock`` polled until ``wait_s`` (the lock ends
    with the transaction, or with the connection if the process dies); statements may
    take up to ``wait_s`` (the engine's 2 s statement timeout is for webhooks).
    SQLite: ``BEGIN IMMEDIATE``, retried while another writer holds the database."""
    started = time.monotonic()
    deadline = started + wait_s
    told = False

    def waiting() -> None:
        nonlocal told
        if time.monotonic() >= deadline:
            raise MigrationError(f"another instance held the migration lock for more than "
                                 f"{wait_s:.0f} s; nothing was changed")
        if not told:
            log.info("waiting for another instance's database migration")
            told = True

    with engine.connect() as conn:
        dialect = conn.dialect.name
        if dialect == "postgresql":
            conn.exec_driver_sql(f"SET LOCAL statement_timeout = {int(wait_s * 1000)}")
            take = sa.select(sa.func.pg_try_advisory_xact_lock(LOCK_KEY))
            while not conn.execute(take).scalar_one():
                waiting()
                time.sleep(0.1)
        elif dialect == "sqlite":
            while True:
                try:
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                    break
                except OperationalError as exc:  # busy_timeout ran out: still locked
                    conn.rollback()
                    if "locked" not in str(exc.orig):
                        raise
                    waiting()
        else:
            raise MigrationError(f"unsupported database {dialect!r}: use SQLite or PostgreSQL")
        waited = time.monotonic() - started
        try:
            yield conn, waited
        except BaseException:
            conn.rollback()
            raise
        conn.commit()


# -- upgrade ---------------------------------------------------------------------------


def upgrade(url: str, *, wait_s: float = DEFAULT_WAIT_S) -> UpgradeResult:
    """Bring the database at ``url`` to the newest revision (see the module docstring)."""
    from gateway.db import make_engine

    engine = make_engine(url)
    try:
        return upgrade_engine(engine, wait_s=wait_s)
    finally:
        engine.dispose()


def upgrade_engine(engine: Engine, *, wait_s: float = DEFAULT_WAIT_S,
                   to: str = "head") -> UpgradeResult:
    """:func:`upgrade` with an engine; raises :class:`MigrationError` (a StoreError).

    ``to``: a revision before the head (tests make databases of older revisions).

    A database already at the head with every table of the code (every start but the
    first after a release) is recognised by one read, without the lock and without
    importing alembic; anything else takes the locked path."""
    if to == "head":
        current = _at_head(engine)
        if current is not None:
            result = UpgradeResult(before=current, after=current)
            log.info("%s", result.describe())
            return result
    try:
        with locked_transaction(engine, wait_s=wait_s) as (conn, waited):
            result = _upgrade(conn, waited, to)
    except StoreError:
        raise
    except SQLAlchemyError as exc:
        raise MigrationError(f"database migration failed, nothing was changed: "
                             f"{_short(exc)}") from exc
    log.info("%s", result.describe())
    return result


def _at_head(engine: Engine) -> str | None:
    """The head revision if the database records it (one row) and has every table of
    the code, read without a lock (a revision is committed with its tables, so a
    database seen at the head stays there); None otherwise, or on any error (the
    locked path then decides and reports)."""
    expected = head_from_files()
    if expected is None:
        return None
    try:
        with engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
            if "alembic_version" not in tables or set(target_metadata().tables) - tables:
                return None
            found = [row[0] for row in
                     conn.execute(sa.text("SELECT version_num FROM alembic_version"))]
    except SQLAlchemyError:
        return None
    return expected if found == [expected] else None


def _upgrade(conn: Connection, waited: float, to: str) -> UpgradeResult:
    from alembic.migration import MigrationContext

    script = script_directory()
    target = head() if to == "head" else to
    context = MigrationContext.configure(conn)
    current = context.get_current_revision()
    present = set(sa.inspect(conn).get_table_names()) & known_tables()
    stamped = None
    if current is None and present:
        stamped = _recognise(conn)
        context.stamp(script, stamped)
        current = stamped
    elif current is not None and not present:
        # the version row outlived every table (metadata.drop_all): an empty database
        log.info("alembic_version says %s but none of the gateway's tables exist: "
                 "migrating from an empty database", current)
        conn.execute(sa.text("DELETE FROM alembic_version"))
        current = None
    if current is not None and current not in {r.revision for r in script.walk_revisions()}:
        raise MigrationError(f"the database is at revision {current}, which this release "
                             f"does not know (upgraded by a newer release?); head here is "
                             f"{target}")
    applied: list[str] = []
    if current != target:
        _run(conn, script, target, applied)
    missing = set(target_metadata().tables) - set(sa.inspect(conn).get_table_names())
    if target == head() and missing:  # a table added to the code without a revision
        raise MigrationError(f"no revision creates the table(s) {', '.join(sorted(missing))} "
                             f"of the code: write one (see gateway.migrations); nothing "
                             f"was changed")
    return UpgradeResult(before=current, after=target, applied=tuple(applied),
                         stamped=stamped, waited_s=waited)


def _recognise(conn: Connection) -> str:
    """The revision a database without history matches, else MigrationError."""
    from gateway.migrations.schema_0001 import released_metadata

    problems = []
    for revision, metadata in ((head(), target_metadata()), (RELEASED, released_metadata())):
        found = differences(conn, metadata)
        if not found:
            return revision
        problems.append(f"differs from {revision}: "
                        + "; ".join(describe_difference(d) for d in found[:5])
                        + (f" and {len(found) - 5} more" if len(found) > 5 else ""))
    raise MigrationError("the database has the gateway's tables but no migration history "
                         "(alembic_version), and they match no revision, so nothing was "
                         "changed (" + " / ".join(reversed(problems)) + ")")


def _run(conn: Connection, script: ScriptDirectory, target: str, applied: list[str]) -> None:
    from alembic.runtime.environment import EnvironmentContext

    def upgrade_fn(revision: Any, _context: Any) -> Any:
        return script._upgrade_revs(target, revision)

    def on_apply(ctx: MigrationContext, step: MigrationInfo, heads: Collection[Any],
                 run_args: Mapping[str, Any]) -> None:
        applied.append(str(step.up_revision_id))

    with EnvironmentContext(config(), script, fn=upgrade_fn, destination_rev=target) as env:
        env.configure(connection=conn, target_metadata=target_metadata(),
                      render_as_batch=True, on_version_apply=on_apply)
        with env.begin_transaction():  # the caller's transaction: nothing of its own
            env.run_migrations()


def status(url: str) -> Status:
    """Where the database at ``url`` stands; changes nothing."""
    from gateway.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return status_of(conn)
    except SQLAlchemyError as exc:
        raise StoreError(f"database unavailable: {_short(exc)}") from exc
    finally:
        engine.dispose()


def status_of(conn: Connection) -> Status:
    from alembic.migration import MigrationContext

    current = MigrationContext.configure(conn).get_current_revision()
    present = set(sa.inspect(conn).get_table_names()) & known_tables()
    if current is not None or not present:
        return Status(current=current, head=head(), empty=not present)
    try:
        return Status(current=None, head=head(), recognised=_recognise(conn))
    except MigrationError as exc:
        return Status(current=None, head=head(), problems=(str(exc),))


def _short(exc: SQLAlchemyError) -> str:
    """The driver's message, first line, without SQLAlchemy's SQL and links."""
    message = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0] if message else ''}"


# -- the alembic command line (revision --autogenerate) ------------------------------


def run_env(context: Any) -> None:
    """``env.py``: for the ``alembic`` command; the gateway itself calls :func:`upgrade`.

    The database is ``GATEWAY_DATABASE_URL`` (the gateway's default SQLite file if
    unset), opened the way the gateway opens it."""
    from gateway.config import DEFAULT_SQLITE_FILE
    from gateway.db import make_engine

    url = os.environ.get("GATEWAY_DATABASE_URL", "").strip() or f"sqlite:///{DEFAULT_SQLITE_FILE}"
    options: dict[str, Any] = {"target_metadata": target_metadata(), "render_as_batch": True,
                               "compare_type": True, "compare_server_default": True}
    if context.is_offline_mode():
        context.configure(url=url.replace("postgres://", "postgresql://", 1),
                          literal_binds=True, **options)
        with context.begin_transaction():
            context.run_migrations()
        return
    given = context.config.attributes.get("connection")
    if given is not None:  # alembic.command called with a connection (tests)
        context.configure(connection=given, **options)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(url)
    try:
        with locked_transaction(engine) as (conn, _waited):
            context.configure(connection=conn, **options)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()
