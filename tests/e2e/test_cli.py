"""The command line, run as a user would: ``python -m gateway ...``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def gateway(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    full_env["PYTHONPATH"] = str(REPO)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "gateway", *args], input=stdin,
                          capture_output=True, text=True, timeout=60, env=full_env, cwd=cwd)


def test_locate_prints_one_json_object(tmp_path: Path) -> None:
    result = gateway("locate", "55.5850", "12.7700", cwd=tmp_path)  # Øresund bridge, Danish half
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["country"] == "DK"
    assert found["emergency_number"] == "112" and found["fallback_dial"] == "112"
    assert found["reason"] == "location" and "osm" in found["boundary_source"].lower()


def test_locate_csv_reads_stdin_and_leaves_the_sea_empty(tmp_path: Path) -> None:
    lines = "lat,lon\n51.1000,1.3600\n50.9900,1.8000\n50.3600,0.5700\n-33.8688,151.2093\n"
    result = gateway("locate", "--csv", stdin=lines, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "51.1000,1.3600,GB,999,999",
        "50.9900,1.8000,FR,112,112",
        "50.3600,0.5700,,112,112",
        "-33.8688,151.2093,AU,000,000",
    ]


def test_locate_csv_reports_bad_lines_and_goes_on(tmp_path: Path) -> None:
    result = gateway("locate", "--csv", stdin="91,0\nabc\n55.6761,12.5683\n", cwd=tmp_path)
    assert result.returncode == 1
    assert "line 1" in result.stderr and "line 2" in result.stderr
    assert result.stdout.strip() == "55.6761,12.5683,DK,112,112"


@pytest.mark.parametrize("args", [("locate", "91", "0"), ("locate", "x", "0")])
def test_locate_rejects_bad_coordinates(args: tuple[str, ...], tmp_path: Path) -> None:
    result = gateway(*args, cwd=tmp_path)
    assert result.returncode == 2 and "latitude" in result.stderr


def test_serve_without_auth_token_fails_clearly(tmp_path: Path) -> None:
    result = gateway("serve", "--port", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert "GATEWAY_TWILIO_AUTH_TOKEN" in result.stderr


def test_invalid_setting_names_the_variable(tmp_path: Path) -> None:
    result = gateway("serve", env={"GATEWAY_TWILIO_AUTH_TOKEN": "x" * 20,
                                   "GATEWAY_RING_TIMEOUT_S": "soon"}, cwd=tmp_path)
    assert result.returncode == 2
    assert "GATEWAY_RING_TIMEOUT_S" in result.stderr and "whole number" in result.stderr
