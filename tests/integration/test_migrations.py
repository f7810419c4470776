"""Migrations (gateway.migrations) on SQLite and PostgreSQL.

An empty database and one at revision 0001 (made by the 0001 migration, or by
``create_all`` as release dde7ea9 did, with no history) are upgraded; rows written
before survive and are read the way the code reads them now; the result equals the
tables the code defines (Alembic's compare_metadata finds no difference), and upgrades
running at the same time apply each revision once.

PostgreSQL runs in a private database made and dropped here: other tests drop the
tables of the shared one.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command

from gateway import migrations
from gateway.db import make_engine
from gateway.migrations import MigrationError, differences, upgrade_engine
from gateway.migrations.schema_0001 import released_metadata
from gateway.store import Store, metadata, register_tables

register_tables()

NOW = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.UTC)
HEAD = migrations.head()


def private_postgres(name: str) -> Iterator[str]:
    """A database of its own on the test server (made, then dropped), as a URL."""
    base = os.environ.get("GATEWAY_TEST_POSTGRES_URL")
    if not base:
        if os.environ.get("CI"):
            pytest.fail("CI must provide PostgreSQL: set GATEWAY_TEST_POSTGRES_URL")
        pytest.skip("PostgreSQL not configured: set GATEWAY_TEST_POSTGRES_URL")
    admin_url = sa.engine.make_url(base.replace("postgresql://", "postgresql+psycopg://", 1))
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    database = f"{name}_{os.getpid()}"
    with admin.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        conn.execute(sa.text(f"CREATE DATABASE {database}"))
    try:
        yield admin_url.set(database=database).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        admin.dispose()


@pytest.fixture(scope="module")
def postgres_database() -> Iterator[str]:
    yield from private_postgres("test_migrations")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/gateway.sqlite3"
        return
    pg = request.getfixturevalue("postgres_database")
    engine = make_engine(pg)
    with engine.begin() as conn:  # empty it: tables and the version of the test before
        conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    engine.dispose()
    yield pg


@pytest.fixture
def engine(url: str) -> Iterator[sa.Engine]:
    engine = make_engine(url)
    yield engine
    engine.dispose()


def version(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars())


def no_differences(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return [migrations.describe_difference(d) for d in differences(conn, metadata)]


def table_names(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


# -- an empty database -------------------------------------------------------------------


def test_an_empty_database_gets_every_revision_and_equals_the_code(engine: sa.Engine) -> None:
    result = upgrade_engine(engine)
    assert (result.before, result.after, result.applied, result.stamped) == (
        None, HEAD, ("0001", "0002", "0003"), None)
    assert version(engine) == [HEAD]
    assert no_differences(engine) == []
    assert table_names(engine) == set(metadata.tables) | {"alembic_version"}
    again = upgrade_engine(engine)  # the next start
    assert (again.before, again.applied) == (HEAD, ())


def test_the_schema_of_the_code_has_a_revision(engine: sa.Engine) -> None:
    """Fails when a table or column was changed without a revision: write one (see the
    gateway.migrations docstring), then this passes."""
    upgrade_engine(engine)
    assert no_differences(engine) == [], (
        "the tables in the code differ from the migrations: add a revision "
        "(gateway/migrations/__init__.py says how)")


def test_the_store_upgrades_when_it_creates_the_schema(url: str) -> None:
    store = Store.from_url(url)
    try:
        store.create_schema()
        store.create_schema()
        assert version(store.engine) == [HEAD]
    finally:
        store.dispose()


def test_tables_dropped_behind_the_version_are_made_again(engine: sa.Engine) -> None:
    """``metadata.drop_all`` (tests do it) leaves alembic_version: the database is empty."""
    upgrade_engine(engine)
    metadata.drop_all(engine)
    result = upgrade_engine(engine)
    assert result.applied == ("0001", "0002", "0003")
    assert no_differences(engine) == []


# -- a database at the previous revision -------------------------------------------------


def write_release_rows(engine: sa.Engine) -> None:
    """Rows as release dde7ea9 wrote them (its columns only)."""
    old = released_metadata().tables
    with engine.begin() as conn:
        conn.execute(old["incidents"].insert(), [{
            "id": "inc-1", "event_id": "ev-1", "payload_sha256": "a" * 64, "type": "crash",
            "vin": "WBA3A5C51CF256001", "msisdn": "+4915112345001", "occurred_at": NOW,
            "received_at": NOW, "lat": 52.52, "lon": 13.40, "trusted": True,
            "crash": {"severity": "high"}, "route_reason": "location", "location_country": "DE",
            "emergency_number": "112", "fallback_dial": "112"}])
        conn.execute(old["call_steps"].insert(), [{
            "call_sid": "CA1", "step": "incoming", "incident_id": "inc-1", "created_at": NOW,
            "twiml": "<Response/>", "detail": {"k": 1}}])
        conn.execute(old["outbox"].insert(), [{
            "incident_id": "inc-1", "payload": {"id": "inc-1"}, "status": "pending",
            "created_at": NOW, "next_attempt_at": NOW}])
        vehicle = {"market": "SE", "purchase_date": dt.date(2024, 5, 1),
                   "serviced_regularly": True, "immobilised": False, "tracking": False,
                   "updated_at": NOW, "owner_name": "Ann"}
        conn.execute(old["vehicles"].insert(), [
            {**vehicle, "vin": "YV1ZW72U5N1234567", "car_msisdn": "+46701234567",
             "owner_phone": "+46709876543", "lookup_code": "100001", "pin_hash": "x"},
            {**vehicle, "vin": "YV1ZW72U5N7654321", "car_msisdn": "+46701234568",
             "owner_phone": None, "lookup_code": "100002", "pin_hash": None}])
        conn.execute(old["pin_failures"].insert(), [
            {"vin": "YV1ZW72U5N1234567", "failures": 2, "updated_at": NOW,
             "locked_until": None},
            {"vin": "YV1ZW72U5N7654321", "failures": 3, "updated_at": NOW,
             "locked_until": NOW + dt.timedelta(minutes=15)}])
        conn.execute(old["audit"].insert(), [{
            "at": NOW, "vin": "YV1ZW72U5N1234567", "actor": "import", "action": "created",
            "detail": {}}])
        notification = {"vin": "YV1ZW72U5N1234567", "body": "alarm", "created_at": NOW,
                        "attempts": 0, "alarm_event_id": "alarm-1", "sent_at": None}
        conn.execute(old["notifications"].insert(), [
            {**notification, "kind": "sms", "target": "+46709876543", "status": "pending",
             "due_at": NOW, "idempotency_key": "alarm-1:sms"},
            {**notification, "kind": "escalation", "target": "assistance-centre",
             "status": "pending", "due_at": NOW + dt.timedelta(minutes=10),
             "idempotency_key": "alarm-1:escalation"},
            {**notification, "kind": "push", "target": "vin:YV1ZW72U5N1234567",
             "status": "sent", "due_at": NOW, "sent_at": NOW,
             "idempotency_key": "alarm-1:push"}])


def as_utc(value: Any) -> Any:
    return value.replace(tzinfo=dt.UTC) if value is not None and value.tzinfo is None else value


def check_rows_after_upgrade(engine: sa.Engine) -> None:
    tables = metadata.tables
    with engine.connect() as conn:
        incident = conn.execute(sa.select(tables["incidents"])).mappings().one()
        assert (incident["id"], incident["lat"], incident["crash"], incident["status"]) == (
            "inc-1", 52.52, {"severity": "high"}, "open")
        assert incident["msd"] is None and incident["test_call"] is None
        step = conn.execute(sa.select(tables["call_steps"])).mappings().one()
        assert (step["twiml"], step["detail"]) == ("<Response/>", {"k": 1})
        assert conn.execute(sa.select(tables["outbox"].c.status)).scalar_one() == "pending"
        assert conn.execute(sa.select(sa.func.count()).select_from(tables["audit"])).scalar() == 1
        # the owner's number is also row 0 of owner_phones; a car without one has none
        phones = conn.execute(sa.select(tables["owner_phones"])).all()
        assert [tuple(p) for p in phones] == [("YV1ZW72U5N1234567", 0, "+46709876543")]
        # two failures of the unlocked PIN still count, from the last attempt; a lock stays
        times = conn.execute(sa.select(tables["pin_failure_times"].c.vin,
                                       tables["pin_failure_times"].c.at)).all()
        assert [(vin, as_utc(at)) for vin, at in times] == [("YV1ZW72U5N1234567", NOW)] * 2
        locked = conn.execute(sa.select(tables["pin_failures"].c.locked_until).where(
            tables["pin_failures"].c.vin == "YV1ZW72U5N7654321")).scalar_one()
        assert as_utc(locked) == NOW + dt.timedelta(minutes=15)
        # pending notifications get the deadline new ones get; nothing is in doubt
        n = tables["notifications"].c
        found = {kind: (status, as_utc(deadline), in_doubt) for kind, status, deadline, in_doubt
                 in conn.execute(sa.select(n.kind, n.status, n.deadline_at, n.in_doubt))}
        assert found == {
            "sms": ("pending", NOW + dt.timedelta(hours=24), False),
            "escalation": ("pending", NOW + dt.timedelta(minutes=10), False),
            "push": ("sent", None, False),
        }


def test_a_database_at_0001_is_upgraded_with_its_rows(engine: sa.Engine) -> None:
    first = upgrade_engine(engine, to="0001")
    assert first.applied == ("0001",) and version(engine) == ["0001"]
    write_release_rows(engine)
    result = upgrade_engine(engine)
    assert (result.before, result.applied, result.stamped) == ("0001", ("0002", "0003"), None)
    check_rows_after_upgrade(engine)
    assert no_differences(engine) == []


def test_a_database_made_by_create_all_at_the_release_is_recognised(engine: sa.Engine) -> None:
    """What every start of release dde7ea9 did: create_all, no alembic_version."""
    released_metadata().create_all(engine)
    write_release_rows(engine)
    result = upgrade_engine(engine)
    assert (result.before, result.stamped, result.applied) == ("0001", "0001", ("0002", "0003"))
    assert version(engine) == [HEAD]
    check_rows_after_upgrade(engine)
    assert no_differences(engine) == []


def test_a_database_made_by_create_all_of_this_code_is_stamped_current(
        engine: sa.Engine) -> None:
    metadata.create_all(engine)
    result = upgrade_engine(engine)
    assert (result.stamped, result.applied) == (HEAD, ())
    assert version(engine) == [HEAD]


def test_tables_matching_no_revision_are_refused_and_left_alone(engine: sa.Engine) -> None:
    released = released_metadata()
    released.tables["audit"].append_column(sa.Column("note", sa.Text))  # a local change
    released.create_all(engine)
    with pytest.raises(MigrationError, match="match no revision") as refused:
        upgrade_engine(engine)
    assert "audit.note" in str(refused.value)
    assert "alembic_version" not in table_names(engine)
    assert "owner_phones" not in table_names(engine)


def test_a_revision_from_a_newer_release_is_refused(engine: sa.Engine) -> None:
    upgrade_engine(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(MigrationError, match="9999"):
        upgrade_engine(engine)


def test_a_failing_revision_changes_nothing(engine: sa.Engine,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """DDL runs in the upgrade's transaction: a failure in 0002 leaves 0001 whole."""
    upgrade_engine(engine, to="0001")
    script = migrations.script_directory().get_revision("0002")
    assert script is not None and script.module is not None

    def broken() -> None:
        from alembic import op

        op.create_table("owner_phones", sa.Column("vin", sa.String(17)))
        raise RuntimeError("a bug in the revision")

    monkeypatch.setattr(script.module, "upgrade", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        upgrade_engine(engine)
    assert version(engine) == ["0001"]
    assert "owner_phones" not in table_names(engine)


def test_downgrade_to_0001_and_up_again(engine: sa.Engine) -> None:
    """The downgrade (alembic's command, through env.py) takes 0003 and 0002 away again."""
    upgrade_engine(engine)
    cfg = migrations.config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
    assert version(engine) == ["0001"]
    assert "vehicle_commands" not in table_names(engine)
    with engine.connect() as conn:
        assert differences(conn, released_metadata()) == []
    assert upgrade_engine(engine).applied == ("0002", "0003")
    assert no_differences(engine) == []


# -- concurrent upgrades -------------------------------------------------------------------


def run_together(count: int, work: Callable[[], Any]) -> list[Any]:
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = work()
        except Exception as exc:  # noqa: BLE001 -- reported below
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_upgrades_at_the_same_time_apply_each_revision_once(url: str) -> None:
    """Four instances (each its own engine and connection) start on an empty database."""
    engines = [make_engine(url) for _ in range(4)]
    try:
        calls = iter(engines)
        lock = threading.Lock()

        def start() -> migrations.UpgradeResult:
            with lock:
                engine = next(calls)
            return upgrade_engine(engine, wait_s=60)

        results = run_together(4, start)
        assert not [r for r in results if isinstance(r, BaseException)], results
        applied = [r.applied for r in results]
        assert sorted(applied) == [(), (), (), ("0001", "0002", "0003")]
        assert version(engines[0]) == [HEAD]
        assert no_differences(engines[0]) == []
    finally:
        for engine in engines:
            engine.dispose()


def test_status_tells_where_a_database_stands(url: str, engine: sa.Engine) -> None:
    assert migrations.status(url).empty
    released_metadata().create_all(engine)
    found = migrations.status(url)
    assert (found.current, found.recognised) == (None, "0001")
    assert "0001" in found.describe() and "db upgrade" in found.describe()
    upgrade_engine(engine)
    assert migrations.status(url).describe() == f"{HEAD} (head)"
