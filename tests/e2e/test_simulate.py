"""``python -m gateway simulate``, run as a user would: real processes, real HTTP.

Without ``--url`` the simulator starts its own demo gateway (``python -m gateway serve``)
from a clean state; with ``--url`` it plays against a gateway started here, with the
tokens of the gateway's own variables.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.server import GatewayProcess, running_gateway
from tests.support.twilio import AUTH_TOKEN, VEHICLE_TOKEN

REPO = Path(__file__).resolve().parents[2]
AGENT_TOKEN = "agent-simulate-token-0123456789ab"
ADMIN_TOKEN = "admin-simulate-token-0123456789ab"
CALLER_IDS = "+442079460555,+4930901820"
OWNER_PHONE = "+442079460777"
COPENHAGEN = ("--lat", "55.6761", "--lon", "12.5683")
#: every emergency number of the demo plan's countries the simulator could print
EMERGENCY_LINE = re.compile(r"dialled: \S+ \(emergency number\)")


def simulate(*args: str, env: dict[str, str] | None = None, cwd: Path,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    full_env["PYTHONPATH"] = str(REPO)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "gateway", "simulate", *args], check=False,
                          capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=cwd)


def lines_of(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The printed lines, a wrapped line joined again, spaces collapsed."""
    assert result.returncode == 0, result.stdout + result.stderr
    lines: list[str] = []
    for line in result.stdout.splitlines():
        if line.startswith(" " * 13) and lines:  # the continuation of a wrapped line
            lines[-1] += " " + line.strip()
        else:
            lines.append(line)
    return [" ".join(line.split()) for line in lines]


def test_crash_with_no_centre_answering_from_a_clean_state(tmp_path: Path) -> None:
    """The README's first example: every centre line rings out, the emergency leg of the
    country where the car is (London: 999 from the GB caller ID) takes the call."""
    result = simulate("crash", "--centre", "noanswer", cwd=tmp_path)
    out = lines_of(result)
    text = result.stdout
    demo = re.search(r"demo gateway: (http://127\.0\.0\.1:\d+)", text)
    assert demo is not None, text
    # the car's data message and the number it is told to call
    assert any(line.startswith("[1] car -> POST /v1/events type=crash") for line in out)
    assert any(line.startswith("answer: call +442079460900 now; if no agent has taken the "
                               "call after") and line.endswith("s the car dials 999 itself")
               for line in out)
    assert "[2] car calls +442079460900 (the emergency number)" in out
    # every centre line, in the plan's order, each with its ring timeout and the reason
    dialled = [line for line in out if line.startswith("dialled:")]
    assert dialled[0].startswith("dialled: +442079460100 (centre eu-primary), ring 15 s")
    assert dialled[1].startswith("dialled: +441614960100 (centre eu-backup), ring 15 s")
    assert dialled[2].startswith("dialled: +61255500100 (centre global), ring 15 s")
    assert "why: centre leg 1: no-answer; centre leg 2: eu-backup, ring 15s" in out
    # then the emergency leg: what was said, what was dialled from which caller ID, and why
    assert ('said: "We could not reach the assistance centre. Connecting you to the '
            'emergency services now."') in out
    assert "dialled: 999 (emergency number), ring 30 s, caller ID +442079460555" in out
    assert any(line.startswith("why: centre leg 3: no-answer; emergency leg 1/2 of GB: 999 "
                               "through Twilio from +442079460555") for line in out)
    assert "end: the emergency services took the call" in out
    assert "as expected for simulate crash --centre noanswer --emergency answer" in out
    assert result.stderr == ""
    # the demo gateway was stopped
    with pytest.raises(requests.ConnectionError):
        requests.get(demo.group(1) + "/readyz", timeout=2)


def test_on_call_rings_the_roadside_line_from_a_clean_state(tmp_path: Path) -> None:
    """The README's second example: ON CALL reaches a roadside line, never 112/999."""
    result = simulate("oncall", cwd=tmp_path)
    out = lines_of(result)
    assert any(line.startswith("[1] car -> POST /v1/events type=on_call") for line in out)
    assert "[2] car calls +442079460901 (the roadside number)" in out
    assert any(line.startswith("dialled: +442079460101 (centre eu-primary, roadside line), "
                               "ring 15 s") for line in out)
    assert 'agent: hears "Roadside assistance call. 2 aboard. In United Kingdom."' in out
    assert "agent: presses 1" in out
    assert any(line.startswith("why: roadside call; route country GB (on_call incident, "
                               "location); roadside leg 1: eu-primary") for line in out)
    assert "end: the agent took the call; the gateway hangs up when it ends" in out
    assert not any(EMERGENCY_LINE.search(line) for line in out)
    assert "emergency numbers dialled: none" in out


# -- against a running gateway (--url) ---------------------------------------------------


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with running_gateway(tmp_path_factory.mktemp("simulate"),
                         GATEWAY_EMERGENCY_CALLER_IDS=CALLER_IDS,
                         GATEWAY_AGENT_API_TOKENS=f"{AGENT_TOKEN}:read",
                         GATEWAY_ADMIN_API_TOKENS=ADMIN_TOKEN) as gw:
        yield gw


def url_env(gw: GatewayProcess, **extra: str) -> dict[str, str]:
    env = {"GATEWAY_TWILIO_AUTH_TOKEN": AUTH_TOKEN, "GATEWAY_VEHICLE_API_TOKENS": VEHICLE_TOKEN,
           "GATEWAY_AGENT_API_TOKENS": f"{AGENT_TOKEN}:read", "GATEWAY_PUBLIC_URL": gw.base_url}
    env.update(extra)
    return env


def test_on_call_nobody_answers_ends_in_a_callback_never_an_emergency_number(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    result = simulate("oncall", "--centre", "noanswer", "--msisdn", "+442079460124",
                      "--url", gateway.base_url, env=url_env(gateway), cwd=tmp_path)
    out = lines_of(result)
    dialled = [line for line in out if line.startswith("dialled:")]
    assert [d.split()[1] for d in dialled] == ["+442079460101", "+441614960101", "+61255500101"]
    assert all("roadside line" in d for d in dialled)
    assert any("call you back" in line for line in out)
    assert "end: no line took the call: a callback is recorded; the call ends" in out
    assert any(line.startswith("why: centre leg 3: no-answer") for line in out)
    assert not any(EMERGENCY_LINE.search(line) for line in out)


def test_crash_where_no_route_completes_is_handed_back(gateway: GatewayProcess,
                                                       tmp_path: Path) -> None:
    result = simulate("crash", "--centre", "busy", *COPENHAGEN, "--msisdn", "+442079460125",
                      "--url", gateway.base_url, env=url_env(gateway), cwd=tmp_path)
    out = lines_of(result)
    assert any(line.startswith("stored: incident") and "in DK" in line for line in out)
    assert "route: emergency number 112; the gateway hands back: the car dials it itself" in out
    assert not any(EMERGENCY_LINE.search(line) for line in out)
    assert any("The car will now call the emergency number 1 1 2 itself" in line
               for line in out)
    assert any(line.startswith("why: centre leg 3: busy; no route completes (Twilio places no "
                               "emergency calls in DK)") for line in out)
    assert "result: hand-back after 4 webhooks" in out


def test_an_answered_sos_is_bridged_to_the_agent(gateway: GatewayProcess,
                                                 tmp_path: Path) -> None:
    result = simulate("sos", "--msisdn", "+442079460126", "--url", gateway.base_url,
                      env=url_env(gateway), cwd=tmp_path)
    out = lines_of(result)
    assert 'agent: hears "S O S call. 2 aboard. In United Kingdom."' in out
    assert "bridged: the caller and the agent talk; the caller hangs up" in out
    assert "result: agent after 2 webhooks" in out
    assert not any(EMERGENCY_LINE.search(line) for line in out)


def test_owner_walks_the_menu_to_the_roadside_line(gateway: GatewayProcess,
                                                   tmp_path: Path) -> None:
    enrolled = requests.post(
        f"{gateway.base_url}/v1/admin/vehicles", timeout=10,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        json={"vin": "SAJWA0ES8DPS56029", "car_msisdn": "+442079460127", "market": "GB",
              "purchase_date": "2025-01-15", "owner_name": "Test Owner",
              "owner_phones": [OWNER_PHONE], "language": "en-GB"})
    assert enrolled.status_code == 201, enrolled.text
    result = simulate("owner", "--msisdn", OWNER_PHONE, "--url", gateway.base_url,
                      env=url_env(gateway), cwd=tmp_path)
    out = lines_of(result)
    assert f"[1] the owner ({OWNER_PHONE}) calls the owners' line +442079460902" in out
    assert any(line.startswith('said: "Welcome to vehicle assistance. For roadside '
                               "assistance, press 1.") for line in out)
    assert "caller: presses 1" in out
    assert any(line.startswith("[2] Twilio -> POST /twilio/ivr/choose Digits=1") for line in out)
    assert any(line.startswith("dialled: +442079460101 (centre eu-primary, roadside line)")
               for line in out)
    assert any(line.startswith('agent: hears "Roadside assistance request. Vehicle ending')
               for line in out)
    assert "end: the agent took the call; the gateway hangs up when it ends" in out
    assert not any(EMERGENCY_LINE.search(line) for line in out)


def test_a_wrong_public_url_is_a_403_and_says_so(gateway: GatewayProcess,
                                                  tmp_path: Path) -> None:
    result = simulate("crash", "--url", gateway.base_url, cwd=tmp_path,
                      env=url_env(gateway, GATEWAY_PUBLIC_URL="https://gateway.example.com"))
    assert result.returncode == 2
    assert "HTTP 403" in result.stderr and "GATEWAY_PUBLIC_URL" in result.stderr


def test_url_without_the_auth_token_names_the_variable(gateway: GatewayProcess,
                                                       tmp_path: Path) -> None:
    result = simulate("crash", "--url", gateway.base_url, cwd=tmp_path, env={})
    assert result.returncode == 2
    assert "GATEWAY_TWILIO_AUTH_TOKEN" in result.stderr


def test_urls_are_signed_for_the_public_url_and_sent_to_the_gateway() -> None:
    """Behind a proxy with a path prefix: Twilio signs the public URL, the gateway is
    reached without the prefix."""
    from gateway.simulate import Target

    target = Target(base_url="http://127.0.0.1:8080", public_url="https://x.example/gw",
                    auth_token=AUTH_TOKEN, vehicle_token=None, agent_token=None)
    first = target.signed_url("/twilio/voice")
    assert first == "https://x.example/gw/twilio/voice"
    assert target.send_url(first) == "http://127.0.0.1:8080/twilio/voice"
    action = "https://x.example/gw/twilio/voice/dial-result?t0=1&k=1"
    assert target.signed_url(action) == action
    assert target.send_url(action) == "http://127.0.0.1:8080/twilio/voice/dial-result?t0=1&k=1"
