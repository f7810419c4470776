"""The delivery centre's bulk import: all rows or none, a per-row report, idempotent on VIN.

In-process through :func:`gateway.owners.bulk_import.import_file` on SQLite and (when
GATEWAY_TEST_POSTGRES_URL is set) PostgreSQL; the command itself
(``python -m gateway vehicles import``) as a subprocess for exit codes and output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from gateway.owners import (
    PinHasher,
    VehicleConflictError,
    VehicleRecord,
    Vehicles,
    audit,
    lookup_code_valid,
    vehicles,
)
from gateway.owners.bulk_import import RowError, import_file
from gateway.store import Store
from tests.conftest import Clock

REPO = Path(__file__).resolve().parents[2]
PIN = "73810592"  # distinctive: searched for in the output and the database bytes
HEADER = ("vin,car_msisdn,market,purchase_date,serviced_regularly,owner_name,owner_phones,"
          "language,pin\n")
ROWS = [
    ("YV1ZW72U5N1000011,+46701000011,SE,2024-05-02,yes,Anna Lind,"
     f"+46701009011;070-100 90 12,sv-SE,{PIN}\n"),
    'WDD2050421F100012,015112340012,de,2023-01-15,,"Müller, Jonas",+4915112349012,,\n',
    "SAJAA01E22HA10013,+447911100013,GB,2022-11-30,false,Ann Smith,+447911190013,en-GB,4711\n",
]
GOOD = HEADER + "".join(ROWS)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "postgres":
        yield request.getfixturevalue("pg_store")
        return
    store = Store.from_url(f"sqlite:///{tmp_path}/import.sqlite3")
    store.create_schema()
    yield store
    store.dispose()


@pytest.fixture
def registry(store: Store, clock: Clock) -> Vehicles:
    return Vehicles(store, PinHasher(n=2**8, r=8, p=1), clock=clock)


def write(tmp_path: Path, text: str, name: str = "delivery.csv", *,
          encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def count(store: Store, table: sa.Table) -> int:
    with store.engine.begin() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def errors_of(report_errors: list[RowError]) -> list[tuple[int, str]]:
    return [(e.line, e.field) for e in report_errors]


def test_a_good_file_creates_every_vehicle(tmp_path: Path, registry: Vehicles,
                                           store: Store) -> None:
    report = import_file(write(tmp_path, GOOD), registry=registry, actor="import:delivery.csv")
    assert report.errors == []
    assert [(line, r.vin, r.result) for line, r in report.results] == [
        (2, "YV1ZW72U5N1000011", "created"), (3, "WDD2050421F100012", "created"),
        (4, "SAJAA01E22HA10013", "created")]
    assert all(lookup_code_valid(r.customer_number) for _, r in report.results)
    first = registry.get("YV1ZW72U5N1000011")
    assert first is not None and first.serviced_regularly and first.language == "sv-SE"
    assert first.owner_phones == ("+46701009011", "+46701009012")
    assert first.customer_number == report.results[0][1].customer_number
    german = registry.get("WDD2050421F100012")
    assert german is not None and german.owner_name == "Müller, Jonas"
    assert (german.car_msisdn, german.market, german.has_pin) == ("+4915112340012", "DE", False)
    assert registry.verify_pin("YV1ZW72U5N1000011", PIN, actor="ivr:CA1").ok
    assert registry.verify_pin("SAJAA01E22HA10013", "4711", actor="ivr:CA2").ok
    assert [(a.action, a.actor) for a in registry.audit_for("SAJAA01E22HA10013")] == [
        ("enrol", "import:delivery.csv"), ("pin_set", "import:delivery.csv"), ("pin_ok", "ivr:CA2")]
    assert [v.vin for v in registry.by_owner_phone("+46701009012")] == ["YV1ZW72U5N1000011"]


def test_importing_the_same_file_again_changes_nothing(tmp_path: Path, registry: Vehicles,
                                                       store: Store) -> None:
    path = write(tmp_path, GOOD)
    first = import_file(path, registry=registry, actor="import:a")
    audited = count(store, audit)
    again = import_file(path, registry=registry, actor="import:a")
    assert [r.result for _, r in again.results] == ["unchanged"] * 3
    assert [r.customer_number for _, r in again.results] == [
        r.customer_number for _, r in first.results]
    assert count(store, audit) == audited and count(store, vehicles) == 3


def test_a_reimport_updates_changed_rows_and_never_overrides_a_pin(
    tmp_path: Path, registry: Vehicles
) -> None:
    import_file(write(tmp_path, GOOD), registry=registry, actor="import:a")
    registry.set_pin("YV1ZW72U5N1000011", "2468", actor="admin:owner-changed-it")
    changed = HEADER + "".join([
        ROWS[0].replace("Anna Lind", "Anna Berg"),   # name changed; its PIN is kept
        ROWS[1].replace(",,\n", ",de-DE,1357\n"),   # language, and a first PIN
        ROWS[2],
    ])
    report = import_file(write(tmp_path, changed, "second.csv"), registry=registry,
                         actor="import:second.csv")
    assert report.errors == []
    assert [(r.result, r.fields) for _, r in report.results] == [
        ("updated", ("owner_name",)), ("updated", ("language", "pin")), ("unchanged", ())]
    assert registry.verify_pin("YV1ZW72U5N1000011", "2468", actor="ivr:CA3").ok
    assert registry.verify_pin("WDD2050421F100012", "1357", actor="ivr:CA4").ok
    trail = [(a.action, a.detail) for a in registry.audit_for("YV1ZW72U5N1000011")]
    assert ("vehicle_changed", {"fields": ["owner_name"]}) in trail


def test_a_file_with_errors_writes_nothing_and_reports_each_row(
    tmp_path: Path, registry: Vehicles, store: Store
) -> None:
    bad = HEADER + "".join([
        ROWS[0],                                                            # line 2: fine
        "YV1ZW72U5N1000022,+46701000022,XX,2024-13-02,maybe,,12,Swedish,12a4\n",   # line 3
        ROWS[0].replace("+46701000011", "+46701000023"),                    # 4: VIN again
        "YV1ZW72U5N1000024,+46701000011,SE,2024-05-02,no,Per,+46701009024,,\n",  # 5: SIM again
        "short,row\n",                                                      # line 6
        "\n",                                                               # blank: skipped
        ROWS[2].replace("4711", "１２３４"),                                 # line 8
    ])
    report = import_file(write(tmp_path, bad), registry=registry, actor="import:bad")
    assert report.results == []
    assert errors_of(report.errors) == [
        (3, "market"), (3, "purchase_date"), (3, "serviced_regularly"), (3, "owner_name"),
        (3, "owner_phones[0]"), (3, "language"), (3, "pin"),
        (4, "vin"), (5, "car_msisdn"), (6, "row"), (8, "pin")]
    assert report.errors[7].reason == "the same as on line 2"
    assert report.errors[9].reason == "2 cells; the header has 9 columns"
    assert all(PIN not in e.reason and "1234" not in e.reason and "12a4" not in e.reason
               for e in report.errors)
    assert count(store, vehicles) == 0 and count(store, audit) == 0


def test_one_bad_last_row_of_many_writes_nothing(tmp_path: Path, registry: Vehicles,
                                                 store: Store) -> None:
    many = [f"YV1ZW72U5N20{i:05d},+467020{i:05d},SE,2024-01-01,,Owner {i},+467030{i:05d},,\n"
            for i in range(60)]
    text = HEADER + "".join(many) + "YV1ZW72U5N2999999,+46702099999,SE,2024-01-01,,X,nope,,\n"
    report = import_file(write(tmp_path, text), registry=registry, actor="import:x")
    assert errors_of(report.errors) == [(62, "owner_phones[0]")]
    assert count(store, vehicles) == 0
    ok = import_file(write(tmp_path, HEADER + "".join(many), "ok.csv"), registry=registry,
                     actor="import:ok")
    assert ok.errors == [] and ok.count("created") == 60


def test_a_sim_registered_outside_the_file_is_refused(tmp_path: Path, registry: Vehicles,
                                                      store: Store) -> None:
    import_file(write(tmp_path, HEADER + ROWS[0]), registry=registry, actor="import:a")
    clash = ROWS[2].replace("+447911100013", "+46701000011")
    report = import_file(write(tmp_path, HEADER + ROWS[1] + clash, "b.csv"),
                         registry=registry, actor="import:b")
    assert [(e.line, e.field, e.reason) for e in report.errors] == [
        (3, "car_msisdn", "already registered to vehicle YV1ZW72U5N1000011")]
    assert count(store, vehicles) == 1


def test_the_transaction_rolls_back_every_row_on_a_late_conflict(registry: Vehicles,
                                                                 store: Store) -> None:
    """A SIM taken by a concurrent writer between the check and the write: nothing stays."""
    import datetime as dt

    registry.register(vin="YV1ZW72U5N1000099", owner_name="Other", market="SE",
                      purchase_date=dt.date(2024, 1, 1), actor="test",
                      car_msisdn="+46701000098")
    rows = [
        (VehicleRecord("YV1ZW72U5N1000031", "+46701000031", "SE", dt.date(2024, 1, 1), False,
                       "A", ("+46701009031",), None), registry.hasher.hash("4711")),
        (VehicleRecord("YV1ZW72U5N1000032", "+46701000098", "SE", dt.date(2024, 1, 1), False,
                       "B", ("+46701009032",), None), None),
    ]
    with pytest.raises(VehicleConflictError):
        registry.import_records(rows, actor="import:race")
    assert registry.get("YV1ZW72U5N1000031") is None
    assert count(store, vehicles) == 1 and count(store, audit) == 1


@pytest.mark.parametrize(("text", "expected"), [
    ("", [(1, "header")]),
    (HEADER, [(1, "file")]),
    (HEADER.replace("owner_name", "owner") + ROWS[0], [(1, "owner"), (1, "owner_name")]),
    (HEADER.replace(",pin", ",vin") + ROWS[0], [(1, "vin")]),
    ("vin,market\nYV1ZW72U5N1000011,SE\n", [(1, "car_msisdn"), (1, "purchase_date"),
                                            (1, "owner_name"), (1, "owner_phones")]),
])
def test_header_problems_are_reported_on_line_one(tmp_path: Path, registry: Vehicles,
                                                  text: str,
                                                  expected: list[tuple[int, str]]) -> None:
    report = import_file(write(tmp_path, text), registry=registry, actor="import:x")
    assert errors_of(report.errors) == expected


def test_columns_in_any_order_with_bom_crlf_and_the_owner_phone_alias(
    tmp_path: Path, registry: Vehicles
) -> None:
    text = ("\ufeff Owner_Name ,VIN,Owner_Phone,market,car_msisdn,purchase_date\r\n"
            "Anna Lind,YV1ZW72U5N1000011,+46701009011,SE,+46701000011,2024-05-02\r\n")
    report = import_file(write(tmp_path, text), registry=registry, actor="import:x")
    assert report.errors == [] and report.count("created") == 1
    vehicle = registry.get("YV1ZW72U5N1000011")
    assert vehicle is not None and vehicle.owner_phones == ("+46701009011",)
    assert (vehicle.serviced_regularly, vehicle.language, vehicle.has_pin) == (False, None, False)


def test_a_file_that_is_not_utf8_names_its_line(tmp_path: Path, registry: Vehicles) -> None:
    text = HEADER + ROWS[0] + ROWS[1]
    report = import_file(write(tmp_path, text, encoding="latin-1"), registry=registry,
                         actor="import:x")
    assert [(e.line, e.field) for e in report.errors] == [(3, "file")]
    assert "UTF-8" in report.errors[0].reason


def test_a_dry_run_says_what_would_happen_and_writes_nothing(
    tmp_path: Path, registry: Vehicles, store: Store
) -> None:
    import_file(write(tmp_path, HEADER + ROWS[0]), registry=registry, actor="import:a")
    audited = count(store, audit)
    text = HEADER + ROWS[0].replace("Anna Lind", "Anna Berg") + ROWS[1]
    report = import_file(write(tmp_path, text, "b.csv"), registry=registry,
                         actor="import:b", dry_run=True)
    assert report.dry_run
    assert [(r.result, r.fields) for _, r in report.results] == [
        ("updated", ("owner_name",)), ("created", ())]
    assert count(store, vehicles) == 1 and count(store, audit) == audited


# -- the command, as the delivery centre runs it -------------------------------------------


def gateway(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update({"PYTHONPATH": str(REPO), "GATEWAY_PIN_SCRYPT_N": "256",
                "GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path}/cli.sqlite3"})
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          text=True, timeout=60, env=env, cwd=tmp_path, check=False)


def test_the_command_reports_rows_and_a_summary(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    first = gateway(tmp_path, "vehicles", "import", str(path))
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0].startswith("delivery.csv:2: YV1ZW72U5N1000011 created, customer number ")
    assert lines[-1] == "delivery.csv: imported: 3 created, 0 updated, 0 unchanged"
    again = gateway(tmp_path, "vehicles", "import", str(path))
    assert again.returncode == 0
    assert again.stdout.splitlines()[-1] == (
        "delivery.csv: imported: 0 created, 0 updated, 3 unchanged")
    for result in (first, again):
        assert PIN not in result.stdout + result.stderr


def test_the_command_exits_1_with_the_errors_and_writes_nothing(tmp_path: Path) -> None:
    bad = HEADER + ROWS[0] + ROWS[1].replace("2023-01-15", "15.01.2023")
    result = gateway(tmp_path, "vehicles", "import", str(write(tmp_path, bad)))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines()[-2:] == [
        "delivery.csv:3: purchase_date: must be a date as YYYY-MM-DD",
        "delivery.csv: 1 error(s) in 1 row(s); nothing was imported"]
    store = Store.from_url(f"sqlite:///{tmp_path}/cli.sqlite3")
    try:
        assert count(store, vehicles) == 0
    finally:
        store.dispose()
    assert PIN.encode() not in b"".join(p.read_bytes() for p in tmp_path.glob("cli.sqlite3*"))
    missing = gateway(tmp_path, "vehicles", "import", str(tmp_path / "nothere.csv"))
    assert missing.returncode == 1 and "cannot read the file" in missing.stderr
