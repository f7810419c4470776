"""The upstream clients against real HTTP servers on 127.0.0.1 playing the upstreams.

Every failure mode is produced on the wire by ``tests/support/fake_servers.py``
(refused connections, accepted-but-silent sockets, slow answers, 4xx/5xx), not
by mocking our own functions.
"""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Self

import pytest
import requests

from gateway.adapters.assistance import AssistanceCentreClient
from gateway.adapters.messaging import PushClient, RebasingTwilioHttpClient, TwilioSms
from gateway.adapters.ports import IncidentSink, PushSender, SmsSender, VehicleCommands
from gateway.adapters.vehicle_commands import VehicleCommandClient
from gateway.errors import PermanentUpstreamError, TransientUpstreamError
from tests.support.fake_servers import (
    FakeAssistanceCentre,
    FakePush,
    FakeTwilioApi,
    FakeVehicleService,
)
from tests.support.fakes_adapters import (
    RecordingIncidentSink,
    RecordingPush,
    RecordingSms,
    RecordingVehicleCommands,
)

TIMEOUT = 0.3  # client timeout in these tests
SLOW = 1.5  # how long "slow"/"timeout" fakes sleep: well past TIMEOUT
MARGIN = 0.4  # scheduling slack on top of a timeout
ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "twilio-auth-token-0123456789abcdef"
FROM = "+4535150000"
TO = "+4520123456"
VIN = "WVWZZZ1JZXW000001"
INCIDENT = {"vin": VIN, "kind": "crash", "position": {"lat": 55.676, "lon": 12.568}}


class Stopwatch:
    def __enter__(self) -> Self:
        self.start = time.monotonic()
        self.elapsed = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.monotonic() - self.start


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def centre() -> Iterator[FakeAssistanceCentre]:
    with FakeAssistanceCentre(slow_s=SLOW) as fake:
        yield fake


@pytest.fixture
def assistance(centre: FakeAssistanceCentre) -> Iterator[AssistanceCentreClient]:
    with AssistanceCentreClient(centre.url, timeout_s=TIMEOUT) as client:
        yield client


@pytest.fixture
def vehicles() -> Iterator[FakeVehicleService]:
    with FakeVehicleService(slow_s=SLOW) as fake:
        yield fake


def vehicle_client(url: str, **overrides: float) -> VehicleCommandClient:
    kwargs: dict[str, float] = {"timeout_s": TIMEOUT, "attempts": 3, "backoff_initial_s": 0.05,
                                "backoff_max_s": 0.1, "total_budget_s": 3.0}
    kwargs.update(overrides)
    return VehicleCommandClient(url, timeout_s=kwargs["timeout_s"],
                                attempts=int(kwargs["attempts"]),
                                backoff_initial_s=kwargs["backoff_initial_s"],
                                backoff_max_s=kwargs["backoff_max_s"],
                                total_budget_s=kwargs["total_budget_s"])


@pytest.fixture
def twilio_api() -> Iterator[FakeTwilioApi]:
    with FakeTwilioApi(ACCOUNT_SID, AUTH_TOKEN, slow_s=SLOW) as fake:
        yield fake


@pytest.fixture
def sms(twilio_api: FakeTwilioApi) -> Iterator[TwilioSms]:
    with TwilioSms(ACCOUNT_SID, AUTH_TOKEN, from_number=FROM, api_url=twilio_api.url,
                   timeout_s=TIMEOUT) as client:
        yield client


@pytest.fixture
def push_server() -> Iterator[FakePush]:
    with FakePush() as fake:
        yield fake


@pytest.fixture
def push(push_server: FakePush) -> Iterator[PushClient]:
    with PushClient(push_server.push_url, timeout_s=TIMEOUT) as client:
        yield client


# -- assistance centre -------------------------------------------------------------------


def test_assistance_delivers_incident_with_idempotency_key(
        centre: FakeAssistanceCentre, assistance: AssistanceCentreClient) -> None:
    assert assistance.send_incident(INCIDENT, idempotency_key="inc-1") == 201

    [request] = centre.requests
    assert (request.method, request.path) == ("POST", "/incidents")
    assert request.header("Idempotency-Key") == "inc-1"
    assert request.json == INCIDENT
    assert centre.wait_for_incidents(1) == {"inc-1": INCIDENT}


def test_assistance_redelivery_with_same_key_is_stored_once(
        centre: FakeAssistanceCentre, assistance: AssistanceCentreClient) -> None:
    assert assistance.send_incident(INCIDENT, idempotency_key="inc-1") == 201
    assert assistance.send_incident({**INCIDENT, "kind": "changed"}, idempotency_key="inc-1") == 200
    assert assistance.send_incident(INCIDENT, idempotency_key="inc-2") == 201

    assert centre.incidents == {"inc-1": INCIDENT, "inc-2": INCIDENT}
    assert centre.deliveries == {"inc-1": 2, "inc-2": 1}


@pytest.mark.parametrize("mode", ["503", "429"])
def test_assistance_overload_is_transient(centre: FakeAssistanceCentre,
                                          assistance: AssistanceCentreClient, mode: str) -> None:
    centre.mode = mode
    with pytest.raises(TransientUpstreamError, match=f"HTTP {mode}"):
        assistance.send_incident(INCIDENT, idempotency_key="inc-1")
    assert centre.incidents == {}
    assert centre.deliveries == {"inc-1": 1}  # one attempt only: retries are the caller's


def test_assistance_rejection_is_permanent_with_status(
        centre: FakeAssistanceCentre, assistance: AssistanceCentreClient) -> None:
    centre.mode = "400"
    with pytest.raises(PermanentUpstreamError) as caught:
        assistance.send_incident(INCIDENT, idempotency_key="inc-1")
    assert caught.value.status == 400
    assert "schema" in str(caught.value)


def test_assistance_refused_is_transient_then_recovers_on_same_port(
        centre: FakeAssistanceCentre, assistance: AssistanceCentreClient) -> None:
    port = centre.port
    centre.mode = "refuse"
    with Stopwatch() as watch, pytest.raises(TransientUpstreamError) as caught:
        assistance.send_incident(INCIDENT, idempotency_key="inc-1")
    assert isinstance(caught.value.__cause__, requests.ConnectionError)
    assert not isinstance(caught.value.__cause__, requests.Timeout)
    assert watch.elapsed < TIMEOUT  # refused at once, no waiting for a timeout

    centre.mode = "up"
    assert centre.port == port
    assert assistance.send_incident(INCIDENT, idempotency_key="inc-1") == 201
    assert list(centre.incidents) == ["inc-1"]


def test_assistance_blackhole_times_out_on_read_then_on_connect(
        centre: FakeAssistanceCentre, assistance: AssistanceCentreClient) -> None:
    centre.mode = "blackhole"
    # 1st: the kernel completes the handshake, nobody ever reads -> read timeout
    with Stopwatch() as watch, pytest.raises(TransientUpstreamError, match="no answer") as caught:
        assistance.send_incident(INCIDENT, idempotency_key="inc-1")
    assert isinstance(caught.value.__cause__, requests.ReadTimeout)
    assert TIMEOUT * 0.9 <= watch.elapsed < TIMEOUT + MARGIN
    # 2nd: the accept queue is full, the SYN is dropped -> connect timeout
    with Stopwatch() as watch, pytest.raises(TransientUpstreamError, match="connect") as caught:
        assistance.send_incident(INCIDENT, idempotency_key="inc-1")
    assert isinstance(caught.value.__cause__, requests.ConnectTimeout)
    assert TIMEOUT * 0.9 <= watch.elapsed < TIMEOUT + MARGIN

    centre.mode = "up"
    assert assistance.send_incident(INCIDENT, idempotency_key="inc-1") == 201
    assert centre.deliveries == {"inc-1": 1}  # the blackholed attempts never reached HTTP


def test_assistance_slow_answer_is_transient_and_retry_is_deduplicated(
        centre: FakeAssistanceCentre, assistance: AssistanceCentreClient) -> None:
    centre.mode = "slow"
    with Stopwatch() as watch, pytest.raises(TransientUpstreamError) as caught:
        assistance.send_incident(INCIDENT, idempotency_key="inc-1")
    assert isinstance(caught.value.__cause__, requests.ReadTimeout)
    assert watch.elapsed < TIMEOUT + MARGIN
    # the centre did take it in; only the answer was late -- the retry is a duplicate
    assert centre.wait_for_incidents(1) == {"inc-1": INCIDENT}

    centre.mode = "up"
    assert assistance.send_incident(INCIDENT, idempotency_key="inc-1") == 200
    assert centre.deliveries == {"inc-1": 2}
    assert len(centre.incidents) == 1


def test_assistance_flapping_alternates(centre: FakeAssistanceCentre,
                                        assistance: AssistanceCentreClient) -> None:
    centre.mode = "flap"
    outcomes: list[object] = []
    for i in range(4):
        try:
            outcomes.append(assistance.send_incident(INCIDENT, idempotency_key=f"inc-{i}"))
        except TransientUpstreamError:
            outcomes.append("transient")
    assert outcomes == ["transient", 201, "transient", 201]
    assert sorted(centre.incidents) == ["inc-1", "inc-3"]


def test_assistance_uses_a_given_session(centre: FakeAssistanceCentre) -> None:
    with requests.Session() as session:
        session.headers["X-Trace"] = "t-1"
        client = AssistanceCentreClient(centre.url + "/", timeout_s=TIMEOUT, session=session)
        assert client.send_incident(INCIDENT, idempotency_key="inc-1") == 201
        client.close()  # not ours: the session stays usable
        assert client.send_incident(INCIDENT, idempotency_key="inc-2") == 201
    assert [r.header("X-Trace") for r in centre.requests] == ["t-1", "t-1"]
    assert {r.path for r in centre.requests} == {"/incidents"}


# -- vehicle commands --------------------------------------------------------------------


def test_vehicle_command_sent_with_params_and_fresh_key(vehicles: FakeVehicleService) -> None:
    with vehicle_client(vehicles.url) as client:
        first = client.send(VIN, "flash_lights", duration_s=5)
        second = client.send(VIN, "flash_lights", duration_s=5)

    assert first["status"] == "accepted" and first["command"] == "flash_lights"
    assert first["command_id"] != second["command_id"]
    keys = [c["idempotency_key"] for c in vehicles.commands]
    assert len(set(keys)) == 2 and all(uuid.UUID(k) for k in keys)
    assert vehicles.commands[0]["vin"] == VIN
    assert vehicles.commands[0]["body"] == {"command": "flash_lights", "duration_s": 5}


@pytest.mark.parametrize("kind", ["timeout", "503"])
def test_vehicle_flaky_succeeds_after_retries_with_one_key(kind: str) -> None:
    with FakeVehicleService(mode="flaky", flaky_failures=2, flaky_kind=kind,
                            slow_s=SLOW) as vehicles, vehicle_client(vehicles.url) as client:
        answer = client.send(VIN, "immobilise", reason="theft")

    assert answer["status"] == "accepted"
    assert len(vehicles.commands) == 3
    assert len({c["idempotency_key"] for c in vehicles.commands}) == 1
    [(key, accepted)] = vehicles.unique_commands.items()
    assert key == vehicles.commands[0]["idempotency_key"]
    assert accepted["command_id"] == answer["command_id"]


def test_vehicle_unreachable_gives_up_within_budget(vehicles: FakeVehicleService) -> None:
    vehicles.mode = "timeout"
    budget = 1.0
    with vehicle_client(vehicles.url, total_budget_s=budget) as client, Stopwatch() as watch, \
            pytest.raises(TransientUpstreamError, match="car unreachable") as caught:
        client.send(VIN, "locate")
    assert watch.elapsed < budget + MARGIN
    assert isinstance(caught.value.__cause__, TransientUpstreamError)
    assert 2 <= len(vehicles.commands) <= 3
    assert len({c["idempotency_key"] for c in vehicles.commands}) == 1


def test_vehicle_attempt_timeouts_are_clipped_to_the_budget(vehicles: FakeVehicleService) -> None:
    # a per-attempt timeout longer than the budget must not stretch the call
    vehicles.slow_s = 3.0
    vehicles.mode = "timeout"
    with vehicle_client(vehicles.url, timeout_s=2.5, attempts=10, total_budget_s=0.8) as client, \
            Stopwatch() as watch, pytest.raises(TransientUpstreamError, match="car unreachable"):
        client.send(VIN, "locate")
    assert watch.elapsed < 0.8 + MARGIN


def test_vehicle_default_budget_fits_twilio_webhook() -> None:
    client = VehicleCommandClient("http://127.0.0.1:9", timeout_s=3.0)
    try:
        assert client.total_budget_s <= 8.0
    finally:
        client.close()
    with pytest.raises(ValueError, match="15 s"):
        VehicleCommandClient("http://127.0.0.1:9", timeout_s=3.0, total_budget_s=14.0)


def test_vehicle_unknown_is_permanent_at_once(vehicles: FakeVehicleService) -> None:
    vehicles.mode = "404"
    with vehicle_client(vehicles.url) as client, Stopwatch() as watch, \
            pytest.raises(PermanentUpstreamError) as caught:
        client.send(VIN, "flash_lights")
    assert caught.value.status == 404
    assert len(vehicles.commands) == 1  # not retried
    assert watch.elapsed < TIMEOUT


def test_vehicle_service_refusing_is_retried_then_unreachable(
        vehicles: FakeVehicleService) -> None:
    vehicles.mode = "refuse"
    with vehicle_client(vehicles.url, attempts=3) as client, \
            pytest.raises(TransientUpstreamError, match=r"car unreachable.*3 attempt"):
        client.send(VIN, "flash_lights")
    vehicles.mode = "up"
    with vehicle_client(vehicles.url) as client:
        assert client.send(VIN, "flash_lights")["status"] == "accepted"


# -- Twilio SMS --------------------------------------------------------------------------


def test_sms_reaches_twilio_with_fields_and_basic_auth(twilio_api: FakeTwilioApi,
                                                       sms: TwilioSms) -> None:
    sid = sms.send(TO, "Your car reported a crash. Help is on the way.",
                   idempotency_key="sms-1")

    [message] = twilio_api.messages
    assert sid == message["sid"] and sid.startswith("SM") and len(sid) == 34
    assert (message["to"], message["from"], message["status"]) == (TO, FROM, "queued")
    [request] = twilio_api.requests
    assert request.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    assert request.form == {"To": TO, "From": FROM,
                            "Body": "Your car reported a crash. Help is on the way."}
    scheme, _, encoded = (request.header("Authorization") or "").partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded).decode() == f"{ACCOUNT_SID}:{AUTH_TOKEN}"
    assert request.header("Idempotency-Key") == "sms-1"
    assert (request.header("User-Agent") or "").startswith("twilio-python/")


def test_sms_rebase_ignores_twilio_region_environment(
        twilio_api: FakeTwilioApi, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWILIO_REGION", "ie1")
    monkeypatch.setenv("TWILIO_EDGE", "dublin")
    with TwilioSms(ACCOUNT_SID, AUTH_TOKEN, from_number=FROM, api_url=twilio_api.url,
                   timeout_s=TIMEOUT) as client:
        assert client.send(TO, "hello", idempotency_key="sms-1").startswith("SM")
    assert len(twilio_api.messages) == 1


def test_sms_wrong_credentials_are_permanent(twilio_api: FakeTwilioApi) -> None:
    with TwilioSms(ACCOUNT_SID, "not-the-token-0123456789", from_number=FROM,
                   api_url=twilio_api.url, timeout_s=TIMEOUT) as client, \
            pytest.raises(PermanentUpstreamError, match="20003") as caught:
        client.send(TO, "hello", idempotency_key="sms-1")
    assert caught.value.status == 401
    assert twilio_api.messages == []


@pytest.mark.parametrize("mode", ["500", "429"])
def test_sms_twilio_failure_is_transient(twilio_api: FakeTwilioApi, sms: TwilioSms,
                                         mode: str) -> None:
    twilio_api.mode = mode
    with pytest.raises(TransientUpstreamError, match=f"HTTP {mode}"):
        sms.send(TO, "hello", idempotency_key="sms-1")
    assert twilio_api.messages == []


def test_sms_rejected_number_is_permanent(twilio_api: FakeTwilioApi, sms: TwilioSms) -> None:
    twilio_api.mode = "400"
    with pytest.raises(PermanentUpstreamError, match="21211") as caught:
        sms.send(TO, "hello", idempotency_key="sms-1")
    assert caught.value.status == 400


def test_sms_invalid_to_is_rejected_by_twilio(twilio_api: FakeTwilioApi, sms: TwilioSms) -> None:
    with pytest.raises(PermanentUpstreamError, match="21211") as caught:
        sms.send("20123456", "hello", idempotency_key="sms-1")  # not E.164
    assert caught.value.status == 400
    assert len(twilio_api.requests) == 1 and twilio_api.messages == []


@pytest.mark.parametrize("mode", ["refuse", "slow", "blackhole"])
def test_sms_unreachable_twilio_is_transient_within_timeout(
        twilio_api: FakeTwilioApi, sms: TwilioSms, mode: str) -> None:
    twilio_api.mode = mode
    with Stopwatch() as watch, pytest.raises(TransientUpstreamError, match="unreachable"):
        sms.send(TO, "hello", idempotency_key="sms-1")
    assert watch.elapsed < TIMEOUT + MARGIN


def test_twilio_http_client_rewrites_only_api_host() -> None:
    client = RebasingTwilioHttpClient("http://127.0.0.1:5000/", timeout=1.0)
    try:
        assert (client.rebase("https://api.twilio.com/2010-04-01/Accounts/AC1/Messages.json")
                == "http://127.0.0.1:5000/2010-04-01/Accounts/AC1/Messages.json")
        with pytest.raises(ValueError, match="only https://api.twilio.com"):
            client.rebase("https://messaging.twilio.com/v1/Services")
        with pytest.raises(ValueError):
            client.rebase("https://api.twilio.com.evil.example/x")
    finally:
        client.close()
    default = RebasingTwilioHttpClient(timeout=1.0)
    try:
        url = "https://messaging.twilio.com/v1/Services"
        assert default.rebase(url) == url
    finally:
        default.close()


# -- push --------------------------------------------------------------------------------


def test_push_is_delivered(push_server: FakePush, push: PushClient) -> None:
    push.send(VIN, "Crash detected", "Help is on the way", idempotency_key="push-1")
    assert push_server.pushes == [{"vin": VIN, "title": "Crash detected",
                                   "body": "Help is on the way", "idempotency_key": "push-1"}]


@pytest.mark.parametrize("mode", ["503", "refuse", "blackhole"])
def test_push_failures_are_transient(push_server: FakePush, push: PushClient, mode: str) -> None:
    push_server.mode = mode
    with Stopwatch() as watch, pytest.raises(TransientUpstreamError):
        push.send(VIN, "t", "b", idempotency_key="push-1")
    assert watch.elapsed < TIMEOUT + MARGIN
    assert push_server.pushes == []


def test_push_bad_url_path_is_permanent(push_server: FakePush) -> None:
    with PushClient(push_server.url + "/nope", timeout_s=TIMEOUT) as client, \
            pytest.raises(PermanentUpstreamError) as caught:
        client.send(VIN, "t", "b", idempotency_key="push-1")
    assert caught.value.status == 404


# -- the fakes themselves ----------------------------------------------------------------


def test_clients_and_recording_fakes_satisfy_the_ports(twilio_api: FakeTwilioApi) -> None:
    with AssistanceCentreClient(twilio_api.url, timeout_s=1) as a, \
            VehicleCommandClient(twilio_api.url, timeout_s=1) as v, \
            TwilioSms(ACCOUNT_SID, AUTH_TOKEN, from_number=FROM, api_url=twilio_api.url) as s, \
            PushClient(twilio_api.url, timeout_s=1) as p:
        assert isinstance(a, IncidentSink) and isinstance(v, VehicleCommands)
        assert isinstance(s, SmsSender) and isinstance(p, PushSender)
    assert isinstance(RecordingIncidentSink(), IncidentSink)
    assert isinstance(RecordingVehicleCommands(), VehicleCommands)
    assert isinstance(RecordingSms(), SmsSender)
    assert isinstance(RecordingPush(), PushSender)


def test_recording_fakes_record_and_fail_on_request() -> None:
    sink = RecordingIncidentSink()
    sink.fail_next(TransientUpstreamError("down"), times=2)
    for _ in range(2):
        with pytest.raises(TransientUpstreamError):
            sink.send_incident(INCIDENT, idempotency_key="k")
    assert sink.send_incident(INCIDENT, idempotency_key="k") == 201
    assert sink.send_incident(INCIDENT, idempotency_key="k") == 200
    assert [c.ok for c in sink.calls] == [False, False, True, True]
    assert sink.incidents == {"k": INCIDENT}

    sms = RecordingSms()
    sms.fail_always(PermanentUpstreamError("bad number", 400))
    with pytest.raises(PermanentUpstreamError):
        sms.send(TO, "x", idempotency_key="s")
    sms.succeed()
    assert sms.send(TO, "x", idempotency_key="s").startswith("SM")
    assert len(sms.calls) == 2 and len(sms.successful) == 1


def test_fake_closes_promptly_with_a_request_in_flight() -> None:
    errors: list[BaseException] = []
    with FakeAssistanceCentre(mode="slow", slow_s=30) as centre:
        def call() -> None:
            with AssistanceCentreClient(centre.url, timeout_s=10) as client:
                try:
                    client.send_incident(INCIDENT, idempotency_key="k")
                except TransientUpstreamError as exc:
                    errors.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        assert centre.wait_until(lambda: len(centre.requests) == 1)
        watch = Stopwatch().__enter__()
    watch.__exit__()
    caller.join(timeout=5)
    assert watch.elapsed < 2.0  # not the 30 s the handler meant to sleep
    assert not caller.is_alive()
    assert len(errors) == 1  # closed without an answer: the client sees a transient failure


def test_fake_rejects_unknown_mode() -> None:
    with FakePush() as fake, pytest.raises(ValueError, match="unknown mode"):
        fake.mode = "teapot"
