"""The command line, run as a user would: ``python -m gateway ...``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GB_DE_CALLER_IDS = {"GATEWAY_EMERGENCY_CALLER_IDS": "+442079460555,+4930901820"}


def gateway(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    full_env["PYTHONPATH"] = str(REPO)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "gateway", *args], input=stdin, check=False,
                          capture_output=True, text=True, timeout=60, env=full_env, cwd=cwd)


def test_locate_prints_one_json_object(tmp_path: Path) -> None:
    result = gateway("locate", "55.5850", "12.7700", cwd=tmp_path)  # Øresund bridge, Danish half
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["country"] == "DK"
    # Twilio places no emergency calls in Denmark and the plan has no PSAP number there:
    # the gateway hands the call back and the car dials 112 itself
    assert found["emergency_number"] == "112" and found["fallback_dial"] is None
    assert found["completable"] is False and "DK" in found["why"]
    assert found["reason"] == "location" and "osm" in found["boundary_source"].lower()


def test_locate_dials_where_a_caller_id_is_configured(tmp_path: Path) -> None:
    result = gateway("locate", "51.5007", "-0.1246", env=GB_DE_CALLER_IDS, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert (found["country"], found["fallback_dial"], found["completable"]) == ("GB", "999", True)


def test_locate_csv_reads_stdin_and_leaves_the_sea_empty(tmp_path: Path) -> None:
    lines = "lat,lon\n51.1000,1.3600\n50.9900,1.8000\n50.3600,0.5700\n-33.8688,151.2093\n"
    result = gateway("locate", "--csv", stdin=lines, env=GB_DE_CALLER_IDS, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # fallback_dial is empty where the gateway hands the call back to the car
    assert result.stdout.splitlines() == [
        "51.1000,1.3600,GB,999,999",  # a GB caller ID is configured: Twilio dials 999
        "50.9900,1.8000,FR,112,",  # Twilio could, but no FR caller ID is configured
        "50.3600,0.5700,,112,",  # at sea: no country, no route
        "-33.8688,151.2093,AU,000,",
    ]


def test_locate_csv_reports_bad_lines_and_goes_on(tmp_path: Path) -> None:
    result = gateway("locate", "--csv", stdin="91,0\nabc\n55.6761,12.5683\n", cwd=tmp_path)
    assert result.returncode == 1
    assert "line 1" in result.stderr and "line 2" in result.stderr
    assert result.stdout.strip() == "55.6761,12.5683,DK,112,"


@pytest.mark.parametrize("args", [("locate", "91", "0"), ("locate", "x", "0")])
def test_locate_rejects_bad_coordinates(args: tuple[str, ...], tmp_path: Path) -> None:
    result = gateway(*args, cwd=tmp_path)
    assert result.returncode == 2 and "latitude" in result.stderr


def test_serve_without_auth_token_fails_clearly(tmp_path: Path) -> None:
    result = gateway("serve", "--port", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert "GATEWAY_TWILIO_AUTH_TOKEN" in result.stderr


def test_invalid_setting_names_the_variable(tmp_path: Path) -> None:
    # --port 0: the listen check comes first, and 8080 may be taken on a shared machine
    result = gateway("serve", "--port", "0", env={"GATEWAY_TWILIO_AUTH_TOKEN": "x" * 20,
                                                  "GATEWAY_RING_TIMEOUT_S": "soon"},
                     cwd=tmp_path)
    assert result.returncode == 2
    assert "GATEWAY_RING_TIMEOUT_S" in result.stderr and "whole number" in result.stderr


# -- check -----------------------------------------------------------------------------


def check_json(env: dict[str, str] | None,
               tmp_path: Path) -> tuple[int, dict[str, dict[str, object]], str]:
    """``check --json``: exit status, the rows by country, stderr."""
    result = gateway("check", "--json", env=env, cwd=tmp_path)
    rows = json.loads(result.stdout) if result.stdout else []
    return result.returncode, {row["country"]: row for row in rows}, result.stderr


def test_check_without_caller_ids_flags_every_country_as_hand_back(tmp_path: Path) -> None:
    # the shipped plan has no PSAP numbers (we do not invent them): without a caller ID
    # no country's emergency call can be completed by the gateway
    status, rows, stderr = check_json(None, tmp_path)
    assert status == 0, stderr
    assert len(rows) == 252
    assert [c for c, row in rows.items() if row["completable"]] == []
    assert all(row["fallback"] == {"kind": "hand_back"} for row in rows.values())
    assert rows["DK"]["why"] == "Twilio places no emergency calls in DK"
    assert rows["GB"]["why"] == "no emergency caller ID of GB configured"
    assert set(rows["JP"]) == {"country", "emergency_number", "fallback", "completable", "why"}
    assert rows["JP"]["emergency_number"] == "119"


def test_check_with_caller_ids_completes_only_those_countries(tmp_path: Path) -> None:
    status, rows, stderr = check_json(GB_DE_CALLER_IDS, tmp_path)
    assert status == 0, stderr
    assert sorted(c for c, row in rows.items() if row["completable"]) == ["DE", "GB"]
    assert rows["GB"]["fallback"] == {"kind": "dial", "number": "999",
                                      "caller_id": "+442079460555"}
    assert rows["DE"]["fallback"] == {"kind": "dial", "number": "112",
                                      "caller_id": "+4930901820"}
    assert rows["DK"]["completable"] is False and rows["DK"]["fallback"] == {"kind": "hand_back"}
    # Twilio routes GB calls by the caller ID's registered address: the operator is told
    assert "register" in stderr and "+442079460555" in stderr


def test_check_with_a_psap_number_dials_it_first(tmp_path: Path) -> None:
    plan = tmp_path / "plan"
    shutil.copytree(REPO / "numbers", plan)
    countries = plan / "countries.csv"
    countries.write_text(countries.read_text(encoding="utf-8").replace(
        "DK,Denmark,112,,,", "DK,Denmark,112,+4570102030,+4570102031,", 1), encoding="utf-8")
    status, rows, stderr = check_json({"GATEWAY_NUMBER_PLAN": str(plan)}, tmp_path)
    assert status == 0, stderr
    assert rows["DK"]["completable"] is True
    assert rows["DK"]["fallback"] == {"kind": "dial", "number": "+4570102030",
                                      "caller_id": "+4570102031"}


def test_check_prints_a_table_and_a_summary(tmp_path: Path) -> None:
    result = gateway("check", env=GB_DE_CALLER_IDS, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["country", "emergency", "fallback", "completable"]
    assert len(lines) == 1 + 252 + 1
    gb = next(line for line in lines if line.startswith("GB "))
    assert "dial 999 from +442079460555" in gb and " yes " in gb
    assert lines[-1].startswith("252 countries, 250 only hand back to the car")


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        # Twilio places no emergency calls in Denmark: the caller ID can never be used
        ({"GATEWAY_EMERGENCY_CALLER_IDS": "+442079460555,+4532123456"},
         "+4532123456 is a caller ID of DK, where Twilio places no emergency calls"),
        ({"GATEWAY_EMERGENCY_CALLER_ID": "+442079460555"}, "GATEWAY_EMERGENCY_CALLER_IDS"),
        ({"GATEWAY_NUMBER_PLAN": "/nonexistent/plan"}, "number plan directory not found"),
    ],
    ids=["caller-id-without-twilio-emergency", "old-variable", "no-plan"],
)
def test_check_exits_1_for_an_invalid_configuration(env: dict[str, str], reason: str,
                                                    tmp_path: Path) -> None:
    result = gateway("check", "--json", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert reason in result.stderr


def test_check_refuses_a_plan_without_an_emergency_number(tmp_path: Path) -> None:
    plan = tmp_path / "plan"
    shutil.copytree(REPO / "numbers", plan)
    inbound = plan / "inbound.csv"
    kept = [line for line in inbound.read_text(encoding="utf-8").splitlines()
            if ",emergency," not in line]
    inbound.write_text("\n".join(kept) + "\n", encoding="utf-8")
    result = gateway("check", env={"GATEWAY_NUMBER_PLAN": str(plan)}, cwd=tmp_path)
    assert result.returncode == 1
    assert "inbound.csv lists no emergency number" in result.stderr


# -- db --------------------------------------------------------------------------------


def test_db_upgrade_and_current_on_a_new_sqlite_database(tmp_path: Path) -> None:
    from gateway.migrations import head

    env = {"GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path}/gateway.sqlite3"}
    before = gateway("db", "current", env=env, cwd=tmp_path)
    assert before.returncode == 0, before.stderr
    assert before.stdout.startswith("none: an empty database")
    upgraded = gateway("db", "upgrade", env=env, cwd=tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout.strip() == (f"database schema upgraded from an empty database to "
                                       f"{head()} (applied 0001, 0002, 0003)")
    assert gateway("db", "current", env=env, cwd=tmp_path).stdout.strip() == f"{head()} (head)"
    again = gateway("init-db", env=env, cwd=tmp_path)  # the old name: the same upgrade
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"database schema at {head()} (head), nothing to apply"


def test_db_upgrade_refuses_tables_of_no_revision(tmp_path: Path) -> None:
    import sqlalchemy as sa

    database = tmp_path / "gateway.sqlite3"
    engine = sa.create_engine(f"sqlite:///{database}")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE incidents (id VARCHAR(36) PRIMARY KEY)"))
    engine.dispose()
    env = {"GATEWAY_DATABASE_URL": f"sqlite:///{database}"}
    current = gateway("db", "current", env=env, cwd=tmp_path)
    assert current.returncode == 1 and "match no revision" in current.stdout
    result = gateway("db", "upgrade", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: the database has the gateway's tables but no "
                                    "migration history")
    assert "Traceback" not in result.stderr


def test_db_upgrade_names_a_database_it_cannot_reach(tmp_path: Path) -> None:
    result = gateway("db", "upgrade", env={
        "GATEWAY_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/nothing"}, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: database migration failed, nothing was changed")
    assert "Traceback" not in result.stderr


def test_version(tmp_path: Path) -> None:
    from gateway import __version__

    result = gateway("--version", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, f"assist-gateway {__version__}\n")
