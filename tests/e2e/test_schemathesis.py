"""schemathesis against a real gateway process: every operation of the vehicle, agent and
admin APIs (and the open ops routes) from /openapi.json, with each API's own token.

Checks: no 5xx (``not_a_server_error``), every answer valid for its documented schema
(``response_schema_conformance``) and every status documented
(``status_code_conformance``).  Bounded and repeatable: 30 examples per operation, a
fixed seed, one worker.  The Twilio webhooks are left out (tag ``twilio``): they need
Twilio's signature, which schemathesis cannot make.

A known incident (crash and SOS) and an enrolled car are created first, and offered for
the path parameters most of the time (the rest are generated, so 404s are tested too);
the vehicle command service is a local fake, as in a deployment where it is configured.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from gateway.schemas.openapi import OPERATIONS
from tests.support.events import crash_event
from tests.support.fake_servers import FakeVehicleService
from tests.support.server import GatewayProcess, running_gateway
from tests.support.twilio import VEHICLE_TOKEN

AGENT_TOKEN = "schemathesis-agent-0123456789abcdef"
ADMIN_TOKEN = "schemathesis-admin-0123456789abcdef"
VIN = "WBA3A5C51CF256001"
SEED = 20261125
MAX_EXAMPLES = 30
#: every operation but the Twilio webhooks
API_OPERATIONS = [op for op in OPERATIONS if op.tag != "twilio"]
CHECKS = "not_a_server_error,response_schema_conformance,status_code_conformance"


def _seed(gateway: GatewayProcess) -> tuple[list[str], str]:
    incidents = []
    for kind in ("crash", "sos"):
        answer = gateway.post_event(crash_event(event_id=f"seed-{kind}", type=kind))
        assert answer.status_code == 201, answer.text
        incidents.append(answer.json()["incident_id"])
    enrolled = requests.post(
        f"{gateway.base_url}/v1/admin/vehicles", timeout=10,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        json={"vin": VIN, "car_msisdn": "+46701000011", "market": "SE",
              "purchase_date": "2024-05-02", "owner_name": "Anna Lind",
              "owner_phones": ["+46701009011"]})
    assert enrolled.status_code == 201, enrolled.text
    return incidents, VIN


def _config(path: Path, incidents: list[str], vin: str) -> Path:
    """schemathesis.toml: each API's token, and the known ids for the path parameters."""
    ids = ", ".join(f'"{i}"' for i in incidents)
    path.write_text(f"""\
[dictionaries.incidents]
values = [{ids}]
[dictionaries.vins]
values = ["{vin}"]

[parameters]
"path.incident_id" = {{ dictionary = "incidents", probability = 0.7 }}
"path.vin" = {{ dictionary = "vins", probability = 0.7 }}

[[operations]]
include-tag = "vehicle"
headers = {{ Authorization = "Bearer {VEHICLE_TOKEN}" }}

[[operations]]
include-tag = "agent"
headers = {{ Authorization = "Bearer {AGENT_TOKEN}" }}

[[operations]]
include-tag = "admin"
headers = {{ Authorization = "Bearer {ADMIN_TOKEN}" }}
""", encoding="utf-8")
    return path


def schemathesis_command(config: Path, url: str) -> list[str]:
    return [sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()",
            "--config-file", str(config), "run", f"{url}/openapi.json",
            "--exclude-tag", "twilio", "--checks", CHECKS,
            "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--workers", "1",
            "--request-timeout", "10", "--no-color"]


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_answer_off_the_schema(
        tmp_path: Path) -> None:
    with FakeVehicleService() as commands, running_gateway(
            tmp_path,
            GATEWAY_AGENT_API_TOKENS=f"{AGENT_TOKEN}:supervisor",
            GATEWAY_ADMIN_API_TOKENS=ADMIN_TOKEN,
            GATEWAY_VEHICLE_COMMAND_URL=commands.url) as gateway:
        incidents, vin = _seed(gateway)
        config = _config(tmp_path / "schemathesis.toml", incidents, vin)
        run = subprocess.run(schemathesis_command(config, gateway.base_url), cwd=tmp_path,
                             capture_output=True, text=True, timeout=600, check=False)
        logs = gateway.logs()
    output = run.stdout + run.stderr
    print(output)  # the summary: operations, cases generated, failures
    assert run.returncode == 0, output[-6000:]
    selected = re.search(r"Selected: (\d+)/", output)
    tested = re.search(r"Tested: (\d+)", output)
    cases = re.search(r"(\d+) generated, (\d+) passed", output)
    assert selected is not None and tested is not None and cases is not None, output[-3000:]
    # every API operation (schemathesis may leave out the document's own URL)
    assert int(tested.group(1)) == int(selected.group(1)) >= len(API_OPERATIONS) - 1
    assert cases.group(1) == cases.group(2), output[-3000:]
    assert '"level": "error"' not in logs, logs[-3000:]
