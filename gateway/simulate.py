"""``python -m gateway simulate``: play the car and Twilio against a gateway and print the call.

The car's part: the data message (``POST /v1/events`` with a vehicle API token), then a
call to the number the answer gives (``call_number``).  Twilio's part: every webhook
signed with the auth token against the gateway's public URL (as Twilio signs it),
every ``<Dial action>``, ``<Gather action>`` and ``<Redirect>`` followed, and the
whisper URL of a centre line fetched as the agent's leg.

How the far ends answer (the simulator decides, nobody is called):

- a **centre line** (a ``<Number url=whisper>``) answers as ``--centre`` says:
  ``answer`` (the agent hears the whisper, presses 1, hears the details; the dial ends
  ``completed`` with ``DialBridged=true``), ``noanswer`` (``no-answer``), ``busy``
  (``busy``) or ``down`` (``failed``);
- an **emergency leg** (a ``<Dial>`` without a whisper: the PSAP number or the local
  emergency number) answers as ``--emergency`` says, ``answer`` by default
  (``completed``): the emergency services pick up.  ``--emergency noanswer|busy|down``
  shows the retries and the hand-back;
- the **owner** (``simulate owner``) chooses 1 (roadside) in the IVR menu, then stays
  silent (a customer number is typed only if ``--customer-number`` is given).

Each step is printed: what was said (the ``<Say>`` texts), what was dialled (number,
ring timeout, caller ID) and why (the gateway's decision, read from the agent API
``GET /v1/agent/incidents/<id>`` when an agent token is available).  At most
:data:`MAX_STEPS` webhooks on the caller's leg; the exit status is 0 when the call
ended as expected for the scenario and the answers chosen, 1 otherwise, 2 when the
simulation could not run.

Without ``--url`` a demo gateway is started (``python -m gateway serve`` on a free
local port, generated tokens, a temporary SQLite file, emergency caller IDs for GB
and DE so that both a dial and a hand-back can be shown) and stopped at the end.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import parse_qs, urlsplit

import requests
from twilio.request_validator import RequestValidator

from gateway.errors import ConfigError

SCENARIOS = ("crash", "sos", "oncall", "owner")
ANSWERS = ("answer", "noanswer", "busy", "down")
#: what a <Dial> that was not answered ends with, per answer
DIAL_STATUS = {"noanswer": "no-answer", "busy": "busy", "down": "failed"}
#: webhooks on the caller's leg before the simulator gives up
MAX_STEPS = 20
#: one HTTP request to the gateway
REQUEST_TIMEOUT_S = 20.0
#: how long to wait for the gateway's decision record (written after the answer)
DECISION_WAIT_S = 3.0

#: the demo car: a British car (the demo plan's numbers are British)
DEMO_VIN = "SAJWA0ES8DPS56028"
DEMO_MSISDN = "+442079460123"
DEMO_OWNER_PHONE = "+442079460789"
#: demo emergency caller IDs (Ofcom drama range, a Berlin number): GB and DE dial, the
#: other countries hand back
DEMO_CALLER_IDS = "+442079460555,+4930901820"
#: the demo position: central London
DEFAULT_LAT, DEFAULT_LON = 51.5072, -0.1276
ACCOUNT_SID = "AC" + "5" * 32


class SimulationError(Exception):
    """The simulation could not run (the gateway unreachable, a token missing...)."""


@dataclass(frozen=True)
class Target:
    """Where requests go and what they are signed and authorised with."""

    base_url: str  # where the simulator sends its requests
    public_url: str  # the gateway's GATEWAY_PUBLIC_URL: what Twilio signs
    auth_token: str
    vehicle_token: str | None
    agent_token: str | None
    #: the demo gateway's admin token (enrols the demo car for ``simulate owner``)
    admin_token: str | None = None
    demo: bool = False

    def send_url(self, url: str) -> str:
        """An action URL (under the public URL) as this simulator reaches it: a proxy's
        path prefix in the public URL is not the gateway's own."""
        if url.startswith(self.public_url + "/"):
            return self.base_url + url[len(self.public_url):]
        parts = urlsplit(url)
        return self.base_url + parts.path + (f"?{parts.query}" if parts.query else "")

    def signed_url(self, url: str) -> str:
        if url.startswith(("http://", "https://")):
            return url
        return self.public_url + url


# -- the gateway to talk to -----------------------------------------------------------


def target_from_env(url: str, env: Mapping[str, str]) -> Target:
    """``--url``: tokens from the gateway's own variables."""
    auth = env.get("GATEWAY_TWILIO_AUTH_TOKEN", "").strip()
    if not auth:
        raise ConfigError("GATEWAY_TWILIO_AUTH_TOKEN: required with --url (the simulator signs "
                          "each webhook with it, as Twilio does)")
    vehicle = next((t.strip() for t in env.get("GATEWAY_VEHICLE_API_TOKENS", "").split(",")
                    if t.strip()), None)
    agent = None
    for item in env.get("GATEWAY_AGENT_API_TOKENS", "").split(","):
        token, _, roles = item.strip().partition(":")
        if token and ({"read", "supervisor"} & set(roles.split("+")) or not roles):
            agent = token
            break
    public = env.get("GATEWAY_PUBLIC_URL", "").strip().rstrip("/") or url.rstrip("/")
    return Target(base_url=url.rstrip("/"), public_url=public, auth_token=auth,
                  vehicle_token=vehicle, agent_token=agent)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def demo_gateway(out: TextIO, *, start_timeout_s: float = 60.0) -> Iterator[Target]:
    """``python -m gateway serve`` on a free local port with generated tokens and a
    temporary SQLite file; stopped (and the file removed) at the end."""
    with tempfile.TemporaryDirectory(prefix="assist-gateway-demo-") as tmp:
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        auth, vehicle = secrets.token_hex(16), secrets.token_hex(16)
        agent, admin = secrets.token_hex(16), secrets.token_hex(16)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH"))
                                            if p)
        env.update({
            "GATEWAY_TWILIO_AUTH_TOKEN": auth,
            "GATEWAY_VEHICLE_API_TOKENS": vehicle,
            "GATEWAY_AGENT_API_TOKENS": f"{agent}:read",
            "GATEWAY_ADMIN_API_TOKENS": admin,
            "GATEWAY_PUBLIC_URL": base,
            "GATEWAY_DATABASE_URL": f"sqlite:///{Path(tmp) / 'demo.sqlite3'}",
            "GATEWAY_EMERGENCY_CALLER_IDS": DEMO_CALLER_IDS,
            "GATEWAY_LOG_LEVEL": "WARNING",
        })
        log_path = Path(tmp) / "gateway.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1",
                 "--port", str(port)],
                env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp)
        try:
            _wait_ready(base, process, log_path, start_timeout_s)
            out.write(f"demo gateway: {base} (temporary SQLite database; emergency caller "
                      f"IDs for GB and DE: {DEMO_CALLER_IDS.replace(',', ', ')})\n")
            yield Target(base_url=base, public_url=base, auth_token=auth,
                         vehicle_token=vehicle, agent_token=agent, admin_token=admin,
                         demo=True)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(base: str, process: subprocess.Popen[bytes], log_path: Path,
                timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SimulationError("the demo gateway exited at start:\n" + _tail(log_path))
        try:
            if requests.get(base + "/readyz", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise SimulationError(f"the demo gateway was not ready after {timeout_s:.0f} s:\n"
                          + _tail(log_path))


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# -- the simulation ---------------------------------------------------------------------


@dataclass
class Outcome:
    """How the call ended, as far as the simulator saw it."""

    kind: str = "unfinished"  # agent | emergency | hand_back | callback | test_end | ended
    detail: str = ""
    steps: int = 0
    emergency_dials: list[str] = field(default_factory=list)
    centre_dials: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Dial:
    number: str
    whisper: str | None  # the agent's leg (a centre line); None: an emergency leg
    emergency: bool


@dataclass
class _Step:
    url: str  # the action URL to post to (absolute, under the public URL, or a path)
    form: dict[str, str]
    why: str  # what made Twilio request it


def _says(element: ET.Element) -> list[tuple[str, str]]:
    return [((say.text or "").strip(), say.get("language", ""))
            for say in element.iter("Say") if (say.text or "").strip()]


def _wrap(label: str, text: str, out: TextIO) -> None:
    prefix = f"    {label:<9}"
    out.write(textwrap.fill(text, width=100, initial_indent=prefix, break_on_hyphens=False,
                            subsequent_indent=" " * len(prefix)) + "\n")


class Simulator:
    def __init__(self, target: Target, out: TextIO, *, centre: str = "answer",
                 emergency: str = "answer", customer_number: str | None = None,
                 session: requests.Session | None = None) -> None:
        if centre not in ANSWERS or emergency not in ANSWERS:
            raise ValueError("answers are one of " + ", ".join(ANSWERS))
        self.target = target
        self.out = out
        self.centre = centre
        self.emergency = emergency
        self.customer_number = customer_number
        self.http = session or requests.Session()
        self.validator = RequestValidator(target.auth_token)
        self.plan: Any = None
        self._agent_legs = 0
        self._said_decisions: set[tuple[str, str]] = set()

    # -- HTTP ------------------------------------------------------------------------

    def _request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        try:
            return self.http.request(method, url, timeout=REQUEST_TIMEOUT_S, **kwargs)
        except requests.RequestException as exc:
            raise SimulationError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc

    def twilio(self, url: str, form: Mapping[str, str]) -> ET.Element:
        """A webhook signed as Twilio signs it; the TwiML it answers."""
        signed = self.target.signed_url(url)
        response = self._request(
            "POST", self.target.send_url(signed), data=dict(form),
            headers={"X-Twilio-Signature": self.validator.compute_signature(signed,
                                                                            dict(form)),
                     "User-Agent": "TwilioProxy/1.1 (assist-gateway simulate)"})
        if response.status_code != 200:
            hint = (" (the signature did not match: is GATEWAY_PUBLIC_URL the URL the gateway "
                    "was configured with?)" if response.status_code == 403 else "")
            raise SimulationError(f"POST {urlsplit(signed).path}: HTTP {response.status_code}"
                                  f"{hint}: {response.text[:200]}")
        try:
            root = ET.fromstring(response.content)
        except ET.ParseError as exc:
            raise SimulationError(f"POST {urlsplit(signed).path}: not TwiML ({exc})") from exc
        if root.tag != "Response":
            raise SimulationError(f"POST {urlsplit(signed).path}: not TwiML (<{root.tag}>)")
        return root

    # -- the car ---------------------------------------------------------------------

    def post_event(self, event: Mapping[str, Any]) -> dict[str, Any]:
        if not self.target.vehicle_token:
            raise ConfigError("GATEWAY_VEHICLE_API_TOKENS: a vehicle API token is needed to "
                              "post the car's data message")
        response = self._request("POST", self.target.base_url + "/v1/events", json=event,
                                 headers={"Authorization": f"Bearer {self.target.vehicle_token}"})
        if response.status_code not in (200, 201):
            raise SimulationError(f"POST /v1/events: HTTP {response.status_code}: "
                                  f"{response.text[:300]}")
        answer: dict[str, Any] = response.json()
        return answer

    def enrol_demo_vehicle(self, admin_token: str, *, vin: str, msisdn: str,
                           owner_phone: str) -> None:
        """In the demo gateway only: the owner's number is known to the IVR."""
        body = {"vin": vin, "car_msisdn": msisdn, "market": "GB",
                "purchase_date": (dt.date.today() - dt.timedelta(days=400)).isoformat(),
                "owner_name": "Demo Owner", "owner_phones": [owner_phone],
                "language": "en-GB"}
        response = self._request("POST", self.target.base_url + "/v1/admin/vehicles",
                                 json=body, headers={"Authorization": f"Bearer {admin_token}"})
        if response.status_code not in (200, 201):
            raise SimulationError(f"POST /v1/admin/vehicles: HTTP {response.status_code}: "
                                  f"{response.text[:300]}")
        self.out.write(f"    enrolled the demo car {vin} with the owner's number {owner_phone} "
                       "(admin API)\n")

    # -- the agent API: why -------------------------------------------------------------

    def decision(self, incident_id: str | None, call_sid: str, step: str) -> dict[str, Any] | None:
        if not incident_id or not self.target.agent_token:
            return None
        deadline = time.monotonic() + DECISION_WAIT_S
        while True:
            response = self._request(
                "GET", f"{self.target.base_url}/v1/agent/incidents/{incident_id}",
                headers={"Authorization": f"Bearer {self.target.agent_token}"})
            if response.status_code == 200:
                for found in response.json().get("decisions", []):
                    if found.get("call_sid") == call_sid and found.get("step") == step:
                        return dict(found)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    # -- running a scenario ------------------------------------------------------------

    def run(self, scenario: str, *, lat: float, lon: float, vin: str, msisdn: str) -> int:
        from gateway.plan import load_plan

        try:  # the demo gateway runs on the embedded plan; --url: the one configured here
            self.plan = load_plan(None if self.target.demo else _plan_dir())
        except Exception:  # noqa: BLE001 -- only labels come from it
            self.plan = None
        out = self.out
        incident_id: str | None = None
        n = 1
        if scenario == "owner":
            service = "owner"
            to = self._owner_number()
            if to is None:
                raise SimulationError("the number plan lists no owner number (inbound.csv)")
            out.write(f"\n[{n}] the owner ({msisdn}) calls the owners' line {to}\n")
            _wrap("note:", "the IVR records no routing decisions: each step shows what its "
                           "TwiML says", out)
            if self.target.admin_token:
                self.enrol_demo_vehicle(self.target.admin_token, vin=vin, msisdn=DEMO_MSISDN,
                                        owner_phone=msisdn)
        else:
            event_type = {"oncall": "on_call"}.get(scenario, scenario)
            service = "roadside" if scenario == "oncall" else "emergency"
            event = _event(event_type, vin=vin, msisdn=msisdn, lat=lat, lon=lon)
            out.write(f"\n[{n}] car -> POST /v1/events  type={event_type}, VIN {vin}, SIM {msisdn}, "
                      f"at {lat}, {lon}\n")
            answer = self.post_event(event)
            incident_id = str(answer.get("incident_id") or "") or None
            where = answer.get("country") or "no country (at sea?)"
            _wrap("stored:", f"incident {incident_id}; in {where}; route country "
                  f"{answer.get('route_country')} ({answer.get('route_reason')})", out)
            emergency_number = answer.get("emergency_number")
            fallback = answer.get("fallback_dial")
            how = (f"the gateway can dial {fallback}" if fallback
                   else "the gateway hands back: the car dials it itself")
            if service == "roadside":
                how = "for the SOS button: a roadside call never dials it"
            _wrap("route:", f"emergency number {emergency_number}; {how}", out)
            to = answer.get("call_number")
            if not to:
                raise SimulationError("the event answer gives no call_number")
            after = answer.get("hand_back_after_s")
            _wrap("answer:", f"call {to} now" + (
                f"; if no agent has taken the call after {after} s the car dials "
                f"{emergency_number} itself" if after else ""), out)
            n += 1
            out.write(f"\n[{n}] car calls {to} ({self._inbound_label(to)})\n")
        if self.target.agent_token is None and incident_id:
            _wrap("note:", "no agent API token (GATEWAY_AGENT_API_TOKENS with the read role): "
                           "the gateway's reasons are not shown, only what the TwiML says", out)
        call_sid = "CA" + uuid.uuid4().hex
        base_form = {"CallSid": call_sid, "AccountSid": ACCOUNT_SID, "From": msisdn,
                     "To": to, "Caller": msisdn, "Called": to, "CallStatus": "in-progress",
                     "ApiVersion": "2010-04-01", "Direction": "inbound"}
        outcome = self.follow(_Step("/twilio/voice", {}, "the call arrives"), base_form,
                              service=service, incident_id=incident_id, first_step=n)
        return self.verdict(scenario, service, outcome)

    def follow(self, step: _Step | None, base_form: dict[str, str], *, service: str,
               incident_id: str | None, first_step: int) -> Outcome:
        out = self.out
        outcome = Outcome()
        menu_chosen = False
        last_connected: str | None = None  # "agent" / "emergency" when the last dial connected
        n = first_step
        while step is not None:
            if outcome.steps >= MAX_STEPS:
                out.write(f"\nstopped: the call did not end within {MAX_STEPS} webhooks\n")
                outcome.kind = "unfinished"
                return outcome
            outcome.steps += 1
            path = urlsplit(step.url).path
            if outcome.steps > 1:
                n += 1
                extra = "  ".join(f"{k}={v}" for k, v in step.form.items()
                                  if k in ("DialCallStatus", "DialBridged", "Digits"))
                out.write(f"\n[{n}] Twilio -> POST {path}  {extra}".rstrip()
                          + f"   ({step.why})\n")
            else:
                out.write(f"    Twilio -> POST {path}\n")
            root = self.twilio(step.url, {**base_form, **step.form})
            decision = self.decision(incident_id, base_form["CallSid"],
                                     _step_name(step.url))
            step = None
            ended = True
            for verb in root:
                if verb.tag == "Say":
                    text = (verb.text or "").strip()
                    if text:
                        _wrap("said:", f'"{text}"', out)
                elif verb.tag == "Gather":
                    for text, _ in _says(verb):
                        _wrap("said:", f'"{text}"', out)
                    digits = self._owner_digits(verb, menu_chosen)
                    if digits:
                        menu_chosen = menu_chosen or urlsplit(
                            verb.get("action", "")).path.endswith("/choose")
                        _wrap("caller:", f"presses {digits}", out)
                        step = _Step(verb.get("action", ""), {"Digits": digits},
                                     f"the caller pressed {digits}")
                        ended = False
                        break
                    _wrap("caller:", "presses nothing", out)
                elif verb.tag == "Redirect":
                    step = _Step((verb.text or "").strip(), {}, "<Redirect>")
                    ended = False
                    break
                elif verb.tag == "Dial":
                    dial = self.describe_dial(verb, base_form, outcome)
                    self._print_why(decision, out)
                    decision = None
                    form, what = self.play_dial(dial, base_form)
                    last_connected = what
                    action = verb.get("action")
                    if action:
                        step = _Step(action, form, "the <Dial> ended")
                        ended = False
                        break
                    if what is not None:  # no action: a connected call ends with the bridge
                        break
                elif verb.tag == "Hangup":
                    break
            if decision is not None:
                self._print_why(decision, out)
            if ended:
                outcome.kind, outcome.detail = self._ending(decision, last_connected, service)
                _wrap("end:", outcome.detail, out)
                return outcome
        return outcome

    def _print_why(self, decision: dict[str, Any] | None, out: TextIO) -> None:
        if decision is not None:
            _wrap("why:", str(decision.get("reason", "")), out)

    def _ending(self, decision: dict[str, Any] | None, connected: str | None,
                service: str) -> tuple[str, str]:
        if connected == "agent":
            return "agent", "the agent took the call; the gateway hangs up when it ends"
        if connected == "emergency":
            return "emergency", "the emergency services took the call"
        target = decision.get("target") if decision else None
        if target == "hand_back":
            return "hand_back", (f"handed back: the car dials {decision.get('number')} "
                                 "itself" if decision else "handed back")
        if target == "callback" or (target is None and service in ("roadside", "owner")):
            return "callback", "no line took the call: a callback is recorded; the call ends"
        if target == "test_end":
            return "test_end", "test call: received and ended"
        if target is None and service == "emergency":
            return "hand_back", "no one took the call: the caller is told to dial themselves"
        return "ended", "the call ends"

    # -- Twilio dialling -----------------------------------------------------------------

    def describe_dial(self, verb: ET.Element, base_form: dict[str, str],
                      outcome: Outcome) -> _Dial:
        """One <Dial> as Twilio reads it; printed and counted."""
        number_el = verb.find("Number")
        number = (number_el.text or "").strip() if number_el is not None else ""
        whisper = number_el.get("url") if number_el is not None else None
        timeout = verb.get("timeout", "30")
        caller_id = verb.get("callerId") or f"the caller's number ({base_form['From']})"
        emergency = not whisper or urlsplit(verb.get("action", "")).path.endswith(
            "/emergency-result")
        label = self._number_label(number, emergency=emergency)
        _wrap("dialled:", f"{number} ({label}), ring {timeout} s, caller ID {caller_id}",
              self.out)
        (outcome.emergency_dials if emergency else outcome.centre_dials).append(number)
        return _Dial(number=number, whisper=whisper, emergency=emergency)

    def play_dial(self, dial: _Dial, base_form: dict[str, str]
                  ) -> tuple[dict[str, str], str | None]:
        """The far end of a <Dial>: the action's form, and what connected (if anything)."""
        out = self.out
        answer = self.emergency if dial.emergency else self.centre
        dial_sid = "CA" + uuid.uuid4().hex
        if answer != "answer":
            status = DIAL_STATUS[answer]
            flag = "--emergency" if dial.emergency else "--centre"
            _wrap("far end:", f"{status} (simulated: {flag} {answer})", out)
            return {"DialCallStatus": status, "DialCallSid": dial_sid,
                    "DialCallDuration": "0"}, None
        if dial.emergency:
            _wrap("far end:", "the emergency services answer; the call is bridged (simulated: "
                              "--emergency answer)", out)
            return {"DialCallStatus": "completed", "DialCallSid": dial_sid,
                    "DialCallDuration": "240"}, "emergency"
        accepted = self.agent_leg(dial.whisper or "", dial.number, dial_sid, base_form)
        if not accepted:
            return {"DialCallStatus": "completed", "DialCallSid": dial_sid,
                    "DialCallDuration": "10", "DialBridged": "false"}, None
        return {"DialCallStatus": "completed", "DialCallSid": dial_sid,
                "DialCallDuration": "180", "DialBridged": "true"}, "agent"

    def agent_leg(self, whisper_url: str, number: str, dial_sid: str,
                  base_form: dict[str, str]) -> bool:
        """The agent answers: the whisper, key 1, the details.  True if bridged."""
        out = self.out
        form = {"CallSid": dial_sid, "ParentCallSid": base_form["CallSid"],
                "AccountSid": ACCOUNT_SID, "From": base_form["From"], "To": number,
                "Called": number, "CallStatus": "in-progress", "ApiVersion": "2010-04-01",
                "Direction": "outbound-dial"}
        root = self.twilio(whisper_url, form)
        for text, _ in _says(root):
            _wrap("agent:", f'hears "{text}"', out)
        gather = root.find("Gather")
        if gather is None or not gather.get("action"):
            _wrap("agent:", "no accept prompt: the leg is bridged as it is", out)
            return root.find("Hangup") is None
        _wrap("agent:", "presses 1", out)
        accepted = self.twilio(gather.get("action", ""), {**form, "Digits": "1"})
        for text, _ in _says(accepted):
            _wrap("agent:", f'hears "{text}"', out)
        if accepted.find("Hangup") is not None:
            _wrap("agent:", "the gateway hung up the agent's leg", out)
            return False
        _wrap("bridged:", "the caller and the agent talk; the caller hangs up", out)
        return True

    # -- the owner's keys ---------------------------------------------------------------

    def _owner_digits(self, gather: ET.Element, menu_chosen: bool) -> str | None:
        action = urlsplit(gather.get("action", "")).path
        if action.endswith("/choose"):
            return None if menu_chosen else "1"
        if action.endswith("/identify"):
            return self.customer_number
        return None

    # -- labels --------------------------------------------------------------------------

    def _owner_number(self) -> str | None:
        if self.plan is None:
            return "+442079460902"
        row = self.plan.inbound_for("owner", "GB")
        return str(row.number) if row is not None else None

    def _inbound_label(self, number: str) -> str:
        from gateway.calls.inbound import classify

        if self.plan is None:
            return "a gateway number"
        inbound = classify(number, self.plan)
        return f"the {inbound.service} number" if inbound.known else "a number not in inbound.csv"

    def _number_label(self, number: str, *, emergency: bool) -> str:
        for centre in getattr(self.plan, "centres", ()) or ():
            if number == centre.number:
                return f"centre {centre.centre_id}"
            if number == centre.roadside_number:
                return f"centre {centre.centre_id}, roadside line"
        return "emergency number" if emergency else "a centre line"

    # -- was that what should happen? ---------------------------------------------------

    def verdict(self, scenario: str, service: str, outcome: Outcome) -> int:
        out = self.out
        problems: list[str] = []
        if outcome.kind == "unfinished":
            problems.append(f"the call did not end within {MAX_STEPS} webhooks")
        if service in ("roadside", "owner"):
            if outcome.emergency_dials:
                problems.append("a roadside call dialled an emergency number: "
                                + ", ".join(outcome.emergency_dials))
            expected = {"agent"} if self.centre == "answer" and outcome.centre_dials else {
                "callback"}
        else:
            if self.centre == "answer" and outcome.centre_dials:
                expected = {"agent"}
            elif self.emergency == "answer" and outcome.emergency_dials:
                expected = {"emergency"}
            else:
                expected = {"hand_back"}
        if outcome.kind != "unfinished" and outcome.kind not in expected:
            problems.append(f"the call ended as {outcome.kind!r}; expected "
                            f"{' or '.join(sorted(expected))} for --centre {self.centre}"
                            + ("" if service != "emergency" else
                               f" --emergency {self.emergency}"))
        out.write(f"\nresult: {outcome.kind.replace('_', '-')} after {outcome.steps} "
                  "webhooks\n")
        out.write("    centre lines rung:         "
                  + (", ".join(outcome.centre_dials) or "none") + "\n")
        out.write("    emergency numbers dialled: "
                  + (", ".join(outcome.emergency_dials) or "none") + "\n")
        if problems:
            for problem in problems:
                out.write(f"UNEXPECTED: {problem}\n")
            return 1
        out.write(f"as expected for simulate {scenario} --centre {self.centre}"
                  + (f" --emergency {self.emergency}" if service == "emergency" else "")
                  + "\n")
        return 0


def _plan_dir() -> Path | None:
    raw = os.environ.get("GATEWAY_NUMBER_PLAN", "").strip()
    return Path(raw) if raw else None


def _step_name(url: str) -> str:
    """The step record name the gateway stores for a caller-leg webhook."""
    parts = urlsplit(url)
    endpoint = parts.path.rstrip("/").rsplit("/", 1)[-1]
    args = {k: v[0] for k, v in parse_qs(parts.query).items()}
    if endpoint in ("dial-result", "roadside-result"):
        return f"{endpoint}:{args.get('k', '0')}"
    if endpoint == "emergency-result":
        return f"{endpoint}:{args.get('e', '0')}"
    return endpoint


def _event(event_type: str, *, vin: str, msisdn: str, lat: float, lon: float) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": f"simulate-{uuid.uuid4().hex[:16]}",
        "type": event_type,
        "vin": vin,
        "msisdn": msisdn,
        "occurred_at": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "location": {"lat": lat, "lon": lon, "heading_deg": 90.0, "accuracy_m": 8.0,
                     "trusted": True},
        "occupants": {"count": 2},
    }
    if event_type == "crash":
        event["crash"] = {"airbag_deployed": True, "belt_tensioner_fired": True,
                          "delta_v_kmh": 38}
    return event


def simulate(scenario: str, *, lat: float | None, lon: float | None, centre: str,
             emergency: str, url: str | None, msisdn: str | None, vin: str | None,
             customer_number: str | None, out: TextIO,
             env: Mapping[str, str] | None = None) -> int:
    """The ``simulate`` command; the exit status."""
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario: one of {', '.join(SCENARIOS)}")
    env = os.environ if env is None else env
    lat = DEFAULT_LAT if lat is None else lat
    lon = DEFAULT_LON if lon is None else lon
    vin = vin or DEMO_VIN
    caller = msisdn or (DEMO_OWNER_PHONE if scenario == "owner" else DEMO_MSISDN)
    out.write(f"assist-gateway simulate {scenario}: --centre {centre}"
              + (f", --emergency {emergency}" if scenario in ("crash", "sos") else "")
              + (f", at {lat}, {lon}" if scenario != "owner" else "") + "\n")
    if url:
        target = target_from_env(url, env)
        out.write(f"gateway: {target.base_url} (webhooks signed for {target.public_url})\n")
        simulator = Simulator(target, out, centre=centre, emergency=emergency,
                              customer_number=customer_number)
        return simulator.run(scenario, lat=lat, lon=lon, vin=vin, msisdn=caller)
    with demo_gateway(out) as target:
        simulator = Simulator(target, out, centre=centre, emergency=emergency,
                              customer_number=customer_number)
        return simulator.run(scenario, lat=lat, lon=lon, vin=vin, msisdn=caller)
